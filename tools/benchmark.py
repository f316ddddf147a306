"""Benchmark multipoint quantization against the baselines and optimum-quanto.

    python tools/benchmark.py [CONFIG CHECKPOINT] [--out DIR] [options]

With CONFIG and CHECKPOINT: that detector, scored by its config's own test evaluator.
Without: our four trained detectors (data/checkpoints/), each scored by COCO mAP and
VOC mAP@0.5 in one pass.

The sweep (per detector):
  * FP;
  * method rtn and mse at every --bits (one point, no budget);
  * method multipoint at every --bits x --budgets, ocs at every --bits x nonzero budget;
  * W4A8 and W8A8 (activations=dict(bits=8), budget 0.05) for multipoint and rtn;
  * optimum-quanto qint2/qint4/qint8, weight-only, eager swap, its effective bits
    counted like ours (codes + stored scales and shifts; FP layers at 32).
With --act SETTING..., instead of the sweep: FP and quantized activations, each
setting (W4A4, W3A4, W2A4, W4A8) x --act-protocols x --act-ranges x --act-methods,
written as DIR/act.md as well (A4 is simulated: onnxruntime has no 4-bit activation
kernels).
With --ablation, also: where the extra points go (output error, weight error, random;
within each layer and across layers) at W3 b0.05 and W2 b0.1; every H form; and each
accuracy lever switched off one at a time.

Every cell records mAP, effective bits per weight, memory and compute overhead, and
quantization and calibration time. Cells already in DIR/results.json are not rerun
(resume). Outputs in DIR: results.json, results.md and PNG plots (mAP against bits per
method, mAP against budget at W2/W3, points per channel per component).
For big models: --bits 4 3, --num-images N (first N test images), --no-quanto.
"""
from __future__ import annotations

import argparse
import ast
import os
import os.path as osp
import sys

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
OURS = ('retinanet_r18q', 'fcos_r18q', 'faster_rcnn_r18q', 'ssdlite_mbv2q')
BOTH_METRICS = [dict(type='CocoMetric', metric='bbox', format_only=False),
                dict(type='NamedVOCMetric', metric='mAP', eval_mode='11points')]
# hook kwargs that switch each accuracy lever off (the --ablation's last group)
LEVERS = {
    'error feedback': dict(feedback=None),
    'act-order': dict(feedback=dict(order=False)),
    'joint feedback': dict(feedback=dict(mode='first')),
    'compute bound': dict(points=dict(budget_on='memory')),
    'global allocation': dict(allocation='layer'),
    'output-space scales': dict(stats=dict(form='identity')),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config', nargs='?')
    p.add_argument('checkpoint', nargs='?')
    p.add_argument('--out', default='work_dirs/benchmark')
    p.add_argument('--detectors', nargs='+', default=list(OURS), choices=OURS,
                   help='without CONFIG: which of our detectors')
    p.add_argument('--bits', nargs='+', type=int, default=[2, 3, 4, 8])
    p.add_argument('--budgets', nargs='+', type=float, default=[0.0, 0.05, 0.1])
    p.add_argument('--methods', nargs='+', default=['rtn', 'mse', 'ocs', 'multipoint'])
    p.add_argument('--num-images', type=int, help='only the first N test images')
    p.add_argument('--no-quanto', action='store_true')
    p.add_argument('--targets', nargs='*', default=['lowbit'], choices=['lowbit', 'int8'],
                   help='deployment targets besides the hook default (int8) of the '
                        'multipoint cells with a budget (none: just the default)')
    p.add_argument('--no-activations', action='store_true', help='skip W4A8/W8A8')
    p.add_argument('--act', nargs='+', default=[], metavar='SETTING',
                   help='quantized activations instead of the sweep: settings among '
                        'W4A4 W3A4 W2A4 W4A8 (see --act-*)')
    p.add_argument('--act-protocols', nargs='+', default=['ours', 'literature'],
                   choices=['ours', 'literature'])
    p.add_argument('--act-ranges', nargs='+', default=['minmax', 'shrink0.7', 'mse', 'fisher'],
                   help='range methods: minmax shrink0.7 shrink0.5 mse fisher')
    p.add_argument('--act-methods', nargs='+', default=['multipoint'],
                   choices=['multipoint', 'rtn', 'mse'], help='weight methods')
    p.add_argument('--act-hook', nargs='*', default=[], metavar='KEY=VALUE',
                   help="more hook arguments of every --act cell, VALUE a Python literal, "
                        "e.g. \"stats={'sequential': True}\"")
    p.add_argument('--ablation', action='store_true')
    p.add_argument('--only-ablation', action='store_true')
    p.add_argument('--threads', type=int, default=1, help='torch intra-op threads')
    p.add_argument('--report-only', action='store_true',
                   help='run nothing: write results.md and the plots from DIR/results.json')
    p.add_argument('--summary', action='store_true',
                   help='also print and write DIR/summary.md: the headline table (multipoint '
                        'at W4/W3/W2 against the best baseline and quanto, with bits per '
                        'weight) and, with the ablation, where the extra points go')
    a = p.parse_args(argv)
    if (a.config is None) != (a.checkpoint is None):
        p.error('give both CONFIG and CHECKPOINT, or neither')
    return a


def our_cfg(det: str):
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(ROOT, f'configs/detectors/{det}_synth_coco.py'))
    ev = [dict(m) for m in BOTH_METRICS]
    ev[0]['ann_file'] = cfg.test_evaluator.ann_file
    cfg.test_evaluator = ev
    return cfg


NAMES = {'retinanet_r18q': 'RetinaNet', 'fcos_r18q': 'FCOS',
         'faster_rcnn_r18q': 'Faster R-CNN', 'ssdlite_mbv2q': 'SSDLite'}


def summary_markdown(rows: list, mets: list) -> str:
    """The headline table: per detector FP, then multipoint at W4/W3 (budget 0.05) and W2
    (0.1) at the hook's default target (and at target 'lowbit' where swept), each with
    the best of rtn, mse and ocs at the same budget (by the last metric, COCO mAP for ours) and quanto's qint4/qint2; cells are metrics x100 with the bits per
    weight in brackets. With the ablation's placement cells, a second table: the last
    metric with the extra points ranked by output error, weight error or at random, per
    layer and across layers."""
    from mpq_det.benchmark import act_bits
    key = mets[-1][0]
    fmts = {'pascal_voc/mAP': '.2f', 'coco/bbox_mAP': '.1f'}

    def cell(r, label=''):
        if r is None:
            return '-'
        c = ' / '.join(format(100 * r['metrics'][k], fmts.get(k, '.2f')) for k, _ in mets)
        if r['kind'] != 'fp':
            c += f" ({r['bits_per_weight']:.2f})"
        return f'{label} {c}'.strip()

    def find(det, **want):
        for r in rows:
            h = r.get('hook') or {}
            if r['detector'] != det or r['group'] != 'sweep' or (h and act_bits(h)):
                continue
            got = dict(kind=r['kind'], quanto=r.get('quanto'), method=h.get('method'),
                       bits=h.get('bits'), budget=h.get('budget'), target=h.get('target'))
            want.setdefault('target', None)   # the hook's default target unless asked
            if all(got[k] == v for k, v in want.items()):
                return r
        return None

    metric = ' / '.join(lab for _, lab in mets)
    out = [f'{metric} (x100), effective bits per weight in brackets', '',
           '| detector | FP | W4: multipoint / lowbit / best baseline / quanto qint4 | '
           'W3: multipoint / lowbit / best baseline | '
           'W2: multipoint / lowbit / best baseline / quanto qint2 |',
           '|---|---|---|---|---|']
    dets = list(dict.fromkeys(r['detector'] for r in rows))
    for det in dets:
        cells = [NAMES.get(det, det), cell(find(det, kind='fp'))]
        for bits, budget, q in ((4, 0.05, 'qint4'), (3, 0.05, None), (2, 0.1, 'qint2')):
            base = [(m, find(det, kind='mpq', method=m, bits=bits,
                             **({'budget': budget} if m == 'ocs' else {})))
                    for m in ('rtn', 'mse', 'ocs')]
            base = [(m, r) for m, r in base if r is not None and key in r['metrics']]
            parts = [cell(find(det, kind='mpq', method='multipoint', bits=bits, budget=budget))]
            low = find(det, kind='mpq', method='multipoint', bits=bits, budget=budget,
                       target='lowbit')
            if low is not None:   # the same memory, target='lowbit' (free point scales)
                parts.append(cell(low, 'lowbit'))
            if base:
                m, r = max(base, key=lambda t: t[1]['metrics'][key])
                parts.append(cell(r, m))
            if q:
                parts.append(cell(find(det, kind='quanto', quanto=q)))
            cells.append(' · '.join(parts))
        out.append('| ' + ' | '.join(cells) + ' |')
    place = [r for r in rows if r['group'] == 'placement']
    if place:
        lab = mets[-1][1]
        out += ['', f'Where the extra points go ({lab} x100; W3 budget 0.05, W2 budget 0.1)', '',
                '| detector | per layer: output / weight / random | '
                'across layers: output / weight / random |', '|---|---|---|']
        for det in dets:
            for bits in (3, 2):
                cells = []
                for alloc in ('layer', 'global'):
                    v = {r['hook']['points']['rank_by']: r for r in place if r['detector'] == det
                         and r['hook']['bits'] == bits and r['hook'].get('allocation') == alloc}
                    cells.append(' / '.join(
                        format(100 * v[b]['metrics'][key], fmts.get(key, '.2f'))
                        if b in v else '-' for b in ('output', 'weight', 'random')))
                out.append(f'| {NAMES.get(det, det)} W{bits} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(out) + '\n'


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    from mmengine.config import Config
    import mpq_det  # noqa: F401  (hook, metric, compat fixes)
    from mpq_det import benchmark as bm
    if a.config:
        jobs = [(osp.splitext(osp.basename(a.config))[0], Config.fromfile(a.config),
                 a.checkpoint)]
    else:
        jobs = [(d, our_cfg(d), osp.join(ROOT, f'data/checkpoints/{d}.pth'))
                for d in a.detectors]
    if a.act:
        more = {k: ast.literal_eval(v) for k, v in (kv.split('=', 1) for kv in a.act_hook)}
        cells = [dict(kind='fp', group='sweep')] + bm.act_cells(
            a.act, a.act_protocols, a.act_ranges, a.act_methods, **more)
    else:
        cells = [] if a.only_ablation else bm.sweep_cells(
            a.bits, a.budgets, a.methods, not a.no_activations,
            () if a.no_quanto else bm.QUANTO, a.targets)
    if a.ablation or a.only_ablation:
        cells += bm.ablation_cells(LEVERS)
    os.makedirs(a.out, exist_ok=True)
    rows = []
    if a.report_only:
        jobs = []
        rows = list(bm.load_results(osp.join(a.out, 'results.json')).values())
    for name, cfg, ckpt in jobs:
        for k in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
            if cfg.get(k):
                cfg[k].num_workers = 0
                cfg[k].persistent_workers = False
        cfg.default_hooks.logger.interval = 10 ** 6
        cfg.log_level = 'WARNING'  # one line per cell; each run's log stays in its work dir
        if a.num_images:
            bm.limit_test_images(cfg, a.num_images, osp.join(a.out, 'runs', name))
        rows += bm.run_sweep(cfg, ckpt, cells, a.out, name)
    md = bm.results_markdown(rows)
    with open(osp.join(a.out, 'results.md'), 'w') as f:
        f.write(md)
    print(md)
    act = bm.act_markdown(rows)
    if act:
        with open(osp.join(a.out, 'act.md'), 'w') as f:
            f.write(act)
        print(act)
    for path in bm.plot_results(rows, a.out):
        print('wrote', path)
    if a.summary:
        md = summary_markdown(rows, bm.metric_names(rows))
        with open(osp.join(a.out, 'summary.md'), 'w') as f:
            f.write(md)
        print(md)
    return 0


if __name__ == '__main__':
    sys.exit(main())
