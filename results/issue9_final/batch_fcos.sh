source "$(dirname "$0")/common.sh"
ablation fcos_r18q
echo BATCH DONE
