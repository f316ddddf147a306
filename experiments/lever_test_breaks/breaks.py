"""Deliberate breaks of the hook's levers, each patched into the source in turn while
the lever tests of tests/test_hook_args_e2e.py run; one line per break: pytest's exit
code (non-zero: caught) and its summary. The source is restored after each.

Each "drops" break makes the hook forget one lever the user set (the quantizer then
sees its default), as a hook that mis-forwards an argument would; the last break keeps
every argument check but turns error feedback off where the quantizer hands the
levers to the model pass.

    python experiments/lever_test_breaks/breaks.py
"""
import subprocess
import sys

HOOK = 'mpq_det/hook.py'
CALL = '        self.quantizer = MultipointQuantizer(**kwargs)\n'


def drops(lever: str) -> str:
    """The hook's quantizer built without ``lever`` ('group' or 'group.key')."""
    group, _, key = lever.partition('.')
    if key:
        fix = (f"kwargs = dict(kwargs, {group}={{k: v for k, v in kwargs['{group}'].items() "
               f"if k != '{key}'}}) if isinstance(kwargs.get('{group}'), dict) else kwargs\n")
    else:
        fix = f"kwargs = {{k: v for k, v in kwargs.items() if k != '{group}'}}\n"
    return '        ' + fix + CALL


LEVERS = ['feedback', 'feedback.points', 'feedback.mode', 'feedback.order',
          'points.budget_on', 'points.rank_by', 'points.scales', 'stats.form',
          'stats.sequential', 'bias_correction', 'allocation', 'max_points', 'activations']
BREAKS = [(f'hook drops {lv}', HOOK, CALL, drops(lv), lv) for lv in LEVERS]
BREAKS.append(('error feedback always off in the quantizer', 'mpq_det/quantizer.py',
               'error_feedback=fb is not None,', 'error_feedback=False,', 'feedback'))

for name, path, a, b, lever in BREAKS:
    src = open(path).read()
    assert a in src, name
    open(path, 'w').write(src.replace(a, b, 1))
    try:
        r = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                            'tests/test_hook_args_e2e.py', '-k',
                            f'lever_reaches and [{lever}] or error_feedback_lowers'],
                           capture_output=True, text=True)
        last = [l for l in r.stdout.splitlines() if 'passed' in l or 'failed' in l][-1:]
        print(f'{name}: rc={r.returncode} {last}', flush=True)
    finally:
        open(path, 'w').write(src)
