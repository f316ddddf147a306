#!/bin/bash
# Multipoint W4/W3/W2 (hook defaults; W2 at budget 0.1) against rtn, mse and ocs at W3,
# every layer of backbone, neck and head quantized, on the 500 synthetic test images.
source "$(dirname "$0")/../common.sh"
set -e
HERE=experiments/method_vs_baselines
$E --detectors $DETECTORS --runs fp mpq_w4 mpq_w3 mpq_w2 rtn_w3 mse_w3 ocs_w3 \
   --work-dir $W/matrix --out $HERE/matrix.md
# the stem and the final classification/regression convs at 8 bits (RetinaNet's *_w3_fl8 configs)
$E --detectors retinanet_r18q --runs mpq_w3_fl8 rtn_w3_fl8 --work-dir $W/matrix --out $HERE/matrix_fl8.md
