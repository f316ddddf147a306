#!/bin/bash
# Wall time of the quantization pass on mmdet's RetinaNet-R50 (random init, random
# statistics of the right shapes, calibration excluded; W4, budget 0.05, the hook's
# defaults), on one core and on two (layers side by side), three runs each. Run it on
# a quiet machine: nothing else on either core.
source "$(dirname "$0")/../common.sh"
for t in 1 2; do
  for i in 1 2 3; do
    echo "threads=$t run $i: $($PY tools/bench_quant.py --parts time --threads $t --pass-threads $t | tail -1)"
  done
done
