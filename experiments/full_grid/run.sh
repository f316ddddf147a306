#!/bin/bash
# All 2^b codes (grid='full') against the symmetric 2^b - 1 levels, everything else at
# the defaults and the target pinned to 'lowbit' (free point scales, both bounds), so
# that only the grid changes: the four detectors at W3 and W2, RetinaNet and FCOS at W4.
source "$(dirname "$0")/../common.sh"
set -e
HERE=experiments/full_grid
for grid in symmetric full; do
  $E --detectors $DETECTORS --runs mpq_w3 mpq_w2 --work-dir $W/grid_$grid \
     --cfg-options custom_hooks.0.grid=$grid custom_hooks.0.target=lowbit \
     --out $HERE/grid_${grid}_w3w2.md
  $E --detectors retinanet_r18q fcos_r18q --runs mpq_w4 --work-dir $W/grid_$grid \
     --cfg-options custom_hooks.0.grid=$grid custom_hooks.0.target=lowbit \
     --out $HERE/grid_${grid}_w4.md
done
echo "full minus symmetric, VOC / COCO (x100):"
$PY experiments/point_scales/compare.py $HERE/grid_symmetric_w3w2.md $HERE/grid_full_w3w2.md
$PY experiments/point_scales/compare.py $HERE/grid_symmetric_w4.md $HERE/grid_full_w4.md
