"""mpq-det: post-training multipoint quantization for MMDetection 3.x detectors."""
from . import compat

compat.apply_all()

from .datasets import NamedVOCMetric  # noqa: E402,F401  (registers the metric)

__version__ = '0.1.0'
