#!/bin/bash
cd /work/wt9
while pgrep -f "work_dirs/batch[34].sh" > /dev/null; do sleep 10; done
git rev-parse HEAD
export PYTHONPATH=/work/wt9 OMP_NUM_THREADS=1
PY=/tmp/fresh1/.venv/bin/python
E="$PY tools/eval_matrix.py --threads 1"
for det in retinanet_r18q faster_rcnn_r18q fcos_r18q ssdlite_mbv2q; do
  # G: final defaults + bias correction
  $E --detectors $det --runs mpq_w3 mpq_w2 --work-dir work_dirs/G_default_bc \
     --cfg-options custom_hooks.0.bias_correction=True
done
