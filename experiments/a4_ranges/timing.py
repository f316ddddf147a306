"""Calibration plus quantization against one evaluation of the test split, on the
committed RetinaNet, in one process (the same machine load for both):

    python experiments/a4_ranges/timing.py

prints the seconds of the FP test pass over the 500 test images and of
MultipointQuantizer.quantize (calibration on 32 train images, the score-space backward
pass, the range search and the weights) at W4A4 and W2A4, both protocols.
"""
import copy
import os.path as osp
import sys
import time

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from probe import evaluate, setup  # noqa: E402

from mpq_det.calibration import build_calib_loader, run_calibration  # noqa: E402
from mpq_det.quantizer import MultipointQuantizer  # noqa: E402
from mpq_det.sensitivity import score_backward  # noqa: E402

torch.set_num_threads(1)
cfg, runner, fp = setup('retinanet_r18q', 0, '/tmp/a4_timing')
t = time.perf_counter()
evaluate(runner, copy.deepcopy(fp))
test_s = time.perf_counter() - t
loader = build_calib_loader(cfg, 'train', 32, 4, 0)
rows = [f'| FP test pass, 500 images | {test_s:.1f} |']
for name, kw in [('W4A4 ours', dict(bits=4)),
                 ('W4A4 literature', dict(bits=4, protocol='literature')),
                 ('W2A4 ours', dict(bits=2, budget=0.1)),
                 ('W2A4 literature', dict(bits=2, budget=0.1, protocol='literature'))]:
    m = copy.deepcopy(fp)
    t = time.perf_counter()
    MultipointQuantizer(activations=dict(bits=4), **kw).quantize(
        m, lambda mm, ref: run_calibration(mm, loader, False, ref),
        backward=score_backward(loader, 0))
    rows.append(f'| calibration + quantization, {name} | {time.perf_counter() - t:.1f} |')
print('| what (RetinaNet, one thread) | s |\n|---|---|\n' + '\n'.join(rows))
