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
    p.add_argument('--no-activations', action='store_true', help='skip W4A8/W8A8')
    p.add_argument('--ablation', action='store_true')
    p.add_argument('--only-ablation', action='store_true')
    p.add_argument('--threads', type=int, default=1, help='torch intra-op threads')
    p.add_argument('--report-only', action='store_true',
                   help='run nothing: write results.md and the plots from DIR/results.json')
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
    cells = [] if a.only_ablation else bm.sweep_cells(
        a.bits, a.budgets, a.methods, not a.no_activations, () if a.no_quanto else bm.QUANTO)
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
    for path in bm.plot_results(rows, a.out):
        print('wrote', path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
