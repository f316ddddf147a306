#!/bin/bash
cd /work/wt9
while pgrep -f "work_dirs/batch[345].sh" > /dev/null; do sleep 10; done
git rev-parse HEAD
export PYTHONPATH=/work/wt9 OMP_NUM_THREADS=1
PY=/tmp/fresh1/.venv/bin/python
E="$PY tools/eval_matrix.py --threads 1"
for det in fcos_r18q ssdlite_mbv2q; do
  $E --detectors $det --runs mpq_w3 mpq_w2 --work-dir work_dirs/E_fbfirst_both \
     --cfg-options custom_hooks.0.feedback_mode=first custom_hooks.0.feedback_points=1
done
$PY tools/bench_quant.py --threads 1 --parts time --feedback 1
$PY tools/bench_quant.py --threads 1 --parts time --feedback 0
