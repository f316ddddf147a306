"""Greedy multipoint quantization in output space, and the shared weight container.

A channel's weight w (d,) is approximated by sum_i a_i q_i with q_i in the b-bit
grid. Step k works on the residual r = w - sum_{i<k} a_i q_i:

* candidate scales a = rho * (the min-max scale) for ``ratios`` rho (rho = 1 is
  always the first one), q = clip(round(r / a), lo, hi) (``grid.code_range``);
* the error of a candidate in the H metric is e(a, q) = r^T H r - 2 a r^T H q +
  a^2 q^T H q; the least-squares refit a* = r^T H q / q^T H q replaces a where it
  gives a lower error (e(a*, q) = r^T H r - (r^T H q)^2 / q^T H q);
* the candidate with the lowest error wins (ties: the earlier candidate, so the
  min-max scale wins ties). Hence a step is never worse than the min-max step in
  the metric used, and with the refit it never increases the error. The error of
  the new residual is then evaluated directly; if float rounding makes it exceed the
  previous one (only possible when r^T H q ~ 0), the point gets scale 0 (it is
  a no-op, and the allocation never picks a point with zero gain).

With error feedback (``feedback``, see ``feedback.py``), errors are measured in the
feedback's exact (or block-diagonal) H, and each point count k may use, instead of
the first k greedy points, the same scales with all codes re-rounded together with
feedback (``joint_feedback``), whichever has the lower error.

The grid (``grid.GRIDS``). 'symmetric': {-Q..Q}, scales >= 0; a negative a* is
stored as |a*| with -q. 'full': all 2^b codes {-2^(b-1)..2^(b-1)-1}, with SIGNED
scales: the sign of a point's scale is its side of the extra level (negative: the
extra level holds the largest positive value). We chose signed scales over positive
scales plus a per-channel side flag because the codes then always lie in one range:
a negative refit (or a joint refit that flips a sign) is kept as it is, with the
same codes; packing, validation and error feedback's rounding need one clamp per
grid; and dequantization stays sum_i a_i q_i. The deployed int8 graph makes its
scales positive by negating a row's codes (``mpq_det.deploy``), which stay within
int8 below 8 bits; at 8 bits the full grid is the symmetric one (``grid``). Each
step searches both sides on side * r with positive candidates and keeps the better
(``greedy_step``).

Everything is vectorized over channels. Points can be computed lazily: compute
``n_points`` for all channels, then ``extend_points`` for the few channels that the
allocation wants to give more.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from .grid import (check_bits, check_choice, check_grid, check_max_points,
                   check_positive_int, check_weight, code_range, grid_extent,
                   positive_scales, signed_scales)
from .feedback import Feedback, round_many
from .hforms import HForm, IdentityH

DEFAULT_N_CANDIDATES = 16
DEFAULT_N_REFINE = 8     # fine candidates around the best coarse ratio
DEFAULT_LLOYD = 1        # re-rounding passes with the refitted scale
_EVAL_MAX = 2 ** 21      # floats of the candidate codes evaluated in one batch at most
FB_MODES = ('joint', 'first')
POINT_SCALES = ('free', 'pow2')
# Smallest candidate ratio rho (scale relative to the min-max scale) per bit width.
DEFAULT_MIN_RATIO = {2: 0.15, 3: 0.25}
DEFAULT_MIN_RATIO_HIGH = 0.35


def default_ratios(bits: int, n_candidates: int = DEFAULT_N_CANDIDATES,
                   min_ratio: float | None = None) -> Tensor:
    """Candidate ratios, from 1 (the min-max scale) down to ``min_ratio``."""
    bits = check_bits(bits)
    n = check_positive_int(n_candidates, 'n_candidates')
    lo = DEFAULT_MIN_RATIO.get(bits, DEFAULT_MIN_RATIO_HIGH) if min_ratio is None \
        else float(min_ratio)
    if not 0 < lo <= 1:
        raise ValueError(f'min_ratio must be in (0, 1], got {lo}')
    if n == 1:
        return torch.ones(1)
    return torch.linspace(1.0, lo, n)


@dataclass
class PointSet:
    """Greedy points for all channels of one layer, before allocation.

    ``computed[j]`` points are valid for channel j; entries beyond are zero (scales,
    codes) or NaN (err, werr).
    """
    scales: Tensor      # (C, P) float32
    codes: Tensor       # (C, P, d) int8
    err: Tensor         # (C, P+1) output error (in H's metric) after 0..P points
    werr: Tensor        # (C, P+1) weight-space squared error after 0..P points
    computed: Tensor    # (C,) int64
    bits: int
    search: dict = field(default_factory=dict)   # n_candidates / refit / ratios
    grid: str = 'symmetric'
    # pow2 scales: merges[j, k] says that point k of channel j merges with the
    # channel's earlier points into one int8 row (``merge_pow2``): on the int8 graph
    # it costs no compute. None without pow2.
    merges: Tensor | None = None
    # signed scales with joint feedback: the best scale of each channel's first point
    # on the side of the extra level that the greedy point does not use (C,)
    other: Tensor | None = None
    # Joint error feedback: at level k, a channel may use instead of its first k
    # greedy points the same k scales with all codes re-rounded with feedback
    # (``alt[k]`` = (codes (C, k, d) int8, scales (C, k))) where that has the lower
    # error; ``use_alt`` (C, P+1) says where, ``err`` holds the lower error and
    # ``cerr`` the greedy chain's own (which later greedy points continue from).
    cerr: Tensor | None = None
    alt: dict = field(default_factory=dict)
    use_alt: Tensor | None = None
    # W H (C, d) in the error metric, kept with joint feedback: the error of any
    # refitted combination then costs O(k d) per row instead of a quadratic form
    mw: Tensor | None = None

    @property
    def max_points(self) -> int:
        return self.scales.shape[1]

    @property
    def channels(self) -> int:
        return self.scales.shape[0]

    @property
    def d(self) -> int:
        return self.codes.shape[2]


@dataclass
class QuantizedWeight:
    """Quantized weight of one layer, shared by all methods.

    Rows are channel-major: channel 0's points, then channel 1's, ...
    """
    codes: Tensor       # (sum_j n_j, d) int8
    scales: Tensor      # (sum_j n_j,) float32
    npoints: Tensor     # (C_out,) int64
    bits: int
    grid: str = 'symmetric'   # scales >= 0 on 'symmetric', signed on 'full'

    def __post_init__(self):
        self.validate()

    def validate(self) -> 'QuantizedWeight':
        check_bits(self.bits)
        if self.codes.dim() != 2 or self.codes.dtype != torch.int8:
            raise ValueError('codes must be a (rows, d) int8 tensor, got '
                             f'{tuple(self.codes.shape)} {self.codes.dtype}')
        if self.npoints.dim() != 1 or self.npoints.numel() == 0:
            raise ValueError('npoints must be a non-empty (C_out,) tensor')
        if bool((self.npoints < 1).any()):
            raise ValueError('npoints must be >= 1 for every channel')
        rows = int(self.npoints.sum())
        if self.codes.shape[0] != rows or self.scales.shape != (rows,):
            raise ValueError(f'codes {tuple(self.codes.shape)} and scales '
                             f'{tuple(self.scales.shape)} must have sum(npoints)='
                             f'{rows} rows')
        lo, hi = code_range(self.bits, self.grid)
        if rows and (int(self.codes.min()) < lo or int(self.codes.max()) > hi):
            raise ValueError(f'codes must lie in {lo}..{hi} for bits={self.bits} on the '
                             f'{self.grid} grid')
        return self

    @property
    def out_channels(self) -> int:
        return self.npoints.numel()

    @property
    def d(self) -> int:
        return self.codes.shape[1]

    def row_channel(self) -> Tensor:
        """(rows,) output channel of each row."""
        return torch.repeat_interleave(
            torch.arange(self.out_channels, device=self.npoints.device), self.npoints)

    def dequantize(self) -> Tensor:
        rows = self.codes.float() * self.scales.float()[:, None]
        out = torch.zeros(self.out_channels, self.d, dtype=torch.float32,
                          device=rows.device)
        return out.index_add_(0, self.row_channel().to(rows.device), rows)

    @classmethod
    def from_single(cls, scales: Tensor, codes: Tensor, bits: int,
                    grid: str = 'symmetric') -> 'QuantizedWeight':
        C = codes.shape[0]
        return cls(codes.to(torch.int8).contiguous(), scales.float().reshape(C),
                   torch.ones(C, dtype=torch.int64), bits, grid)

    def extra_points(self) -> int:
        return int(self.npoints.sum()) - self.out_channels


def from_single(scales: Tensor, codes: Tensor, bits: int,
                grid: str = 'symmetric') -> QuantizedWeight:
    """One point per channel (rtn, mse, ocs) as a QuantizedWeight."""
    return QuantizedWeight.from_single(scales, codes, bits, grid)


def select_points(ps: PointSet, npoints: Tensor) -> QuantizedWeight:
    """Keep the first ``npoints[j]`` points of every channel."""
    npoints = torch.as_tensor(npoints, dtype=torch.int64)
    if npoints.shape != (ps.channels,):
        raise ValueError(f'npoints must have shape ({ps.channels},), got '
                         f'{tuple(npoints.shape)}')
    if bool((npoints < 1).any()) or bool((npoints > ps.computed).any()):
        raise ValueError('npoints must be in 1..computed points for every channel')
    mask = torch.arange(ps.max_points)[None, :] < npoints[:, None]
    codes, scales = ps.codes[mask].contiguous(), ps.scales[mask].contiguous()
    if ps.use_alt is not None:
        alt = ps.use_alt.gather(1, npoints[:, None])[:, 0]
        start = torch.cumsum(npoints, 0) - npoints
        for k in npoints[alt].unique().tolist():
            ch = torch.nonzero(alt & (npoints == k)).reshape(-1)
            rows = (start[ch][:, None] + torch.arange(k)[None, :]).reshape(-1)
            a_codes, a_scales = ps.alt[k]
            codes[rows] = a_codes[ch].reshape(-1, ps.d)
            scales[rows] = a_scales[ch].reshape(-1)
    return QuantizedWeight(codes, scales, npoints.clone(), ps.bits, ps.grid)


# ------------------------------------------------------------------------ search
def _check_layer(W: Tensor, H: HForm | None) -> HForm:
    check_weight(W, 'W')
    C, d = W.shape
    if H is None:
        return IdentityH(d, 1)
    if not isinstance(H, HForm):
        raise ValueError(f'H must be an HForm (see mpq_det.quant.stats), got '
                         f'{type(H).__name__}')
    if H.d != d:
        raise ValueError(f'H is for d={H.d} but W has shape {tuple(W.shape)}')
    if C % H.groups:
        raise ValueError(f'W has {C} output channels, not divisible by the '
                         f'{H.groups} groups of H')
    return H


def _check_feedback(W: Tensor, H: HForm, feedback: Feedback | None) -> HForm:
    """The metric that errors are measured in: feedback's if given, else H."""
    if feedback is None:
        return H
    if not isinstance(feedback, Feedback):
        raise ValueError(f'feedback must be a Feedback, got {type(feedback).__name__}')
    if feedback.d != W.shape[1] or feedback.groups != H.groups:
        raise ValueError(f'feedback is for d={feedback.d}, groups={feedback.groups} but '
                         f'W has shape {tuple(W.shape)} and H groups={H.groups}')
    return feedback.metric


INT8_MAX = 127


def _pow2_chain(scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(step, mult, chain) of points' scales (..., k), float64: step = the smallest
    nonzero |scale| (> 0), mult = scales / step (signed; 0 for zero points), chain =
    whether the first scale is nonzero and every nonzero |mult| is a power of two."""
    nz = scales != 0
    step = torch.where(nz, scales.abs(), torch.full_like(scales, math.inf)).amin(-1)
    mult = scales / step[..., None]
    chain = (torch.frexp(torch.where(nz, mult.abs(), torch.ones_like(mult))).mantissa
             == 0.5).all(-1) & (scales[..., 0] != 0)
    return step, mult, chain


def pow2_room(scales: Tensor, bits: int, grid: str = 'symmetric') -> tuple[Tensor, Tensor]:
    """(step (C,), jmax (C,) int64) for a next point of each row of ``scales``
    (C, k): a channel's points so far. If their nonzero |scales| are |s_1| / 2^(j_i)
    (one power-of-two chain; ``step`` = the last of them, > 0), a next point of
    scale +-step / 2^j still merges with them into one int8 code (``merge_pow2``)
    for j <= jmax: with T the largest |code| of the grid, the merged codes lie
    within +-(M 2^j + T) with M = T sum_i |s_i| / step, and M 2^j + T <= 127. jmax
    = 0 where no such point exists."""
    T = -code_range(bits, grid)[0]
    step, mult, chain = _pow2_chain(scales.double())
    M = torch.where(chain, T * mult.abs().sum(-1), torch.ones_like(step))
    room = torch.floor(torch.log2(torch.clamp((INT8_MAX - T) / M, min=1.0)))
    jmax = torch.where(chain, room, torch.zeros_like(room)).to(torch.int64)
    return torch.where(chain, step, torch.zeros_like(step)).float(), jmax


def merge_pow2(scales: Tensor, codes: Tensor) -> tuple[Tensor, Tensor, int]:
    """A channel's points (scales (k,), codes (k, d)) as int8 rows: the longest
    leading run that is one power-of-two chain (zero points included) and whose
    merged codes fit in -127..127 becomes one row, step = its smallest nonzero
    |scale| (> 0) and codes sum_i c_i s_i / step (exact integers); the points after
    it stay as they are (signed scales on the full grid). Returns (scales (r,),
    codes (r, d) int16, merged (int): points in row 0). Exact: the rows' sum equals
    the points' sum."""
    best, row = 1, None
    for n in range(2, scales.numel() + 1):
        step, mult, chain = _pow2_chain(scales[:n].double())
        if not bool(chain):
            break
        merged = (mult[:, None] * codes[:n].double()).sum(0)
        if float(merged.abs().max()) > INT8_MAX:
            break
        best, row = n, (step, merged)
    if row is None:
        return scales, codes.to(torch.int16), 1
    step, merged = row
    return (torch.cat([step.float().reshape(1), scales[best:]]),
            torch.cat([merged.round().to(torch.int16)[None], codes[best:].to(torch.int16)]),
            best)


def int8_rows(qw: QuantizedWeight) -> tuple[Tensor, int, int]:
    """(rows (C,) int64, lowest code, highest code) of a layer on the int8 graph: each
    channel's rows after ``merge_pow2``, and the range of all its rows' codes (merged
    rows included), which decides whether the graph can store them as INT4."""
    rows = qw.npoints.clone()
    lo = int(qw.codes.min()) if qw.codes.numel() else 0
    hi = int(qw.codes.max()) if qw.codes.numel() else 0
    start = torch.cumsum(qw.npoints, 0) - qw.npoints
    for c in torch.nonzero(qw.npoints > 1).reshape(-1).tolist():
        s, n = int(start[c]), int(qw.npoints[c])
        _, codes, m = merge_pow2(qw.scales[s:s + n], qw.codes[s:s + n])
        rows[c] = n - m + 1
        lo, hi = min(lo, int(codes.min())), max(hi, int(codes.max()))
    return rows, lo, hi


def greedy_step(R: Tensor, H: HForm, bits: int, ratios: Tensor, refit: bool = True,
                err_prev: Tensor | None = None, gidx: Tensor | None = None,
                n_refine: int = 0, lloyd: int = 0, measure: HForm | None = None,
                pow2: tuple[Tensor, Tensor] | None = None, grid: str = 'symmetric',
                return_other: bool = False):
    """One greedy step for all rows of R (C, d).

    ``grid``: the code grid (``grid.GRIDS``). Where scales are signed (the full grid
    below 8 bits) both sides of the extra level are searched, each on side * r with
    positive candidates, and each row keeps the better one (ties: the side that puts
    the largest |r| on the extra level, ``grid.grid_extent``). ``return_other``:
    also return the best scale found on the side not kept (zeros where scales are
    not signed), which error feedback rounds as well (``joint_feedback``).

    ``pow2`` = (step (C,), jmax (C,)) from ``pow2_room``: a row with jmax >= 1 only
    tries the scales +-step / 2^j, j = 1..jmax, unrefitted, so that its points stay
    one int8 code (``merge_pow2``); the other rows search as below.

    Candidates, in order (a later one replaces the best only if strictly better,
    so the min-max scale ``ratios[0] = 1`` wins ties):
    1. a = ratios[i] * (the min-max scale) for every i (the coarse grid);
    2. ``n_refine`` ratios evenly spaced within one coarse step on both sides of
       each channel's best coarse ratio;
    3. ``lloyd`` times: the best scale found so far (after its refit) used as a
       rounding scale, i.e. q = round(r / a*), then refit again.
    Each candidate's a is refitted by least squares when that lowers the error.

    ``measure`` (default: H) is the metric of ``err_prev`` and of the returned error,
    e.g. the exact H of error feedback while the search uses a cheaper form.

    Returns (scale (C,), codes (C, d) float, new residual, new error (C,)), plus the
    other side's scale (C,) with ``return_other``.
    """
    lo, hi = code_range(bits, grid)
    Q = -lo                   # min-max scale = extent / Q
    C = R.shape[0]
    free = torch.ones(C, dtype=torch.bool)  # rows with the free scale search
    if pow2 is not None:
        step, jmax = pow2
        free = jmax < 1
    ones = torch.ones(C)

    def search(side):
        """(best error, fitted scale, rounding scale, rows on this side, extent) of
        the search on side * r: positive candidates, the same errors in H."""
        side, m = grid_extent(R, bits, grid, side)
        Rs = R * side[:, None] if bool((side < 0).any()) else R
        HR = H.matvec(Rs, gidx)
        rHr = torch.linalg.vecdot(Rs, HR)
        best_err = torch.full((C,), float('inf'))
        best_a = torch.zeros(C)         # fitted scale (signed)
        best_r = torch.zeros(C)         # rounding scale that produced q
        nz = m > 0

        def evaluate(A, rows=None, refit=refit):
            """Candidate scales: each row of A (n, C) in turn, a few at a time (one
            batched pass over H each). A candidate replaces a row's best only if
            strictly better (the first best wins); it is refitted by least squares
            where that lowers the error (``refit``; rows with free scales only)."""
            nonlocal best_err, best_a, best_r
            per = max(1, _EVAL_MAX // max(1, C * R.shape[1]))
            for s0 in range(0, A.shape[0], per):
                a = A[s0:s0 + per]                                        # (n, C)
                ok_a = nz & (a > 0) if rows is None else nz & (a > 0) & rows
                if not bool(ok_a.any()):
                    continue
                inv = torch.where(ok_a, 1.0 / torch.where(ok_a, a, ones),
                                  torch.zeros_like(a))
                qs = torch.mul(Rs, inv[..., None]).round_().clamp_(lo, hi)  # (n, C, d)
                b = torch.linalg.vecdot(qs, HR)
                c = H.quad_many(qs, gidx)
                del qs
                fit = a
                err = rHr - 2 * a * b + a * a * c
                if refit:
                    ok = (c > 0) & free
                    a_ls = b / torch.where(ok, c, ones)
                    err_ls = rHr - b * a_ls
                    use = ok & (err_ls < err)
                    fit = torch.where(use, a_ls, a)
                    err = torch.where(use, err_ls, err)
                err = torch.where(ok_a & ~torch.isnan(err), err, float('inf'))
                i = torch.argmin(err, 0)[None]                  # the first minimum
                e = err.gather(0, i)[0]
                better = e < best_err
                best_err = torch.where(better, e, best_err)
                best_a = torch.where(better, fit.gather(0, i)[0], best_a)
                best_r = torch.where(better, a.gather(0, i)[0], best_r)

        if pow2 is not None:
            for j in range(1, int(jmax.max()) + 1):
                evaluate((step * 2.0 ** -j)[None], jmax >= j, False)
        if bool(free.any()):
            rows = None if bool(free.all()) else free
            rl = ratios.tolist()
            # each candidate's factor rounded to float first, as m * (rho / Q) does
            evaluate((ratios.double() / Q).float()[:, None] * m, rows)
            if n_refine > 0 and len(rl) > 1:
                st = abs(rl[0] - rl[1])
                base = best_r.clone()
                offs = torch.linspace(-st, st, n_refine + 2)[1:-1]
                evaluate(base + (offs.double() / Q).float()[:, None] * m, rows)
            for _ in range(lloyd):
                evaluate(best_a.abs()[None], rows)
        return best_err, best_a, best_r, side, m

    best_err, best_a, best_r, side, m = search(None)
    other_scale = torch.zeros(C)
    if signed_scales(bits, grid):
        # the other side too: the extreme's side (searched first, it wins ties) is
        # not always the better one
        other = search(-side)
        use = other[0] < best_err
        other_scale = torch.where(use, side * best_a, other[3] * other[1])
        best_a, best_r, side, m = (torch.where(use, o, t) for o, t in
                                   zip(other[1:], (best_a, best_r, side, m)))
    nz = m > 0
    if err_prev is None:
        err_prev = (H if measure is None else measure).quad(R, gidx)
    ok_r = nz & (best_r > 0)
    inv = torch.where(ok_r, 1.0 / torch.where(ok_r, best_r, ones), torch.zeros_like(m))
    q = torch.round(R * (side * inv)[:, None]).clamp_(lo, hi)
    scale, q = positive_scales(side * best_a, q, bits, grid)
    R_new = R - scale[:, None] * q
    err_new = (H if measure is None else measure).quad(R_new, gidx)
    bad = ~(err_new <= err_prev) | ~nz
    if bool(bad.any()):
        scale = torch.where(bad, torch.zeros_like(scale), scale)
        q = torch.where(bad[:, None], torch.zeros_like(q), q)
        R_new = torch.where(bad[:, None], R, R_new)
        err_new = torch.where(bad, err_prev, err_new)
    if return_other:
        return scale, q, R_new, err_new, other_scale
    return scale, q, R_new, err_new


def feedback_step(R: Tensor, scale: Tensor, q: Tensor, R_new: Tensor, err: Tensor,
                  fb: Feedback, bits: int, gidx: Tensor | None = None,
                  refit: bool | Tensor = True, grid: str = 'symmetric'):
    """Re-round a greedy point with error feedback, on the greedy point's scale.

    ``R`` is the residual the point approximates and (scale, q, R_new, err) the
    greedy step's result, err in ``fb.metric``. The codes are rounded column by
    column with feedback (``Feedback.round``); the scale is then refitted by least
    squares in ``fb.metric`` where that lowers the error and keeps the scale's sign
    (the side the codes were rounded for). Each row keeps whichever
    of the two points (greedy or feedback) has the lower error, so a step is never
    worse than the greedy one. Returns (scale, q, R_new, err) like ``greedy_step``.
    ``refit`` may be a (C,) mask of the rows whose scale may be refitted.
    """
    M = fb.metric
    qf = fb.round(R, scale, bits, gidx, grid)
    a = scale
    if refit is not False:
        Hq = M.matvec(qf, gidx)
        b = torch.linalg.vecdot(R, Hq)
        c = torch.linalg.vecdot(qf, Hq)
        ok = (c > 0) & (b * scale > 0) & refit
        a_ls = torch.where(ok, b / torch.where(ok, c, torch.ones_like(c)), a)
        # e(a) - e(a_ls) = c (a - a_ls)^2 >= 0: the refit never raises the error
        a = torch.where(ok, a_ls, a)
    Rf = R - a[:, None] * qf
    ef = M.quad(Rf, gidx)
    use = (ef < err) & (scale != 0)
    return (torch.where(use, a, scale), torch.where(use[:, None], qf, q),
            torch.where(use[:, None], Rf, R_new), torch.where(use, ef, err))


def joint_feedback(W: Tensor, scales: Tensor, fb: Feedback, bits: int,
                   gidx: Tensor | None = None, refit: bool = True,
                   MW: Tensor | None = None, fixed_ratios: bool = False,
                   grid: str = 'symmetric') -> tuple[Tensor, Tensor, Tensor]:
    """k points per row of W (n, d) on the given steps ``scales`` (n, k), all codes
    rounded together with error feedback (``Feedback.round``) on ``grid``, then the
    k scales refitted jointly by least squares in ``fb.metric`` where that lowers
    the error.

    Returns (scales (n, k), codes (n, k, d) float, error (n,) in fb.metric). The
    scales are >= 0 on the symmetric grid (a negative refitted scale is stored as
    its absolute value with negated codes) and signed on the full grid (see
    ``joint_feedback_refit``).
    ``MW``: ``fb.metric.matvec(W)`` if the caller has it; the refitted error is then
    (W - a Q) . (MW - a HQ), with no further pass over H. ``fixed_ratios``: one
    common factor of a row's k scales is refitted, so that their ratios (powers of
    two, ``pow2_room``) stay as they are.
    """
    codes = fb.round(W, scales, bits, gidx, grid)                 # (n, k, d)
    return joint_feedback_codes(W, scales, codes, fb, bits, gidx, refit, MW,
                                fixed_ratios, grid)


def joint_feedback_codes(W: Tensor, scales: Tensor, codes: Tensor, fb: Feedback,
                         bits: int, gidx: Tensor | None = None, refit: bool = True,
                         MW: Tensor | None = None, fixed_ratios: bool = False,
                         grid: str = 'symmetric') -> tuple[Tensor, Tensor, Tensor]:
    """``joint_feedback`` after its rounding: ``codes`` (n, k, d) from
    ``fb.round(W, scales, bits, gidx, grid)``; the same arguments and result."""
    M = fb.metric
    k = scales.shape[1]
    if not refit:
        return scales, codes, M.quad(W - torch.einsum('nk,nkd->nd', scales, codes), gidx)
    if fixed_ratios and k > 1:
        s1 = scales[:, :1]
        nz = s1 != 0
        ratio = torch.where(nz, scales / torch.where(nz, s1, torch.ones_like(s1)),
                            torch.zeros_like(scales))
        u = torch.einsum('nk,nkd->nd', ratio, codes)[:, None]    # (n, 1, d)
        a, u_signed, e = joint_feedback_refit(W, s1, u, M, gidx, MW, bits, grid)
        sign = torch.where((u_signed * u).sum(-1) < 0, -1.0, 1.0)  # (n, 1)
        return a * ratio, codes * sign[..., None], e
    return joint_feedback_refit(W, scales, codes, M, gidx, MW, bits, grid)


def joint_feedback_refit(W: Tensor, scales: Tensor, codes: Tensor, M: HForm,
                         gidx: Tensor | None = None, MW: Tensor | None = None,
                         bits: int = 4, grid: str = 'symmetric'
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """The refit of ``joint_feedback``: scales (n, k) refitted jointly by least
    squares in M for the given codes (n, k, d), where that lowers the error. The
    result goes through ``grid.positive_scales``: scales >= 0 with negated codes on
    the symmetric grid, signed on the full grid."""
    n, k = scales.shape
    d = codes.shape[2]
    g_rep = None if gidx is None else gidx.repeat_interleave(k)
    HQ = M.matvec(codes.reshape(n * k, d), g_rep).reshape(n, k, d)
    Gm = torch.bmm(codes, HQ.transpose(1, 2)).double()            # (n, k, k)
    rhs = torch.einsum('nkd,nd->nk', HQ, W).double()
    L, info = torch.linalg.cholesky_ex(Gm)
    ok = (info == 0) & torch.isfinite(rhs).all(-1)
    eye = torch.eye(k, dtype=L.dtype)
    a_ls = torch.cholesky_solve(rhs[..., None], torch.where(ok[:, None, None], L, eye))
    a_ls = torch.where(ok[:, None], a_ls[..., 0], scales.double())
    if MW is None:
        e_ls = M.quad(W - torch.einsum('nk,nkd->nd', a_ls.float(), codes), gidx)
    else:
        a32 = a_ls.float()
        e_ls = torch.linalg.vecdot(W - torch.einsum('nk,nkd->nd', a32, codes),
                                   MW - torch.einsum('nk,nkd->nd', a32, HQ))
    # a_ls minimizes the error over the scales, so the error of the greedy scales is
    # e(a_ls) + (a - a_ls)^T G (a - a_ls): no second pass over H
    delta = scales.double() - a_ls
    e_greedy = e_ls.double() + torch.einsum('nk,nkl,nl->n', delta, Gm, delta)
    use = ok & (e_ls.double() <= e_greedy) & torch.isfinite(e_ls)
    if not bool(use.all()):     # rows without a valid refit: their own error
        bad = ~use
        g = gidx
        if g is None and M.groups > 1:
            g = torch.arange(n) // (n // M.groups)
        e_ls = e_ls.clone()
        e_ls[bad] = M.quad(W[bad] - torch.einsum('nk,nkd->nd', scales[bad], codes[bad]),
                           None if g is None else g[bad])
    a = torch.where(use[:, None], a_ls.float(), scales)
    a, codes = positive_scales(a, codes, bits, grid)
    return a, codes, e_ls


@dataclass
class JointJob:
    """Level ``k`` of joint feedback for channels ``ch`` of a layer's PointSet: the
    rows to round (``W``, with the first point's other side appended at level 1),
    their steps and groups. ``_joint_level`` runs it at once; ``joint_levels`` runs
    many together (the roundings of several layers in one batch)."""
    ps: PointSet
    ch: Tensor
    k: int
    fb: Feedback
    W: Tensor
    scales: Tensor
    gidx: Tensor | None
    mw: Tensor | None
    side: Tensor         # channels (indices into ch) whose other side is appended

    def finish(self, codes: Tensor) -> None:
        """Refit on the rounded ``codes`` and keep, per channel, the lower error."""
        ps, ch, k = self.ps, self.ch, self.k
        a, q, e = joint_feedback_codes(self.W, self.scales, codes, self.fb, ps.bits,
                                       self.gidx, ps.search.get('refit', True), self.mw,
                                       ps.search.get('pow2', False), ps.grid)
        n = ch.numel()
        if self.side.numel():
            two = e[n:] < e[self.side]
            sel = self.side[two]
            full = (a, q, e)
            a, q, e = (t[:n].clone() for t in full)
            a[sel], q[sel], e[sel] = (t[n:][two] for t in full)
        use = e < ps.cerr[ch, k]
        ps.alt[k][0][ch] = q.to(torch.int8)
        ps.alt[k][1][ch] = a
        ps.use_alt[ch, k] = use
        ps.err[ch, k] = torch.where(use, e, ps.cerr[ch, k])


def _joint_level(ps: PointSet, W: Tensor, ch: Tensor, k: int, fb: Feedback,
                 gidx: Tensor | None, defer: list | None = None) -> None:
    """Level k of joint feedback for channels ``ch`` (rows ``W``), in place. At
    level 1 with signed scales, the first point's other side (``PointSet.other``)
    is rounded as well, and each channel keeps the lower error. ``defer``: append
    the ``JointJob`` there instead, for ``joint_levels``."""
    if k not in ps.alt:
        ps.alt[k] = (torch.zeros(ps.channels, k, ps.d, dtype=torch.int8),
                     torch.zeros(ps.channels, k))
    n = W.shape[0]
    scales = ps.scales[ch, :k]
    mw = None if ps.mw is None else ps.mw[ch]
    side = torch.zeros(0, dtype=torch.int64)
    if k == 1 and ps.other is not None:
        # the other side's rows ride along in the same rounding: its cost is mostly
        # per column, not per row
        side = torch.nonzero(ps.other[ch] != 0).reshape(-1)
    if side.numel():
        if gidx is None and fb.groups > 1:
            gidx = torch.arange(n) // (n // fb.groups)
        W = torch.cat([W, W[side]])
        scales = torch.cat([scales, ps.other[ch][side, None]])
        gidx = None if gidx is None else torch.cat([gidx, gidx[side]])
        mw = None if mw is None else torch.cat([mw, mw[side]])
    job = JointJob(ps, ch, k, fb, W, scales, gidx, mw, side)
    if defer is not None:
        fb.coefficients()   # its Cholesky now, on this layer's worker, not when batched
        defer.append(job)
    else:
        joint_levels([job])


def joint_levels(jobs: list[JointJob],
                 each: Callable[[Callable[[int], Any], list[int]], Any] | None = None
                 ) -> None:
    """Run ``JointJob``s: the roundings of all jobs with the same bits and grid in
    one ``round_many``, then each job's refit. ``each(fn, keys)``: how to call
    ``fn`` on every key (default: one after the other), e.g. side by side on
    worker threads; the keys are the layers (jobs of one PointSet run in order)."""
    if not jobs:
        return
    codes: list = [None] * len(jobs)
    by: dict[tuple, list[int]] = {}
    for i, jb in enumerate(jobs):
        by.setdefault((jb.ps.bits, jb.ps.grid), []).append(i)
    for (bits, grid), idx in by.items():
        for i, q in zip(idx, round_many([(jobs[i].fb, jobs[i].W, jobs[i].scales,
                                          jobs[i].gidx) for i in idx], bits, grid, each)):
            codes[i] = q
    layers: dict[int, list[int]] = {}
    for i, jb in enumerate(jobs):
        layers.setdefault(id(jb.ps), []).append(i)
    keys = list(layers)

    def run(key):
        for i in layers[key]:
            jobs[i].finish(codes[i])
    if each is None:
        for key in keys:
            run(key)
    else:
        each(run, keys)


def _pow2_room(ps: PointSet, ch: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """``pow2_room`` for point k of channels ``ch`` (None without pow2 or for the
    first point); marks in ``ps.merges`` the channels whose point k will merge."""
    if ps.merges is None or not k:
        return None
    step, jmax = pow2_room(ps.scales[ch, :k], ps.bits, ps.grid)
    ps.merges[ch, k] = jmax >= 1
    return step, jmax


def greedy_multipoint(W: Tensor, H: HForm | None = None, bits: int = 4,
                      max_points: int = 4, n_candidates: int = DEFAULT_N_CANDIDATES,
                      refit: bool = True, n_points: int | None = None,
                      min_ratio: float | None = None,
                      n_refine: int = DEFAULT_N_REFINE,
                      lloyd: int = DEFAULT_LLOYD, feedback: Feedback | None = None,
                      fb_points: int = 1, fb_mode: str = 'joint',
                      pow2: bool = False, grid: str = 'symmetric',
                      defer: list | None = None) -> PointSet:
    """Greedy points for every channel of W (C, d) in the metric of H.

    ``H`` None means the weight-space metric (H = I). ``n_points`` (default
    ``max_points``) points are computed now for every channel; the rest can be added
    later with ``extend_points``. Search: ``n_candidates`` coarse ratios from 1 (the
    min-max scale) down to ``min_ratio``, ``n_refine`` fine ones around the best and
    ``lloyd`` re-rounding passes (see ``greedy_step``).

    ``feedback``: error feedback, with every error in ``PointSet.err`` measured in
    ``feedback.metric`` (the search still uses H). ``fb_mode`` 'joint': the greedy
    points stay as they are, and for 1..``fb_points`` points a channel may instead
    use the same scales with all codes re-rounded together with feedback
    (``joint_feedback``), wherever that has the lower error. 'first': the first
    ``fb_points`` greedy points themselves are re-rounded with feedback
    (``feedback_step``) and the later greedy points approximate what they leave.

    ``pow2``: each further point's scale is the previous one's / 2^j, wherever the
    channel's points then still merge into one int8 code (``pow2_room``; joint
    feedback refits a common factor only): on int8 hardware such a channel runs as
    one int8 row (``merge_pow2``), its extra points at no extra compute
    (``PointSet.merges`` says which points merge).

    ``grid``: the code grid, 'symmetric' or 'full' (``grid.GRIDS``; see the module
    doc for the full grid's signed scales).

    ``defer``: the joint feedback levels are appended there as ``JointJob``s, to be
    run later with ``joint_levels`` (with other layers' levels); the PointSet is
    complete only after that.
    """
    n_refine = check_positive_int(n_refine, 'n_refine', 0)
    lloyd = check_positive_int(lloyd, 'lloyd', 0)
    bits = check_bits(bits)
    P = check_max_points(max_points)
    n_points = P if n_points is None else check_positive_int(n_points, 'n_points')
    n_points = min(n_points, P)
    H = _check_layer(W, H)
    fb_points = check_positive_int(fb_points, 'fb_points', 0)
    M = _check_feedback(W, H, feedback)
    check_choice(fb_mode, 'fb_mode', FB_MODES)
    check_grid(grid)
    W = W.detach().float().cpu()
    C, d = W.shape
    ratios = default_ratios(bits, n_candidates, min_ratio)
    ps = PointSet(scales=torch.zeros(C, P), codes=torch.zeros(C, P, d, dtype=torch.int8),
                  err=torch.full((C, P + 1), float('nan')),
                  werr=torch.full((C, P + 1), float('nan')),
                  computed=torch.zeros(C, dtype=torch.int64), bits=bits,
                  search=dict(ratios=ratios, refit=bool(refit), n_refine=n_refine,
                              lloyd=lloyd, fb_points=fb_points if feedback else 0,
                              fb_mode=fb_mode, pow2=bool(pow2)), grid=grid,
                  merges=torch.zeros(C, P, dtype=torch.bool) if pow2 else None)
    joint = feedback is not None and fb_mode == 'joint'
    if joint:
        ps.use_alt = torch.zeros(C, P + 1, dtype=torch.bool)
        ps.mw = M.matvec(W)
        ps.err[:, 0] = torch.linalg.vecdot(W, ps.mw)
    else:
        ps.err[:, 0] = M.quad(W)
    ps.cerr = ps.err.clone()
    ps.werr[:, 0] = torch.linalg.vecdot(W, W)
    R = W
    for k in range(n_points):
        p2 = _pow2_room(ps, torch.arange(C), k)
        scale, q, Rn, e, other = greedy_step(
            R, H, bits, ratios, refit, ps.cerr[:, k], n_refine=n_refine, lloyd=lloyd,
            measure=None if feedback is None else M, pow2=p2, grid=grid,
            return_other=True)
        if joint and k == 0 and signed_scales(bits, grid):
            ps.other = other
        if feedback is not None and not joint and k < fb_points:
            scale, q, Rn, e = feedback_step(R, scale, q, Rn, e, feedback, bits,
                                            refit=True if p2 is None else p2[1] < 1,
                                            grid=grid)
        R = Rn
        ps.scales[:, k] = scale
        ps.codes[:, k] = q.to(torch.int8)
        ps.err[:, k + 1] = e
        ps.cerr[:, k + 1] = e
        if joint and k < fb_points:
            _joint_level(ps, W, torch.arange(C), k + 1, feedback, None, defer)
        ps.werr[:, k + 1] = torch.linalg.vecdot(R, R)
    ps.computed.fill_(n_points)
    return ps


def residual(ps: PointSet, W: Tensor, channels: Tensor | None = None) -> Tensor:
    """W - (computed points) for the given channels."""
    if channels is None:
        channels = torch.arange(ps.channels)
    W = W.detach().float().cpu()[channels]
    mask = torch.arange(ps.max_points)[None, :] < ps.computed[channels][:, None]
    s = ps.scales[channels] * mask
    return W - torch.einsum('cp,cpd->cd', s, ps.codes[channels].float())


def extend_points(ps: PointSet, W: Tensor, H: HForm | None, channels: Tensor,
                  n_points: int | None = None, feedback: Feedback | None = None,
                  defer: list | None = None) -> PointSet:
    """Compute points up to ``n_points`` (default max_points) for ``channels``, in
    place. Same search settings as the original ``greedy_multipoint`` call, which
    must have had the same ``feedback``. ``defer``: as in ``greedy_multipoint``."""
    H = _check_layer(W, H)
    M = _check_feedback(W, H, feedback)
    fb_points = ps.search.get('fb_points', 0)
    if bool(fb_points) != (feedback is not None):
        raise ValueError('extend_points: pass the feedback the points were made with')
    joint = feedback is not None and ps.search.get('fb_mode') == 'joint'
    Wd = W.detach().float().cpu()
    target = ps.max_points if n_points is None else min(int(n_points), ps.max_points)
    channels = torch.as_tensor(channels, dtype=torch.int64).reshape(-1)
    channels = channels[ps.computed[channels] < target]
    if channels.numel() == 0:
        return ps
    C = ps.channels
    gidx_all = None
    if H.groups > 1:
        gidx_all = channels // (C // H.groups)
    R = residual(ps, W, channels)
    ratios, refit = ps.search['ratios'], ps.search['refit']
    for k in range(int(ps.computed[channels].min()), target):
        sel = ps.computed[channels] == k
        if not bool(sel.any()):
            continue
        ch = channels[sel]
        g = None if gidx_all is None else gidx_all[sel]
        Rs = R[sel]
        p2 = _pow2_room(ps, ch, k)
        scale, q, Rn, e = greedy_step(Rs, H, ps.bits, ratios, refit,
                                      ps.cerr[ch, k], gidx=g,
                                      n_refine=ps.search.get('n_refine', 0),
                                      lloyd=ps.search.get('lloyd', 0),
                                      measure=None if feedback is None else M, pow2=p2,
                                      grid=ps.grid)
        if feedback is not None and not joint and k < fb_points:
            scale, q, Rn, e = feedback_step(Rs, scale, q, Rn, e, feedback, ps.bits, g,
                                            refit=True if p2 is None else p2[1] < 1,
                                            grid=ps.grid)
        R[sel] = Rn
        ps.scales[ch, k] = scale
        ps.codes[ch, k] = q.to(torch.int8)
        ps.err[ch, k + 1] = e
        ps.cerr[ch, k + 1] = e
        if joint and k < fb_points:
            _joint_level(ps, Wd[ch], ch, k + 1, feedback, g, defer)
        ps.werr[ch, k + 1] = torch.linalg.vecdot(Rn, Rn)
        ps.computed[ch] = k + 1
    return ps


def quantize_points(W: Tensor, H: HForm | None, bits: int, npoints: Tensor,
                    max_points: int = 4, feedback: Feedback | None = None,
                    fb_points: int = 4, fb_mode: str = 'joint',
                    **search) -> tuple[QuantizedWeight, PointSet]:
    """Channel j of W (C, d) quantized with exactly ``npoints[j]`` points.

    The points are searched as in ``greedy_multipoint`` (same ``feedback``,
    ``fb_points``, ``fb_mode`` and ``search`` keywords), but only as many as each
    channel gets: for a point count decided elsewhere, e.g. sequential statistics,
    where the allocation over all layers was made once on the floating-point
    statistics and each layer is then quantized again on its own.
    Returns (the quantized weight, its PointSet).
    """
    npoints = torch.as_tensor(npoints, dtype=torch.int64).reshape(-1).cpu()
    if npoints.numel() != W.shape[0] or bool((npoints < 1).any()) \
            or int(npoints.max()) > max_points:
        raise ValueError(f'npoints must hold 1..max_points={max_points} for each of the '
                         f'{W.shape[0]} channels')
    ps = greedy_multipoint(W, H, bits, max_points, n_points=1, feedback=feedback,
                           fb_points=fb_points, fb_mode=fb_mode, **search)
    for k in range(1, int(npoints.max())):
        extend_points(ps, W, H, torch.nonzero(npoints > k).reshape(-1), k + 1,
                      feedback=feedback)
    return select_points(ps, npoints), ps
