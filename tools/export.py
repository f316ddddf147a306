"""Quantize a detector and write the quantized checkpoint, without testing it.

    python tools/export.py CONFIG CHECKPOINT OUT [--cfg-options custom_hooks.0.bits=3]

Uses the MultipointQuantHook of CONFIG (one with default settings if CONFIG has none).
"""
import argparse
import sys

from mmengine.config import DictAction

import mpq_det  # noqa: F401  (registers the hook, metric and compat fixes)
from mpq_det.launch import config_with_options
from mpq_det.export import quantize_and_export


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Quantize a detector and write the export')
    p.add_argument('config')
    p.add_argument('checkpoint', help='float checkpoint to quantize')
    p.add_argument('out', help='path of the quantized checkpoint to write')
    p.add_argument('--work-dir', help='for the log and mpq_report.json')
    p.add_argument('--cfg-options', nargs='+', action=DictAction)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_with_options(args.config, args.cfg_options)
    if args.work_dir is None and cfg.get('work_dir') is None:
        import os.path as osp
        cfg.work_dir = osp.join('./work_dirs', 'export_' +
                                osp.splitext(osp.basename(args.config))[0])
    quantize_and_export(cfg, args.checkpoint, args.out, work_dir=args.work_dir)
    return 0


if __name__ == '__main__':
    sys.exit(main())
