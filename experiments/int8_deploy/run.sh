#!/bin/bash
# mAP of the int8 ONNX graphs (tools/test.py --onnx) against the PyTorch W4A8 model,
# onnxruntime's own quantize_static W8A8 and the FP32 graph, on the 500 synthetic test
# images, VOC and COCO, for the three one-stage detectors. Prints one line per run
# (<detector> <dataset> <graph> <metric line>), then the table. The graphs stay in
# $W/int8 for experiments/int8_speed/run.sh.
source "$(dirname "$0")/../common.sh"
set -e
W=$W/int8
mkdir -p $W
HERE=experiments/int8_deploy

# config and extra hook options of an export: W2-W4 use their own configs; W8 is the
# w4 config with bits=8
config_of() { if [ $2 = 8 ]; then echo configs/mpq/$1_mpq_w4.py; else echo configs/mpq/$1_mpq_w$2.py; fi; }
bits_opt() { [ $1 = 8 ] && echo custom_hooks.0.bits=8; true; }

# 1. W4A8, W8A8 and W3A8 exports (8-bit activations, the hook's other defaults) with free
#    point scales, and W4A8, W3A8 with points.scales=pow2
for det in $ONE_STAGE; do
  for ds in voc coco; do
    for b in 4 8 3; do
      for ps in free pow2; do
        [ $ps = pow2 ] && [ $b = 8 ] && continue
        n=${det}_${ds}_w${b}a8; [ $ps = pow2 ] && n=${n}_pow2
        [ -f $W/$n.pth ] && continue
        $PY tools/export.py $(config_of ${det}_synth_$ds $b) data/checkpoints/$det.pth $W/$n.pth \
            --cfg-options custom_hooks.0.activations.bits=8 custom_hooks.0.points.scales=$ps \
            $(bits_opt $b) > $W/$n.export.log 2>&1
      done
    done
  done
done

# 2. the graphs and their mAP
metric() { grep -E "pascal_voc/mAP:|bbox_mAP_copypaste" $1 | tail -1 | sed -E 's/.*(pascal_voc\/mAP: [0-9.]+|bbox_mAP_copypaste: [0-9.]+).*/\1/'; }
{
ls $W/*.pth
for det in $ONE_STAGE; do
  for ds in voc coco; do
    fcfg=configs/detectors/${det}_synth_${ds}.py
    $PY tools/deploy.py $fcfg data/checkpoints/$det.pth --fp32 $W/${det}_${ds}_fp32.onnx \
        --ort-static $W/${det}_${ds}_ort_w8a8.onnx > $W/${det}_${ds}_ort.deploy.log 2>&1
    for g in fp32 ort_w8a8; do
      $PY tools/test.py $fcfg data/checkpoints/$det.pth --onnx $W/${det}_${ds}_$g.onnx \
          --work-dir $W/t_${det}_${ds}_$g > $W/${det}_${ds}_$g.test.log 2>&1
      echo "$det $ds $g $(metric $W/${det}_${ds}_$g.test.log)"
    done
    for n0 in w4a8 w8a8 w3a8 w4a8_pow2 w3a8_pow2; do
      b=${n0:1:1}; n=${det}_${ds}_$n0; c=$(config_of ${det}_synth_$ds $b)
      o=; [ $b = 8 ] && o="--cfg-options $(bits_opt $b)"
      $PY tools/deploy.py $c $W/$n.pth --out $W/$n.onnx > $W/$n.deploy.log 2>&1
      echo "$det $ds ${n0}_deploy $(grep -E '^int8:' $W/$n.deploy.log)"
      $PY tools/test.py $c $W/$n.pth --onnx $W/$n.onnx --work-dir $W/t_$n $o > $W/$n.int8.test.log 2>&1
      echo "$det $ds ${n0}_int8 $(metric $W/$n.int8.test.log)"
      if [ $b = 4 ]; then
        $PY tools/test.py $c $W/$n.pth --work-dir $W/t_${n}_pt > $W/$n.pt.test.log 2>&1
        echo "$det $ds ${n0}_pytorch $(metric $W/$n.pt.test.log)"
      fi
    done
  done
done
} | tee $W/map_table.out
$PY $HERE/tables.py $W/map_table.out
