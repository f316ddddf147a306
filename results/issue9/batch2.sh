#!/bin/bash
cd /work/wt9
export PYTHONPATH=/work/wt9 OMP_NUM_THREADS=1
PY=/tmp/fresh1/.venv/bin/python
while pgrep -f batch1.sh > /dev/null; do sleep 10; done
for det in retinanet_r18q faster_rcnn_r18q fcos_r18q ssdlite_mbv2q; do
  # D: the new defaults (joint feedback on 1..4 points, budget on memory and compute)
  $PY tools/eval_matrix.py --detectors $det --runs mpq_w3 mpq_w2 --threads 1 --work-dir work_dirs/D_fbjoint_both
done
for det in retinanet_r18q faster_rcnn_r18q; do
  # E: feedback 'first' (first point re-rounded, greedy residual points after it)
  $PY tools/eval_matrix.py --detectors $det --runs mpq_w3 mpq_w2 --threads 1 --work-dir work_dirs/E_fbfirst_both \
     --cfg-options custom_hooks.0.feedback_mode=first custom_hooks.0.feedback_points=1
done
for det in retinanet_r18q faster_rcnn_r18q fcos_r18q ssdlite_mbv2q; do
  # C: joint feedback, memory-only budget
  $PY tools/eval_matrix.py --detectors $det --runs mpq_w3 mpq_w2 --threads 1 --work-dir work_dirs/C_fbjoint_mem \
     --cfg-options custom_hooks.0.budget_on=memory
done
