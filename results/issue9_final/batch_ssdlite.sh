source "$(dirname "$0")/common.sh"
$E --detectors ssdlite_mbv2q --runs fp mpq_w4 mpq_w3 mpq_w2 rtn_w3 mse_w3 ocs_w3 --work-dir $W/matrix
ablation ssdlite_mbv2q
echo BATCH DONE
