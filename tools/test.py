"""Test (and evaluate) a detector: mmdet's tools/test.py CLI with mpq_det loaded.

With ``MultipointQuantHook`` in the config's custom_hooks, the model is quantized
right after CHECKPOINT loads, so the printed mAP is the quantized detector's.
"""
import argparse

from mmengine.config import Config, DictAction
from mmengine.runner import Runner

import mpq_det  # noqa: F401  (registers the hook, metric and compat fixes)
from mpq_det.checkpoint_io import check_readable
from mpq_det.launch import prepare_cfg, set_local_rank


def parse_args():
    p = argparse.ArgumentParser(description='Test (and eval) a detector')
    p.add_argument('config')
    p.add_argument('checkpoint')
    p.add_argument('--work-dir')
    p.add_argument('--out', help='dump predictions to a .pkl file')
    p.add_argument('--cfg-options', nargs='+', action=DictAction)
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    p.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    set_local_rank(args.local_rank)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    prepare_cfg(cfg, args.launcher, args.work_dir, args.config)
    if '://' not in args.checkpoint:
        check_readable(args.checkpoint)  # a clear message instead of torch's zip errors
    cfg.load_from = args.checkpoint
    runner = Runner.from_cfg(cfg)
    if args.out is not None:
        from mmdet.evaluation import DumpDetResults
        assert args.out.endswith(('.pkl', '.pickle')), 'The dump file must be a pkl file.'
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    metrics = runner.test()
    # machine-readable copy of what the evaluator printed (tools/eval_matrix.py reads it)
    from mmengine.dist import is_main_process
    if is_main_process():
        import json, os, os.path as osp
        os.makedirs(runner.work_dir, exist_ok=True)
        with open(osp.join(runner.work_dir, 'metrics.json'), 'w') as f:
            json.dump({k: float(v) for k, v in (metrics or {}).items()
                       if isinstance(v, (int, float))}, f, indent=1)


if __name__ == '__main__':
    main()
