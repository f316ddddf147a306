"""mpq-det: post-training multipoint quantization for MMDetection 3.x detectors.

The algorithm core (``mpq_det.quant``), the quantized modules and the model pass
(``mpq_det.modules``, ``mpq_det.model_pass``, ``mpq_det.quantizer``) need torch only.
Where mmdet is installed, importing the package also applies the compatibility
fixes and registers the hooks and the metric with mmdet's registries (what
``custom_imports=dict(imports=['mpq_det'])`` relies on).
"""
import importlib.util

from .quantizer import MultipointQuantizer

__version__ = '0.1.0'
__all__ = ['MultipointQuantizer']

# find_spec, not try/except ImportError: a broken mmdet install must fail loudly here,
# not leave the hooks silently unregistered
if importlib.util.find_spec('mmdet') is not None:
    from . import compat

    compat.apply_all()

    from .datasets import NamedVOCMetric  # noqa: E402  (registers the metric)
    from .hook import MultipointQuantHook  # noqa: E402  (registers the hook)
    from .deploy.ort import OnnxRuntimeHook  # noqa: E402  (registers the hook)

    __all__ += ['MultipointQuantHook', 'NamedVOCMetric', 'OnnxRuntimeHook']
