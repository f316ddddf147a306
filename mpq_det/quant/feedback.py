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
and d small vector steps in Python.
"""
from __future__ import annotations

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
    return L.flip(-1, -2).float().contiguous()


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
        see ``feedback_coefficients``."""
        if self._A is None:
            m = self.metric
            H = m.H[:, None] if isinstance(m, ExactH) else m.blocks
            if self.perm is not None:
                H = H[..., self.perm, :][..., :, self.perm]
            self._A = feedback_coefficients(H)
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
        lim = code_range(bits, grid)  # a bad value fails here, before any work
        C, d = R.shape
        if d != self.d:
            raise ValueError(f'R has {d} columns but H is for d={self.d}')
        if self.perm is not None:
            q = self._round(R[:, self.perm], scale, lim, gidx)
            return q[..., self.inv]
        return self._round(R, scale, lim, gidx)

    def _round(self, R, scale, lim, gidx):
        C, d = R.shape
        single = scale.dim() == 1
        S = scale.float().reshape(C, -1)                                # (C, k)
        k = S.shape[1]
        A = self.coefficients()
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
            q = _round_batched(X, Sb, A.reshape(G * nb, b, b), lim, self.block)
            q = q.reshape(g, nb, c, b, k).permute(0, 2, 4, 1, 3).reshape(C, k, nb * b)
        elif C * nb * b * b <= _GATHER_MAX:
            # every row with its own group's coefficients (depthwise convs: d small)
            X = Rp.reshape(C * nb, 1, b)
            Sb = S[:, None].expand(C, nb, k).reshape(C * nb, 1, k)
            q = _round_batched(X, Sb, A[gidx].reshape(C * nb, b, b), lim, self.block)
            q = q.reshape(C, nb, b, k).permute(0, 3, 1, 2).reshape(C, k, nb * b)
        else:
            q = torch.empty(C, k, nb * b)
            for gg in gidx.unique().tolist():
                m = gidx == gg
                n = int(m.sum())
                X = Rp[m].reshape(n, nb, b).permute(1, 0, 2)
                Sb = S[m][None].expand(nb, n, k)
                q[m] = _round_batched(X, Sb, A[gg], lim, self.block) \
                    .permute(1, 3, 0, 2).reshape(n, k, nb * b)
        q = q[..., :d]
        return q[:, 0] if single else q


def _round_batched(X: Tensor, scale: Tensor, AT: Tensor, lim: tuple[int, int],
                   block: int) -> Tensor:
    """Feedback rounding of X (B, n, b) on k points with steps ``scale`` (B, n, k) and
    coefficients AT (B, b, b) (``feedback_coefficients``), codes clamped to ``lim`` =
    (lo, hi). Returns codes (B, n, b, k)."""
    B, n, b = X.shape
    k = scale.shape[-1]
    lo, hi = lim
    ok = scale != 0
    a = torch.where(ok, scale, torch.zeros_like(scale))                   # (B, n, k)
    inv = torch.where(ok, 1.0 / torch.where(ok, scale, torch.ones_like(scale)),
                      torch.zeros_like(scale))
    codes = torch.empty(B, n, b, k)
    E = torch.empty_like(X)                     # e_j = x_j - sum_i a_i q_ij
    for s in range(0, b, block):
        t = min(s + block, b)
        # targets of this block: the block's own values plus all earlier errors
        T = X[:, :, s:t].clone()
        if s:
            T.baddbmm_(E[:, :, :s], AT[:, :s, s:t])
        for i in range(s, t):
            r = T[:, :, i - s]                                            # (B, n)
            if k == 1:
                q = (r * inv[..., 0]).round_().clamp_(lo, hi)
                codes[:, :, i, 0] = q
                e = X[:, :, i] - a[..., 0] * q
            else:
                rem = r.clone()
                for p in range(k):
                    q = (rem * inv[..., p]).round_().clamp_(lo, hi)
                    codes[:, :, i, p] = q
                    rem -= a[..., p] * q
                e = X[:, :, i] - (r - rem)
            E[:, :, i] = e
            if i + 1 < t:
                # later columns of the block: t_k += A_ki e_i
                T[:, :, i + 1 - s:].baddbmm_(e[..., None], AT[:, i:i + 1, i + 1:t])
    return codes


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
