"""Runner set-up shared by tools/train.py and tools/test.py."""
from __future__ import annotations

import argparse
import os
import os.path as osp

import torch
from mmengine.config import Config, DictAction


def tool_parser(description: str, checkpoint: bool) -> argparse.ArgumentParser:
    """mmdet's tool CLI: CONFIG [CHECKPOINT] --work-dir --cfg-options --launcher."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument('config')
    if checkpoint:
        p.add_argument('checkpoint')
    p.add_argument('--work-dir')
    p.add_argument('--cfg-options', nargs='+', action=DictAction)
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    p.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return p


def config_with_options(path: str, cfg_options: dict | None) -> Config:
    """The config at ``path`` with a tool's ``--cfg-options`` merged in."""
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def load_tool_cfg(args: argparse.Namespace) -> Config:
    """The config of a tool's arguments, with --cfg-options and the launcher applied."""
    set_local_rank(args.local_rank)
    cfg = config_with_options(args.config, args.cfg_options)
    return prepare_cfg(cfg, args.launcher, args.work_dir, args.config)


def prepare_cfg(cfg: Config, launcher: str, work_dir: str | None, config_path: str) -> Config:
    """Applies the CLI settings mmdet's tools apply, plus the CPU distributed path.

    mmengine 0.10.7's pytorch launcher calls ``torch.cuda.set_device`` and its
    ``wrap_model`` passes ``device_ids=[LOCAL_RANK]`` to DDP; both fail without a GPU.
    Without CUDA we use gloo, DDP without device_ids, and a no-op set_device. With CUDA
    the usual nccl path is left untouched.
    """
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(config_path))[0])
    if launcher != 'none' and not torch.cuda.is_available():
        cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
        wrapper = cfg.get('model_wrapper_cfg') or dict(type='MMDistributedDataParallel')
        wrapper['device_ids'] = None
        cfg.model_wrapper_cfg = wrapper
        torch.cuda.set_device = lambda *args, **kwargs: None
    return cfg


def set_local_rank(local_rank: int) -> None:
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(local_rank)


def finish() -> None:
    """Ends a distributed run cleanly.

    Without it, gloo's threads can still be running at interpreter exit, and rank 0
    then aborts ('terminate called without an active exception') after the results
    are already written.
    """
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
