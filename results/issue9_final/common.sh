# Shared by batch_*.sh: run from the repository root; the runs of the README were made
# in worktrees of the commit each batch printed (git rev-parse HEAD), one thread each.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
git rev-parse HEAD
export OMP_NUM_THREADS=1
E="${PY:-.venv/bin/python} tools/eval_matrix.py --threads 1"
W=work_dirs/final

# The ablation rows A-G, S, SC of README "Accuracy and cost levers", at W3 and W2.
ablation() {
  local det=$1
  $E --detectors $det --runs mpq_w3 mpq_w2 --work-dir $W/A --cfg-options custom_hooks.0.error_feedback=False custom_hooks.0.budget_on=memory
  $E --detectors $det --runs mpq_w3 mpq_w2 --work-dir $W/B --cfg-options custom_hooks.0.error_feedback=False
  $E --detectors $det --runs mpq_w3 mpq_w2 --work-dir $W/C --cfg-options custom_hooks.0.budget_on=memory
  $E --detectors $det --runs mpq_w3 mpq_w2 --work-dir $W/D --cfg-options custom_hooks.0.feedback_order=False
  $E --detectors $det --runs mpq_w3 mpq_w2 --work-dir $W/E --cfg-options custom_hooks.0.feedback_mode=first custom_hooks.0.feedback_points=1
  $E --detectors $det --runs mpq_w3 mpq_w2 --work-dir $W/G --cfg-options custom_hooks.0.bias_correction=True
  $E --detectors $det --runs mpq_w3 mpq_w2 --work-dir $W/S --cfg-options custom_hooks.0.sequential=True
  $E --detectors $det --runs mpq_w3 mpq_w2 --work-dir $W/SC --cfg-options custom_hooks.0.sequential=components
}
