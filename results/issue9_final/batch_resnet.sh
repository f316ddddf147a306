source "$(dirname "$0")/common.sh"
$E --detectors retinanet_r18q --runs fp mpq_w4 mpq_w3 mpq_w2 rtn_w3 mse_w3 ocs_w3 mpq_w3_fl8 rtn_w3_fl8 --work-dir $W/matrix
for det in faster_rcnn_r18q fcos_r18q; do
  $E --detectors $det --runs fp mpq_w4 mpq_w3 mpq_w2 rtn_w3 mse_w3 ocs_w3 --work-dir $W/matrix
done
for det in retinanet_r18q faster_rcnn_r18q fcos_r18q; do
  ablation $det
done
echo BATCH DONE
