#!/bin/bash
# A: before (no feedback, memory-only budget); B: no feedback, budget on both
cd /work/wt9
export PYTHONPATH=/work/wt9 OMP_NUM_THREADS=1
PY=/tmp/fresh1/.venv/bin/python
for det in retinanet_r18q faster_rcnn_r18q fcos_r18q ssdlite_mbv2q; do
  $PY tools/eval_matrix.py --detectors $det --runs mpq_w3 mpq_w2 --threads 1 --work-dir work_dirs/A_nofb_mem \
     --cfg-options custom_hooks.0.error_feedback=False custom_hooks.0.budget_on=memory
  $PY tools/eval_matrix.py --detectors $det --runs mpq_w3 mpq_w2 --threads 1 --work-dir work_dirs/B_nofb_both \
     --cfg-options custom_hooks.0.error_feedback=False custom_hooks.0.budget_on=both
done
