#!/bin/bash
# mAP of the int8 graphs through tools/test.py --onnx, against the PyTorch W4A8 model,
# onnxruntime's quantize_static W8A8 and FP32, on the 500 synthetic test images.
# Prints one line per run: <name> <graph> <metric line>. Output: work_dirs/i11
set -e
W=${W:-work_dirs/i11}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
BITS="4 8 3" results/issue11/export_all.sh
ls $W/*.pth
metric() { grep -E "pascal_voc/mAP:|bbox_mAP_copypaste" $1 | tail -1 | sed -E 's/.*(pascal_voc\/mAP: [0-9.]+|bbox_mAP_copypaste: [0-9.]+).*/\1/'; }
for det in retinanet_r18q fcos_r18q ssdlite_mbv2q; do
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
      b=${n0:1:1}; n=${det}_${ds}_$n0
      if [ $b = 8 ]; then c=configs/mpq/${det}_synth_${ds}_mpq_w4.py; o="--cfg-options custom_hooks.0.bits=8"; else c=configs/mpq/${det}_synth_${ds}_mpq_w$b.py; o=; fi
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
