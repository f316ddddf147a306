"""Small, narrow fixes that let mmdet 3.3 / mmengine 0.10.7 run on torch >= 2.6.

Applied once when ``mpq_det`` is imported (the configs import it via
``custom_imports``; tools/ import it directly).
"""
from __future__ import annotations

import torch


def _numpy_globals() -> list:
    """numpy objects that pickled ndarrays/scalars reference (HistoryBuffer holds them)."""
    import numpy as np
    try:  # numpy >= 1.25 has the dtype classes; np.core is the numpy<2 path
        from numpy.core.multiarray import _reconstruct, scalar
    except ImportError:  # pragma: no cover - numpy 2
        from numpy._core.multiarray import _reconstruct, scalar
    dtype_classes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith('DType')]
    return [_reconstruct, scalar, np.ndarray, np.dtype, *dtype_classes]


def _history_buffer_getattr(obj, name: str):
    """Stands in for ``builtins.getattr`` while unpickling, for one pattern only.

    HistoryBuffer pickles its statistics methods as ``getattr(HistoryBuffer, 'min')``.
    Allowing the real getattr would open every attribute of every allowed object
    (and from there, code execution), so only HistoryBuffer's registered statistics
    methods are resolved; anything else is refused.
    """
    import pickle

    from mmengine.logging.history_buffer import HistoryBuffer
    # the four built-ins are registered by the first HistoryBuffer(), maybe not yet
    allowed = {'min', 'max', 'current', 'mean', *HistoryBuffer._statistics_methods}
    if obj is HistoryBuffer and name in allowed:
        return getattr(obj, name)
    raise pickle.UnpicklingError(
        f'getattr({getattr(obj, "__name__", type(obj).__name__)}, {name!r}) is not allowed '
        f'in a weights-only checkpoint (only HistoryBuffer statistics methods are)')


def allow_mmengine_checkpoints() -> None:
    """Allowlist what an mmengine training checkpoint pickles, for ``weights_only=True``.

    torch >= 2.6 loads with ``weights_only=True`` by default and mmengine 0.10.7 does not
    pass ``weights_only``, so its own checkpoints (``message_hub`` holds HistoryBuffers
    of numpy arrays) fail to load. We allow exactly mmengine's HistoryBuffer, the numpy
    reconstruction globals and a getattr restricted to HistoryBuffer's statistics
    methods; every other global is still refused.
    """
    if not hasattr(torch.serialization, 'add_safe_globals'):
        return  # torch < 2.4 loads full pickles by default
    from mmengine.logging.history_buffer import HistoryBuffer
    torch.serialization.add_safe_globals(
        [HistoryBuffer, *_numpy_globals(),
         (_history_buffer_getattr, 'builtins.getattr')])


def fix_ssd_head() -> None:
    """mmdet 3.3's SSDHead has no ``loss_cls`` (it computes CE inline), but
    BaseDenseHead.predict_by_feat reads ``self.loss_cls.custom_cls_channels``. A None
    class attribute makes that check read False, which is what SSD means."""
    from mmdet.models.dense_heads import SSDHead
    if not hasattr(SSDHead, 'loss_cls'):
        SSDHead.loss_cls = None


def apply_all() -> None:
    allow_mmengine_checkpoints()
    fix_ssd_head()
