#!/bin/bash
# The int8 graph at the hook's defaults (full grid, target 'int8': the extra points at
# power-of-two scale ratios merge into int8 rows): mAP of the W4A8 and W3A8 exports'
# int8 ONNX graphs against their PyTorch models, on the 500 synthetic test images, VOC
# and COCO, for the three one-stage detectors (part 1; any machine), then speed and the
# extra points' time overhead against the same graphs without them (part 2; run it on a
# quiet machine: nothing else on either core). Outputs go to $W/int8_defaults.
source "$(dirname "$0")/../common.sh"
set -e
HERE=experiments/int8_defaults
W=$W/int8_defaults
mkdir -p $W
metric() { grep -E "pascal_voc/mAP:|bbox_mAP_copypaste" $1 | tail -1 | sed -E 's/.*(pascal_voc\/mAP: [0-9.]+|bbox_mAP_copypaste: [0-9.]+).*/\1/'; }
A8="custom_hooks.0.activations.bits=8"

if [ "${1:-all}" != speed ]; then
{
for det in $ONE_STAGE; do
  for ds in voc coco; do
    for b in 4 3; do
      n=${det}_${ds}_w${b}a8; c=configs/mpq/${det}_synth_${ds}_mpq_w$b.py
      # a pair whose two mAPs are in its logs is not run again (resume)
      if [ -z "$(metric $W/$n.pt.test.log 2>/dev/null)" ]; then
        $PY tools/export.py $c data/checkpoints/$det.pth $W/$n.pth --cfg-options $A8 > $W/$n.export.log 2>&1
        $PY tools/deploy.py $c $W/$n.pth --out $W/$n.onnx > $W/$n.deploy.log 2>&1
        $PY tools/test.py $c $W/$n.pth --onnx $W/$n.onnx --work-dir $W/t_$n > $W/$n.int8.test.log 2>&1
        $PY tools/test.py $c $W/$n.pth --work-dir $W/t_${n}_pt > $W/$n.pt.test.log 2>&1
      fi
      echo "$det $ds w${b}a8_deploy $(grep -E '^int8:' $W/$n.deploy.log)"
      echo "$det $ds w${b}a8_int8 $(metric $W/$n.int8.test.log)"
      echo "$det $ds w${b}a8_pytorch $(metric $W/$n.pt.test.log)"
    done
  done
done
} | tee $W/map_table.out
$PY experiments/int8_deploy/tables.py $W/map_table.out | tee $HERE/map.md
fi

if [ "${1:-all}" != map ]; then
# the same W4A8 VOC exports without their extra points (budget 0), and the FP32 graphs
for det in $ONE_STAGE; do
  c=configs/mpq/${det}_synth_voc_mpq_w4.py
  $PY tools/export.py $c data/checkpoints/$det.pth $W/${det}_one_point.pth \
      --cfg-options $A8 custom_hooks.0.budget=0 > $W/${det}_one_point.export.log 2>&1
  $PY tools/deploy.py $c $W/${det}_one_point.pth --out $W/${det}_one_point.onnx \
      --fp32 $W/${det}_fp32.onnx > $W/${det}_one_point.deploy.log 2>&1
done
args=()
for det in $ONE_STAGE; do
  args+=(--graphs $det $W/${det}_fp32.onnx $W/${det}_voc_w4a8.onnx
         --graphs ${det}_one_point $W/${det}_fp32.onnx $W/${det}_one_point.onnx)
done
taskset -c 1 $PY tools/bench_deploy.py "${args[@]}" --threads 1 --repeats 50 --no-memory \
    --work-dir $W/bench_deploy | tee $HERE/bench_small.log
$PY tools/bench_deploy.py --r50 --threads 1 2 --r50-repeats 7 --no-memory \
    --work-dir $W/bench_deploy | tee $HERE/bench_r50.log
fi
