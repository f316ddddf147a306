"""The external peer: optimum-quanto's weight quantization of the same detector.

    python tools/bench_quanto.py CONFIG CHECKPOINT --weights qint4 [--work-dir DIR]

quanto (0.2.7) swaps Conv2d/Linear eagerly, like our hook, and quantizes weights
to qint2/qint4 (group-wise scales and shifts) or qint8 (per channel). It has no
3-bit type. The mAP is the config's own evaluator on the test split; the
quantization wall time excludes loading and testing. Compare with tools/test.py on
the corresponding configs/mpq/ config.
"""
import argparse
import json
import os
import os.path as osp
import time

import torch
from mmengine.config import Config
from mmengine.runner import Runner, load_checkpoint

import mpq_det  # noqa: F401


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('config')
    p.add_argument('checkpoint')
    p.add_argument('--weights', default='qint4', choices=['qint2', 'qint4', 'qint8'])
    p.add_argument('--work-dir', default='work_dirs/bench_quanto')
    a = p.parse_args()
    from optimum import quanto
    cfg = Config.fromfile(a.config)
    cfg.custom_hooks = []
    cfg.work_dir = a.work_dir
    cfg.load_from = None  # loaded below, before quanto swaps the layers
    runner = Runner.from_cfg(cfg)
    load_checkpoint(runner.model, a.checkpoint, map_location='cpu', logger='silent')
    # quanto quantizes Conv2d/Linear in backbone, neck and heads (not the preprocessor)
    t0 = time.perf_counter()
    for name in ('backbone', 'neck', 'bbox_head', 'rpn_head', 'roi_head'):
        if hasattr(runner.model, name) and getattr(runner.model, name) is not None:
            quanto.quantize(getattr(runner.model, name), weights=getattr(quanto, a.weights))
            quanto.freeze(getattr(runner.model, name))
    qtime = time.perf_counter() - t0
    n_q = sum(isinstance(m, quanto.QModuleMixin) for m in runner.model.modules())
    metrics = runner.test()
    out = dict(metrics={k: float(v) for k, v in metrics.items()}, quant_time_s=qtime,
               quantized_modules=n_q, weights=a.weights, torch=torch.__version__)
    os.makedirs(a.work_dir, exist_ok=True)
    with open(osp.join(a.work_dir, 'quanto.json'), 'w') as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out))


if __name__ == '__main__':
    main()
