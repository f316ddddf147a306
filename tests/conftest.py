"""Shared fixtures: a tiny synthetic dataset and configs that point at it."""
from __future__ import annotations

import os.path as osp

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: longer tests, excluded from `make test`')
    # warnings of the libraries we build on, about their own internals, would bury ours
    for f in ('ignore::UserWarning:mmengine', 'ignore::DeprecationWarning:mmengine',
              'ignore::UserWarning:mmdet', 'ignore::DeprecationWarning:mmdet',
              'ignore::UserWarning:mmcv', 'ignore::FutureWarning:mmcv',
              'ignore:.*legacy TorchScript-based ONNX export:DeprecationWarning',
              'ignore:The feature will be removed:DeprecationWarning',
              'ignore:Detected pickle protocol:UserWarning',
              # the int8 graph asks for opset 21 (INT4) and keeps BatchNorm nodes
              # (PRESERVE) for its own folding, on purpose; tracing notes on mmdet's code
              'ignore:Exporting to ONNX opset version 21',
              'ignore:.*constant folding be turned off:UserWarning',
              'ignore::torch.jit.TracerWarning'):
        config.addinivalue_line('filterwarnings', f)
    # one thread: on 2 shared cores, two threads slow the small test models down a lot
    torch.set_num_threads(1)


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory) -> str:
    from mpq_det.datasets.synth import SynthSpec, make_synth_dataset
    out = str(tmp_path_factory.mktemp('synth'))
    make_synth_dataset(out, SynthSpec(num_train=16, num_test=8, min_size=96, max_size=128,
                                      min_obj=10, max_obj=60, seed=3), log=lambda *a: None)
    return out


@pytest.fixture(scope='session')
def synth_data() -> str:
    """The README's synthetic dataset in data/synth, generated when missing (as
    `make data` does), so that its time counts in the suite's. Under pytest-xdist one
    worker writes it while the others wait on the lock."""
    import fcntl
    import os
    from mpq_det.datasets.synth import ensure_synth_dataset
    out = osp.join(ROOT, 'data', 'synth')
    os.makedirs(osp.dirname(out), exist_ok=True)
    with open(osp.join(ROOT, 'data', '.synth.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ensure_synth_dataset(out, log=lambda *a: None)
    return out


def tiny_cfg(config: str, data: str, work_dir: str, img_scale=(128, 128)):
    """A repo config pointed at the tiny dataset, with small images and no workers."""
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(ROOT, config))
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        dl = cfg[key]
        dl.num_workers = 0
        dl.persistent_workers = False
        dl.batch_size = 2
        ds = dl.dataset
        if ds.type == 'VOCDataset':
            ds.data_root = osp.join(data, 'VOCdevkit') + '/'
        else:
            ds.data_root = data + '/'
        for t in ds.pipeline:
            if t.type == 'Resize':
                t.scale = img_scale
    for key in ('val_evaluator', 'test_evaluator'):
        if cfg[key].get('ann_file'):
            cfg[key].ann_file = osp.join(data, 'annotations', 'instances_val.json')
    cfg.work_dir = work_dir
    cfg.default_hooks.visualization = dict(type='DetVisualizationHook')
    cfg.default_hooks.logger.interval = 1
    return cfg


def save_random_checkpoint(cfg, path: str, meta: dict | None = None, seed: int = 0):
    """Builds cfg.model with a seeded random init, saves it as a float checkpoint."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    model.init_weights()
    torch.save({'state_dict': model.state_dict(), 'meta': meta or {}}, path)
    return model


def load_tool(name: str):
    """tools/<name>.py as a module (tools/ is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f'mpq_tools_{name}',
                                                  osp.join(ROOT, 'tools', f'{name}.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
