"""Calibration images from a config's dataloader, run with the test pipeline."""
from __future__ import annotations

import copy

import torch
from mmengine.config import Config, ConfigDict
from mmengine.dataset import pseudo_collate
from mmengine.utils import ProgressBar
from torch.utils.data import DataLoader, Subset

from .quantizer import SPLITS


def _innermost(ds_cfg: dict) -> dict:
    # wrappers (RepeatDataset, ClassBalancedDataset ...) hold the real one in 'dataset'
    while 'dataset' in ds_cfg and isinstance(ds_cfg['dataset'], dict):
        ds_cfg = ds_cfg['dataset']
    return ds_cfg


def calib_dataset_cfg(cfg: Config, split: str) -> dict:
    """The ``{split}_dataloader`` dataset of ``cfg`` with the test pipeline.

    Random augmentation would make the statistics depend on chance, so the test
    pipeline replaces the split's own (and its wrappers are dropped).
    """
    if split not in SPLITS:
        raise ValueError(f'calib.split={split!r} is not allowed; choose one of {SPLITS}')
    key = f'{split}_dataloader'
    if cfg.get(key) is None or cfg[key].get('dataset') is None:
        raise ValueError(f'calib.split={split!r}: the config has no {key} with a dataset; '
                         f'choose a split the config defines')
    ds = copy.deepcopy(_innermost(cfg[key]['dataset']))
    test_dl = cfg.get('test_dataloader') or cfg.get('val_dataloader')
    if test_dl is not None:
        ds['pipeline'] = copy.deepcopy(_innermost(test_dl['dataset'])['pipeline'])
    return ConfigDict(ds)


def build_calib_loader(cfg: Config, split: str = 'train', num_images: int = 32,
                       batch_size: int = 4, seed: int = 0) -> DataLoader:
    """A deterministic loader of ``num_images`` images chosen from ``seed``."""
    from mmdet.registry import DATASETS
    from mmengine.registry import init_default_scope
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    dataset = DATASETS.build(calib_dataset_cfg(cfg, split))
    if num_images > len(dataset):
        raise ValueError(f'calib.num_images={num_images} is larger than the {split} split '
                         f'({len(dataset)} images); allowed: 1..{len(dataset)}')
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    subset = Subset(dataset, sorted(idx[:num_images].tolist()))
    return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=0,
                      collate_fn=pseudo_collate)


@torch.no_grad()
def run_calibration(model: torch.nn.Module, loader: DataLoader, show_progress: bool = True,
                    reference: torch.nn.Module | None = None) -> None:
    """Runs the detector's own inference path (``test_step``) on every batch;
    ``reference`` (sequential statistics): each batch runs through it first."""
    was_training = model.training
    model.eval()
    if reference is not None:
        reference.eval()
    bar = ProgressBar(len(loader.dataset)) if show_progress else None
    for batch in loader:
        if reference is not None:
            reference.test_step(batch)
        model.test_step(batch)
        if bar is not None:
            for _ in range(len(batch['inputs'])):
                bar.update()
    if bar is not None:
        print()
    model.train(was_training)


def collect_layer_stats(cfg: Config, checkpoint: str, num_images: int = 32,
                        batch_size: int = 4, seed: int = 0, split: str = 'train'
                        ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, weight, exact H (G, d, d)) for every Conv2d/Linear of a trained detector.

    For benchmarks that compare quantizers and H forms on real calibration statistics.
    """
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_checkpoint

    from .components import component_of
    from .model_pass import QuantSettings, StatsCollector, plan_layers
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model = MODELS.build(cfg.model)
    load_checkpoint(model, checkpoint, map_location='cpu', logger='silent')
    s = QuantSettings()
    plans, _, _ = plan_layers(model, component_of, {c: s for c in ('backbone', 'neck', 'head')})
    collector = StatsCollector(plans, form='exact', seed=seed, damp=0.0)
    try:
        run_calibration(model, build_calib_loader(cfg, split, num_images, batch_size, seed),
                        show_progress=False)
    finally:
        collector.remove()
    return [(p.name, p.module.weight.detach().clone(),
             collector.stats[p.name].stats.finalize().dense()) for p in plans]
