"""Calibration data: which dataset, split, images and pipeline.

The calibration images must come from the configured split of the detector's own
dataset (the train split by default, never the images that are scored), through the
test pipeline (no random flip), with dataset wrappers removed, and be the same
images for the same seed. The end-to-end test records what the detector actually
sees during the hook's calibration forwards.
"""
import copy
import os.path as osp
from types import SimpleNamespace

import pytest
import torch

import mpq_det  # noqa: F401
from mpq_det import MultipointQuantHook
from mpq_det.calibration import build_calib_loader

from conftest import tiny_cfg

CFG = 'configs/detectors/retinanet_r18q_synth_voc.py'


def split_ids(data: str, split: str) -> set[str]:
    name = {'train': 'trainval', 'test': 'test'}[split]
    with open(osp.join(data, 'VOCdevkit/VOC2007/ImageSets/Main', f'{name}.txt')) as f:
        return {line.strip() for line in f if line.strip()}


def stem(path: str) -> str:
    return osp.splitext(osp.basename(path))[0]


@pytest.fixture(scope='module')
def wrapped_cfg(tiny_data, tmp_path_factory):
    """The train split wrapped in RepeatDataset, with a flip that always fires."""
    cfg = tiny_cfg(CFG, tiny_data, str(tmp_path_factory.mktemp('calib')))
    ds = cfg.train_dataloader.dataset
    for t in ds.pipeline:
        if t.type == 'RandomFlip':
            t.prob = 1.0
    cfg.train_dataloader.dataset = dict(type='RepeatDataset', times=3, dataset=ds)
    return cfg


def test_loader_uses_the_split_the_pipeline_and_no_wrapper(wrapped_cfg, tiny_data):
    loader = build_calib_loader(wrapped_cfg, split='train', num_images=6, batch_size=4, seed=0)
    ds = loader.dataset.dataset
    assert type(ds).__name__ == 'VOCDataset'          # RepeatDataset removed
    assert ds.ann_file.endswith('ImageSets/Main/trainval.txt')
    assert len(loader.dataset) == 6
    test_types = [t['type'] for t in wrapped_cfg.test_dataloader.dataset.pipeline]
    assert [type(t).__name__ for t in ds.pipeline.transforms] == test_types
    assert 'RandomFlip' not in test_types
    seen = []
    for batch in loader:
        assert len(batch['inputs']) <= 4
        for s in batch['data_samples']:
            assert not s.metainfo.get('flip', False)
            seen.append(stem(s.img_path))
    assert len(seen) == len(set(seen)) == 6
    assert set(seen) <= split_ids(tiny_data, 'train')


def test_same_seed_same_images_other_seed_other_images(wrapped_cfg):
    def ids(seed, split='train', n=5):
        loader = build_calib_loader(wrapped_cfg, split=split, num_images=n, seed=seed)
        return [stem(s.img_path) for b in loader for s in b['data_samples']]
    assert ids(0) == ids(0)
    assert ids(0) != ids(1)
    # the same image, through the test pipeline, gives the same tensor every time
    a = next(iter(build_calib_loader(wrapped_cfg, num_images=2, seed=4)))['inputs'][0]
    b = next(iter(build_calib_loader(wrapped_cfg, num_images=2, seed=4)))['inputs'][0]
    assert torch.equal(a, b)


@pytest.mark.parametrize('split, other', [('train', 'test'), ('test', 'train')])
def test_hook_calibrates_on_the_configured_split(wrapped_cfg, tiny_data, tmp_path, split,
                                                 other):
    """Records the images the detector runs on during the hook's calibration."""
    from mmdet.registry import MODELS
    torch.manual_seed(0)
    model = MODELS.build(wrapped_cfg.model)
    seen, flips = [], []
    real = model.test_step

    def recording_test_step(batch):
        for s in batch['data_samples']:
            seen.append(stem(s.img_path))
            flips.append(bool(s.metainfo.get('flip', False)))
        return real(batch)
    model.test_step = recording_test_step
    runner = SimpleNamespace(model=model, cfg=copy.deepcopy(wrapped_cfg), work_dir=str(tmp_path),
                             _train_loop=None)
    n = 6
    hook = MultipointQuantHook(bits=4, calib=dict(split=split, num_images=n, batch_size=4, seed=0),
                               report=False)
    hook.before_test(runner)
    assert len(seen) == len(set(seen)) == n
    assert set(seen) <= split_ids(tiny_data, split)
    assert not set(seen) & split_ids(tiny_data, other)
    assert not any(flips)
    assert hook.result.layers    # it did quantize
