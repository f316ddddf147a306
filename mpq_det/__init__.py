"""mpq-det: post-training multipoint quantization for MMDetection 3.x detectors."""
from . import compat

compat.apply_all()

from .datasets import NamedVOCMetric  # noqa: E402  (registers the metric)
from .hook import MultipointQuantHook  # noqa: E402  (registers the hook)
from .deploy.ort import OnnxRuntimeHook  # noqa: E402  (registers the hook)

__version__ = '0.1.0'
__all__ = ['MultipointQuantHook', 'NamedVOCMetric', 'OnnxRuntimeHook']
