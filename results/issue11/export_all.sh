#!/bin/bash
# W4A8 (and W3A8, W8A8) exports of the three one-stage detectors, VOC and COCO, with
# the hook's defaults; the float FP32 and onnxruntime W8A8 graphs. Output: work_dirs/i11
set -e
W=${W:-work_dirs/i11}
mkdir -p $W
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
for det in retinanet_r18q fcos_r18q ssdlite_mbv2q; do
  for ds in voc coco; do
    for b in ${BITS:-4}; do
      n=${det}_${ds}_w${b}a8
      [ -f $W/$n.pth ] && continue
      if [ $b = 8 ]; then c=configs/mpq/${det}_synth_${ds}_mpq_w4.py; o="custom_hooks.0.bits=8"; else c=configs/mpq/${det}_synth_${ds}_mpq_w$b.py; o=; fi
      $PY tools/export.py $c data/checkpoints/$det.pth $W/$n.pth --cfg-options custom_hooks.0.act_bits=8 $o > $W/$n.export.log 2>&1
    done
  done
done
