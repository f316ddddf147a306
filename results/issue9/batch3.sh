#!/bin/bash
# all with the code of commit $(git rev-parse --short HEAD) (logged below)
cd /work/wt9
git rev-parse HEAD
export PYTHONPATH=/work/wt9 OMP_NUM_THREADS=1
PY=/tmp/fresh1/.venv/bin/python
E="$PY tools/eval_matrix.py --threads 1"
for det in retinanet_r18q faster_rcnn_r18q fcos_r18q ssdlite_mbv2q; do
  # D: the new defaults (joint error feedback, budget on memory and compute)
  $E --detectors $det --runs mpq_w3 mpq_w2 --work-dir work_dirs/D_fbjoint_both
done
for det in retinanet_r18q faster_rcnn_r18q fcos_r18q ssdlite_mbv2q; do
  # B: no error feedback, budget on both
  $E --detectors $det --runs mpq_w3 mpq_w2 --work-dir work_dirs/B_nofb_both \
     --cfg-options custom_hooks.0.error_feedback=False
done
for det in retinanet_r18q faster_rcnn_r18q fcos_r18q ssdlite_mbv2q; do
  # C: joint error feedback, memory-only budget
  $E --detectors $det --runs mpq_w3 mpq_w2 --work-dir work_dirs/C_fbjoint_mem \
     --cfg-options custom_hooks.0.budget_on=memory
done
for det in retinanet_r18q faster_rcnn_r18q; do
  # E: feedback 'first' (first point re-rounded, greedy points after it), budget on both
  $E --detectors $det --runs mpq_w3 mpq_w2 --work-dir work_dirs/E_fbfirst_both \
     --cfg-options custom_hooks.0.feedback_mode=first custom_hooks.0.feedback_points=1
done
for det in retinanet_r18q faster_rcnn_r18q fcos_r18q ssdlite_mbv2q; do
  $E --detectors $det --runs mpq_w4 --work-dir work_dirs/D_fbjoint_both
done
