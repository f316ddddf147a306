#!/bin/bash
# Where the model runs, on the full grid: target='int8' (power-of-two point scales;
# merged points cost no compute, the others their rows) against target='lowbit' (free
# scales, every point a row of MACs under the compute bound). The lowbit side is
# experiments/full_grid's full-grid runs (the same settings), so only the int8 runs
# are made here: the four detectors at W3 and W2, RetinaNet and FCOS at W4. The
# tables' last two columns are the overheads as deployed on the run's target.
source "$(dirname "$0")/../common.sh"
set -e
HERE=experiments/int8_target
$E --detectors $DETECTORS --runs mpq_w3 mpq_w2 --work-dir $W/target_int8 \
   --cfg-options custom_hooks.0.grid=full custom_hooks.0.target=int8 \
   --out $HERE/target_int8_w3w2.md
$E --detectors retinanet_r18q fcos_r18q --runs mpq_w4 --work-dir $W/target_int8 \
   --cfg-options custom_hooks.0.grid=full custom_hooks.0.target=int8 \
   --out $HERE/target_int8_w4.md
# W4 of the other two detectors at the defaults (no lowbit run to compare with)
$E --detectors faster_rcnn_r18q ssdlite_mbv2q --runs mpq_w4 --work-dir $W/target_int8 \
   --cfg-options custom_hooks.0.grid=full custom_hooks.0.target=int8 \
   --out $HERE/target_int8_w4_more.md
echo "int8 minus lowbit, VOC / COCO (x100):"
$PY experiments/point_scales/compare.py experiments/full_grid/grid_full_w3w2.md $HERE/target_int8_w3w2.md
$PY experiments/point_scales/compare.py experiments/full_grid/grid_full_w4.md $HERE/target_int8_w4.md
