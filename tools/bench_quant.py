"""Benchmark of the quantization core: errors, H forms, quantization time.

    python tools/bench_quant.py                       # all three parts
    python tools/bench_quant.py --parts errors hforms --threads 1
    python tools/bench_quant.py --parts time --form block

Parts
* errors: relative output-space error sum_j d_j^T H d_j / sum_j w_j^T H w_j (exact H)
  and relative weight-space error, averaged over layers, for rtn, mse, ocs and
  multipoint at several bits and budgets.
* hforms: multipoint quantized with each form of H, scored with the exact H, and
  the time it took.
* time: wall time to quantize every Conv2d/Linear of mmdet's
  retinanet_r50_fpn_1x_coco (random init, random statistics of the right shapes,
  calibration excluded) at 4 bits, budget 0.05, global allocation, defaults
  (error feedback on, as in the hook; --feedback 0 for the pass without it).
  The last line is ``quantize_time_s=<seconds>``.

``errors`` and ``hforms`` take a list of (name, weight, H) triples: weight as in the
module, (C_out, C_in/groups, kh, kw) or (C_out, d), and H a dense (G, d, d) tensor
or an HForm; ``synthetic_layers`` builds them from a small
random conv net. Any caller (e.g. with a trained detector's calibration statistics)
can pass its own list to ``bench_errors`` / ``bench_hforms``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mpq_det.quant import (DEFAULT_FORM, GRIDS, ExactH, HForm,  # noqa: E402
                           InputStats, conv_patches, hform_from_dense, mse_qw,
                           multipoint_quantize, ocs, ocs_fold, random_hform, rtn_qw)
from mpq_det.quantizer import TARGET_POINTS  # noqa: E402


# ---------------------------------------------------------------- synthetic data
def synthetic_layers(seed: int = 0, n_images: int = 16, size: int = 48,
                     max_rows: int = 4096):
    """(name, W (C, d), H (G, d, d)) for the convs of a small random conv net fed
    with smooth random images; H from the real unfolded inputs of each layer."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_images, 3, size // 4, size // 4, generator=g)
    x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
    x = x + 0.3 * torch.randn(n_images, 3, size, size, generator=g)
    specs = [  # name, c_in, c_out, k, stride, groups
        ('stem', 3, 32, 3, 2, 1), ('b1.conv1', 32, 32, 1, 1, 1),
        ('b1.conv2', 32, 32, 3, 1, 1), ('b1.conv3', 32, 64, 1, 1, 1),
        ('b2.conv2', 64, 64, 3, 2, 1), ('b2.dw', 64, 64, 3, 1, 64),
        ('b2.conv3', 64, 128, 1, 1, 1), ('head.conv', 128, 64, 3, 1, 1),
        ('head.reg', 64, 16, 3, 1, 1)]
    out = []
    for name, cin, cout, k, s, groups in specs:
        W = torch.randn(cout, cin // groups, k, k, generator=g)
        W = W * (2.0 / (cin // groups * k * k)) ** 0.5
        # heavy-tailed per-channel scales and a few outliers, as in trained nets
        W = W * torch.exp(0.5 * torch.randn(cout, 1, 1, 1, generator=g))
        mask = torch.rand(W.shape, generator=g) < 0.002
        W = torch.where(mask, W * 6, W)
        st = InputStats(cin // groups * k * k, groups, 'exact')
        st.update(conv_patches(x, k, s, k // 2, 1, groups, max_rows,
                               generator=torch.Generator().manual_seed(seed + 1)))
        out.append((name, W, st.finalize().dense()))
        y = F.conv2d(x, W, None, s, k // 2, 1, groups)
        y = (y - y.mean((0, 2, 3), keepdim=True)) / (y.std((0, 2, 3), keepdim=True)
                                                      + 1e-5)
        x = torch.relu(y + 0.5 * torch.randn(1, cout, 1, 1, generator=g))
    return out


def _exact(H) -> HForm:
    return H if isinstance(H, HForm) else ExactH(H)


def _dense(H):
    return H.dense() if isinstance(H, HForm) else H


def rel_errors(layers, qweights):
    """Mean over layers of relative output error (exact H) and weight error."""
    eo, ew = [], []
    for (name, W, H), Wq in zip(layers, qweights):
        Hx = _exact(H)
        W = W.reshape(W.shape[0], -1)
        D = W - Wq
        eo.append(float(Hx.quad(D).sum() / Hx.quad(W).sum().clamp_min(1e-30)))
        ew.append(float((D * D).sum() / (W * W).sum().clamp_min(1e-30)))
    return sum(eo) / len(eo), sum(ew) / len(ew)


def _forms(layers, form, **opts):
    return [hform_from_dense(_dense(H), form, **opts) for _, _, H in layers]


def quantize_with(method, layers, bits, budget, form=DEFAULT_FORM, hforms=None,
                  **kw):
    """Dequantized weights for one method over all layers (one budget pool)."""
    Ws = [W.reshape(W.shape[0], -1) for _, W, _ in layers]
    if method == 'rtn':
        return [rtn_qw(W, bits).dequantize() for W in Ws]
    if method == 'mse':
        return [mse_qw(W, bits).dequantize() for W in Ws]
    if method == 'ocs':
        out = []
        for _, W, H in layers:
            G = _dense(H).shape[0]
            if G > 1 or budget == 0:      # OCS is for groups=1 only
                out.append(rtn_qw(W.reshape(W.shape[0], -1), bits).dequantize())
                continue
            # W is (C_out, C_in, *k): split input channels, fold back to score
            qw, idx = ocs(W, bits, budget)
            Wsplit = qw.dequantize().reshape(W.shape[0], idx.numel(), *W.shape[2:])
            out.append(ocs_fold(Wsplit, idx, W.shape[1]).reshape(W.shape[0], -1))
        return out
    if method.startswith('mp'):
        if hforms is None:
            hforms = [None] * len(Ws) if method == 'mp-weight' else _forms(layers, form)
        alloc = 'layer' if method == 'mp-layer' else 'global'
        by = 'weight' if method == 'mp-weight' else 'output'
        qws, _ = multipoint_quantize(Ws, hforms, bits, budget, alloc, 4, by, **kw)
        return [q.dequantize() for q in qws]
    raise ValueError(method)


def bench_errors(layers, bits_list=(2, 3, 4), budgets=(0.0, 0.05, 0.1),
                 form=DEFAULT_FORM):
    methods = ['rtn', 'mse', 'ocs', 'mp-weight', 'mp-layer', 'mp']
    print(f'\n## Errors ({len(layers)} layers; mean relative error per layer; '
          f'mp = output-space multipoint, form={form}, global budget; mp-layer = '
          'per-layer budget; mp-weight = weight-space points and allocation; '
          'rtn/mse ignore the budget; ocs expand ratio = budget)')
    print(f'{"bits":>4} {"budget":>6} ' + ' '.join(f'{m + " out":>13} {"wt":>8}'
                                                  for m in methods))
    hf = _forms(layers, form)
    for bits in bits_list:
        for budget in budgets:
            cells = []
            for m in methods:
                Wq = quantize_with(m, layers, bits, budget, form,
                                   hforms=hf if m in ('mp', 'mp-layer') else None)
                eo, ew = rel_errors(layers, Wq)
                cells.append(f'{eo:13.3e} {ew:8.2e}')
            print(f'{bits:>4} {budget:>6.2f} ' + ' '.join(cells))


FORM_VARIANTS = [('exact', {}), ('lowrank', {'rank': 8}), ('lowrank', {'rank': 32}),
                 ('lowrank', {'rank': 64}), ('lowrank', {'rank': 32, 'sketch': 1}),
                 ('block', {'block_size': 32}),
                 ('block', {'block_size': 64}), ('block', {'block_size': 128}),
                 ('diag', {}), ('identity', {})]


def bench_hforms(layers, bits_list=(2, 3, 4), budget=0.05, variants=FORM_VARIANTS):
    print(f'\n## H forms (multipoint, budget {budget} global, max_points 4; error '
          'scored with the exact H; time = points + allocation on these layers, '
          'form construction excluded)')
    print(f'{"form":>24} ' + ' '.join(f'{"rel_out@" + str(b) + "b":>13} {"time_s":>7}'
                                      for b in bits_list))
    for form, opts in variants:
        hf = _forms(layers, form, **opts)
        cells = []
        for bits in bits_list:
            t0 = time.perf_counter()
            qws, _ = multipoint_quantize([W.reshape(W.shape[0], -1)
                                          for _, W, _ in layers], hf, bits, budget)
            dt = time.perf_counter() - t0
            eo, _ = rel_errors(layers, [q.dequantize() for q in qws])
            cells.append(f'{eo:13.4e} {dt:7.3f}')
        label = form + ''.join(f' {k}={v}' for k, v in opts.items())
        print(f'{label:>24} ' + ' '.join(cells))


# ------------------------------------------------------------------- timing part
def retinanet_layers():
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    import mmdet
    register_all_modules()
    path = os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'configs',
                        'retinanet', 'retinanet_r50_fpn_1x_coco.py')
    cfg = Config.fromfile(path)
    cfg.model.backbone.init_cfg = None          # no pretrained download
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)      # default torch init: random weights
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))]


def feedback_for(H, d, taps, groups):
    """The Feedback the model pass would build for a layer whose statistic is the
    random form H: dense (exact) H up to FEEDBACK_MAX_D, else block-diagonal by input
    channel. A low-rank H is densified as U S U^T + diag(r), with a 1% ridge."""
    from mpq_det.quant import (FEEDBACK_MAX_D, ExactH, Feedback,
                               feedback_block_size)
    eye = torch.eye(d)
    if isinstance(H, HForm) and H.kind == 'lowrank':
        dense = torch.bmm(H.Us, H.Us.transpose(1, 2)) + torch.diag_embed(H.r)
    else:
        dense = H.dense()
    dense = dense + 0.01 * dense.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * eye
    if d <= FEEDBACK_MAX_D:
        return Feedback(ExactH(dense))
    b = feedback_block_size(d, taps)
    return Feedback(hform_from_dense(dense, 'block', block_size=b))


def bench_time(form=DEFAULT_FORM, bits=4, budget=0.05, max_points=4, seed=0,
               num_threads=1, feedback=False, budget_on='both', grid='full',
               target='int8', **form_opts):
    mods = retinanet_layers()
    Ws, Hs, fbs = [], [], []
    g = torch.Generator().manual_seed(seed)
    for name, m in mods:
        W = m.weight.detach().float()
        Ws.append(W.reshape(W.shape[0], -1))
        groups = getattr(m, 'groups', 1)
        Hs.append(random_hform(Ws[-1].shape[1], groups, form, generator=g,
                               **form_opts))
        if feedback:
            taps = m.weight[0, 0].numel() if isinstance(m, nn.Conv2d) else 1
            fbs.append(feedback_for(Hs[-1], Ws[-1].shape[1], taps, groups))
    nparams = sum(W.numel() for W in Ws)
    t0 = time.perf_counter()
    for W in Ws:
        rtn_qw(W, bits)
    t_rtn = time.perf_counter() - t0
    t0 = time.perf_counter()
    qws, pss = multipoint_quantize(Ws, Hs, bits, budget, 'global', max_points,
                                   num_threads=num_threads, budget_on=budget_on,
                                   feedbacks=fbs if feedback else None,
                                   grid=grid, target=target,
                                   pow2=TARGET_POINTS[target]['scales'] == 'pow2')
    dt = time.perf_counter() - t0
    extra = sum(q.extra_points() * q.d for q in qws)
    computed = sum(int(p.computed.sum()) for p in pss)
    print(f'\n## Quantization time: retinanet_r50_fpn_1x_coco, {len(Ws)} layers, '
          f'{nparams / 1e6:.2f}M weights, bits={bits}, budget={budget} global, '
          f'max_points={max_points}, form={form} {form_opts or ""}, '
          f'feedback={feedback}, budget_on={budget_on}, grid={grid}, target={target} '
          f'(positions unknown: 1 per layer), '
          f'threads={num_threads or torch.get_num_threads()}')
    print(f'rtn pass: {t_rtn:.2f} s; multipoint: {dt:.2f} s; points searched '
          f'{computed} for {sum(p.channels for p in pss)} channels; extra storage '
          f'{extra / nparams:.4f} of the weights')
    return dt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--parts', nargs='+', default=['errors', 'hforms', 'time'],
                   choices=['errors', 'hforms', 'time'])
    p.add_argument('--threads', type=int, default=None,
                   help='torch intra-op threads (default: torch default)')
    p.add_argument('--form', default=DEFAULT_FORM, help='H form of the time part')
    p.add_argument('--pass-threads', type=int, default=1,
                   help='num_threads of multipoint_quantize in the time part '
                        '(library default 1; 0 = leave torch\'s setting)')
    p.add_argument('--opt', nargs='*', default=[], metavar='KEY=INT',
                   help='form options of the time part, e.g. rank=64 block_size=64')
    p.add_argument('--layers', default=None, metavar='PT',
                   help='torch.save()d list of (name, weight, H (G, d, d)) triples, '
                        'e.g. a trained detector\'s layers with their calibration '
                        'statistics (default: a small synthetic conv net)')
    p.add_argument('--config', help='a trained detector: its layers and calibration '
                   'statistics (32 train images) are benched instead of synthetic ones')
    p.add_argument('--checkpoint', help='checkpoint of --config')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--feedback', type=int, default=1,
                   help='time part: error feedback on (1, the hook default) or off (0); '
                        'feedback H built outside the timed pass')
    p.add_argument('--budget-on', default='both', choices=['memory', 'compute', 'both'])
    p.add_argument('--grid', default='full', choices=GRIDS,
                   help='code grid of the time part (the hook default: full)')
    p.add_argument('--target', default='int8', choices=tuple(TARGET_POINTS),
                   help='deployment target of the time part (the hook default: int8, '
                        'so power-of-two point scales)')
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if 'errors' in args.parts or 'hforms' in args.parts:
        if args.config:
            import mpq_det  # noqa: F401
            from mmengine.config import Config

            from mpq_det.calibration import collect_layer_stats
            layers = collect_layer_stats(Config.fromfile(args.config), args.checkpoint,
                                         seed=args.seed)
            src = f'{args.config} + {args.checkpoint}'
        elif args.layers:
            layers = [(n, W.float(), H) for n, W, H in
                      torch.load(args.layers, map_location='cpu', weights_only=False)]
            src = args.layers
        else:
            layers = synthetic_layers(args.seed)
            src = 'synthetic'
        print(f'{src} layers: ' + ', '.join(f'{n} {tuple(W.shape)}'
                                             for n, W, _ in layers))
        if 'errors' in args.parts:
            bench_errors(layers)
        if 'hforms' in args.parts:
            bench_hforms(layers)
    if 'time' in args.parts:
        opts = {k: int(v) for k, v in (o.split('=') for o in args.opt)}
        dt = bench_time(args.form, seed=args.seed,
                        num_threads=args.pass_threads or None,
                        feedback=bool(args.feedback), budget_on=args.budget_on,
                        grid=args.grid, target=args.target, **opts)
        print(f'quantize_time_s={dt:.2f}')


if __name__ == '__main__':
    main()
