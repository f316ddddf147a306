"""Activation ranges chosen by error, per-layer activation bits and the image layer,
on tiny tensors and the tiny plain-torch model (no mmdet)."""
import pytest
import torch
from torch import nn

from mpq_det import MultipointQuantizer
from mpq_det.model_pass import ActSettings, LayerStats, choose_act_ranges
from mpq_det.modules import QConv2d, QLinear
from mpq_det.quant.act_ranges import (DEFAULT_FACTORS, clip_candidates, fake_quant,
                                      quantize_to_range, random_projection, range_errors,
                                      search_range)
from mpq_det.quant.grid import act_qparams

from conftest import gen
from tinynet import Tiny, calibrate_on


def heavy_tailed(n: int = 20000, seed: int = 0) -> torch.Tensor:
    """Post-ReLU values: a Laplace bulk and 0.2% outliers up to 30x its scale."""
    g = gen(seed)
    x = -torch.log(torch.rand(n, generator=g)) * (torch.rand(n, generator=g) < 0.5)
    out = torch.rand(n, generator=g) < 0.002
    return torch.where(out, 30 * torch.rand(n, generator=g), x)


def err(x, lo, hi, bits, w=None):
    e = (quantize_to_range(x, lo, hi, bits) - x) ** 2
    return float((e if w is None else e * w).sum())


def test_fake_quant_matches_the_module():
    """The module's input quantization is fake_quant with its calibrated range."""
    m = nn.Conv2d(2, 3, 1)
    from mpq_det.quant import rtn_qw
    q = QConv2d.from_float(m, rtn_qw(m.weight.detach().reshape(3, -1), 8), act_bits=4)
    q.set_act_range(-0.5, 2.0)
    x = torch.randn(1, 2, 4, 4, generator=gen(1)) * 2
    seen = {}
    q.register_forward_pre_hook(lambda mod, inp: seen.setdefault('x', inp[0]))
    y = q(x)
    step, zero = act_qparams(-0.5, 2.0, 4, False)
    want = nn.functional.conv2d(fake_quant(x, step, zero, 4), q.weight, q.bias)
    assert torch.allclose(y, want, atol=1e-6)
    lo, hi = q.act_range
    assert lo == pytest.approx(-zero * step) and hi == pytest.approx((15 - zero) * step)


def test_candidates_keep_minmax_and_a_bound_at_zero():
    c = clip_candidates(0.0, 4.0)
    assert c.shape == (len(DEFAULT_FACTORS), 2) and bool((c[:, 0] == 0).all())
    assert c[0].tolist() == [0.0, 4.0]                       # widest first: min/max
    c2 = clip_candidates(-1.0, 4.0, (1.0, 0.5))
    assert sorted(map(tuple, c2.tolist())) == sorted([(-1, 4), (-1, 2), (-0.5, 4), (-0.5, 2)])
    with pytest.raises(ValueError, match='factors'):
        clip_candidates(0.0, 1.0, (1.5,))


@pytest.mark.parametrize('bits', [4, 3])
def test_heavy_tailed_layer_mse_range_beats_minmax(bits):
    """On heavy-tailed inputs the searched range clips the tail and has a lower
    quantization error than min/max, by its own criterion."""
    x = heavy_tailed()
    lo, hi = float(x.min()), float(x.max())
    lo2, hi2 = search_range(x, lo, hi, bits)
    assert hi2 <= 0.8 * hi                      # the tail is clipped (measured 0.7, 0.5)
    assert err(x, lo2, hi2, bits) < 0.8 * err(x, lo, hi, bits)   # measured 0.69, 0.56
    # and it is the best candidate: range_errors agrees with a direct evaluation
    e = range_errors(x, clip_candidates(lo, hi), bits)
    assert float(e.min()) == pytest.approx(err(x, lo2, hi2, bits), rel=1e-4)


def test_heavy_tailed_layer_fisher_range_beats_minmax_and_follows_the_weights():
    """'fisher': the weighted error of its range is below min/max's; weights on the
    tail make it clip less than the plain MSE range, weights on the bulk more."""
    x = heavy_tailed()
    lo, hi = float(x.min()), float(x.max())
    tail = (x > torch.quantile(x, 0.99)).float() * 50 + 1
    bulk = torch.ones_like(x)
    _, hi_mse = search_range(x, lo, hi, 4)
    _, hi_tail = search_range(x, lo, hi, 4, weight=tail)
    assert err(x, lo, hi_tail, 4, tail) < err(x, lo, hi, 4, tail)
    assert hi_tail > hi_mse
    assert search_range(x, lo, hi, 4, weight=bulk) == search_range(x, lo, hi, 4)
    # no weight anywhere (no gradient reached the layer): min/max
    assert search_range(x, lo, hi, 4, weight=torch.zeros_like(x)) == (lo, hi)


def test_two_sided_range_searches_both_bounds():
    g = gen(2)
    x = torch.cat([torch.randn(20000, generator=g), torch.tensor([-40.0, 3.0])])
    lo2, hi2 = search_range(x, float(x.min()), float(x.max()), 4)
    assert lo2 > 0.5 * float(x.min())           # the one far negative value is clipped
    assert hi2 == pytest.approx(3.0) or hi2 < 3.0


def test_random_projection_gives_the_jacobian_diagonal_in_expectation():
    """E_v g^2 = diag(J^T diag(w^2) J) for g = grad of random_projection."""
    J = torch.randn(5, 3, generator=gen(3))
    w = torch.tensor([1.0, 2.0, 0.0, 0.5, 1.0])
    x = torch.randn(3, generator=gen(4)).requires_grad_()
    g2 = torch.zeros(3)
    n = 4000
    gg = gen(5)
    for _ in range(n):
        x.grad = None
        random_projection([(J @ x, w)], gg).backward()
        g2 += x.grad ** 2 / n
    want = ((J * w[:, None]) ** 2).sum(0)
    assert torch.allclose(g2, want, rtol=0.1)


def quantize_tiny(**acts):
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(8, 3, 16, 16, generator=gen(6))
    q = MultipointQuantizer(bits=4, budget=0.0, feedback=None, activations=acts)
    res, _, _ = q.quantize(model, calibrate_on([x]),
                           backward=lambda m: random_projection([(m(x.requires_grad_()), 1.0)],
                                                                gen(7)).backward())
    return model, res


def qlayers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (QConv2d, QLinear))}


def test_first_layer_reads_the_image_at_8_bits_unless_overridden():
    model, res = quantize_tiny(bits=4)
    bits = {n: l.act_bits for n, l in qlayers(model).items()}
    assert bits == {'backbone.0': 8, 'backbone.2': 4, 'backbone.4': 4, 'neck.0': 4,
                    'bbox_head.1': 4}
    assert res.summary['image_layer'] == 'backbone.0'
    row = next(r for r in res.layers if r['name'] == 'backbone.0')
    assert row['act_bits'] == 8 and row['act_method'] == 'minmax'
    model, _ = quantize_tiny(bits=4, image_bits=None)
    assert {l.act_bits for l in qlayers(model).values()} == {4}
    model, _ = quantize_tiny(bits=4, layer_bits={'backbone.0': 6})
    assert qlayers(model)['backbone.0'].act_bits == 6


def test_per_layer_act_bits_reach_the_modules_and_the_report():
    lb = {'neck.*': 6, 'bbox_head.*': 8, 'backbone.2': 3}
    model, res = quantize_tiny(bits=4, layer_bits=lb)
    want = {'backbone.0': 8, 'backbone.2': 3, 'backbone.4': 4, 'neck.0': 6,
            'bbox_head.1': 8}
    assert {n: l.act_bits for n, l in qlayers(model).items()} == want
    assert {r['name']: r['act_bits'] for r in res.layers} == want
    for n, l in qlayers(model).items():       # the range the report names is the module's
        r = next(r for r in res.layers if r['name'] == n)
        # up to the zero point's rounding to an integer code
        assert abs(l.act_range[1] - r['act_range'][1]) <= float(l.act_scale)


@pytest.mark.parametrize('method', ['mse', 'fisher'])
def test_range_methods_clip_and_shrink_scales_minmax(method):
    m0, _ = quantize_tiny(bits=4, range='minmax')
    m1, res = quantize_tiny(bits=4, range=method)
    m2, _ = quantize_tiny(bits=4, range='minmax', shrink=0.5)
    r0 = {n: l.act_range for n, l in qlayers(m0).items()}
    r1 = {n: l.act_range for n, l in qlayers(m1).items()}
    r2 = {n: l.act_range for n, l in qlayers(m2).items()}
    inner = [n for n in r0 if n != 'backbone.0']
    assert r1['backbone.0'] == r0['backbone.0'] == r2['backbone.0']   # the image: min/max
    assert any(r1[n][1] < 0.95 * r0[n][1] for n in inner)             # clipped somewhere
    assert all(r1[n][1] <= r0[n][1] * (1 + 1e-6) for n in inner)
    assert all(r2[n][1] == pytest.approx(0.5 * r0[n][1], rel=2e-2) for n in inner)
    assert {r['act_method'] for r in res.layers if r['name'] in inner} <= {method,
                                                                        'mse (no gradient)'}


def test_bad_activation_arguments_are_named():
    with pytest.raises(ValueError, match='activations.range'):
        MultipointQuantizer(activations=dict(bits=4, range='percentile'))
    with pytest.raises(ValueError, match='activations.shrink'):
        MultipointQuantizer(activations=dict(bits=4, shrink=1.5))
    with pytest.raises(ValueError, match="range='minmax'"):
        MultipointQuantizer(activations=dict(bits=4, range='mse', shrink=0.7))
    with pytest.raises(ValueError, match=r"activations.layer_bits\['x'\]"):
        MultipointQuantizer(activations=dict(bits=4, layer_bits={'x': 1}))
    with pytest.raises(ValueError, match='activations.fit'):
        MultipointQuantizer(activations=dict(bits=4, fit='both'))
    with pytest.raises(ValueError, match='protocol'):
        MultipointQuantizer(protocol='qdrop')


def test_fisher_without_backward_falls_back_to_mse(caplog):
    model = Tiny().eval()
    x = torch.randn(2, 3, 16, 16, generator=gen(8))
    res, _, _ = MultipointQuantizer(activations=dict(bits=4, range='fisher')).quantize(
        model, calibrate_on([x]))
    assert 'backward' in caplog.text
    assert {r['act_method'] for r in res.layers} == {'minmax', 'mse (no backward)'}


def test_act_settings_bits_of():
    a = ActSettings(bits=4, layer_bits={'a.*': 6})
    assert a.bits_of('a.b', image=True) == 6 and a.bits_of('c', image=True) == 8
    assert a.bits_of('c', image=False) == 4


@pytest.mark.parametrize('fit', ['quantized', 'target'])
def test_fit_on_quantized_inputs_changes_the_weights(fit):
    """H (and with 'target' the cross term) from the inputs through the chosen
    ranges: the weights differ from those fitted to the float inputs."""
    m0, _ = quantize_tiny(bits=4, range='minmax', shrink=0.5)
    m1, _ = quantize_tiny(bits=4, range='minmax', shrink=0.5, fit=fit)
    w0 = {n: l.quantized_weight().dequantize() for n, l in qlayers(m0).items()}
    w1 = {n: l.quantized_weight().dequantize() for n, l in qlayers(m1).items()}
    changed = [n for n in w0 if not torch.equal(w0[n], w1[n])]
    assert 'backbone.2' in changed, changed


def test_8_bit_inputs_keep_minmax_and_need_no_backward():
    """The range method applies below 8 bits: W*A8 keeps the min/max ranges the int8
    graph was validated with, and runs no backward pass."""
    calls = []
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(4, 3, 16, 16, generator=gen(9))
    res, _, _ = MultipointQuantizer(bits=4, activations=dict(bits=8)).quantize(
        model, calibrate_on([x]), backward=lambda m: calls.append(1))
    assert not calls and {r['act_method'] for r in res.layers} == {'minmax'}
    model, res = quantize_tiny(bits=4, layer_bits={'neck.*': 8})
    methods = {r['name']: r['act_method'] for r in res.layers}
    assert methods['neck.0'] == 'minmax' and methods['backbone.2'] == 'fisher'


def deployed_with_a_4_bit_input(tmp_path, factor: float = 0.4):
    """The deploy tests' toy W4A8 model with one inner conv's input at 4 bits over a
    clipped range (``factor`` of its min/max), and its int8 graph."""
    from test_deploy import deploy, toy
    model = toy(1)
    name = 'c1.0'
    layer = model.get_submodule(name)
    lo, hi = layer.act_range
    layer.set_act_range(factor * lo, factor * hi, act_bits=4)
    path, report = deploy(model, tmp_path)
    return model, name, path, report


def test_deploy_lists_4_bit_input_layers(tmp_path):
    """onnxruntime has no 4-bit activation kernels: the int8 graph builder keeps a
    layer with 4-bit inputs out of its integer convs and the report names it and why."""
    pytest.importorskip('onnxruntime')
    _, name, _, report = deployed_with_a_4_bit_input(tmp_path)
    rec = {c.name: c for c in report.non_integer}
    assert name in rec and 'act_bits=4' in rec[name].reason
    assert any(name in line for line in report.lines())


@pytest.mark.xfail(strict=True, reason='deploy: the 4-bit input Q/DQ is uint8 at the 4-bit '
                   'step without the clip to codes 0..15 (requant.input_qdq ignores bits), '
                   'and onnxruntime fuses it into a QLinearConv')
def test_deploy_runs_4_bit_inputs_as_pytorch_does(tmp_path):
    """The graph's 4-bit input quantization clips where PyTorch clips: with a clipped
    range it stays as close to PyTorch as the 8-bit graph does (measured 0.020 W4A8;
    0.072 with one input at 4 bits over 0.4 of its min/max)."""
    pytest.importorskip('onnxruntime')
    from test_deploy import compare
    model, _, path, _ = deployed_with_a_4_bit_input(tmp_path)
    assert compare(model, path) < 0.04


def test_fisher_ranges_follow_the_gradients():
    """'fisher' weighs each input by the squared gradient that reaches it: its ranges
    are not the plain MSE ones."""
    _, r_mse = quantize_tiny(bits=4, range='mse')
    _, r_fisher = quantize_tiny(bits=4, range='fisher')
    mse = {r['name']: r['act_range'] for r in r_mse.layers}
    fisher = {r['name']: r['act_range'] for r in r_fisher.layers}
    assert any(fisher[n] != mse[n] for n in mse if n != 'backbone.0')


def test_choose_act_ranges_weights_each_value_by_its_gradient():
    """On the same sample, 'fisher' with weight on the tail keeps more of the tail than
    with uniform weights (its MSE range): the squared gradients reach the search."""
    from types import SimpleNamespace
    x = heavy_tailed()
    stats = {'a': LayerStats(None, float(x.min()), float(x.max()), [x], calls=1)}
    plans = [SimpleNamespace(name='a')]
    acts = ActSettings(bits=4, range='fisher')
    tail = (x > torch.quantile(x, 0.99)).float() * 50 + 1
    r_tail = choose_act_ranges(plans, stats, acts, None, {'a': (x, tail)})['a']
    r_flat = choose_act_ranges(plans, stats, acts, None, {'a': (x, torch.ones_like(x))})['a']
    r_mse = choose_act_ranges(plans, stats, ActSettings(bits=4, range='mse'))['a']
    assert (r_flat.lo, r_flat.hi) == (r_mse.lo, r_mse.hi)
    assert r_tail.hi > r_flat.hi and r_tail.method == 'fisher'
