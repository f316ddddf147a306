from .synth import CLASSES, SynthSpec, make_synth_dataset
from .voc_metric import NamedVOCMetric

__all__ = ['CLASSES', 'SynthSpec', 'make_synth_dataset', 'NamedVOCMetric']
