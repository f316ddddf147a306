#!/bin/bash
# Weights-only accuracy with power-of-two point scales (points.scales='pow2'), against
# the default free scales (experiments/method_vs_baselines/matrix.md).
source "$(dirname "$0")/../common.sh"
set -e
HERE=experiments/point_scales
$E --detectors retinanet_r18q fcos_r18q faster_rcnn_r18q ssdlite_mbv2q --runs mpq_w4 mpq_w3 mpq_w2 \
   --work-dir $W/pow2 --cfg-options custom_hooks.0.points.scales=pow2 --out $HERE/eval_matrix_pow2.md
$PY $HERE/compare.py experiments/method_vs_baselines/matrix.md $HERE/eval_matrix_pow2.md
