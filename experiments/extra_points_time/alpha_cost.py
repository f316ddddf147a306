"""R50 W4A8 with an allocation that charges each extra row (d + alpha) * positions
(a per-output cost): int8 graph vs the same graph without extra points, 1 thread.

    python experiments/extra_points_time/alpha_cost.py 400 work_dirs/experiments/extra_points_time/alpha400 [repeats]
"""
import sys, os, os.path as osp, statistics, numpy as np, torch
alpha = float(sys.argv[1]); out = sys.argv[2]
import mpq_det.quant.allocation as A
orig = A._Costs.__init__
def init(self, point_sets, sizes, wbits, positions, groups, budget, budget_on):
    orig(self, point_sets, sizes, wbits, positions, groups, budget, budget_on)
    self.comp = [int(round((int(d) + alpha) * float(p))) for d, p in zip(sizes, positions)]
    self.comp_total = sum(c * m for c, m in zip(self.C, self.comp))
A._Costs.__init__ = init
import mpq_det.deploy.tools as T
from mpq_det.deploy.qdq import build_int8_onnx
from mpq_det.deploy.convert import write_bytes_atomic
from mpq_det.deploy.ort import time_graphs
# reuse r50_graphs' model building by patching the variant writer
import mmdet
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmdet.registry import MODELS
from mpq_det.quantizer import MultipointQuantizer
from mpq_det.model_pass import summarize
os.makedirs(out, exist_ok=True)
cfg = Config.fromfile(osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', 'retinanet', 'retinanet_r50_fpn_1x_coco.py'))
init_default_scope('mmdet')
mc = cfg.model; T._strip_pretrained(mc)
torch.manual_seed(0)
model = MODELS.build(mc).eval()
g = torch.Generator().manual_seed(0)
batches = [torch.randn(1, 3, 320, 320, generator=g) for _ in range(2)]
quantizer = MultipointQuantizer(bits=4, budget=0.05, activations=dict(bits=8), calib=dict(seed=0))
@torch.no_grad()
def calibrate(m, reference):
    for x in batches:
        if reference is not None: reference(x, None, mode='tensor')
        m(x, None, mode='tensor')
result, plans, _ = quantizer.quantize(model, calibrate, 'x')
sm = summarize(result, model, plans)
print(f'alpha {alpha}: memory {sm["memory_overhead"]:.2%} MACs {sm["compute_overhead"]:.2%}', flush=True)
from mpq_det.modules import QConv2d
rows = [(n, int(m.npoints.sum()) - m.out_channels, m.out_channels) for n, m in model.named_modules() if isinstance(m, QConv2d) and int(m.npoints.sum()) > m.out_channels]
print('layers with extra points:', len(rows), rows[:12])
paths = {}
for kind, kw in (('int8', {}), ('one', dict(first_point_only=True))):
    proto, _ = build_int8_onnx(model, batches[0], batches, **kw)
    paths[kind] = osp.join(out, f'{kind}.onnx'); write_bytes_atomic(proto.SerializeToString(), paths[kind])
x = np.random.default_rng(0).standard_normal((1, 3, 800, 1344)).astype(np.float32)
t = time_graphs(paths, x, 1, 2, int(sys.argv[3]) if len(sys.argv) > 3 else 5)
med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
print(f'alpha {alpha}: int8 {med["int8"]:.1f} ms, one point {med["one"]:.1f} ms, extra {med["int8"] / med["one"] - 1:.1%}')
