"""Deliberate breaks of the activation levers, each patched into a copy of the
package (never the working tree) while the tests that guard them run; one line per
break: which of the three test groups failed (caught) and which passed.

    python experiments/a4_ranges/breaks.py [WORD ...]   # only the breaks naming a WORD
"""
import os
import os.path as osp
import shutil
import subprocess
import sys
import tempfile

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TESTS = {
    'unit': ['tests/test_act_ranges.py'],
    'e2e': ['tests/test_hook_args_e2e.py', '-k',
            'test_activations or (lever_reaches and (activations or protocol))'],
    'guard': ['tests/test_accuracy_guards.py', '-k', 'w4a4_literature'],
}
BREAKS = [
    ('the range search keeps min/max', 'mpq_det/quant/act_ranges.py',
     'k = int(torch.argmin(err))', 'k = 0'),
    ("'fisher' drops its weights (plain MSE)", 'mpq_det/model_pass.py',
     'lo, hi = search_range(x, lo, hi, bits, weight=g2)',
     'lo, hi = search_range(x, lo, hi, bits, weight=None)'),
    ('the image layer takes the bits of the others', 'mpq_det/model_pass.py',
     'if image and self.image_bits is not None:', 'if False:'),
    ('activations.layer_bits ignored', 'mpq_det/model_pass.py',
     '            if fnmatch.fnmatchcase(name, g):\n                return b\n',
     '            if fnmatch.fnmatchcase(name, g):\n                pass\n'),
    ('activations.shrink ignored', 'mpq_det/model_pass.py',
     'lo, hi = shrink_range(lo, hi, acts.shrink)', 'lo, hi = lo, hi'),
    ('activations.fit ignored', 'mpq_det/model_pass.py',
     "    if acts.fit == 'float':\n        return col.stats, ranges, image",
     "    if True:\n        return col.stats, ranges, image"),
    ('the hook passes no backward function', 'mpq_det/hook.py',
     "backward=score_backward(loader, q.calib['seed']))", 'backward=None)'),
    ("protocol='literature' quantizes the heads", 'mpq_det/quantizer.py',
     "if self.protocol == 'literature' and 'head' not in self.explicit:", 'if False:'),
    ("protocol='literature' leaves the first conv at the base bits", 'mpq_det/quantizer.py',
     'out[first] = LITERATURE_FIRST_BITS', 'pass'),
    ('raw logits instead of score space', 'mpq_det/sensitivity.py',
     'pairs.append((cls, (s * (1 - s)).reshape(cls.shape)))',
     'pairs.append((cls, torch.ones_like(cls)))'),
]

work = tempfile.mkdtemp(prefix='a4_breaks_')
for d in ('mpq_det', 'tests', 'configs', 'tools'):
    shutil.copytree(osp.join(ROOT, d), osp.join(work, d),
                    ignore=shutil.ignore_patterns('__pycache__'))
os.makedirs(osp.join(work, 'data'))
for d in ('checkpoints', 'synth'):
    os.symlink(osp.join(ROOT, 'data', d), osp.join(work, 'data', d))
env = dict(os.environ, PYTHONPATH=work)
only = sys.argv[1:]
for name, path, a, b in BREAKS:
    if only and not any(w in name for w in only):
        continue
    f = osp.join(work, path)
    src = open(f).read()
    assert src.count(a) == 1, name
    open(f, 'w').write(src.replace(a, b))
    out = []
    try:
        for group, args in TESTS.items():
            r = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-x', '-p',
                                'no:cacheprovider', *args], cwd=work, env=env,
                               capture_output=True, text=True)
            failed = [l.split(' ')[1] for l in r.stdout.splitlines()
                      if l.startswith('FAILED')]
            out.append(f'{group}: ' + ('caught by ' + ', '.join(failed) if r.returncode
                                       else 'passed'))
        print(f'{name}: ' + '; '.join(out), flush=True)
    finally:
        open(f, 'w').write(src)
shutil.rmtree(work)
