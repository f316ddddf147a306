"""The model pass where the model is: a CUDA model is calibrated and quantized on
CUDA, and every quantized buffer stays on its device. Skipped on machines without
CUDA (CPU CI); run it on a GPU machine, where mmdet need not be installed: it uses
the plain-torch ``MultipointQuantizer`` only."""
import pytest
import torch

from mpq_det import MultipointQuantizer
from mpq_det.modules import QConv2d, QLinear

from tinynet import Tiny, calibrate_on

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


@pytest.mark.parametrize('method', ['multipoint', 'rtn', 'mse', 'ocs'])
def test_model_pass_on_cuda(method):
    torch.manual_seed(0)
    cpu = Tiny().eval()
    gpu = Tiny().eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    x = torch.randn(8, 3, 16, 16)
    outs = {}
    for model, dev in ((cpu, 'cpu'), (gpu, 'cuda')):
        q = MultipointQuantizer(bits=3, method=method, budget=0.1, activations=dict(bits=8))
        q.quantize(model, calibrate_on([x.to(dev)]))
        layers = [m for m in model.modules() if isinstance(m, (QConv2d, QLinear))]
        assert len(layers) == 5
        for m in layers:
            for name, b in m.named_buffers():
                assert b.device.type == dev, (dev, name)
        with torch.no_grad():
            outs[dev] = model(x.to(dev)).cpu()
    err = float((outs['cuda'] - outs['cpu']).norm() / outs['cpu'].norm())
    assert err < 1e-3, err  # the same quantization on both devices (float sums aside)
