"""The algorithm core, the quantized modules and the model pass need torch only: a
plain-torch user (or a GPU machine without mmcv/mmdet/mmengine) quantizes any model
with ``MultipointQuantizer`` and the hook's defaults."""
import os
import os.path as osp
import subprocess
import sys

HERE = osp.dirname(osp.abspath(__file__))
# the checkout's package and tests/ (tinynet), whether or not mpq_det is installed
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([osp.dirname(HERE), HERE]))

SCRIPT = r'''
import sys

# as if mmdet, mmengine and mmcv were not installed: None in sys.modules makes their
# import fail and importlib.util.find_spec report them absent
for name in ('mmdet', 'mmengine', 'mmcv'):
    sys.modules[name] = None
import torch
import mpq_det
from mpq_det import MultipointQuantizer
from mpq_det.modules import QConv2d, QLinear
from tinynet import Tiny, calibrate_on

assert not hasattr(mpq_det, 'MultipointQuantHook')
torch.manual_seed(0)
model = Tiny().eval()
x = torch.randn(8, 3, 16, 16)
with torch.no_grad():
    ref = model(x)
for seq in (False, True):
    m = Tiny().eval()
    m.load_state_dict(model.state_dict())
    q = MultipointQuantizer(bits=4, budget=0.1, activations=dict(bits=8),
                            stats=dict(sequential=seq))
    result, plans, skipped = q.quantize(m, calibrate_on([x]))
    layers = [l for l in m.modules() if isinstance(l, (QConv2d, QLinear))]
    assert len(layers) == 5 and not skipped, (layers, skipped)
    assert all(l.act_bits == 8 for l in layers)
    assert sum(int(l.npoints.sum()) - l.npoints.numel() for l in layers) > 0
    with torch.no_grad():
        err = float((m(x) - ref).norm() / ref.norm())
    assert 0 < err < 0.2, err
loaded = sorted(n for n, m in sys.modules.items()
                if m is not None and n.split('.')[0] in ('mmdet', 'mmengine', 'mmcv'))
assert not loaded, loaded
print('ok')
'''


def test_model_pass_imports_and_runs_without_mmdet():
    out = subprocess.run([sys.executable, '-c', SCRIPT], env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith('ok'), out.stderr[-3000:]


def test_hide_really_hides_mmdet():
    """The check above would pass vacuously if hiding failed to hide."""
    probe = SCRIPT.split('import torch')[0] + 'import mmdet\n'
    out = subprocess.run([sys.executable, '-c', probe], env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and 'ModuleNotFoundError' in out.stderr, out.stderr
