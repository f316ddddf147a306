"""Hook settings scored on one detector, loaded once (the exploration runs in logs/):

    python experiments/a4_ranges/settings.py DETECTOR N_TEST_IMAGES "SETTING" ...

each SETTING the keyword arguments of MultipointQuantizer, e.g.
"protocol='literature', activations=dict(bits=4, range='fisher')"; prints VOC / COCO
mAP (x100) and the calibration + quantization time of each (32 train images).
"""
import sys, time, copy, torch
sys.path.insert(0, 'experiments/a4_ranges')
from probe import *
from mpq_det.calibration import build_calib_loader, run_calibration
from mpq_det.quantizer import MultipointQuantizer
from mpq_det.sensitivity import score_backward
torch.set_num_threads(1)
det = sys.argv[1]; N = int(sys.argv[2])
cfg, runner, fp = setup(det, N, f'/tmp/probe{N}_' + det)
loader = build_calib_loader(cfg, 'train', 32, 4, 0)
def q(**kw):
    m = copy.deepcopy(fp); t = time.perf_counter()
    res, plans, _ = MultipointQuantizer(**kw).quantize(m, lambda mm, ref: run_calibration(mm, loader, False, ref), backward=score_backward(loader, 0))
    return m, res, time.perf_counter() - t
for spec in sys.argv[3:]:
    kw = eval(f'dict({spec})')
    m, res, t = q(**kw)
    print(det, spec, ['%.2f' % v for v in evaluate(runner, m)], 'calib+quant %.1fs' % t, flush=True)
