#!/bin/bash
# W4A8 (and W3A8, W8A8) exports of the three one-stage detectors, VOC and COCO, with
# the hook's defaults (and point_scales=pow2 for W4, W3); the float FP32 and onnxruntime W8A8 graphs. Output: work_dirs/i11
set -e
W=${W:-work_dirs/i11}
mkdir -p $W
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
for det in retinanet_r18q fcos_r18q ssdlite_mbv2q; do
  for ds in voc coco; do
    for b in ${BITS:-4}; do
      for ps in free pow2; do
        n=${det}_${ds}_w${b}a8; [ $ps = pow2 ] && n=${n}_pow2
        [ -f $W/$n.pth ] && continue
        [ $ps = pow2 ] && [ $b = 8 ] && continue
        if [ $b = 8 ]; then c=configs/mpq/${det}_synth_${ds}_mpq_w4.py; o="custom_hooks.0.bits=8"; else c=configs/mpq/${det}_synth_${ds}_mpq_w$b.py; o=; fi
        $PY tools/export.py $c data/checkpoints/$det.pth $W/$n.pth --cfg-options custom_hooks.0.act_bits=8 custom_hooks.0.point_scales=$ps $o > $W/$n.export.log 2>&1
      done
    done
  done
done
