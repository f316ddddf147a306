"""VOCMetric that prints the dataset's own class names."""
from mmdet.evaluation import VOCMetric
from mmdet.registry import METRICS


@METRICS.register_module()
class NamedVOCMetric(VOCMetric):
    """mmdet's VOCMetric, unchanged except for the names in its per-class table.

    mmdet 3.3 prints VOC's own class names ('aeroplane', 'bicycle', ...) whenever the
    dataset lives under a VOC2007/VOC2012 folder, even with a custom class list. The
    scores are the same; only the names were wrong. The 11-point/area mode is set by
    ``eval_mode`` as in VOCMetric.
    """

    def compute_metrics(self, results: list) -> dict:
        meta = self.dataset_meta
        if meta.get('dataset_type') is not None:
            # Without dataset_type, VOCMetric labels rows with meta['classes'].
            self._dataset_meta = {k: v for k, v in meta.items() if k != 'dataset_type'}
        try:
            return super().compute_metrics(results)
        finally:
            self._dataset_meta = meta
