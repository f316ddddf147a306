"""The int8 QDQ ONNX graph on tiny models: outputs against the PyTorch
W4A8 model, multipoint rows, depthwise convs, what stays float, and integer kernels
in onnxruntime's optimized graph."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from mpq_det.deploy.convert import max_rel_diff, raw_outputs
from mpq_det.deploy.ort import integer_kernel_counts, make_session, run_session
from mpq_det.deploy.qdq import Int8Builder, build_int8_onnx, row_layout, tensor_ranges
from mpq_det.modules import QConv2d
from mpq_det.quant import greedy_multipoint, select_points
from mpq_det.qstate import swap_module

from conftest import gen

pytest.importorskip('onnxruntime')

# Max |int8 - PyTorch| / max|PyTorch| per output. The graph rounds where PyTorch does,
# plus one 8-bit rounding of each conv output that does not feed a quantized conv
# (residual adds, multipoint rows); a flipped rounding moves a value by one step.
TOL = 0.05
# with every requantization at the next layer's own input scale (a plain chain)
TOL_CHAIN = 0.02


class Toy(nn.Module):
    """A one-stage-detector-shaped net: stem, residual block, depthwise separable
    conv with ReLU6, two output convs (``mode='tensor'`` like an mmdet detector)."""

    def __init__(self, residual: bool = True):
        super().__init__()
        self.residual = residual
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.c1 = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False),
                                nn.BatchNorm2d(16), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24),
                                nn.ReLU())
        self.cls = nn.Conv2d(24, 6, 3, 1, 1)
        self.reg = nn.Conv2d(24, 4, 3, 1, 1)

    def forward(self, x, data_samples=None, mode='tensor'):
        x = self.stem(x)
        y = self.c2(self.c1(x))
        x = torch.relu(x + y) if self.residual else torch.relu(y)
        x = self.pw(self.dw(x))
        return [self.cls(x)], [self.reg(x)]


def random_bn(model: nn.Module, g: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            C = m.num_features
            m.weight.data = torch.randn(C, generator=g) * 0.5 + 1.0  # some negative
            m.bias.data = torch.randn(C, generator=g) * 0.1
            m.running_mean.data = torch.randn(C, generator=g) * 0.1
            m.running_var.data = torch.rand(C, generator=g) + 0.5
            m.weight.data[0] = 0.0  # a zero factor (mmdet's zero_init_residual)


def quantize(model: nn.Module, batches: list, bits: int = 4, max_points: int = 1,
             seed: int = 0, skip=(), pow2: bool = False, grid: str = 'symmetric'
             ) -> nn.Module:
    """W{bits}A8: each conv's points from greedy_multipoint (1..max_points per channel,
    random counts) on ``grid``, its input range from the float model on ``batches``."""
    ranges = {}

    def rec(name):
        def hook(mod, inp):
            lo, hi = float(inp[0].min()), float(inp[0].max())
            r = ranges.setdefault(name, [lo, hi])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)
        return hook
    convs = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and n not in skip]
    hs = [m.register_forward_pre_hook(rec(n)) for n, m in convs]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hs:
        h.remove()
    g = gen(seed)
    for name, m in convs:
        W = m.weight.detach().reshape(m.out_channels, -1)
        ps = greedy_multipoint(W, None, bits, max_points, pow2=pow2, grid=grid)
        n = torch.randint(1, max_points + 1, (m.out_channels,), generator=g)
        q = QConv2d.from_float(m, select_points(ps, n), act_bits=8)
        q.set_act_range(*ranges[name])
        swap_module(model, name, q)
    return model.eval()


def images(n: int, seed: int, size=(40, 48)) -> list:
    g = gen(seed)
    return [torch.randn(2, 3, *size, generator=g) for _ in range(n)]


def toy(max_points: int, residual: bool = True, seed: int = 0, skip=(),
        pow2: bool = False, bits: int = 4, grid: str = 'symmetric') -> nn.Module:
    torch.manual_seed(seed)
    model = Toy(residual).eval()
    random_bn(model, gen(seed + 1))
    return quantize(model, images(4, seed + 2), bits=bits, max_points=max_points,
                    seed=seed, skip=skip, pow2=pow2, grid=grid)


def conv_nodes(model, exclude=(), only=None) -> int:
    """Conv nodes of the int8 graph: one per layer, plus a 1x1 segment-sum conv for a
    dense multipoint layer with its extra rows; one per point level for a grouped
    multipoint layer or a dense one where that costs less (rows.levels_cheaper)."""
    from mpq_det.deploy import rows
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, QConv2d) and name not in exclude and (only is None or name in only):
            p = int(m.npoints.max())
            n += p if m.groups > 1 or (p > 1 and rows.levels_cheaper(m)) else 1 + (p > 1)
    return n


def deploy(model, tmp_path, int8_outputs=False, floors=None):
    """The graph with float output convs (the 8-bit rounding of the outputs aside,
    it rounds where PyTorch does) unless ``int8_outputs``; ``floors`` as
    ``Int8Builder(output_floors=)``."""
    calib = images(4, 2)  # the calibration images of toy()
    if floors is None:
        proto, report = build_int8_onnx(model, calib[0], calib, int8_outputs=int8_outputs)
    else:
        b = Int8Builder(model, calib[0], int8_outputs, output_floors=floors)
        names = b.build()  # before the ranges: they are of the built graph's tensors
        proto = b.finish(tensor_ranges(b.G.proto(), names, calib))
        report = b.report
    path = str(tmp_path / 'int8.onnx')
    import onnx
    onnx.checker.check_model(proto)
    onnx.save(proto, path)
    return path, report


def compare(model, path) -> float:
    x = images(1, 99)[0]
    ref = raw_outputs(model, x)
    got = run_session(make_session(path, threads=1), x)
    return max_rel_diff([torch.from_numpy(g) for g in got], ref)


@pytest.mark.parametrize('max_points', [1, 3])
def test_int8_outputs_match_pytorch_w4a8(max_points, tmp_path):
    model = toy(max_points)
    npts = {n: int(m.npoints.max()) for n, m in model.named_modules()
            if isinstance(m, QConv2d)}
    assert max(npts.values()) == max_points
    path, report = deploy(model, tmp_path)
    d = compare(model, path)
    print(f'max_points={max_points}: int8 ONNX vs PyTorch W4A8 max rel diff {d:.3e}')
    assert d <= TOL
    counts = integer_kernel_counts(path)
    print(counts)
    # every conv but the two output convs (kept float by default) runs as QLinearConv;
    # a grouped multipoint conv as one conv per point level
    assert counts['integer_convs'] == conv_nodes(model, exclude=('cls', 'reg'))
    assert counts['float_convs'] == conv_nodes(model, only=('cls', 'reg'))
    assert counts['conv_integer'] == 0
    names = {c.name for c in report.non_integer}
    assert names == {'cls', 'reg'}
    assert all('raw head output' in c.reason for c in report.non_integer)


@pytest.mark.parametrize('levels', [False, True])
def test_dense_multipoint_as_rows_or_levels(levels, tmp_path, monkeypatch):
    """Both ways of running a dense multipoint conv (its extra rows and the segment-sum
    conv, or one conv per point level) match PyTorch and run as integer kernels."""
    from mpq_det.deploy import rows
    monkeypatch.setattr(rows, 'levels_cheaper', lambda q: levels)
    model = toy(3)
    path, _ = deploy(model, tmp_path)
    assert compare(model, path) <= TOL
    counts = integer_kernel_counts(path)
    assert counts['integer_convs'] == conv_nodes(model, exclude=('cls', 'reg'))
    assert counts['float_convs'] == conv_nodes(model, only=('cls', 'reg'))


def test_float_sum_of_the_rows(tmp_path, monkeypatch):
    """The float Slice/Add/Concat sum (used when the levels' powers of two differ too
    much for int8 weights) gives the same outputs as the integer segment-sum conv."""
    from mpq_det.deploy import rows
    model = toy(3)
    d_int = compare(model, deploy(model, tmp_path)[0])
    monkeypatch.setattr(rows, 'MAX_SEGMENT_SHIFT', -1)
    path, _ = deploy(model, tmp_path)
    import onnx
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert 'Concat' in ops
    d_float = compare(model, path)
    print(f'segment conv {d_int:.3e}, float sum {d_float:.3e}')
    assert d_float <= TOL


def test_int8_outputs_option(tmp_path):
    model = toy(2)
    path, report = deploy(model, tmp_path, int8_outputs=True)
    assert not report.non_integer
    counts = integer_kernel_counts(path)
    assert counts['float_convs'] == 0 and counts['integer_convs'] == conv_nodes(model)
    assert compare(model, path) <= TOL


def test_score_floor_rounds_the_scores_that_matter_finer(tmp_path):
    """An output with a score floor: its 8-bit range starts there, so every value
    below it comes out at (about) the floor, and the values above it are rounded
    finer than with the calibrated min/max range."""
    model = toy(1, residual=False)
    x = images(1, 99)[0]
    with torch.no_grad():  # logits mostly far below zero, like a score map's
        r = raw_outputs(model, x)[0]
        model.cls.bias -= r.quantile(0.9)
        model.cls.bias[:3] -= 10 * r.std()
    ref = raw_outputs(model, x)[0]
    floor = float(ref[:, 3:].quantile(0.5))
    assert floor < 0
    errs = {}
    for name, floors in (('minmax', {}), ('floor', {'out0': floor})):
        path, report = deploy(model, tmp_path, int8_outputs=True, floors=floors)
        got = torch.from_numpy(run_session(make_session(path, threads=1), x)[0])
        above = ref > floor + 0.1
        errs[name] = (got - ref)[above].abs().mean().item()
        if floors:
            lo, start, hi = report.floored_outputs['out0']
            assert lo < floor == start < hi
            step = (hi - start) / 255
            assert got.min() >= floor - step  # the zero point's rounding moves it < 1 step
            below = ref < floor - step
            assert below.any() and torch.all((got[below] - floor).abs() <= step)
    print(f'mean |int8 - PyTorch| above the floor: {errs}')
    assert errs['floor'] < 0.7 * errs['minmax']


def test_pow2_points_run_as_one_int8_row(tmp_path):
    """Points with power-of-two scale ratios (points.scales='pow2') merge into one
    int8 row per channel: the graph has the one-point graph's convs (no extra rows,
    levels or sums), matches PyTorch, and its merged codes exceed 4 bits."""
    import onnx
    model = toy(2, pow2=True)
    assert max(int(m.npoints.max()) for m in model.modules() if isinstance(m, QConv2d)) == 2
    path, report = deploy(model, tmp_path, int8_outputs=True)
    assert compare(model, path) <= TOL
    extra = sum(int(m.npoints.sum()) - m.out_channels for m in model.modules()
                if isinstance(m, QConv2d))
    assert sum(c.merged for c in report.convs) == extra
    assert all(c.rows == c.out_channels for c in report.convs)
    counts = integer_kernel_counts(path)
    n_layers = sum(isinstance(m, QConv2d) for m in model.modules())
    assert counts['integer_convs'] == n_layers and counts['float_convs'] == 0
    assert any('merged' in line for line in report.lines())
    g = onnx.load(path).graph
    assert max(int(np.abs(weight_codes(g, n)).max()) for n in g.node
               if n.op_type == 'Conv') > 8
    # free scales on the same layers: extra rows (or levels) to run
    free = toy(2)
    _, rep_free = deploy(free, tmp_path, int8_outputs=True)
    assert sum(c.rows > c.out_channels for c in rep_free.convs) > 0


def test_a_plain_chain_rounds_where_pytorch_does(tmp_path):
    """No residual and one point per channel: every conv output's requantization is
    the next layer's own input quantization, so only flipped roundings differ."""
    model = toy(1, residual=False)
    path, report = deploy(model, tmp_path)
    inner = [c for c in report.convs if c.integer]
    assert inner and all(c.output_q == 'next layer' for c in inner)
    d = compare(model, path)
    print(f'chain: int8 ONNX vs PyTorch W4A8 max rel diff {d:.3e}')
    assert d <= TOL_CHAIN


def weight_codes(g, conv, stored: bool = False):
    """The int8 codes of a Conv node's weight: DequantizeLinear of an int8
    initializer, or of the Cast of an INT4 one, possibly times a per-row sign
    (``stored``: 'INT4' or 'INT8')."""
    from onnx import TensorProto, numpy_helper
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    src = producers[conv.input[1]].input[0]
    sign = 1
    if src in producers and producers[src].op_type == 'Mul':
        src, sign_name = producers[src].input
        sign = numpy_helper.to_array(inits[sign_name]).astype(np.int16)
    if src in producers:
        cast = producers[src]
        assert cast.op_type == 'Cast' and cast.attribute[0].i == TensorProto.INT8
        src = cast.input[0]
    if stored:
        return TensorProto.DataType.Name(inits[src].data_type)
    return (numpy_helper.to_array(inits[src]).astype(np.int16) * sign).astype(np.int8)


@pytest.mark.parametrize('bits', [4, 8])
def test_low_bit_codes_stored_as_int4(bits, tmp_path):
    """Codes in [-8, 7] (W2-W4) are INT4 initializers, two per byte, cast to int8 at
    load; wider codes stay int8. Same codes, same outputs, same integer kernels."""
    import onnx
    torch.manual_seed(0)
    model = Toy().eval()
    random_bn(model, gen(1))
    model = quantize(model, images(4, 2), bits=bits, max_points=2)
    calib = images(4, 2)
    paths, graphs = {}, {}
    for int4 in (True, False):
        proto, _ = build_int8_onnx(model, calib[0], calib, int4=int4)
        paths[int4] = str(tmp_path / f'int4_{int4}.onnx')
        onnx.save(proto, paths[int4])
        graphs[int4] = proto.graph
    convs = {k: [n for n in g.node if n.op_type == 'Conv' and n.input[1]]
             for k, g in graphs.items()}
    n_int4 = 0
    for a, b in zip(*convs.values()):
        ca, cb = weight_codes(graphs[True], a), weight_codes(graphs[False], b)
        assert np.array_equal(ca, cb)
        n_int4 += weight_codes(graphs[True], a, stored=True) == 'INT4'
    x = images(1, 99)[0]
    out = {k: run_session(make_session(p, threads=1), x) for k, p in paths.items()}
    assert all(np.array_equal(u, v) for u, v in zip(out[True], out[False]))
    assert integer_kernel_counts(paths[True]) == integer_kernel_counts(paths[False])
    import os.path as osp
    size = {k: osp.getsize(p) for k, p in paths.items()}
    print(f'W{bits}: file {size}')
    if bits == 4:
        assert size[True] < 0.8 * size[False]
    else:
        assert size[True] == size[False]


def test_depthwise_multipoint_stays_depthwise(tmp_path):
    """A depthwise conv with extra points becomes one depthwise conv per point level
    (onnxruntime's depthwise kernel), never a conv with several rows per group."""
    import onnx
    from onnx import numpy_helper
    model = toy(3)
    assert int(model.dw[0].npoints.max()) == 3
    path, report = deploy(model, tmp_path)
    g = onnx.load(path).graph
    grouped = [n for n in g.node if n.op_type == 'Conv' and
               any(a.name == 'group' and a.i > 1 for a in n.attribute)]
    assert len(grouped) == 3
    for n in grouped:
        w = weight_codes(g, n)
        assert w.dtype == np.int8 and w.shape[:2] == (16, 1)
    rec = next(c for c in report.convs if c.name == 'dw.0')
    assert rec.integer and 'point levels' in rec.reason


def test_multipoint_rows_and_depthwise_layout():
    """Main rows first, extra rows after (per group, zero-padded), each extra row's
    scale times 2^k with 2^-k to divide back; the rows sum to the dequantized weight."""
    model = toy(3)
    for name, q in model.named_modules():
        if not isinstance(q, QConv2d):
            continue
        lay = row_layout(q)
        C, G = q.out_channels, q.groups
        R = lay['codes'].shape[0]
        assert R % G == 0 and R >= int(q.npoints.sum())
        rows_per_group = R // G
        for j in range(C):  # main row of channel j inside its group's block
            assert lay['main'][j] // rows_per_group == j // (C // G)
        w = torch.zeros(C, q.codes.shape[1], dtype=torch.float64)
        for r in range(R):
            if lay['chan'][r] >= 0:
                w[lay['chan'][r]] += torch.from_numpy(lay['codes'][r].astype(np.float64)) * \
                    lay['scales'][r] * lay['fac'][r]
        ref = q._dequant_rows().double()
        assert torch.allclose(w, ref, rtol=1e-6, atol=1e-7), name
        ex = lay['extra']
        assert ex.size == int(q.npoints.sum()) - C
        assert len(lay['levels']) == int(q.npoints.max()) - 1
        for i, idx in enumerate(lay['levels']):  # the i-th extra point, or a zero row
            has = q.npoints.numpy() > i + 1
            assert (lay['chan'][idx[has]] == np.arange(C)[has]).all()
            assert (lay['chan'][idx[~has]] == -1).all()
            assert not lay['codes'][idx[~has]].any()
        assert (lay['fac'][ex] <= 1).all() and (lay['fac'][lay['main']] == 1).all()
        if name == 'dw.0':
            assert G == C and int(q.npoints.max()) > 1
            assert R >= C * int(q.npoints.max())  # each group padded to the most points


def test_non_integer_layer_is_reported(tmp_path):
    """A conv left in floating point runs as a float conv and the report says why."""
    model = toy(2, skip=('pw.0',))
    assert isinstance(model.pw[0], nn.Conv2d)
    path, report = deploy(model, tmp_path)
    rec = {c.name: c for c in report.non_integer}
    assert 'pw.0' in rec and 'not quantized' in rec['pw.0'].reason
    assert any('pw.0' in line for line in report.lines())
    counts = integer_kernel_counts(path)
    assert counts['float_convs'] == 1 + conv_nodes(model, only=('cls', 'reg'))  # + pw.0
    assert compare(model, path) <= TOL
