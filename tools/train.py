"""Train a detector (mmdet's tools/train.py CLI, with mpq_det's registry entries)."""
import argparse

from mmengine.config import Config, DictAction
from mmengine.runner import Runner

import mpq_det  # noqa: F401  (registers the hook, metric and compat fixes)
from mpq_det.launch import prepare_cfg, set_local_rank


def parse_args():
    p = argparse.ArgumentParser(description='Train a detector')
    p.add_argument('config')
    p.add_argument('--work-dir')
    p.add_argument('--resume', nargs='?', type=str, const='auto')
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
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    Runner.from_cfg(cfg).train()


if __name__ == '__main__':
    main()
