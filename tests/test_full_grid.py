"""All 2^b codes (grid='full') and the int8 target: the core on tiny tensors, and the
quantizer's arguments."""
import pytest
import torch

from mpq_det import MultipointQuantizer
from mpq_det.quant import (ExactH, Feedback, QuantizedWeight, code_range,
                           feedback_round_reference, greedy_multipoint, merge_pow2,
                           mse_clip, multipoint_quantize, pack_codes, packed_nbytes,
                           random_correlated_rows,
                           random_hform, rtn, unpack_codes)
from mpq_det.quant.levels import expanded_rows
from mpq_det.quant.multipoint import int8_rows

from conftest import gen


def random_layer(C=48, d=36, seed=0):
    """W (C, d) and the exact H of correlated inputs."""
    g = gen(seed)
    W = torch.randn(C, d, generator=g) * (torch.rand(C, 1, generator=g) + 0.1)
    X = random_correlated_rows(4 * d, d, generator=g)[0]
    return W, ExactH((X.T @ X / X.shape[0])[None])


def test_code_ranges():
    assert [code_range(b, 'full') for b in (2, 3, 4, 7)] == \
        [(-2, 1), (-4, 3), (-8, 7), (-64, 63)]
    # 8 bits: symmetric on both grids (the int8 graph negates codes; -(-128) > 127)
    assert code_range(8, 'full') == code_range(8, 'symmetric') == (-127, 127)
    assert code_range(2, 'symmetric') == (-1, 1)
    with pytest.raises(ValueError, match=r"grid must be one of \['full', 'symmetric'\]"):
        code_range(4, 'asymmetric')


@pytest.mark.parametrize('bits', [2, 3, 4])
def test_full_grid_codes_use_both_ends(bits):
    """Every code of the grid is used, the extra one included, and nothing beyond."""
    lo, hi = code_range(bits, 'full')
    W, H = random_layer(seed=bits)
    for qw in (multipoint_quantize([W], [H], bits, 0.2, grid='full')[0][0],
               QuantizedWeight.from_single(*rtn(W, bits, 'full'), bits, 'full')):
        used = set(qw.codes.unique().tolist())
        assert used == set(range(lo, hi + 1)), (bits, sorted(used))
    # the symmetric grid never holds the extra code
    qs = multipoint_quantize([W], [H], bits, 0.2, grid='symmetric')[0][0]
    assert int(qs.codes.min()) == -hi and int(qs.codes.max()) == hi
    with pytest.raises(ValueError, match=rf'{lo + 1}\.\.{hi}'):
        QuantizedWeight(qw.codes, qw.scales, qw.npoints, bits, 'symmetric')


def test_extra_level_side_follows_the_channel():
    """The extra level goes where each channel's largest |w| is: a channel whose
    outlier is positive gets a negative scale, and its outlier the code -2^(b-1)."""
    g = gen(5)
    W = torch.randn(6, 20, generator=g) * 0.1
    W[0::2, 3] = 1.0          # positive outliers on even channels
    W[1::2, 7] = -1.0         # negative outliers on odd channels
    for bits in (2, 3, 4):
        lo = code_range(bits, 'full')[0]
        for scales, codes in (rtn(W, bits, 'full'), mse_clip(W, bits, grid='full')):
            assert (scales[0::2] < 0).all() and (scales[1::2] > 0).all(), (bits, scales)
            assert (codes[0::2, 3] == lo).all() and (codes[1::2, 7] == lo).all()
        ps = greedy_multipoint(W, None, bits, 1, grid='full')
        s, q = ps.scales[:, 0], ps.codes[:, 0]
        assert (s[0::2] < 0).all() and (s[1::2] > 0).all(), (bits, s)
        assert (q[0::2, 3] == lo).all() and (q[1::2, 7] == lo).all()
        # mirrored weights mirror the sides
        ps2 = greedy_multipoint(-W, None, bits, 1, grid='full')
        assert torch.equal(ps2.scales[:, 0], -s) and torch.equal(ps2.codes[:, 0], q)
    # 8 bits: the symmetric grid, scales >= 0
    s8, q8 = rtn(W, 8, 'full')
    assert (s8 > 0).all() and int(q8.min()) == -127 and int(q8.max()) == 127


def test_both_sides_are_searched():
    """The side that puts the largest |w| on the extra level is not always the better
    one: one 1.0 among many -0.95 and -0.5 at W2 fits {-2a, -a, 0, a} with a = 0.5
    (positive scale) far better than {-a, 0, a, 2a}."""
    w = torch.tensor([[1.0] + [-0.95] * 8 + [-0.5] * 8])
    ps = greedy_multipoint(w, None, 2, 1, grid='full')
    assert float(ps.scales[0, 0]) > 0
    s, q = rtn(w, 2, 'full')                       # the min-max side: the outlier's
    assert float(s[0]) < 0
    assert float(ps.err[0, 1]) < 0.5 * float(((w - s[:, None] * q) ** 2).sum())


def test_feedback_rounds_both_sides_of_the_first_point():
    """Joint error feedback keeps, per channel, the better of the first point's two
    sides, each rounded with feedback (``PointSet.other``: the side not kept)."""
    from mpq_det.quant import joint_feedback
    W, H = random_layer(seed=7)
    fb = Feedback(H, order=True)
    ps = greedy_multipoint(W, H, 2, 1, feedback=fb, grid='full')
    assert bool((ps.other * ps.scales[:, 0] < 0).all())
    e_kept = joint_feedback(W, ps.scales[:, :1], fb, 2, grid='full', MW=ps.mw)[2]
    e_other = joint_feedback(W, ps.other[:, None], fb, 2, grid='full', MW=ps.mw)[2]
    tol = 1e-6 * float(ps.err[:, 0].max())
    assert bool((ps.err[:, 1] <= torch.minimum(e_kept, e_other) + tol).all())
    assert bool((e_other < e_kept).any())


@pytest.mark.parametrize('bits', [2, 3])
def test_full_grid_lowers_the_output_error(bits):
    """Full-grid W2/W3 output error well below the symmetric grid's on a random layer,
    greedy alone and with error feedback (measured: 0.55-0.72 of it)."""
    for seed in range(2):
        W, H = random_layer(seed=10 + seed)
        for fb in (None, Feedback(H, order=True)):
            err = {}
            for grid in ('symmetric', 'full'):
                ps = greedy_multipoint(W, H, bits, 1, feedback=fb, grid=grid)
                err[grid] = float(ps.err[:, 1].sum())
            assert err['full'] < 0.85 * err['symmetric'], (bits, fb is not None, err)


@pytest.mark.parametrize('bits', [2, 4])
def test_full_grid_errors_are_the_stored_points(bits):
    """The errors that the allocation ranks are those of the stored (signed) points,
    with feedback in both modes and power-of-two scales."""
    W, H = random_layer(seed=3)
    for mode in ('joint', 'first'):
        for pow2 in (False, True):
            qws, pss = multipoint_quantize([W], [H], bits, 0.3, feedbacks=[Feedback(H)],
                                           fb_mode=mode, pow2=pow2, grid='full')
            qw, ps = qws[0], pss[0]
            assert qw.grid == 'full' and bool((qw.scales < 0).any())
            torch.testing.assert_close(H.quad(W - qw.dequantize()),
                                       ps.err.gather(1, qw.npoints[:, None])[:, 0],
                                       rtol=1e-3, atol=1e-6)


def test_feedback_rounding_matches_the_reference_on_the_full_grid():
    W, H = random_layer(C=4, d=12, seed=4)
    fb = Feedback(H)
    scale = torch.tensor([0.3, -0.2, 0.25, -0.4])
    q = fb.round(W, scale, 2, grid='full')
    assert int(q.min()) == -2 and int(q.max()) == 1
    for j in range(4):
        ref = feedback_round_reference(W[j], float(scale[j]), H.H[0], 2, 'full')
        assert torch.equal(q[j], ref)


def test_pow2_merge_is_exact_with_signed_scales():
    """Full-grid points with power-of-two scale ratios of either sign merge into one
    int8 row whose sum is exactly the points' sum, with a positive scale."""
    W, H = random_layer(seed=6)
    ps = greedy_multipoint(W, H, 2, 4, pow2=True, grid='full')
    merged_any = 0
    for c in range(ps.channels):
        s, q = ps.scales[c], ps.codes[c]
        step, rows, m = merge_pow2(s, q)
        assert step[0] > 0 and int(rows.abs().max()) <= 127
        torch.testing.assert_close((step[:, None] * rows.float()).sum(0),
                                   (s[:, None] * q.float()).sum(0), rtol=0, atol=1e-6)
        assert m == 1 + int(ps.merges[c, 1:].cumprod(0).sum())
        merged_any += m > 1
    assert merged_any == ps.channels
    assert bool((ps.scales[:, 1:] < 0).any())   # further points use both sides too


@pytest.mark.parametrize('grid', ['full', 'symmetric'])
def test_pow2_merged_points_cost_no_compute_on_int8(grid):
    """target='int8': points that merge into their channel's int8 row are free under
    a compute bound, so far more of them are taken than on 'lowbit', and the int8
    graph's extra rows stay within the budget."""
    Ws, Hs, pos = [], [], []
    for i, (C, d, p) in enumerate(((32, 27, 64.0), (24, 36, 16.0), (16, 48, 4.0))):
        W, H = random_layer(C, d, seed=20 + i)
        Ws.append(W), Hs.append(H), pos.append(p)
    budget = 0.05
    kw = dict(budget_on='compute', positions=pos, pow2=True, grid=grid)
    low, _ = multipoint_quantize(Ws, Hs, 2, budget, **kw, target='lowbit')
    i8, pss = multipoint_quantize(Ws, Hs, 2, budget, **kw, target='int8')
    total = sum(W.numel() * p for W, p in zip(Ws, pos))

    def extra(qws, rows_of):
        return sum((expanded_rows(rows_of(q)) - q.out_channels) * q.d * p
                   for q, p in zip(qws, pos))
    assert extra(low, lambda q: q.npoints) <= budget * total
    assert extra(i8, lambda q: int8_rows(q)[0]) <= budget * total
    assert max(int8_rows(q)[2] for q in i8) > 7     # merged rows leave INT4
    assert sum(q.extra_points() for q in i8) > 3 * sum(q.extra_points() for q in low)
    # a channel whose extra points all merge runs as one row
    for q, ps in zip(i8, pss):
        rows = int8_rows(q)[0]
        for c in torch.nonzero(q.npoints > 1).reshape(-1).tolist():
            if bool(ps.merges[c, 1:int(q.npoints[c])].all()):
                assert int(rows[c]) == 1


@pytest.mark.parametrize('bits', [2, 3, 4, 8])
def test_pack_roundtrip_both_grids(bits):
    for grid in ('full', 'symmetric'):
        lo, hi = code_range(bits, grid)
        codes = torch.randint(lo, hi + 1, (1001,), generator=gen(bits)).to(torch.int8)
        codes[:2] = torch.tensor([lo, hi])
        packed = pack_codes(codes, bits, grid)
        assert packed.numel() == 126 * bits          # b bits per code on both grids
        assert torch.equal(unpack_codes(packed, bits, codes.numel(), grid), codes)
    # fields: c + Q on the symmetric grid (every export before the full grid), c + 2
    # on the full grid; 2-bit fields little-endian in each byte
    c = torch.tensor([-1, 0, 1, 1, 0, -1, 0, 0], dtype=torch.int8)
    assert pack_codes(c, 2, 'symmetric').tolist() == [0b10100100, 0b01010001]
    assert pack_codes(c, 2, 'full').tolist() == [0b11111001, 0b10100110]


def test_quantizer_grid_and_target_arguments():
    q = MultipointQuantizer(grid='full', target='int8')
    assert q.points['scales'] == 'pow2' and q.points['budget_on'] == 'both'
    assert q.settings()['grid'] == 'full' and q.settings()['target'] == 'int8'
    assert MultipointQuantizer(target='lowbit').points['scales'] == 'free'
    # the explicit points keys win over the target's
    q = MultipointQuantizer(target='int8', points=dict(scales='free', budget_on='memory'))
    assert q.points['scales'] == 'free' and q.points['budget_on'] == 'memory'
    with pytest.raises(ValueError, match=r"grid='half' is not allowed"):
        MultipointQuantizer(grid='half')
    with pytest.raises(ValueError, match=r"target='gpu' is not allowed"):
        MultipointQuantizer(target='gpu')


# ------------------------------------------------------------------------- export
class _Det(torch.nn.Module):
    """A detector-shaped toy: backbone (dense + depthwise), neck, head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        nn = torch.nn
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU())
        self.neck = nn.Sequential(nn.Conv2d(16, 24, 1), nn.ReLU())
        self.bbox_head = nn.Conv2d(24, 8, 3, padding=1)

    def forward(self, x):
        return self.bbox_head(self.neck(self.backbone(x)))


@pytest.mark.parametrize('grid', ['full', 'symmetric'])
@pytest.mark.parametrize('target', ['int8', 'lowbit'])
def test_export_round_trip_is_bit_exact(grid, target, tmp_path):
    """An export reloads into a fresh model with the same outputs, bit for bit, on
    both grids; one without the layers' ``grid`` (written before it existed) reads
    as symmetric."""
    from mpq_det.export import (allow_exports, build_export, content_sha256,
                                prepare_model_for_export, validate_export)
    allow_exports()
    xs = [torch.randn(2, 3, 12, 12, generator=gen(i)) for i in range(3)]

    def calibrate(m, ref):
        with torch.no_grad():
            for x in xs:
                m(x)
    q = MultipointQuantizer(bits=2, budget=0.2, grid=grid, target=target,
                            calib=dict(num_images=6))
    model = _Det()
    q.quantize(model, calibrate)
    with torch.no_grad():
        ref = [model(x) for x in xs]
    ckpt = build_export(model, settings=q.settings())
    assert ckpt['meta']['mpq']['settings']['grid'] == grid
    assert {r['grid'] for r in ckpt['mpq_layers'].values()} == {grid}
    stored = {n: r['codes'].numel() for n, r in ckpt['mpq_layers'].items()}
    if grid == 'symmetric':   # as an export written before the grid existed
        for r in ckpt['mpq_layers'].values():
            del r['grid']
        ckpt['meta']['mpq']['content_sha256'] = content_sha256(ckpt)
    torch.save(ckpt, tmp_path / 'q.pth')
    ckpt = torch.load(tmp_path / 'q.pth', weights_only=False)
    validate_export(ckpt)
    fresh = _Det()
    prepare_model_for_export(fresh, ckpt)
    fresh.load_state_dict(ckpt['state_dict'])
    with torch.no_grad():
        out = [fresh(x) for x in xs]
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    # b bits per code on both grids
    for name, m in fresh.named_modules():
        if name in stored:
            assert stored[name] == packed_nbytes(m.codes.numel(), 2) and m.grid == grid
