"""Deliberate breaks of the sequential statistics, each patched into the source in turn
while tests/test_sequential.py runs; one line per break: pytest's exit code (non-zero:
caught) and its summary. The source is restored after each.

    python experiments/sequential_test_breaks/breaks.py
"""
import subprocess, sys
BREAKS = [
 ('target_weight returns W', 'mpq_det/quant/stats.py',
  "        if self.cross_acc is None:\n            return W.detach().float().clone()",
  "        if True:\n            return W.detach().float().clone()"),
 ('reference rows from new positions', 'mpq_det/model_pass.py',
  "                rows, _ = self._rows(m, x, idx)",
  "                rows, _ = self._rows(m, x)"),
 ('unpaired ignored', 'mpq_det/model_pass.py',
  "        if i and not unpaired(st):", "        if i:"),
 ('no ridge toward W in A', 'mpq_det/quant/stats.py',
  "        rhs = torch.bmm(A + lam * eye, Wg.transpose(1, 2))",
  "        rhs = torch.bmm(A, Wg.transpose(1, 2))"),
 ('quantize_points ignores counts', 'mpq_det/quant/multipoint.py',
  "    return select_points(ps, npoints), ps\n",
  "    return select_points(ps, torch.ones_like(npoints)), ps\n"),
]
for name, path, a, b in BREAKS:
    src = open(path).read()
    assert a in src, name
    open(path, 'w').write(src.replace(a, b, 1))
    try:
        r = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-x', 'tests/test_sequential.py'],
                           capture_output=True, text=True)
        last = [l for l in r.stdout.splitlines() if 'passed' in l or 'failed' in l][-1:]
        print(f'{name}: rc={r.returncode} {last}')
    finally:
        open(path, 'w').write(src)
