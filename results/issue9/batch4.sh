#!/bin/bash
cd /work/wt9
while pgrep -f "work_dirs/batch3.sh" > /dev/null; do sleep 10; done
git rev-parse HEAD
export PYTHONPATH=/work/wt9 OMP_NUM_THREADS=1
PY=/tmp/fresh1/.venv/bin/python
E="$PY tools/eval_matrix.py --threads 1"
for det in retinanet_r18q faster_rcnn_r18q fcos_r18q ssdlite_mbv2q; do
  # F: the final defaults (joint error feedback with act-order, budget on both)
  $E --detectors $det --runs mpq_w3 mpq_w2 --work-dir work_dirs/F_default
done
