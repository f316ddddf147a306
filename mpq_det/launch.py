"""Runner set-up shared by tools/train.py and tools/test.py."""
from __future__ import annotations

import os
import os.path as osp

import torch
from mmengine.config import Config


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
