"""MultipointQuantHook: arguments, bad input, components/skip, reports, both config styles."""
import json
import os
import os.path as osp
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import mpq_det  # noqa: F401
from mpq_det import MultipointQuantHook
from mpq_det.modules import QConv2d

from conftest import ROOT, tiny_cfg

CFG = 'configs/detectors/retinanet_r18q_synth_voc.py'


@pytest.fixture(scope='module')
def runner(tiny_data, tmp_path_factory):
    from mmengine.runner import Runner
    cfg = tiny_cfg(CFG, tiny_data, str(tmp_path_factory.mktemp('wd')))
    return Runner.from_cfg(cfg)


def fresh_runner(runner, tmp_path):
    """The module's runner with a fresh float model and an empty work_dir."""
    from mmdet.registry import MODELS
    torch.manual_seed(0)
    model = MODELS.build(runner.cfg.model)
    return SimpleNamespace(model=model, cfg=runner.cfg, work_dir=str(tmp_path),
                           _train_loop=None)


@pytest.mark.parametrize('kwargs, match', [
    (dict(bitz=4), 'unknown argument'),
    (dict(bits=1), 'bits'),
    (dict(bits=9), 'bits'),
    (dict(method='gptq'), 'method'),
    (dict(allocation='random'), 'allocation'),
    (dict(budget=-0.1), 'budget'),
    (dict(max_points=0), 'max_points'),
    (dict(components={'body': None}), 'unknown component'),
    (dict(components={'head': dict(bits=1)}), 'bits'),
    (dict(components={'head': dict(foo=1)}), 'unknown key'),
    (dict(calib=dict(num_images=0)), 'num_images'),
    (dict(calib=dict(split='holdout')), 'split'),
    (dict(activations=dict(bits=16)), 'activations.bits'),
    (dict(activations=8), 'activations=8 must be a dict'),
    (dict(stats=dict(form='full')), 'stats.form'),
    (dict(points=dict(rank_by='size')), 'points.rank_by'),
    (dict(points=dict(rank_points_by='output')), r"points: unknown key.*rank_points_by"),
    (dict(act_bits=8), r"unknown argument.*act_bits.*activations=dict\(bits=\.\.\.\)"),
])
def test_bad_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultipointQuantHook(**kwargs)


def test_bad_input_at_start_of_testing_writes_nothing(runner, tmp_path):
    export = str(tmp_path / 'q.pth')
    r = fresh_runner(runner, tmp_path)
    with pytest.raises(ValueError, match=r'num_images=999 is larger than the train split'):
        MultipointQuantHook(calib=dict(num_images=999), export=export).before_test(r)
    cfg = runner.cfg.copy()
    cfg.pop('val_dataloader')
    r2 = SimpleNamespace(model=r.model, cfg=cfg, work_dir=str(tmp_path), _train_loop=None)
    with pytest.raises(ValueError, match=r"split='val'.*no val_dataloader"):
        MultipointQuantHook(calib=dict(split='val'), export=export).before_test(r2)
    assert os.listdir(tmp_path) == []
    assert not any(isinstance(m, QConv2d) for m in r.model.modules())


def test_component_the_model_lacks(runner, tmp_path):
    class NoNeck(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Conv2d(3, 4, 3)
            self.bbox_head = nn.Conv2d(4, 4, 1)
    r = SimpleNamespace(model=NoNeck(), cfg=runner.cfg, work_dir=str(tmp_path), _train_loop=None)
    with pytest.raises(ValueError, match="no 'neck'"):
        MultipointQuantHook(components={'neck': dict(bits=8)}).before_test(r)
    assert os.listdir(tmp_path) == []


def test_components_skip_report_and_act_bits(runner, tmp_path, caplog):
    r = fresh_runner(runner, tmp_path)
    hook = MultipointQuantHook(bits=4, components={'neck': None, 'head': dict(bits=8, budget=0.0)},
                               skip=['backbone.conv1', '*.retina_reg', 'nothing.*'],
                               activations=dict(bits=8),
                               calib=dict(num_images=4, batch_size=2))
    from mmengine.logging import MMLogger
    logger = MMLogger.get_instance('mmdet_test_hook')
    messages = []
    logger.warning = lambda msg, *a, **k: messages.append(msg)
    hook.before_test(r)
    assert any("'nothing.*' matches no layer" in m for m in messages)
    mods = dict(r.model.named_modules())
    assert isinstance(mods['backbone.layer1.0.conv1'], QConv2d)
    assert mods['backbone.layer1.0.conv1'].bits == 4
    assert isinstance(mods['bbox_head.retina_cls'], QConv2d) and mods['bbox_head.retina_cls'].bits == 8
    assert type(mods['backbone.conv1']) is nn.Conv2d
    assert type(mods['bbox_head.retina_reg']) is nn.Conv2d
    assert type(mods['neck.fpn_convs.0.conv']) is nn.Conv2d
    assert mods['backbone.layer1.0.conv1'].act_bits == 8
    rep = json.load(open(osp.join(tmp_path, 'mpq_report.json')))
    reasons = {s['name']: s['reason'] for s in rep['skipped']}
    assert 'skip glob' in reasons['backbone.conv1']
    assert 'floating point' in reasons['neck.fpn_convs.0.conv']
    s = rep['summary']
    assert s['fp_weights'] > 0 and 4 < s['bits_per_weight'] < 32
    assert {'name', 'component', 'shape', 'bits', 'points_mean', 'mem_overhead',
            'compute_overhead', 'rel_err_1pt', 'rel_err_final'} <= set(rep['layers'][0])
    # the head pools its own budget (0): one point everywhere there
    head = [l for l in rep['layers'] if l['component'] == 'head']
    assert all(l['points_mean'] == 1 for l in head)
    # quantizing twice is a no-op (before_val then before_test)
    before = mods['backbone.layer1.0.conv1'].codes.clone()
    hook.before_test(r)
    assert torch.equal(before, dict(r.model.named_modules())['backbone.layer1.0.conv1'].codes)


def test_budget_is_spent_and_rtn_says_budget_ignored(runner, tmp_path):
    r = fresh_runner(runner, tmp_path)
    MultipointQuantHook(bits=3, budget=0.1, calib=dict(num_images=4, batch_size=2)).before_test(r)
    s = json.load(open(osp.join(tmp_path, 'mpq_report.json')))['summary']
    # default budget_on='both' on target int8: memory and the compute the int8 graph
    # pays (merged points none) within the budget, the binding one spent
    assert s['memory_overhead'] <= 0.1 and s['compute_overhead_deployed'] <= 0.1 + 1e-6
    assert max(s['memory_overhead'], s['compute_overhead_deployed']) >= 0.09
    r = fresh_runner(runner, tmp_path)
    MultipointQuantHook(bits=3, budget=0.1, points=dict(budget_on='memory'),
                        calib=dict(num_images=4, batch_size=2)).before_test(r)
    s = json.load(open(osp.join(tmp_path, 'mpq_report.json')))['summary']
    assert 0.09 <= s['memory_overhead'] <= 0.1
    r = fresh_runner(runner, tmp_path)
    MultipointQuantHook(bits=3, method='rtn', budget=0.1,
                        calib=dict(num_images=2, batch_size=2)).before_test(r)
    s = json.load(open(osp.join(tmp_path, 'mpq_report.json')))['summary']
    assert s['memory_overhead'] == 0
    assert any('budget' in n and 'ignored' in n for n in s['notes'])


def test_validation_during_training_does_not_quantize(runner, tmp_path):
    from mmengine.runner.loops import EpochBasedTrainLoop
    r = fresh_runner(runner, tmp_path)
    r._train_loop = EpochBasedTrainLoop.__new__(EpochBasedTrainLoop)
    MultipointQuantHook(calib=dict(num_images=2)).before_val(r)
    assert not any(isinstance(m, QConv2d) for m in r.model.modules())


def test_pure_python_config_style(tiny_data, tmp_path):
    from mmengine.config import Config
    src = tmp_path / 'cfg_lazy.py'
    src.write_text(
        'from mpq_det import MultipointQuantHook\n'
        'custom_hooks = [dict(type=MultipointQuantHook, bits=3, budget=0.05)]\n')
    cfg = Config.fromfile(str(src))
    from mmdet.registry import HOOKS
    hook = HOOKS.build(cfg.custom_hooks[0])
    assert isinstance(hook, MultipointQuantHook) and hook.quantizer.base.bits == 3


def test_dict_config_style_and_cfg_options():
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(ROOT, 'configs/mpq/retinanet_r18q_synth_voc_mpq_w4.py'))
    cfg.merge_from_dict({'custom_hooks.0.bits': 3})
    from mmdet.registry import HOOKS
    hook = HOOKS.build(cfg.custom_hooks[0])
    assert hook.quantizer.base.bits == 3 and hook.quantizer.base.method == 'multipoint'


def test_mmcv_wrappers_are_quantized_and_errors_name_the_layer():
    from mmcv.cnn import Conv2d as McvConv2d, Linear as McvLinear
    from mpq_det.components import component_of
    from mpq_det.model_pass import QuantSettings, StatsCollector, plan_layers
    m = nn.Module()
    m.bbox_head = nn.Sequential(McvConv2d(3, 4, 3), McvLinear(8, 4), nn.Linear(8, 4))
    plans, skipped, _ = plan_layers(m, component_of, {'head': QuantSettings(bits=8)})
    assert [p.name for p in plans] == ['bbox_head.0', 'bbox_head.1', 'bbox_head.2']
    assert skipped == []
    col = StatsCollector(plans[:1])
    with pytest.raises(ValueError, match="layer 'bbox_head.0'"):
        m.bbox_head[0](torch.full((1, 3, 5, 5), float('nan')))
    col.remove()


def test_layer_bits_overrides_matching_layers():
    from mpq_det.components import component_of
    from mpq_det.model_pass import QuantSettings, plan_layers
    m = nn.Module()
    m.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    m.bbox_head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 8, 1))
    s = QuantSettings(bits=3)
    plans, _, unmatched = plan_layers(m, component_of, {'backbone': s, 'head': s},
                                      layer_bits={'backbone.0': 8, 'bbox_head.1': 6, 'x.*': 8})
    assert {p.name: p.settings.bits for p in plans} == {
        'backbone.0': 8, 'backbone.1': 3, 'bbox_head.0': 3, 'bbox_head.1': 6}
    assert unmatched == ['x.*']
    with pytest.raises(ValueError, match=r"layer_bits\['a'\]"):
        MultipointQuantHook(layer_bits={'a': 12})


def test_report_picture_and_a_broken_backend_only_warns(runner, tmp_path, monkeypatch):
    r = fresh_runner(runner, tmp_path)
    MultipointQuantHook(bits=3, calib=dict(num_images=2, batch_size=2)).before_test(r)
    png = tmp_path / 'mpq_report.png'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 10_000
    # a plotting failure: a warning, the quantization and the JSON report still done
    import matplotlib.pyplot as plt
    from mmengine.logging import MMLogger

    def broken(*a, **k):
        raise RuntimeError('no backend')
    monkeypatch.setattr(plt, 'subplots', broken)
    messages = []
    monkeypatch.setattr(MMLogger.get_current_instance(), 'warning',
                        lambda msg, *a, **k: messages.append(msg))
    wd = tmp_path / 'broken'
    r = fresh_runner(runner, wd)
    MultipointQuantHook(bits=3, calib=dict(num_images=2, batch_size=2)).before_test(r)
    assert any('could not draw' in m and 'no backend' in m for m in messages)
    assert (wd / 'mpq_report.json').exists() and not (wd / 'mpq_report.png').exists()
    assert any(isinstance(m, QConv2d) for m in r.model.modules())


@pytest.mark.parametrize('kw,name', [
    (dict(points=dict(budget_on='flops')), 'points.budget_on'),
    (dict(feedback='yes'), 'feedback=.yes. must be a dict'),
    (dict(feedback=dict(points=0)), 'feedback.points'), (dict(feedback=dict(mode='all')), 'feedback.mode'),
    (dict(feedback=dict(order=1)), 'feedback.order'), (dict(bias_correction=None), 'bias_correction'),
    (dict(stats=dict(sequential=1)), 'stats.sequential'), (dict(calib=dict(seed='0')), 'calib.seed')])
def test_lever_arguments_are_checked(kw, name):
    with pytest.raises(ValueError, match=name):
        MultipointQuantHook(**kw)


def test_lever_settings_are_stored():
    s = MultipointQuantHook(points=dict(budget_on='memory'), feedback=None).settings()
    # the point scales come from the target (int8 by default: power-of-two)
    assert s['points'] == dict(budget_on='memory', rank_by='output', scales='pow2')
    assert s['grid'] == 'full' and s['target'] == 'int8'
    assert s['feedback'] is None and s['bias_correction'] is False
    # a group given in part keeps the defaults of its other keys
    s = MultipointQuantHook(feedback=dict(mode='first')).settings()
    assert s['feedback'] == dict(points=4, mode='first', order=True)
    assert s['stats'] == dict(form='lowrank', sequential=False) and s['activations'] is None
