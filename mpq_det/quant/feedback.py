"""Error feedback inside a layer (OBQ / GPTQ): round input columns in order and
push each column's rounding error onto the columns not yet rounded.

For one output channel with weight (or residual) r (d,), grid step a and the
calibration metric H (d, d), the output error of codes q is e^T H e with
e = r - a q. Write H = V^T V with V lower triangular. Then

    e^T H e = sum_i V_ii^2 (e_i + sum_{j<i} (V_ij / V_ii) e_j)^2 ,

and the i-th term only involves columns 0..i. Rounding the columns in order, each
one to the grid point nearest to its target t_i = r_i + sum_{j<i} (V_ij / V_ii) e_j,
makes the i-th term as small as the grid allows given the columns already rounded.
This is GPTQ's update (its Cholesky factor of H^-1 is V^-T) written with one
Cholesky of H and no inverse: V = J chol(J H J)^T J with J the reversal.

The columns are processed in blocks of ``block`` columns (GPTQ's lazy batch): the
contributions of earlier blocks to a block's targets are one matmul; only the
columns inside a block are updated one by one. Everything is vectorized over the
output channels and over the independent diagonal blocks of a block-diagonal H
(``BlockH``) and the groups of a grouped conv.

Cost for a layer of C channels, d columns, one group and exact H: one Cholesky,
d^3 / 3 flops (once per layer, cached), C * d^2 flops of updates per rounding,
and d small vector steps (a TorchScript loop: ``_column_steps``). The steps cost
about the same for few rows as for many, so ``round_many`` steps several layers'
rows through together.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .grid import check_bits, code_range
from .hforms import BlockH, ExactH, HForm

DEFAULT_BLOCK = 128
_GATHER_MAX = 2 ** 25   # floats gathered at most for per-row coefficient matrices


# above this size the Cholesky runs in float32 (half the time); the 1% ridge of the
# model pass keeps H well enough conditioned, and the coefficients only steer rounding
DOUBLE_MAX_D = 1152


def feedback_coefficients(H: Tensor) -> Tensor:
    """Coefficients of error feedback for a batch of PSD matrices H (..., n, n), as
    AT (..., n, n) with AT[j, i] = V_ij / V_ii for j < i (entries on and below the
    diagonal are not used), where H = V^T V and V is lower triangular.

    With L = chol(J H J) (J the reversal), V = J L^T J, so AT = J (L / diag(L)) J:
    one Cholesky, no inverse. A singular H gets a growing ridge (1e-6 .. 1 of its
    mean diagonal; identity if the matrix is zero) until the Cholesky succeeds: a
    zero-variance input then passes no error on, as its zero row in H says.
    """
    n = H.shape[-1]
    H = H.double() if n <= DOUBLE_MAX_D else H.float()
    Hf = H.flip(-1, -2)                         # J H J
    L, info = torch.linalg.cholesky_ex(Hf)
    ridge = 1e-6
    while bool((info > 0).any()):
        if ridge > 1:
            raise ValueError('feedback_coefficients: H is not positive semi-definite')
        mean = H.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
        mean = torch.where(mean > 0, mean, torch.ones_like(mean))
        L, info = torch.linalg.cholesky_ex(
            Hf + ridge * mean * torch.eye(n, dtype=H.dtype))
        ridge *= 10
    del Hf
    L = L / L.diagonal(dim1=-2, dim2=-1)[..., None, :]
    return L.flip(-1, -2).float()


class Feedback:
    """The metric of one layer for error feedback: an ``ExactH`` or a ``BlockH``,
    with its coefficients (computed once, on first use).

    ``metric`` also serves to score errors (``quad``): it is the most exact H the
    calibration kept for this layer. ``order``: round the columns in order of
    decreasing H_ii (GPTQ's act-order: the inputs with the most energy first, while
    many columns are left to absorb their error); exact H of ungrouped layers only.
    """

    def __init__(self, metric: HForm, block: int = DEFAULT_BLOCK, order: bool = False):
        if not isinstance(metric, (ExactH, BlockH)):
            raise ValueError('error feedback needs an exact or block-diagonal H, got '
                             f'{type(metric).__name__}')
        self.metric = metric
        self.block = int(block)
        self._A = None
        self.order = bool(order)
        self.perm = None
        if order and isinstance(metric, ExactH) and metric.groups == 1:
            self.perm = torch.argsort(metric.H[0].diagonal(), descending=True)
            self.inv = torch.argsort(self.perm)

    @property
    def d(self) -> int:
        return self.metric.d

    @property
    def groups(self) -> int:
        return self.metric.groups

    def coefficients(self) -> Tensor:
        """(G, nb, b, b): nb diagonal blocks of size b per group (nb = 1 for exact);
        see ``feedback_coefficients``. Kept transposed (``At[..., i, j] = AT[..., j,
        i]``, contiguous), the layout the rounding reads; this is a view of it."""
        return self._columns().transpose(-1, -2)

    def _columns(self) -> Tensor:
        if self._A is None:
            m = self.metric
            H = m.H[:, None] if isinstance(m, ExactH) else m.blocks
            if self.perm is not None:
                H = H[..., self.perm, :][..., :, self.perm]
            self._A = feedback_coefficients(H).transpose(-1, -2).contiguous()
        return self._A

    def round(self, R: Tensor, scale: Tensor, bits: int,
              gidx: Tensor | None = None, grid: str = 'symmetric') -> Tensor:
        """Codes for rows R (C, d), each column rounded with the errors of the earlier
        ones fed forward.

        ``scale`` (C,): one grid step per row (signed on the full grid); returns
        codes (C, d) in the ``grid``'s range (``grid.code_range``).
        ``scale`` (C, k): k points per row (multipoint, steps a_1 > a_2 > ...); each
        column's target t goes to a_1 q_1 + ... + a_k q_k with q_i = round(r_i / a_i)
        on the remainder r_i (r_1 = t); returns codes (C, k, d).
        Steps of 0 give zero codes. ``gidx`` as in ``HForm`` (rows from any groups);
        otherwise row j is in group j // (C // G).
        """
        return round_many([(self, R, scale, gidx)], bits, grid)[0]

    def _pieces(self, R: Tensor, scale: Tensor, gidx: Tensor | None):
        """The rounding of rows R (C, d) as independent batches (X (B, n, b), steps
        (B, n, k), At (B, b, b)) for ``_round_batched``, and the function that puts
        their codes (B, n, b, k) back together as codes (C, k, d) of R's columns."""
        C, d = R.shape
        if d != self.d:
            raise ValueError(f'R has {d} columns but H is for d={self.d}')
        if self.perm is not None:
            R = R[:, self.perm]
        S = scale.float().reshape(C, -1)                                # (C, k)
        k = S.shape[1]
        A = self._columns()                                             # At
        G, nb, b, _ = A.shape
        pad = nb * b - d
        Rp = torch.nn.functional.pad(R.float(), (0, pad)) if pad else R.float()
        if gidx is None or G == 1:
            if gidx is None and C % G:
                raise ValueError(f'{C} rows are not divisible by groups={G}')
            g = 1 if gidx is not None else G
            c = C // g
            X = Rp.reshape(g, c, nb, b).permute(0, 2, 1, 3).reshape(g * nb, c, b)
            Sb = S.reshape(g, 1, c, k).expand(g, nb, c, k).reshape(g * nb, c, k)
            pieces = [(X, Sb, A.reshape(G * nb, b, b))]

            def join(qs):
                return qs[0].reshape(g, nb, c, b, k).permute(0, 2, 4, 1, 3) \
                    .reshape(C, k, nb * b)
        elif C * nb * b * b <= _GATHER_MAX:
            # every row with its own group's coefficients (depthwise convs: d small)
            X = Rp.reshape(C * nb, 1, b)
            Sb = S[:, None].expand(C, nb, k).reshape(C * nb, 1, k)
            pieces = [(X, Sb, A[gidx].reshape(C * nb, b, b))]

            def join(qs):
                return qs[0].reshape(C, nb, b, k).permute(0, 3, 1, 2).reshape(C, k, nb * b)
        else:
            masks = [gidx == gg for gg in gidx.unique().tolist()]
            pieces = []
            for gg, m in zip(gidx.unique().tolist(), masks):
                n = int(m.sum())
                pieces.append((Rp[m].reshape(n, nb, b).permute(1, 0, 2),
                               S[m][None].expand(nb, n, k), A[gg]))

            def join(qs):
                q = torch.empty(C, k, nb * b)
                for m, qg in zip(masks, qs):
                    q[m] = qg.permute(1, 3, 0, 2).reshape(int(m.sum()), k, nb * b)
                return q

        def codes(qs):
            q = join(qs)[..., :d]
            if self.perm is not None:
                q = q[..., self.inv]
            return q[:, 0] if scale.dim() == 1 else q
        return pieces, codes


# floats of the stacked inputs and coefficients of one batched rounding call at most
_BATCH_MAX = 2 ** 26


def round_many(jobs: list[tuple[Feedback, Tensor, Tensor, Tensor | None]], bits: int,
               grid: str = 'symmetric',
               each: Callable[[Callable[[int], Any], list[int]], Any] | None = None
               ) -> list[Tensor]:
    """``Feedback.round`` of several (feedback, R, scale, gidx) jobs, e.g. the layers
    of a model: the codes of each job, the same as one call each.

    The rounding steps through the columns one at a time, and each step is a few
    small ops whose cost hardly depends on the number of rows. So the jobs' batches
    with the same block size, number of points and about the same number of rows
    (within 25%) are stacked (rows zero-padded: a step of 0 gives code 0) and
    stepped through together (up to ``_BATCH_MAX`` floats a call): layers of one
    shape cost about what one of them costs. ``each(fn, keys)``: how to call ``fn``
    on every batch (default: one after the other), e.g. side by side on threads.
    """
    lim = code_range(bits, grid)  # a bad value fails here, before any work
    made = [fb._pieces(R, scale, gidx) for fb, R, scale, gidx in jobs]
    flat = [(j, i, p) for j, (pieces, _) in enumerate(made) for i, p in enumerate(pieces)]
    out: dict[tuple[int, int], Tensor] = {}
    bykey: dict[tuple, list] = {}
    for j, i, (X, S, At) in flat:
        bykey.setdefault((X.shape[2], S.shape[2], jobs[j][0].block), []).append((j, i, X, S, At))
    chunks: list[tuple[int, list, int]] = []      # (size, items, block)
    for (b, k, block), items in bykey.items():
        items.sort(key=lambda t: t[2].shape[1])        # similar row counts together
        chunk: list = []
        size = 0
        for it in items + [None]:
            if it is not None:
                grow = it[2].shape[0] * (it[2].shape[1] * b + b * b)
            # padding costs work in every step: only row counts within 25% together
            if chunk and (it is None or size + grow > _BATCH_MAX
                          or it[2].shape[1] > 1.25 * chunk[0][2].shape[1]):
                chunks.append((size * b, chunk, block))
                chunk, size = [], 0
            if it is not None:
                chunk.append(it)
                size += grow
    chunks.sort(key=lambda c: -c[0])                   # the largest first

    def run(i):
        _round_chunk(chunks[i][1], lim, chunks[i][2], out)
    if each is None:
        for i in range(len(chunks)):
            run(i)
    else:
        each(run, list(range(len(chunks))))
    return [codes([out[(j, i)] for i in range(len(pieces))])
            for j, (pieces, codes) in enumerate(made)]


def _round_chunk(items: list, lim: tuple[int, int], block: int,
                 out: dict[tuple[int, int], Tensor]) -> None:
    """One ``_round_batched`` call for the pieces ``items`` (job, piece, X, S, At),
    their rows padded to the largest count; codes go to ``out[(job, piece)]``."""
    if len(items) == 1:
        j, i, X, S, At = items[0]
        out[(j, i)] = _round_batched(X, S, At, lim, block)
        return
    n = max(it[2].shape[1] for it in items)
    Xs = [torch.nn.functional.pad(it[2], (0, 0, 0, n - it[2].shape[1])) for it in items]
    Ss = [torch.nn.functional.pad(it[3], (0, 0, 0, n - it[3].shape[1])) for it in items]
    q = _round_batched(torch.cat(Xs), torch.cat(Ss), torch.cat([it[4] for it in items]),
                       lim, block)
    s = 0
    for j, i, X, _, _ in items:
        out[(j, i)] = q[s:s + X.shape[0], :X.shape[1]]
        s += X.shape[0]


def _round_batched(X: Tensor, scale: Tensor, At: Tensor, lim: tuple[int, int],
                   block: int) -> Tensor:
    """Feedback rounding of X (B, n, b) on k points with steps ``scale`` (B, n, k) and
    the transposed coefficients At (B, b, b) (``At[:, i, j] = AT[:, j, i]``, AT from
    ``feedback_coefficients``), codes clamped to ``lim`` = (lo, hi). Returns codes
    (B, n, b, k) (a permuted view)."""
    B, n, b = X.shape
    k = scale.shape[-1]
    lo, hi = lim
    ok = scale != 0
    zero = torch.zeros_like(scale)
    # (B, k, n) and columns first (B, b, n): each column's step below reads and writes
    # contiguous rows, and writes its codes and errors in place (out=): the loop runs
    # b * k times, so the number of small ops per column is what it costs
    a = torch.where(ok, scale, zero).transpose(1, 2).contiguous()
    inv = torch.where(ok, 1.0 / torch.where(ok, scale, torch.ones_like(scale)),
                      zero).transpose(1, 2).contiguous()
    Xt = X.transpose(1, 2).contiguous()                                   # (B, b, n)
    codes = torch.empty(B, k, b, n)
    _column_steps(Xt, a, inv, At, codes, float(lo), float(hi), block)
    return codes.permute(0, 3, 2, 1)


def _column_steps_py(Xt: Tensor, a: Tensor, inv: Tensor, At: Tensor, codes: Tensor,
                     lo: float, hi: float, block: int) -> None:
    """The column loop of ``_round_batched``: codes (B, k, b, n) written in place."""
    B, b, n = Xt.shape
    k = a.shape[1]
    E = torch.empty_like(Xt)                    # e_j = x_j - sum_i a_i q_ij
    for s in range(0, b, block):
        t = min(s + block, b)
        # targets of this block: the block's own values plus all earlier errors
        T = Xt[:, s:t].clone()
        if s:
            T.baddbmm_(At[:, s:t, :s], E[:, :s])
        for i in range(s, t):
            r = T[:, i - s]                                               # (B, n)
            e = E[:, i]
            if k == 1:
                q = codes[:, 0, i]
                torch.mul(r, inv[:, 0], out=q).round_().clamp_(lo, hi)
                torch.addcmul(Xt[:, i], a[:, 0], q, value=-1, out=e)
            else:
                rem = r.clone()
                for p in range(k):
                    q = codes[:, p, i]
                    torch.mul(rem, inv[:, p], out=q).round_().clamp_(lo, hi)
                    rem.addcmul_(a[:, p], q, value=-1)
                torch.sub(Xt[:, i], r - rem, out=e)
            if i + 1 < t:
                # later columns of the block: t_j += A_ij e_i
                T[:, i + 1 - s:].baddbmm_(At[:, i + 1:t, i:i + 1], e[:, None])


try:
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        _column_steps = torch.jit.script(_column_steps_py)
except Exception:
    _column_steps = _column_steps_py


def feedback_round_reference(r: Tensor, scale, H: Tensor, bits: int,
                             grid: str = 'symmetric') -> Tensor:
    """Slow reference for one channel: OBQ's loop with the inverse Hessian.

    Round column i of the current weights, then move the error onto the columns
    not yet rounded with the optimal (OBS) update -e_i / Hinv_ii * Hinv_i,F, and
    remove column i from Hinv (Gaussian elimination). ``scale``: a float (codes (d,))
    or a list of k steps (codes (k, d); each value goes to a_1 q_1 + ... + a_k q_k,
    one point after the other), codes in the ``grid``'s range. Only for tests.
    """
    lo, hi = code_range(bits, grid)
    steps = [float(scale)] if isinstance(scale, (int, float)) else [float(a) for a in scale]
    w = r.double().clone()
    d = w.numel()
    Hinv = torch.linalg.inv(H.double())
    q = torch.zeros(len(steps), d, dtype=torch.float64)
    for i in range(d):
        rem = w[i]
        for p, a in enumerate(steps):
            q[p, i] = torch.clamp(torch.round(rem / a), lo, hi) if a != 0 else 0
            rem = rem - a * q[p, i]
        err = rem
        w[i + 1:] -= err / Hinv[i, i] * Hinv[i, i + 1:]
        Hinv = Hinv - torch.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
    return q[0].float() if isinstance(scale, (int, float)) else q.float()
