#!/bin/bash
# Each accuracy and cost lever switched off (or on) one at a time, at W3 (budget 0.05)
# and W2 (budget 0.1), on the four detectors; then the two ablation tables.
source "$(dirname "$0")/../common.sh"
set -e
row() {  # row LABEL [hook options...]
  local label=$1; shift
  [ $# -gt 0 ] && set -- --cfg-options "$@"
  $E --detectors $DETECTORS --runs mpq_w3 mpq_w2 --work-dir $W/levers/$label "$@"
}
row A custom_hooks.0.feedback=None custom_hooks.0.points.budget_on=memory  # the method without both
row B custom_hooks.0.feedback=None
row C custom_hooks.0.points.budget_on=memory
row D custom_hooks.0.feedback.order=False
row E custom_hooks.0.feedback.mode=first custom_hooks.0.feedback.points=1
row F                                                                        # the defaults
row G custom_hooks.0.bias_correction=True
row S custom_hooks.0.stats.sequential=True
row SC custom_hooks.0.stats.sequential=components
$PY experiments/levers_ablation/tables.py $W/levers | tee experiments/levers_ablation/tables.md
