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
        # mkstemp makes the file 0600; give it the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
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


# torch.save's legacy (non-zip) format starts with pickle protocol 2 and a long
_LEGACY_MAGIC = b'\x80\x02\x8a\x0a'


def check_readable(path: str) -> None:
    """Fails early, naming ``path``, on a missing, truncated or corrupt checkpoint.

    torch.load's own errors for such files come from deep inside its zip reader. This
    reads the zip directory and CRCs only (no unpickling).
    """
    import zipfile
    if not osp.isfile(path):
        raise FileNotFoundError(f'{path}: no such checkpoint file')
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except Exception as e:  # noqa: BLE001  (any reader error means a damaged file)
            raise ValueError(f'{path}: corrupt checkpoint ({e})') from None
        if bad is not None:
            raise ValueError(f'{path}: corrupt checkpoint (bad CRC in {bad})')
        return
    with open(path, 'rb') as f:
        head = f.read(4)
    if head != _LEGACY_MAGIC:
        raise ValueError(f'{path}: not a PyTorch checkpoint (truncated, corrupt or another '
                         f'kind of file)')
