#!/bin/bash
# What the free-scale extra points cost in onnxruntime time on RetinaNet-R50 (W4A8), and
# whether charging each extra row a per-output cost in the allocation lowers it: the int8
# graph against the same graph without extra points, then the per-op profile of both.
source "$(dirname "$0")/../common.sh"
set -e
HERE=experiments/extra_points_time
X=$W/extra_points_time
$PY $HERE/alpha_cost.py 400 $X/alpha400 5   # each extra row charged (d + 400) x positions
$PY $HERE/alpha_cost.py 0 $X/alpha0 5       # the hook's cost, d x positions
# per-op time of the R50 int8 graph and of the same graph without extra points, as
# experiments/int8_speed/run.sh wrote them
R50=$W/bench_deploy/r50
$PY $HERE/profile_ort.py $R50/retinanet_r50_int8.onnx $X/int8_nodes.json
$PY $HERE/profile_ort.py $R50/retinanet_r50_int8_one_point.onnx $X/one_point_nodes.json
