"""The model pass where the model is: a CUDA model is calibrated and quantized on
CUDA, and every quantized buffer stays on its device (issue 9, item 6). Skipped on
machines without CUDA (CPU CI); run it on a GPU machine."""
import pytest
import torch
from torch import nn

import mpq_det  # noqa: F401
from mpq_det.components import component_of
from mpq_det.model_pass import QuantSettings, StatsCollector, plan_layers, quantize_model
from mpq_det.modules import QConv2d, QLinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU())
        self.neck = nn.Sequential(nn.Conv2d(32, 24, 1), nn.ReLU())
        self.bbox_head = nn.Sequential(nn.Flatten(), nn.Linear(24 * 8 * 8, 10))

    def forward(self, x):
        return self.bbox_head(self.neck(self.backbone(x)))


@pytest.mark.parametrize('method', ['multipoint', 'rtn', 'mse', 'ocs'])
def test_model_pass_on_cuda(method):
    torch.manual_seed(0)
    cpu = Tiny().eval()
    gpu = Tiny().eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    x = torch.randn(8, 3, 16, 16)
    s = QuantSettings(bits=3, method=method, budget=0.1)
    outs = {}
    for model, dev in ((cpu, 'cpu'), (gpu, 'cuda')):
        plans, _, _ = plan_layers(model, component_of, {c: s for c in ('backbone', 'neck', 'head')})
        col = StatsCollector(plans)
        with torch.no_grad():
            model(x.to(dev))
        col.remove()
        quantize_model(model, plans, col.stats, act_bits=8)
        q = [m for m in model.modules() if isinstance(m, (QConv2d, QLinear))]
        assert len(q) == 5
        for m in q:
            for name, b in m.named_buffers():
                assert b.device.type == dev, (dev, name)
        with torch.no_grad():
            outs[dev] = model(x.to(dev)).cpu()
    err = float((outs['cuda'] - outs['cpu']).norm() / outs['cpu'].norm())
    assert err < 1e-3, err  # the same quantization on both devices (float sums aside)
