"""Exploration harness (not a table script): one detector loaded once, a quantized
model per setting, scored on the first N test images (COCO + VOC in one pass); and
the prototypes' pieces (value samples, sensitivity samples, the cross-term criterion,
bias correction of the activation error)."""
from __future__ import annotations

import copy
import os
import os.path as osp
import sys
import time

import torch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)


def setup(det: str, n: int, wd: str):
    import mpq_det  # noqa: F401
    from mmengine.runner import Runner
    from mpq_det.benchmark import limit_test_images
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    from benchmark import our_cfg
    cfg = our_cfg(det)
    for k in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[k].num_workers = 0
        cfg[k].persistent_workers = False
    cfg.default_hooks.logger.interval = 10 ** 6
    cfg.log_level = 'WARNING'
    cfg.work_dir = wd
    cfg.load_from = osp.join(ROOT, f'data/checkpoints/{det}.pth')
    if n:
        limit_test_images(cfg, n, wd)
    runner = Runner.from_cfg(cfg)
    runner.load_or_resume()
    fp = copy.deepcopy(runner.model).eval()
    return cfg, runner, fp


def evaluate(runner, model) -> tuple[float, float]:
    loop = runner.test_loop
    model.eval()
    with torch.no_grad():
        for batch in loop.dataloader:
            loop.evaluator.process(data_samples=model.test_step(batch), data_batch=batch)
    m = loop.evaluator.evaluate(len(loop.dataloader.dataset))
    return 100 * m['pascal_voc/mAP'], 100 * m['coco/bbox_mAP']


def quantize(fp, cfg, **kw):
    """A copy of ``fp`` quantized by MultipointQuantizer(**kw) on 32 train images."""
    from mpq_det.calibration import build_calib_loader, run_calibration
    from mpq_det.quantizer import MultipointQuantizer
    loader = build_calib_loader(cfg, 'train', 32, 4, 0)
    m = copy.deepcopy(fp)
    t = time.perf_counter()
    res, plans, _ = MultipointQuantizer(**kw).quantize(
        m, lambda mm, ref: run_calibration(mm, loader, False, ref))
    return m, res, time.perf_counter() - t


def collect(fp, cfg, names, per_batch=16384, seed=0):
    """{name: (min, max, values sample)} of the FP model's layer inputs."""
    from mpq_det.calibration import build_calib_loader, run_calibration
    loader = build_calib_loader(cfg, 'train', 32, 4, 0)
    g = torch.Generator().manual_seed(seed)
    out = {n: [float('inf'), float('-inf'), []] for n in names}
    hs = []
    for n in names:
        def hook(m, inp, n=n):
            x = inp[0].detach().float().flatten()
            o = out[n]
            o[0] = min(o[0], float(x.min())); o[1] = max(o[1], float(x.max()))
            idx = torch.randint(x.numel(), (per_batch,), generator=g)
            o[2].append(x[idx])
        hs.append(fp.get_submodule(n).register_forward_pre_hook(hook))
    try:
        run_calibration(fp, loader, False)
    finally:
        for h in hs:
            h.remove()
    return {n: (a, b, torch.cat(v)) for n, (a, b, v) in out.items()}


def qlayers(model):
    from mpq_det.modules import QConv2d, QLinear
    return {n: m for n, m in model.named_modules() if isinstance(m, (QConv2d, QLinear))}


def set_ranges(model, ranges: dict, bits: dict):
    for n, l in qlayers(model).items():
        if n in ranges:
            l.set_act_range(*ranges[n], act_bits=bits.get(n, 4))


def collect_sens(fp, cfg, names, out_fn, per_batch=16384, seed=0, nv=1):
    """{name: (values, g2)}: samples of each layer's FP input and of the squared
    gradient of a random projection of ``out_fn(model, inputs)`` (a list of
    (tensor, weight) pairs) with respect to it (Hutchinson: E g^2 = diag J^T W J)."""
    from mpq_det.calibration import build_calib_loader
    loader = build_calib_loader(cfg, 'train', 32, 4, 0)
    g = torch.Generator().manual_seed(seed)
    out = {n: ([], []) for n in names}
    acts = {}
    hs = []
    for n in names:
        def hook(m, inp, n=n):
            x = inp[0]
            if x.requires_grad:
                x.retain_grad()
            acts[n] = x
        hs.append(fp.get_submodule(n).register_forward_pre_hook(hook))
    fp.eval()
    try:
        for batch in loader:
            data = fp.data_preprocessor(batch, False)
            inputs = data['inputs'].float().requires_grad_()
            g2s = {n: 0 for n in names}
            for k in range(nv):
                acts.clear()
                fp.zero_grad(set_to_none=True)
                s = 0
                for t, w in out_fn(fp, inputs):
                    v = torch.randint(0, 2, t.shape, generator=g).float() * 2 - 1
                    s = s + (v * w * t).sum()
                s.backward()
                for n in names:
                    g2s[n] = g2s[n] + acts[n].grad.detach() ** 2 / nv
            for n in names:
                x = acts[n].detach().flatten()
                idx = torch.randint(x.numel(), (per_batch,), generator=g)
                out[n][0].append(x[idx])
                out[n][1].append(g2s[n].flatten()[idx])
    finally:
        for h in hs:
            h.remove()
    fp.zero_grad(set_to_none=True)
    return {n: (torch.cat(a), torch.cat(b)) for n, (a, b) in out.items()}


def search(v, lo, hi, w=None, b=4, factors=None, p=2):
    """(err, lo', hi') minimizing sum w |x - Q(x)|^p over clip factors."""
    from mpq_det.quant.act_ranges import quantize_to_range, DEFAULT_FACTORS
    factors = factors or DEFAULT_FACTORS
    best = None
    for fl in (factors if lo < 0 else (1.0,)):
        for fh in factors:
            e = (quantize_to_range(v, lo * fl, hi * fh, b) - v).abs() ** p
            e = float((e if w is None else e * w).sum())
            if best is None or e < best[0]:
                best = (e, lo * fl, hi * fh)
    return best


def candidates(lo, hi, factors):
    fl = factors if lo < 0 else (1.0,)
    return [(lo * a, hi * b) for a in fl for b in factors]


def collect_prop(fp, cfg, names, out_fn, ranges0, factors, seed=0, nv=2, b=4):
    """{name: (cands, full (K,), diag (K,))}: for each candidate range of each layer
    (alone, the other layers FP), sum over images and random projections v of
    (g . (Q(x) - x))^2 (full: the linearized output error with its correlations)
    and of sum g^2 (Q(x) - x)^2 (diag)."""
    from mpq_det.calibration import build_calib_loader
    from mpq_det.quant.act_ranges import quantize_to_range
    loader = build_calib_loader(cfg, 'train', 32, 4, 0)
    g = torch.Generator().manual_seed(seed)
    cands = {n: candidates(*ranges0[n], factors) for n in names}
    full = {n: torch.zeros(len(cands[n]), dtype=torch.float64) for n in names}
    diag = {n: torch.zeros(len(cands[n]), dtype=torch.float64) for n in names}
    acts = {}
    hs = []
    for n in names:
        def hook(m, inp, n=n):
            x = inp[0]
            if x.requires_grad:
                x.retain_grad()
            acts[n] = x
        hs.append(fp.get_submodule(n).register_forward_pre_hook(hook))
    fp.eval()
    try:
        for batch in loader:
            data = fp.data_preprocessor(batch, False)
            inputs = data['inputs'].float().requires_grad_()
            for k in range(nv):
                acts.clear()
                fp.zero_grad(set_to_none=True)
                s = 0
                for t, w in out_fn(fp, inputs):
                    v = torch.randint(0, 2, t.shape, generator=g).float() * 2 - 1
                    s = s + (v * w * t).sum()
                s.backward()
                with torch.no_grad():
                    for n in names:
                        x, gr = acts[n].detach(), acts[n].grad.detach()
                        B = x.shape[0]
                        for i, (lo, hi) in enumerate(cands[n]):
                            e = quantize_to_range(x, lo, hi, b) - x
                            full[n][i] += float(((gr * e).reshape(B, -1).sum(1) ** 2).sum())
                            diag[n][i] += float((gr * gr * e * e).sum())
    finally:
        for h in hs:
            h.remove()
    fp.zero_grad(set_to_none=True)
    return {n: (cands[n], full[n], diag[n]) for n in names}


def act_bias_correct(model, fp, cfg, names, weight_too=True):
    """Adds to each quantized layer's bias the mean output shift on the calibration
    images between the FP layer on FP inputs and the quantized layer on the same
    inputs (fake-quantized by its own range)."""
    from mpq_det.calibration import build_calib_loader, run_calibration
    loader = build_calib_loader(cfg, 'train', 32, 4, 0)
    q = qlayers(model)
    acc = {n: [0, 0] for n in names}
    hs = []
    for n in names:
        def hook(m, inp, out, n=n):
            x = inp[0].detach()
            yq = q[n](x)
            d = (out.detach() if weight_too else torch.nn.functional.conv2d(
                x, q[n].weight, q[n].bias, m.stride, m.padding, m.dilation, m.groups)) - yq
            acc[n][0] = acc[n][0] + d.transpose(0, 1).reshape(d.shape[1], -1).sum(1)
            acc[n][1] += d.numel() // d.shape[1]
        hs.append(fp.get_submodule(n).register_forward_hook(hook))
    try:
        run_calibration(fp, loader, False)
    finally:
        for h in hs:
            h.remove()
    for n in names:
        l = q[n]
        shift = acc[n][0] / acc[n][1]
        if l.bias is None:
            l.bias = torch.nn.Parameter(shift.clone(), requires_grad=False)
        else:
            l.bias.data += shift
        l.invalidate_cache()


# shared by the criteria prototypes: the literature's protocol, the candidate clip
# factors, and the score-space outputs (sigmoid scores weighted by s(1-s), box deltas by
# their prior's best score) whose error they weigh
LIT = dict(components=dict(head=None), layer_bits={'backbone.conv1': 8})
F = tuple(round(1 - 0.05 * i, 2) for i in range(17))


def score(m, x):
    cls, reg = m._forward(x)
    out = []
    for c, r in zip(cls, reg):
        s = torch.sigmoid(c.detach())
        out.append((c, s * (1 - s)))
        A = r.shape[1] // 4
        sm = s.reshape(s.shape[0], A, -1, *s.shape[2:]).amax(2)   # B A H W
        out.append((r, sm.repeat_interleave(4, 1)))
    return out
