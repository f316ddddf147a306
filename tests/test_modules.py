"""Tests of the quantized modules (mpq_det.modules)."""
import copy
import io

import pytest
import torch
import torch.nn as nn

from mpq_det.modules import QConv2d, QLinear
from mpq_det.quant import (QuantizedWeight, expanded_rows, greedy_multipoint, ocs,
                           random_hform, rtn_qw, select_points)

from conftest import gen


def multipoint_qw(W2d, bits=3, seed=0):
    """Points with a varied number per channel (1..3)."""
    C = W2d.shape[0]
    ps = greedy_multipoint(W2d, None, bits, 3)
    n = torch.randint(1, 4, (C,), generator=gen(seed))
    return select_points(ps, n)


def rel_fro(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def rel_diff(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


CONVS = [
    dict(in_channels=8, out_channels=12, kernel_size=3, padding=1),
    dict(in_channels=8, out_channels=12, kernel_size=3, stride=2, padding=2,
         dilation=2, bias=False),
    dict(in_channels=8, out_channels=12, kernel_size=(3, 1), padding=(1, 0), groups=4),
    dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8),   # dw
    dict(in_channels=8, out_channels=16, kernel_size=3, padding=1, groups=8),  # dw x2
    dict(in_channels=8, out_channels=6, kernel_size=1),
    dict(in_channels=8, out_channels=6, kernel_size=3, padding='same', dilation=2),
    dict(in_channels=8, out_channels=6, kernel_size=3, padding=1,
         padding_mode='reflect'),
]


@pytest.mark.parametrize('cfg', CONVS)
def test_conv_forwards_agree(cfg):
    torch.manual_seed(0)
    m = nn.Conv2d(**cfg)
    qw = multipoint_qw(m.weight.detach().reshape(m.out_channels, -1))
    q = QConv2d.from_float(m, qw)
    x = torch.randn(2, 8, 11, 9, generator=gen(1))
    with torch.no_grad():
        y_fp = nn.functional.conv2d(x, m.weight, m.bias, m.stride, m.padding,
                                    m.dilation, m.groups) \
            if cfg.get('padding_mode') != 'reflect' else m(x)
        y_ref = nn.functional.conv2d(
            nn.functional.pad(x, (1, 1, 1, 1), mode='reflect')
            if cfg.get('padding_mode') == 'reflect' else x,
            qw.dequantize().reshape_as(m.weight), m.bias, m.stride,
            0 if cfg.get('padding_mode') == 'reflect' else m.padding, m.dilation,
            m.groups)
        q.mode = 'dequant'
        y1 = q(x)
        q.mode = 'expanded'
        y2 = q(x)
    assert y1.shape == y_ref.shape == y_fp.shape
    # 3-bit, 1-3 points: measured 0.065-0.103 relative (Frobenius) error against the
    # float conv, where one-point 3-bit rtn gives 0.113-0.170
    rtn_q = QConv2d.from_float(m, rtn_qw(m.weight.detach().reshape(m.out_channels, -1), 3))
    with torch.no_grad():
        e_rtn = rel_fro(rtn_q(x), y_fp)
    assert rel_fro(y1, y_fp) < 0.13
    assert rel_fro(y1, y_fp) < 0.9 * e_rtn
    assert rel_diff(y1, y_ref) <= 1e-5
    assert rel_diff(y2, y1) <= 1e-4
    assert int(q.npoints.sum()) > m.out_channels     # there are extra points
    torch.testing.assert_close(q.weight, qw.dequantize().reshape_as(m.weight))


@pytest.mark.parametrize('bias', [True, False])
def test_linear_forwards_agree(bias):
    torch.manual_seed(1)
    m = nn.Linear(20, 7, bias=bias)
    qw = multipoint_qw(m.weight.detach())
    q = QLinear.from_float(m, qw)
    x = torch.randn(3, 5, 20, generator=gen(2))
    with torch.no_grad():
        y_ref = nn.functional.linear(x, qw.dequantize(), m.bias)
        y1 = q(x)
        q.mode = 'expanded'
        y2 = q(x)
    assert rel_diff(y1, y_ref) <= 1e-5
    assert rel_diff(y2, y1) <= 1e-4


def test_mode_validation_and_dtype():
    m = nn.Linear(6, 4)
    q = QLinear.from_float(m, rtn_qw(m.weight.detach(), 4))
    with pytest.raises(ValueError, match='mode'):
        q.mode = 'fast'
    x = torch.randn(2, 6, dtype=torch.float64)
    assert q(x).dtype == torch.float64
    with pytest.raises(ValueError, match='d='):
        QLinear.from_float(nn.Linear(5, 4), q.quantized_weight())


def test_ocs_module_function():
    torch.manual_seed(2)
    m = nn.Conv2d(10, 6, 3, padding=1)
    W = m.weight.detach()
    qw, idx = ocs(W, 8, 0.2)
    q = QConv2d.from_float(m, qw, in_index=idx)
    x = torch.randn(2, 10, 7, 7, generator=gen(3))
    with torch.no_grad():
        y = q(x)
        q.mode = 'expanded'
        y2 = q(x)
        y_fp = m(x)
    assert rel_diff(y2, y) <= 1e-4
    assert rel_diff(y, y_fp) < 0.01           # 8-bit OCS: measured 0.0038
    lin = nn.Linear(10, 4)
    qwl, idl = ocs(lin.weight.detach(), 8, 0.3)
    ql = QLinear.from_float(lin, qwl, in_index=idl)
    xl = torch.randn(3, 10, generator=gen(4))
    with torch.no_grad():
        assert rel_diff(ql(xl), lin(xl)) < 0.01   # measured 0.0047
    with pytest.raises(ValueError, match='groups'):
        QConv2d.from_float(nn.Conv2d(4, 4, 3, groups=2),
                           rtn_qw(torch.randn(4, 2 * 2 * 9), 4),
                           in_index=torch.tensor([0, 1, 2, 3, 0, 1]))


def test_state_dict_and_deepcopy():
    torch.manual_seed(3)
    m = nn.Conv2d(8, 12, 3, padding=1)
    q = QConv2d.from_float(m, multipoint_qw(m.weight.detach().reshape(12, -1), 4, 1))
    x = torch.randn(1, 8, 6, 6, generator=gen(5))
    with torch.no_grad():
        y = q(x)
    keys = set(q.state_dict())
    assert {'codes', 'scales', 'npoints', 'bias', 'act_scale'} <= keys
    assert q.state_dict()['codes'].dtype == torch.int8
    # a module built with other point counts takes the saved ones
    other = QConv2d.from_float(m, rtn_qw(m.weight.detach().reshape(12, -1), 4))
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    with torch.no_grad():
        torch.testing.assert_close(other(x), y)
    c = copy.deepcopy(q)
    c.mode = 'expanded'
    with torch.no_grad():
        assert rel_diff(c(x), y) <= 1e-4
    assert q.mode == 'dequant'


def test_act_quant():
    torch.manual_seed(4)
    m = nn.Conv2d(4, 5, 3, padding=1)
    q = QConv2d.from_float(m, rtn_qw(m.weight.detach().reshape(5, -1), 8), act_bits=8)
    x = torch.rand(2, 4, 8, 8, generator=gen(6)) * 3
    with pytest.raises(RuntimeError, match='set_act_range'):
        q(x)
    q.set_act_range(0.0, 3.0)
    with torch.no_grad():
        y = q(x)
        q.act_bits = None
        y_noact = q(x)
    assert 0 < rel_diff(y, y_noact) < 0.02
    q.act_bits = 4
    q.set_act_range(-1.0, 3.0, symmetric=True)
    with torch.no_grad():
        y4 = q(x)
    assert rel_diff(y4, y_noact) > rel_diff(y, y_noact)
    with pytest.raises(ValueError, match='act_bits'):
        q.set_act_range(0, 1, act_bits=12)
    with pytest.raises(ValueError, match='min <= max'):
        q.set_act_range(2.0, 1.0)


def test_output_space_points_reduce_output_error():
    """End to end: QConv2d from output-space points is closer to the float conv
    on the calibration distribution than RTN."""
    torch.manual_seed(5)
    from mpq_det.quant import InputStats, conv_patches
    m = nn.Conv2d(16, 16, 3, padding=1)
    x = torch.relu(torch.randn(4, 16, 12, 12, generator=gen(7)) +
                   torch.randn(1, 16, 1, 1, generator=gen(8)))
    st = InputStats(16 * 9, 1, 'exact')
    st.update(conv_patches(x, 3, 1, 1, 1, 1, max_rows=10 ** 5))
    H = st.finalize()
    W = m.weight.detach().reshape(16, -1)
    q_mp = QConv2d.from_float(m, select_points(greedy_multipoint(W, H, 3, 1),
                                               torch.ones(16, dtype=torch.int64)))
    q_rtn = QConv2d.from_float(m, rtn_qw(W, 3))
    with torch.no_grad():
        y = m(x)
        e_mp = float(((q_mp(x) - y) ** 2).mean())
        e_rtn = float(((q_rtn(x) - y) ** 2).mean())
    assert e_mp < e_rtn
    assert random_hform(9, 1, 'diag').d == 9


def random_qw(C, d, bits, npoints):
    """A QuantizedWeight of random codes and scales with the given points per channel."""
    g = gen(C + d)
    rows = int(npoints.sum())
    q = 2 ** (bits - 1) - 1
    codes = torch.randint(-q, q + 1, (rows, d), generator=g).to(torch.int8)
    return QuantizedWeight(codes, torch.rand(rows, generator=g) + 0.1, npoints, bits)


GROUPED = [
    dict(in_channels=12, out_channels=12, kernel_size=3, padding=1, groups=12),  # dw
    dict(in_channels=12, out_channels=12, kernel_size=3, stride=2, padding=2,
         dilation=2, groups=12, bias=False),                                       # dw
    dict(in_channels=6, out_channels=18, kernel_size=3, padding=1, groups=6),    # dw x3
    dict(in_channels=8, out_channels=12, kernel_size=(3, 1), padding=(1, 0), groups=4),
    dict(in_channels=12, out_channels=12, kernel_size=3, padding=1, groups=12,
         padding_mode='reflect'),
    dict(in_channels=8, out_channels=12, kernel_size=3, stride=2, padding=1),    # dense
]
NPOINTS = ['random', 'ones', 'one_channel']


@pytest.mark.parametrize('pts', NPOINTS)
@pytest.mark.parametrize('cfg', GROUPED)
def test_expanded_levels_are_exact(cfg, pts):
    """The expanded forward (point levels for grouped convs) equals the conv of the
    dequantized weight, and runs ``expanded_rows`` rows: sum_j n_j for depthwise."""
    m = nn.Conv2d(**cfg).double()
    C, G = m.out_channels, m.groups
    d = m.weight[0].numel()
    n = {'random': torch.randint(1, 5, (C,), generator=gen(C)),
         'ones': torch.ones(C, dtype=torch.int64),
         'one_channel': torch.ones(C, dtype=torch.int64).index_fill(
             0, torch.tensor([C - 2]), 4)}[pts]
    qw = random_qw(C, d, 3, n)
    q = QConv2d.from_float(m, qw)
    q.mode = 'expanded'
    x = torch.randn(2, m.in_channels, 11, 9, generator=gen(3), dtype=torch.float64)
    xp = x if m.padding_mode == 'zeros' else \
        nn.functional.pad(x, (1, 1, 1, 1), mode='reflect')
    # the dequantized weight in float64 (``qw.dequantize()`` sums in float32)
    w = torch.zeros(C, d, dtype=torch.float64).index_add_(
        0, qw.row_channel(), qw.codes.double() * qw.scales.double()[:, None])
    with torch.no_grad():
        ref = nn.functional.conv2d(
            xp, w.reshape_as(m.weight), None if q.bias is None else q.bias.double(),
            m.stride, m.padding if m.padding_mode == 'zeros' else 0, m.dilation, G)
        y = q(x)
    torch.testing.assert_close(qw.dequantize().double(), w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    if G == 1:
        rows = q._expanded(torch.float64, x.device)[0].shape[0]
    else:
        levels = q._levels(torch.float64, x.device)
        assert len(levels) == int(n.max())          # one conv per point level
        rows = sum(w.shape[0] for _, _, w, _, _ in levels)
    assert rows == expanded_rows(n, G)
    if C == G or G == 1:                            # depthwise, dense: no padding rows
        assert rows == int(n.sum())


def test_levels_cache_follows_the_mode_and_state():
    m = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    W = m.weight.detach().reshape(8, -1)
    q = QConv2d.from_float(m, multipoint_qw(W, 3, 1))
    x = torch.randn(1, 8, 5, 5, generator=gen(4))
    q.mode = 'expanded'
    with torch.no_grad():
        q(x)
        assert q._cache[0][0] == 'l'
        q.load_state_dict(QConv2d.from_float(m, multipoint_qw(W, 3, 2)).state_dict())
        assert q._cache is None                     # new points: levels rebuilt
        q.mode = 'dequant'
        y = q(x)
        q.mode = 'expanded'
        assert rel_diff(q(x), y) <= 1e-5
