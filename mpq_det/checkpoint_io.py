"""Checkpoint file helpers: atomic writes and weights-only copies of training checkpoints."""
from __future__ import annotations

import os
import os.path as osp
import tempfile

import torch


def atomic_save(obj: dict, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename.

    A failure at any point removes the temporary file and leaves an earlier ``path``
    untouched, so readers never see a partial file.
    """
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + osp.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


def strip_checkpoint(src: str, dst: str) -> dict:
    """Writes ``src``'s state_dict and meta only (no optimizer, message_hub)."""
    ckpt = torch.load(src, map_location='cpu')  # weights_only, see compat.py
    meta = {k: v for k, v in ckpt.get('meta', {}).items()
            if k in ('dataset_meta', 'mmdet_version', 'mmengine_version', 'epoch', 'iter',
                     'seed', 'experiment_name', 'cfg')}
    out = dict(state_dict=ckpt['state_dict'], meta=meta)
    atomic_save(out, dst)
    return out
