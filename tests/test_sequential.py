"""Sequential statistics: each stage is calibrated on the inputs
that the quantized stages before it give, against the floating-point outputs."""
import pytest
import torch
from torch import nn

from mpq_det.model_pass import (QuantSettings, StatsCollector, plan_layers,
                                quantize_model, quantize_model_sequential, summarize)
from mpq_det.quant import InputStats, greedy_multipoint, quantize_points
from mpq_det.quant.hforms import ExactH

from conftest import gen


def test_target_weight_solves_the_cross_least_squares():
    """W* minimises ||W X_ref^T - W* X^T||^2 + lam ||W* - W||^2, and is W itself when
    the inputs are the reference's."""
    g = gen(0)
    d, C, n = 12, 5, 200
    X_ref = torch.randn(n, d, generator=g)
    X = X_ref + 0.3 * torch.randn(n, d, generator=g)
    W = torch.randn(C, d, generator=g)
    damp = 0.01
    st = InputStats(d, form='exact', cross=True, damp=damp)
    st.update(X[None], X_ref[None])
    lam = damp * float((X * X).sum(0).mean() / n)
    # the ridge least squares in closed form, from the rows themselves
    A = torch.cat([X / n ** 0.5, lam ** 0.5 * torch.eye(d)])
    B = torch.cat([X_ref @ W.T / n ** 0.5, lam ** 0.5 * W.T])
    expect = torch.linalg.lstsq(A.double(), B.double()).solution.T.float()
    got = st.target_weight(W)
    assert torch.allclose(got, expect, atol=1e-4), (got - expect).abs().max()
    assert not torch.allclose(got, W, atol=1e-2)
    same = InputStats(d, form='exact', cross=True, damp=damp)
    same.update(X_ref[None], X_ref[None])
    assert torch.allclose(same.target_weight(W), W, atol=1e-4)
    assert torch.allclose(st.mean(ref=True), X_ref.mean(0)[None], atol=1e-6)
    with pytest.raises(ValueError, match='ref_rows'):
        st.update(X[None])
    with pytest.raises(ValueError, match='cross=True'):
        InputStats(d).target_weight(W)


def test_quantize_points_keeps_the_given_counts():
    g = gen(1)
    W = torch.randn(6, 20, generator=g)
    X = torch.randn(100, 20, generator=g)
    H = ExactH(X.T @ X / 100)
    n = torch.tensor([1, 2, 3, 1, 4, 2])
    qw, ps = quantize_points(W, H, 2, n, max_points=4)
    assert torch.equal(qw.npoints, n)
    # the same points as the full greedy search, channel by channel
    full = greedy_multipoint(W, H, 2, 4)
    for j, k in enumerate(n.tolist()):
        assert torch.allclose(ps.err[j, k], full.err[j, k], rtol=1e-5)


class _Chain(nn.Module):
    """Three stages of convs: errors of early stages reach the later ones."""

    def __init__(self):
        super().__init__()
        g = gen(3)
        self.s1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                nn.Conv2d(16, 16, 3, padding=1))
        self.s2 = nn.Sequential(nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.s3 = nn.Conv2d(16, 8, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data = torch.randn(m.weight.shape, generator=g) / \
                    m.weight[0].numel() ** 0.5
                m.bias.data = 0.1 * torch.randn(m.bias.shape, generator=g)

    def forward(self, x):
        return self.s3(self.s2(self.s1(x)))


def _calibrate(batches):
    def run(model, reference=None):
        with torch.no_grad():
            for x in batches:
                if reference is not None:
                    reference(x)
                model(x)
    return run


def test_statistics_after_a_quantized_layer_differ_and_pair_up():
    """With a reference, a layer's H comes from the quantized model's inputs and
    its cross term pairs them with the reference's inputs at the same positions."""
    import copy
    model = _Chain().eval()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 12, 12, generator=gen(4))
    # quantize the first stage (2 bits) so that s2's input changes
    p1, _, _ = plan_layers(model, lambda n: 'backbone' if n.startswith('s1') else None,
                           {'backbone': QuantSettings(bits=2, method='rtn', budget=0)})
    quantize_model(model, p1, None)
    plans, _, _ = plan_layers(model, lambda n: 'head' if n.startswith('s2') else None,
                              {'head': QuantSettings(bits=2)})
    col = StatsCollector(plans, form='exact', reference=reference, damp=0.01,
                         rows_per_batch=50)
    seen = {}
    hooks = [mod.s2[1].register_forward_hook(
        lambda m, i, o, k=k: seen.__setitem__(k, i[0].detach()))
        for k, mod in (('q', model), ('ref', reference))]
    _calibrate([x])(model, reference)
    col.remove()
    for h in hooks:
        h.remove()
    ref_plans, _, _ = plan_layers(reference, lambda n: 'head' if n.startswith('s2') else None,
                                  {'head': QuantSettings(bits=2)})
    fp = StatsCollector(ref_plans, form='exact', damp=0.0, rows_per_batch=50)
    _calibrate([x])(reference)
    fp.remove()
    st, st_fp = col.stats['s2.1'].stats, fp.stats['s2.1'].stats
    # the cross term pairs the two inputs at the same (subsampled) positions
    from mpq_det.quant import conv_patches
    _, idx = conv_patches(seen['ref'], 3, padding=1, max_rows=50,
                          generator=torch.Generator().manual_seed(0), return_index=True)
    Xq, Xr = (conv_patches(seen[k], 3, padding=1, index=idx)[0] for k in ('q', 'ref'))
    assert idx.numel() == 50 and st.n == 50
    assert torch.allclose(st.cross_acc[0], Xq.T @ Xr, rtol=1e-4, atol=1e-4)
    # the same positions: the reference rows of the pair are the FP model's rows
    assert torch.allclose(st.ref_row_sum, st_fp.row_sum, rtol=1e-5)
    H, H_fp = st.finalize().dense(), st_fp.finalize().dense()
    assert (H - H_fp).abs().max() > 1e-3 * H_fp.abs().max()
    W = model.s2[1].weight.detach().reshape(16, -1)
    assert not torch.allclose(st.target_weight(W), W, atol=1e-3)


def test_sequential_pass_lowers_the_output_error():
    """At 2 bits the sequential pass matches the floating-point outputs better than
    the pass on floating-point statistics, with the same overheads."""
    import copy
    base = _Chain().eval()
    batches = [torch.randn(4, 3, 12, 12, generator=gen(10 + i)) for i in range(3)]
    test_x = torch.randn(4, 3, 12, 12, generator=gen(20))
    with torch.no_grad():
        ref = base(test_x)
    stage = lambda n: n.split('.')[0]   # noqa: E731
    s = QuantSettings(bits=2, budget=0.2)
    errs, res = {}, {}
    for seq in (False, True):
        model = copy.deepcopy(base)
        plans, _, _ = plan_layers(model, lambda n: 'backbone', {'backbone': s})
        if seq:
            r = quantize_model_sequential(model, plans, _calibrate(batches), stage,
                                          error_feedback=True)
            assert r.summary['calib_passes'] == 3   # the first stage needs no pass of its own
            assert r.summary['stages'] == ['s1', 's2', 's3']
        else:
            col = StatsCollector(plans, feedback=True)
            _calibrate(batches)(model)
            col.remove()
            r = quantize_model(model, plans, col.stats, error_feedback=True)
        r.summary.update(summarize(r, model, plans))
        res[seq] = r
        with torch.no_grad():
            errs[seq] = float((model(test_x) - ref).pow(2).mean() / ref.pow(2).mean())
    print(errs)
    assert errs[True] < 0.9 * errs[False], errs
    # the allocation is made once on FP statistics: the same points per layer
    assert [r['points_mean'] for r in res[True].layers] == \
        [r['points_mean'] for r in res[False].layers]
    for k in ('memory_overhead', 'compute_overhead'):
        assert res[True].summary[k] <= 0.2 + 1e-6


def test_stages_of_an_mmdet_detector():
    from mpq_det.components import runs_on_proposals, stage_of
    names = ['backbone.conv1', 'backbone.layer1.0.conv1', 'backbone.layer2.1.conv2',
             'neck.lateral_convs.0.conv', 'rpn_head.rpn_conv', 'roi_head.bbox_head.fc_cls']
    assert [stage_of(n) for n in names] == [
        'backbone.conv1', 'backbone.layer1', 'backbone.layer2', 'neck', 'rpn_head',
        'roi_head']
    assert [stage_of(n, split_backbone=False) for n in names][:3] == ['backbone'] * 3
    assert [runs_on_proposals(stage_of(n)) for n in names] == [False] * 5 + [True]


def test_unpaired_stages_keep_the_floating_point_statistics():
    """A stage whose rows do not pair up (a RoI head) is quantized from step 1's
    statistics: with every stage unpaired, the result is the plain pass's."""
    import copy
    base = _Chain().eval()
    batches = [torch.randn(2, 3, 12, 12, generator=gen(30 + i)) for i in range(2)]
    s = QuantSettings(bits=2, budget=0.2)
    w = {}
    for seq in (False, True):
        model = copy.deepcopy(base)
        plans, _, _ = plan_layers(model, lambda n: 'backbone', {'backbone': s})
        if seq:
            r = quantize_model_sequential(model, plans, _calibrate(batches),
                                          lambda n: n.split('.')[0], error_feedback=True,
                                          unpaired=lambda st: True)
            assert r.summary['calib_passes'] == 1
        else:
            col = StatsCollector(plans, feedback=True)
            _calibrate(batches)(model)
            col.remove()
            quantize_model(model, plans, col.stats, error_feedback=True)
        w[seq] = [m.weight.detach() for m in model.modules() if hasattr(m, 'npoints')]
    assert all(torch.equal(a, b) for a, b in zip(w[False], w[True]))
