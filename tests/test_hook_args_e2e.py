"""Every hook argument end to end: through the hook in a Runner's test loop, or
through the hook's before_test on the loaded detector where only the layers matter.

The committed RetinaNet (trained, so activations and errors are those of a real
detector) runs on the tiny synthetic set: ``Runner.test()`` loads the checkpoint, the
hook calibrates and quantizes in ``before_test``, and the test loop runs the
quantized model. Each test checks what its argument is for, on the model and on the
report the hook wrote, so that ignoring the argument makes it fail.
"""
import copy
import fnmatch
import json
import os.path as osp

import pytest
import torch

import mpq_det  # noqa: F401
from mpq_det.deploy.convert import max_rel_diff, raw_outputs, sample_inputs
from mpq_det.modules import QConv2d, QLinear
from mpq_det.quant import FORMS

from conftest import ROOT, tiny_cfg

CFG = 'configs/detectors/retinanet_r18q_synth_voc.py'
CKPT = osp.join(ROOT, 'data/checkpoints/retinanet_r18q.pth')
CALIB = dict(split='train', num_images=4, batch_size=2, seed=0)


@pytest.fixture(scope='module')
def base_cfg(tiny_data, tmp_path_factory):
    cfg = tiny_cfg(CFG, tiny_data, str(tmp_path_factory.mktemp('e2e')))
    cfg.load_from = CKPT
    return cfg


@pytest.fixture(scope='module')
def inputs(base_cfg):
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    return sample_inputs(base_cfg, MODELS.build(base_cfg.model), 2)


def run(base_cfg, tmp_path, name='run', **hook):
    """Runner.test() with the hook (or no hook when ``hook`` is empty); returns the
    runner, its quantized model and the report the hook wrote."""
    from mmengine.runner import Runner
    cfg = copy.deepcopy(base_cfg)
    cfg.work_dir = str(tmp_path / name)
    cfg.custom_hooks = [dict(type='MultipointQuantHook', calib=CALIB, **hook)] if hook else []
    runner = Runner.from_cfg(cfg)
    runner.test()
    rep_path = osp.join(cfg.work_dir, 'mpq_report.json')
    rep = json.load(open(rep_path)) if hook and osp.exists(rep_path) else None
    return runner, runner.model.eval(), rep


def qlayers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (QConv2d, QLinear))}


def overhead_in_bits(rows) -> float:
    extra = sum(r['bits'] * (r['stored_weights'] - r['weights']) for r in rows)
    return extra / sum(r['bits'] * r['weights'] for r in rows)


def rel_err(model, ref, inputs) -> float:
    return max_rel_diff(raw_outputs(model, *inputs), ref)


@pytest.fixture(scope='module')
def fp_model(base_cfg):
    """The trained RetinaNet in floating point, loaded once; the tests quantize copies."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_checkpoint
    init_default_scope('mmdet')
    model = MODELS.build(base_cfg.model)
    load_checkpoint(model, CKPT, map_location='cpu', logger='silent')
    return model.eval()


@pytest.fixture(scope='module')
def fp_raw(fp_model, inputs):
    return raw_outputs(fp_model, *inputs)


def quant(base_cfg, fp_model, tmp_path, name='q', **hook):
    """What the hook does in tools/test.py's ``before_test``, on a copy of the float
    model, without the test loop (the tests that need a Runner use ``run``); returns
    the quantized model and the hook's report (its layers and summary)."""
    from types import SimpleNamespace
    from mmengine.registry import HOOKS
    m = copy.deepcopy(fp_model)
    h = HOOKS.build(dict(type='MultipointQuantHook', calib=CALIB, report=False, **hook))
    h.before_test(SimpleNamespace(model=m, cfg=base_cfg, work_dir=str(tmp_path / name),
                                  _train_loop=None))
    return m, dict(layers=h.result.layers, summary=h.result.summary)


def test_activations(base_cfg, inputs, fp_raw, tmp_path):
    """activations=dict(bits=A) fake-quantizes every quantized layer's input: the outputs move away
    from the weight-only model's, by a bounded amount that grows as bits shrink."""
    _, w_only, _ = run(base_cfg, tmp_path, 'w', bits=8, budget=0.0)
    ref = raw_outputs(w_only, *inputs)
    errs = {}
    for a in (8, 4):
        _, m, rep = run(base_cfg, tmp_path, f'a{a}', bits=8, budget=0.0,
                        activations=dict(bits=a))
        q = qlayers(m)
        # the first conv reads the image: its input stays at 8 bits (activations.image_bits)
        assert q and all(l.act_bits == (8 if n == 'backbone.conv1' else a)
                         and float(l.act_scale) > 0 for n, l in q.items())
        assert rep['summary']['settings']['activations']['bits'] == a
        assert rep['summary']['image_layer'] == 'backbone.conv1'
        # below 8 bits the ranges come from the detector's score-space gradients
        methods = {r['act_method'] for r in rep['layers'] if r['name'] != 'backbone.conv1'}
        assert methods == ({'fisher'} if a < 8 else {'minmax'}), methods
        assert any('backbone.conv1 reads the image: its input at 8 bits' in n
                   for n in rep['summary']['notes'])
        errs[a] = rel_err(m, ref, inputs)
    print(f'activations: raw-output max rel diff vs weight-only W8: {errs}; '
          f'W8 weight-only vs FP {max_rel_diff(ref, fp_raw):.2e}')
    assert errs[8] > 1e-4            # it does something
    assert errs[8] < 0.06            # measured 0.021: 8-bit activations keep the detector
    assert errs[4] > 2 * errs[8]     # and fewer bits cost more


def test_layer_bits_and_budget_counted_in_bits(base_cfg, fp_model, tmp_path):
    lb = {'backbone.conv1': 8, 'backbone.layer1.*': 4, 'bbox_head.retina_cls': 8,
          'bbox_head.retina_reg': 6}
    budget = 0.1
    m, rep = quant(base_cfg, fp_model, tmp_path, bits=3, budget=budget, layer_bits=lb)
    q = qlayers(m)
    want = {n: next((b for g, b in lb.items() if fnmatch.fnmatchcase(n, g)), 3) for n in q}
    assert {n: l.bits for n, l in q.items()} == want
    assert {r['name']: r['bits'] for r in rep['layers']} == want
    # points went to layers of different bits, so weights and bits would disagree
    assert len({r['bits'] for r in rep['layers'] if r['stored_weights'] > r['weights']}) >= 2
    s = rep['summary']
    mem = overhead_in_bits(rep['layers'])
    assert s['memory_overhead'] == pytest.approx(mem, rel=1e-9)
    assert 0.5 * budget < mem <= budget + 1e-9
    # bits per weight: codes at each layer's bits, 32-bit scales, FP layers at 32
    bpw = (sum(r['bits'] * r['stored_weights'] + 32 * r['scales'] for r in rep['layers'])
           + 32 * s['fp_weights']) / (s['quantized_weights'] + s['fp_weights'])
    assert s['bits_per_weight'] == pytest.approx(bpw, rel=1e-9)


def test_component_with_its_own_budget(base_cfg, fp_model, tmp_path):
    _, rep = quant(base_cfg, fp_model, tmp_path, bits=3, budget=0.02,
                    components={'head': dict(budget=0.3)})
    head = [r for r in rep['layers'] if r['component'] == 'head']
    rest = [r for r in rep['layers'] if r['component'] != 'head']
    assert head and rest
    assert 0.15 < overhead_in_bits(head) <= 0.3 + 1e-9
    assert 0.01 < overhead_in_bits(rest) <= 0.02 + 1e-9


def test_allocation_layer(base_cfg, fp_model, tmp_path):
    """The paper's rule: floor(budget * C_out) extra points in every layer."""
    budget = 0.1
    m, rep = quant(base_cfg, fp_model, tmp_path, 'layer', bits=3, budget=budget, allocation='layer')
    extra = {r['name']: round(r['points_mean'] * r['shape'][0]) - r['shape'][0]
             for r in rep['layers']}
    want = {r['name']: int(budget * r['shape'][0] + 1e-9) for r in rep['layers']}
    assert extra == want
    assert {n: int(l.npoints.sum()) - l.npoints.numel() for n, l in qlayers(m).items()} == want
    _, rep_g = quant(base_cfg, fp_model, tmp_path, 'global', bits=3, budget=budget, allocation='global')
    extra_g = {r['name']: round(r['points_mean'] * r['shape'][0]) - r['shape'][0]
               for r in rep_g['layers']}
    assert extra_g != want      # the global pool spends it elsewhere


@pytest.mark.parametrize('max_points', [1, 2, 3])
def test_max_points(base_cfg, fp_model, tmp_path, max_points):
    # a budget far above what max_points allows: the cap is what binds
    m, rep = quant(base_cfg, fp_model, tmp_path, bits=2, budget=1.0, max_points=max_points)
    most = max(int(l.npoints.max()) for l in qlayers(m).values())
    assert most == max_points
    assert max(r['points_max'] for r in rep['layers']) == max_points


def test_every_h_form(base_cfg, fp_model, inputs, fp_raw, tmp_path):
    """Each form runs end to end and is the one used: the codes depend on it."""
    codes, errs = {}, {}
    for form in FORMS:
        m, rep = quant(base_cfg, fp_model, tmp_path, form, bits=3, budget=0.05,
                        stats=dict(form=form))
        assert rep['summary']['settings']['stats']['form'] == form
        codes[form] = torch.cat([l.codes.flatten() for l in qlayers(m).values()])
        errs[form] = rel_err(m, fp_raw, inputs)
    print(f'stats.form: W3 raw-output max rel diff vs FP: {errs}')
    assert all(e < 0.4 for e in errs.values()), errs   # measured 0.18-0.21
    forms = list(FORMS)
    for i, a in enumerate(forms):
        for b in forms[i + 1:]:
            if codes[a].shape == codes[b].shape:
                assert not torch.equal(codes[a], codes[b]), (a, b)


def test_method_mse(base_cfg, fp_model, tmp_path):
    """mse: one point per channel, its scale clipped below min-max on some channels
    (on the full grid, the default: codes -4..3 and signed scales)."""
    from mpq_det.quant import code_range, minmax_scale
    m, rep = quant(base_cfg, fp_model, tmp_path, method='mse', bits=3, budget=0.05)
    sd = torch.load(CKPT, map_location='cpu', weights_only=True)['state_dict']
    clipped = total = 0
    for name, l in qlayers(m).items():
        assert l.bits == 3 and bool((l.npoints == 1).all())
        w = sd[f'{name}.weight'].reshape(l.npoints.numel(), -1)
        lo, hi = code_range(3, 'full')
        assert lo <= int(l.codes.min()) and int(l.codes.max()) <= hi
        # the min-max scale would put max|w| exactly on the grid's end
        minmax = minmax_scale(w, 3, 'full').abs()
        clipped += int((l.scales.abs() < minmax * (1 - 1e-3)).sum())
        total += l.scales.numel()
    assert clipped > 0.1 * total
    assert rep['summary']['memory_overhead'] == 0


def test_method_ocs_export_reload_to_float(base_cfg, inputs, tmp_path):
    from mpq_det.deploy.convert import convert_export
    q = str(tmp_path / 'ocs.pth')
    _, m, rep = run(base_cfg, tmp_path, 'ocs', method='ocs', bits=4, budget=0.05, export=q)
    layers = qlayers(m)
    split = [n for n, l in layers.items() if l.in_index is not None]
    assert len(split) >= len(layers) // 2        # OCS split input channels
    assert 0 < rep['summary']['memory_overhead'] <= 0.05
    ref = raw_outputs(m, *inputs)
    # reload through the hook: the export's layers, bit for bit, no calibration
    cfg = copy.deepcopy(base_cfg)
    cfg.load_from = q
    _, m2, _ = run(cfg, tmp_path, 'reload', bits=2)  # config settings lose to the export's
    assert {n: l.in_index is not None for n, l in qlayers(m2).items()} == \
        {n: l.in_index is not None for n, l in layers.items()}
    assert all(torch.equal(a, b) for a, b in zip(raw_outputs(m2, *inputs), ref))
    # --to-float: a plain mmdet model with the OCS duplicates summed back
    diffs = convert_export(cfg, q, to_float=str(tmp_path / 'float.pth'))
    assert diffs['float'] <= 1e-5


def test_points_rank_by(base_cfg, fp_model, tmp_path):
    """The ablation's placements spend the same budget on other channels."""
    npoints, mem = {}, {}
    for by in ('output', 'weight', 'random'):
        m, rep = quant(base_cfg, fp_model, tmp_path, by, bits=3, budget=0.05,
                        points=dict(rank_by=by))
        assert rep['summary']['settings']['points']['rank_by'] == by
        npoints[by] = torch.cat([l.npoints for l in qlayers(m).values()])
        # the binding one of the two bounds (budget_on='both'; compute as the default
        # target, int8, pays it) is spent
        mem[by] = max(rep['summary']['memory_overhead'],
                      rep['summary']['compute_overhead_deployed'])
    assert all(0.04 < v <= 0.05 + 1e-9 for v in mem.values()), mem
    assert not torch.equal(npoints['output'], npoints['random'])
    assert not torch.equal(npoints['output'], npoints['weight'])


def test_sequential(base_cfg, fp_model, tmp_path):
    """Sequential statistics: the allocation is made once on FP statistics (the
    same point counts as without), the first stage is quantized from those, and
    every later stage from its own pass on the partly quantized model."""
    models, reps = {}, {}
    for seq in (False, True):
        models[seq], reps[seq] = quant(base_cfg, fp_model, tmp_path, f'seq_{seq}', bits=3,
                                        budget=0.05, stats=dict(sequential=seq))
    summ = reps[True]['summary']
    assert summ['settings']['stats']['sequential'] is True
    assert summ['stages'][0] == 'backbone.conv1' and summ['stages'][-2:] == ['neck',
                                                                            'bbox_head']
    assert summ['calib_passes'] == len(summ['stages'])
    q = {k: qlayers(m) for k, m in models.items()}
    for name, layer in q[False].items():
        other = q[True][name]
        assert torch.equal(layer.npoints, other.npoints), name
        same = torch.equal(layer.quantized_weight().dequantize(),
                           other.quantized_weight().dequantize())
        # the first stage sees the images themselves: nothing to redo
        assert same == name.startswith('backbone.conv1'), name
    for k in ('memory_overhead', 'compute_overhead_deployed'):
        assert summ[k] <= 0.05 + 1e-6
    with pytest.raises(ValueError, match='stats.sequential'):
        quant(base_cfg, fp_model, tmp_path, 'seq_bad', stats=dict(sequential='blocks'))


def test_point_scales_pow2(base_cfg, fp_model, tmp_path):
    """points.scales='pow2': every extra point is a power-of-two fraction of its
    channel's previous one, so the points merge into int8 rows (deployment runs them
    at no extra compute). On target lowbit the budget bounds every point's rows, as
    with free scales; on int8 (whose default scales these are) the compute the int8
    graph pays, so the points go where memory buys most and their rows exceed the
    budget."""
    from mpq_det.deploy.qdq import merged_points
    extras = {}
    for target in ('lowbit', 'int8'):
        m, rep = quant(base_cfg, fp_model, tmp_path, f'pow2_{target}', bits=3,
                       budget=0.05, points=dict(scales='pow2'), target=target)
        s = rep['summary']
        assert s['settings']['points']['scales'] == 'pow2'
        extra = merged = 0
        for layer in qlayers(m).values():
            extra += int(layer.npoints.sum()) - layer.out_channels
            merged += merged_points(layer)[1]
        assert extra > 0 and merged >= 0.95 * extra, (merged, extra)
        compute = 'compute_overhead' if target == 'lowbit' else 'compute_overhead_deployed'
        for k in ('memory_overhead', compute):
            assert s[k] <= 0.05 + 1e-6, (target, k, s[k])
        extras[target] = s['compute_overhead']
    assert extras['int8'] > 0.05, extras
    with pytest.raises(ValueError, match='points.scales'):
        quant(base_cfg, fp_model, tmp_path, 'pow2_bad', points=dict(scales='int8'))


# Each lever flipped from its default, as a user would write it in the config. A hook
# (or quantizer) that dropped the value would quantize both runs alike, so every flip
# must change the quantized layers of the trained RetinaNet at W2, budget 0.1 (where
# channels get 2 to 4 points, so that max_points and feedback.points bind).
LEVER_FLIPS = {
    'feedback': dict(feedback=None),
    'feedback.points': dict(feedback=dict(points=1)),
    'feedback.mode': dict(feedback=dict(mode='first')),
    'feedback.order': dict(feedback=dict(order=False)),
    'points.budget_on': dict(points=dict(budget_on='memory')),
    'points.rank_by': dict(points=dict(rank_by='weight')),
    'points.scales': dict(points=dict(scales='free')),
    'stats.form': dict(stats=dict(form='diag')),
    'stats.sequential': dict(stats=dict(sequential='components')),
    'bias_correction': dict(bias_correction=True),
    'allocation': dict(allocation='layer'),
    'max_points': dict(max_points=2),
    'activations': dict(activations=dict(bits=8)),
    'protocol': dict(protocol='literature'),
    # the activations group's keys, each flipped against ACT_BASE (one key apart)
    'activations.range': dict(activations=dict(bits=4, range='fisher')),
    'activations.shrink': dict(activations=dict(bits=4, range='minmax', shrink=0.7)),
    'activations.layer_bits': dict(activations=dict(bits=4, range='minmax',
                                                    layer_bits={'neck.*': 6})),
    'activations.image_bits': dict(activations=dict(bits=4, range='minmax', image_bits=None)),
    'activations.fit': dict(activations=dict(bits=4, range='minmax', fit='quantized')),
    'grid': dict(grid='symmetric'),
    'target': dict(target='lowbit'),
}
LEVER_RUN = dict(bits=2, budget=0.1)
ACT_BASE = dict(activations=dict(bits=4, range='minmax'))


def layer_state(model) -> dict:
    out = {}
    for n, l in qlayers(model).items():
        out[n] = (l.quantized_weight().dequantize(), l.npoints,
                  None if l.bias is None else l.bias.detach().clone(),
                  None if l.act_bits is None else float(l.act_scale))
    return out


def same_layers(a: dict, b: dict) -> bool:
    def eq(x, y):
        if x is None or y is None or isinstance(x, float):
            return x == y
        return x.shape == y.shape and torch.equal(x, y)
    return a.keys() == b.keys() and all(eq(x, y) for n in a for x, y in zip(a[n], b[n]))


@pytest.fixture(scope='module')
def lever_default(base_cfg, fp_model, tmp_path_factory):
    m, rep = quant(base_cfg, fp_model, tmp_path_factory.mktemp('lever_default'), **LEVER_RUN)
    return layer_state(m), rep


@pytest.fixture(scope='module')
def lever_act_default(base_cfg, fp_model, tmp_path_factory):
    """4-bit inputs with min/max ranges: what a flip of an activations key changes."""
    m, rep = quant(base_cfg, fp_model, tmp_path_factory.mktemp('lever_act'), **LEVER_RUN,
                   **ACT_BASE)
    return layer_state(m), rep


def test_the_defaults_run_twice_alike(base_cfg, fp_model, lever_default, tmp_path):
    """Without this, a flip could differ from the default by chance alone."""
    m, _ = quant(base_cfg, fp_model, tmp_path, **LEVER_RUN)
    assert same_layers(layer_state(m), lever_default[0])


@pytest.mark.parametrize('lever', list(LEVER_FLIPS))
def test_every_lever_reaches_the_quantized_layers(base_cfg, fp_model, request,
                                                  tmp_path, lever):
    m, rep = quant(base_cfg, fp_model, tmp_path, **LEVER_RUN, **LEVER_FLIPS[lever])
    group, _, key = lever.partition('.')
    # the settings the export stores say what was asked ...
    flip = LEVER_FLIPS[lever][group]
    settings = rep['summary']['settings']
    stored = settings[group] if group in settings else settings['base'][group]
    if isinstance(stored, dict) and isinstance(flip, dict) and not key:
        stored = {k: stored[k] for k in flip}     # a group: the keys given, defaults aside
    assert stored == flip or (key and stored[key] == flip[key]), (lever, stored)
    # ... and the layers show it (an activations key: against ACT_BASE)
    base = request.getfixturevalue('lever_act_default' if group == 'activations' and key
                                   else 'lever_default')
    assert not same_layers(layer_state(m), base[0]), lever


def test_error_feedback_lowers_the_output_error(base_cfg, fp_model, lever_default,
                                                tmp_path):
    """The lever that pays most, guarded by its effect as well: the report's output
    error after all points, summed over layers, is lower with feedback than without."""
    _, rep_off = quant(base_cfg, fp_model, tmp_path, **LEVER_RUN, feedback=None)
    err = {k: sum(r['rel_err_final'] for r in rep['layers'] if r['rel_err_final'])
           for k, rep in (('on', lever_default[1]), ('off', rep_off))}
    print(f'summed relative output error at W2 b0.1: {err}')
    assert err['on'] < 0.9 * err['off'], err
