#!/bin/bash
# 4-bit activations: each range method (min/max, the uniform shrink 0.7, activation MSE,
# the Fisher-weighted error of the detector's scores) under both protocols, W4A4 and
# W2A4 (budget 0.1), on the 500 synthetic test images; then W3A4/W4A8, rtn and mse
# weights, and the ablation of sequential statistics and of weights fitted to the
# quantized inputs, on RetinaNet. Prints the table (act.md) at the end.
source "$(dirname "$0")/../common.sh"
set -e
HERE=experiments/a4_ranges
OUT=$W/a4
B="$PY tools/benchmark.py --threads 1 --out $OUT"
# RetinaNet: every range method
$B --detectors retinanet_r18q --act W4A4 W2A4 --act-ranges minmax shrink0.7 mse fisher
# the other three: min/max, the uniform shrink and the default
$B --detectors fcos_r18q faster_rcnn_r18q ssdlite_mbv2q --act W4A4 W2A4 \
   --act-ranges minmax shrink0.7 fisher
# RetinaNet: W3A4 and W4A8 with the default ranges; rtn and mse weights beside multipoint
$B --detectors retinanet_r18q --act W3A4 W4A8 --act-ranges fisher
$B --detectors retinanet_r18q --act W4A4 W2A4 --act-ranges fisher --act-methods rtn mse
# ablation: sequential statistics, and the weights fitted to the quantized inputs
$B --detectors retinanet_r18q --act W4A4 W2A4 --act-ranges fisher \
   --act-hook "stats={'sequential': True}"
$B --detectors retinanet_r18q --act W4A4 W2A4 --act-ranges fisher_fitq
$B --report-only > /dev/null
cp $OUT/act.md $HERE/act.md
cat $HERE/act.md
