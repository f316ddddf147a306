#!/bin/bash
# Where SSDLite's W2 loss sits: W2 with the defaults (full grid, int8 target), then
# the same with one group of layers at more bits (layer_bits), one run each:
# depthwise convs (backbone, neck, head: d = 9) at 8 bits, the blocks' 1x1
# projections (linear_conv) at 4, their 1x1 expansions at 4, the head at 4.
source "$(dirname "$0")/../common.sh"
set -e
HERE=experiments/ssdlite_w2
O="custom_hooks.0.grid=full custom_hooks.0.target=int8"
probe() {  # name, layer_bits options
  local name=$1; shift
  $E --detectors ssdlite_mbv2q --runs mpq_w2 --work-dir $W/ssdlite_w2_$name \
     --cfg-options $O "$@" --out $HERE/probe_$name.md
}
probe dw8 'custom_hooks.0.layer_bits.*depthwise_conv*=8' 'custom_hooks.0.layer_bits.*_convs*conv=8'
probe project4 'custom_hooks.0.layer_bits.*linear_conv*=4'
probe expand4 'custom_hooks.0.layer_bits.*expand_conv*=4'
probe head4 'custom_hooks.0.layer_bits.*_convs*=4'
$PY $HERE/where.py $W/target_int8/ssdlite_mbv2q/mpq_w2_both/mpq_report.json \
    experiments/int8_target/target_int8_w3w2.md $HERE/probe_*.md
