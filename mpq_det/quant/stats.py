"""Calibration statistic H = X^T X / N of a layer's inputs, accumulated batch by batch.

For a layer with weight W (C_out, d) and input rows X (N, d) (for a Conv2d, the
unfolded input patches, ordered like ``weight.reshape(C_out, -1)``), the output
error of channel j with weight error d_j is ||X d_j||^2 / N = d_j^T H d_j.
``InputStats`` accumulates what the chosen form of H needs (``hforms``: exact,
diag, block, lowrank, identity) and, for error feedback and sequential
statistics, the exact or block-diagonal H and the cross term with reference inputs.

Accumulation memory: ``diag`` and ``block`` accumulate only what they keep; ``exact``
accumulates the full (G, d, d) matrix. ``lowrank`` accumulates the full matrix when
d <= ``dense_max_d`` (4096; the factorisation is taken in ``finalize`` by a seeded
randomized subspace iteration, no d^3 eigendecomposition); for larger d (e.g. the
d = 18432 P6 conv of RetinaNet, whose H alone would take 1.4 GB) it streams a
seeded Gaussian sketch Y = H Omega (G, d, 2k+16) plus the exact diagonal, and
finalizes with a stable single-pass Nystrom approximation.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from .feedback import DEFAULT_BLOCK, Feedback
from .grid import check_choice, check_positive_int, check_weight
from .hforms import (DEFAULT_FORM, DEFAULT_FORM_OPTS, FORMS, BlockH, DiagH, ExactH, HForm,
                     IdentityH, LowRankH, _default_generator, _nystrom, hform_from_dense)

# ridge added to H at finalize, relative to its mean diagonal (see InputStats.finalize);
# 0 keeps H = X^T X / N exactly, the model pass asks for a small one
DEFAULT_DAMP = 0.0

def _pair(v, name):
    if isinstance(v, numbers.Integral):
        return int(v), int(v)
    if isinstance(v, (tuple, list)) and len(v) == 2:
        return int(v[0]), int(v[1])
    raise ValueError(f'{name} must be an int or a pair of ints, got {v!r}')


def _subsample(total: int, max_rows: int, generator) -> Tensor | None:
    max_rows = check_positive_int(max_rows, 'max_rows')
    if total <= max_rows:
        return None
    idx = torch.randperm(total, generator=_default_generator(generator))[:max_rows]
    return idx.sort().values


def _positions(total: int, max_rows: int, generator, index: Tensor | None
               ) -> Tensor | None:
    """``index`` checked against ``total`` positions, or (None given) the seeded
    subsample of at most ``max_rows`` (None: take them all)."""
    if index is None:
        return _subsample(total, max_rows, generator)
    if int(index.max()) >= total:
        raise ValueError(f'index reaches {int(index.max())} but the input has {total} '
                         f'positions')
    return index


def conv_patches(x: Tensor, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, max_rows: int = 4096, generator=None,
                 padding_mode: str = 'zeros', index: Tensor | None = None,
                 return_index: bool = False):
    """Input patches of a Conv2d: (B, C_in, H, W) -> (G, N, d).

    d = C_in / groups * kh * kw, ordered like ``weight.reshape(C_out, -1)`` within a
    group. Output positions are subsampled to at most ``max_rows`` rows with
    ``generator`` (seed 0 when None), so the result is deterministic. Only the
    chosen positions are gathered: memory is N * C_in * kh * kw.

    ``index``: the flat output positions to gather instead (e.g. the same positions
    of another model's input); ``return_index``: also return the positions used.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f'x must be a (B, C_in, H, W) tensor, got {got}')
    groups = check_positive_int(groups, 'groups')
    B, C, Hh, Ww = x.shape
    if C % groups:
        raise ValueError(f'groups={groups} must divide the {C} input channels')
    kh, kw = _pair(kernel_size, 'kernel_size')
    sh, sw = _pair(stride, 'stride')
    dh, dw = _pair(dilation, 'dilation')
    if isinstance(padding, str):
        check_choice(padding, 'padding', ('valid', 'same'))
        if padding == 'valid':
            pads = (0, 0, 0, 0)
        else:
            th, tw = dh * (kh - 1), dw * (kw - 1)
            pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    else:
        ph, pw = _pair(padding, 'padding')
        pads = (pw, pw, ph, ph)
    if any(pads):
        mode = 'constant' if padding_mode == 'zeros' else padding_mode
        x = F.pad(x, pads, mode=mode)
    Hp, Wp = x.shape[-2:]
    Ho = (Hp - dh * (kh - 1) - 1) // sh + 1
    Wo = (Wp - dw * (kw - 1) - 1) // sw + 1
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f'input of spatial size {(Hh, Ww)} is too small for the kernel')
    total = B * Ho * Wo
    idx = _positions(total, max_rows, generator, index)
    if idx is None:
        idx = torch.arange(total)
    idx = idx.to(x.device)
    b = idx // (Ho * Wo)
    oy = (idx // Wo) % Ho
    ox = idx % Wo
    cols = []
    for ki in range(kh):
        yy = oy * sh + ki * dh
        for kj in range(kw):
            xx = ox * sw + kj * dw
            cols.append(x[b, :, yy, xx])            # (N, C)
    rows = torch.stack(cols, dim=-1)              # (N, C, kh*kw)
    N = rows.shape[0]
    rows = rows.reshape(N, groups, (C // groups) * kh * kw)
    rows = rows.permute(1, 0, 2).contiguous()
    return (rows, idx) if return_index else rows


def linear_rows(x: Tensor, max_rows: int = 4096, generator=None,
                index: Tensor | None = None, return_index: bool = False):
    """Input rows of a Linear: (..., d) -> (1, N, d), subsampled to <= max_rows.
    ``index`` / ``return_index``: as in ``conv_patches``."""
    if not isinstance(x, Tensor) or x.dim() < 1 or x.numel() == 0:
        raise ValueError('x must be a non-empty (..., d) tensor')
    x = x.reshape(-1, x.shape[-1])
    idx = _positions(x.shape[0], max_rows, generator, index)
    if idx is not None:
        x = x[idx.to(x.device)]
    else:
        idx = torch.arange(x.shape[0])
    rows = x[None].contiguous()
    return (rows, idx) if return_index else rows


# --------------------------------------------------------------------------- forms
# Error feedback keeps the exact H up to this d (every 3x3 conv with <= 256 input
# channels); above it, a block-diagonal H along input channels (FEEDBACK_BLOCK
# columns at most per block: whole input channels with all their taps). 2304, not
# 4608: on RetinaNet-R50 the three d = 4608 convs (layer4's 3x3) took a third of
# the pass (Cholesky d^3/3, quadratic forms C d^2); the committed detectors have
# d <= 1152 and are not affected.
FEEDBACK_MAX_D = 2304
FEEDBACK_BLOCK = 576


def feedback_block_size(d: int, taps: int = 1, max_block: int | None = None) -> int:
    """Block size for a block-diagonal H of a layer with d = channels * taps columns:
    taps times the largest divisor of the channels that keeps it <= max_block
    (default FEEDBACK_BLOCK)."""
    taps = check_positive_int(taps, 'taps')
    max_block = FEEDBACK_BLOCK if max_block is None else max_block
    if d % taps:
        raise ValueError(f'taps={taps} must divide d={d}')
    ch = d // taps
    best = 1
    for c in range(1, ch + 1):
        if ch % c == 0 and c * taps <= max_block:
            best = c
    return best * taps


def _ridge(H: Tensor, damp: float) -> Tensor:
    """damp * mean(diag H) of each group of a dense (G, d, d) H, as (G, 1, 1)."""
    return damp * torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)[:, None, None]


class InputStats:
    """Running accumulator of H = X^T X / N for one layer (per conv group).

    ``update(rows)`` takes (G, N, d) rows (see ``conv_patches`` / ``linear_rows``).
    Memory: G*d for 'diag', G*d*block_size for 'block', G*d*d for 'exact' and
    'lowrank' (factorised at ``finalize``), nothing for 'identity'.

    ``feedback=True`` also keeps what error feedback needs (``finalize_feedback``):
    the exact H when d <= FEEDBACK_MAX_D (shared with the 'exact' / dense 'lowrank'
    accumulator), else a block-diagonal H whose blocks are whole input channels
    (``taps`` = kernel positions per input channel, kh * kw for a conv).

    ``cross=True`` (sequential statistics): ``update(rows, ref_rows)`` takes each
    row twice, as the layer sees it in the model being quantized (``rows``: H is
    theirs) and as the floating-point model's layer sees it (``ref_rows``, the same
    positions). It keeps the cross term A = X^T X_ref / N (d <= FEEDBACK_MAX_D), from
    which ``target_weight`` gives the weight to quantize.
    """

    def __init__(self, d: int, groups: int = 1, form: str = DEFAULT_FORM,
                 generator=None, feedback: bool = False, taps: int = 1,
                 cross: bool = False, **form_opts):
        self.d = check_positive_int(d, 'd')
        self.groups = check_positive_int(groups, 'groups')
        self.form = check_choice(form, 'form', FORMS)
        self.opts = {**DEFAULT_FORM_OPTS.get(form, {}), **form_opts}
        self.generator = generator
        self.n = 0
        self.row_sum = torch.zeros(self.groups, self.d, dtype=torch.float64)
        self.feedback = bool(feedback)
        self.cross = bool(cross)
        self._fb = None
        G = self.groups
        # feedback and the cross term both need the dense H where d is moderate
        dense = (self.feedback or self.cross) and d <= FEEDBACK_MAX_D
        if dense and form == 'lowrank':
            # keep the dense accumulator that feedback needs anyway
            self.opts['dense_max_d'] = max(int(self.opts.get('dense_max_d', 0)), d)
        if form == 'diag':
            self.acc = torch.zeros(G, d, dtype=torch.float64)
        elif form == 'block':
            b = min(check_positive_int(self.opts['block_size'], 'block_size'), d)
            self.block_size = b
            self.nb = math.ceil(d / b)
            self.acc = torch.zeros(G, self.nb, b, b, dtype=torch.float64)
        elif form == 'identity':
            self.acc = None
        elif form == 'lowrank' and d > int(self.opts.get('dense_max_d', 4096)):
            k = min(int(self.opts['rank']), d)
            p = min(d, 2 * k + 16)
            gen = torch.Generator().manual_seed(int(self.opts.get('sketch_seed', 0)))
            self.omega = torch.randn(G, d, p, generator=gen)
            self.acc = torch.zeros(G, d, p, dtype=torch.float32)
            self.diag = torch.zeros(G, d, dtype=torch.float64)
            self.sketch = True
        else:
            self.acc = torch.zeros(G, d, d, dtype=torch.float32)
        # feedback's own accumulator, where the form's is not the dense H
        self.fb_acc = None
        self.fb_block = None
        if (self.feedback or dense) and not self._acc_is_dense():
            if d <= FEEDBACK_MAX_D:
                self.fb_acc = torch.zeros(G, d, d, dtype=torch.float32)
            else:
                b = feedback_block_size(d, taps)
                self.fb_block = b
                self.fb_acc = torch.zeros(G, math.ceil(d / b), b, b, dtype=torch.float32)

        self.cross_acc = None
        self.ref_row_sum = None
        if self.cross:
            self.ref_row_sum = torch.zeros(G, d, dtype=torch.float64)
            if d <= FEEDBACK_MAX_D:
                self.cross_acc = torch.zeros(G, d, d, dtype=torch.float32)

    @property
    def damp(self) -> float:
        """Ridge on H relative to its mean diagonal (see ``finalize``)."""
        return float(self.opts.get('damp', DEFAULT_DAMP))

    def _feedback_acc(self) -> Tensor:
        """The accumulator of the H that feedback and the cross term use: the form's
        own when it is dense, else the dense or block-diagonal one kept for them."""
        return self.acc if self.fb_acc is None else self.fb_acc

    def _acc_is_dense(self) -> bool:
        return self.acc is not None and self.acc.dim() == 3 and \
            self.acc.shape[-1] == self.d == self.acc.shape[-2]

    def _check_rows(self, rows: Tensor, name: str) -> Tensor:
        if rows.dim() == 2:
            rows = rows[None]
        if rows.dim() != 3 or rows.shape[0] != self.groups or rows.shape[2] != self.d:
            raise ValueError(f'{name} must be ({self.groups}, N, {self.d}), '
                             f'got {tuple(rows.shape)}')
        check_weight(rows, name, ndim=3)
        return rows.detach().float().cpu()

    def update(self, rows: Tensor, ref_rows: Tensor | None = None) -> None:
        rows = self._check_rows(rows, 'rows')
        if self.cross != (ref_rows is not None):
            raise ValueError('InputStats.update: pass ref_rows exactly when cross=True')
        if self.cross:
            ref_rows = self._check_rows(ref_rows, 'ref_rows')
            if ref_rows.shape != rows.shape:
                raise ValueError(f'ref_rows {tuple(ref_rows.shape)} must have the shape of '
                                 f'rows {tuple(rows.shape)} (the same positions)')
            self.ref_row_sum += ref_rows.sum(1, dtype=torch.float64)
            if self.cross_acc is not None:
                self.cross_acc += torch.bmm(rows.transpose(1, 2), ref_rows)
        self.n += rows.shape[1]
        self.row_sum += rows.sum(1, dtype=torch.float64)
        if self.form == 'diag':
            self.acc += (rows.double() ** 2).sum(1)
        elif self.form == 'block':
            b, nb = self.block_size, self.nb
            X = F.pad(rows, (0, nb * b - self.d)).reshape(self.groups, -1, nb, b)
            X = X.permute(0, 2, 1, 3)                                 # G nb N b
            self.acc += torch.matmul(X.transpose(-1, -2), X).double()
        elif getattr(self, 'sketch', False):
            self.acc += torch.bmm(rows.transpose(1, 2), torch.bmm(rows, self.omega))
            self.diag += (rows.double() ** 2).sum(1)
        elif self.form != 'identity':
            self.acc += torch.bmm(rows.transpose(1, 2), rows)
        if self.fb_acc is not None and self.fb_block is None:
            self.fb_acc += torch.bmm(rows.transpose(1, 2), rows)
        elif self.fb_acc is not None:
            b, nb = self.fb_block, self.fb_acc.shape[1]
            X = F.pad(rows, (0, nb * b - self.d)).reshape(self.groups, -1, nb, b)
            X = X.permute(0, 2, 1, 3)                                 # G nb N b
            self.fb_acc += torch.matmul(X.transpose(-1, -2), X)

    def mean(self, ref: bool = False) -> Tensor:
        """(G, d) mean input row (for bias correction: the mean output shift of a
        weight error D is D @ mean); ``ref``: of the reference rows (cross=True)."""
        if self.n == 0:
            raise ValueError('InputStats.mean: no rows were accumulated')
        if ref and not self.cross:
            raise ValueError('InputStats.mean(ref=True) needs cross=True')
        return ((self.ref_row_sum if ref else self.row_sum) / self.n).float()

    def target_weight(self, W: Tensor) -> Tensor:
        """The float weight to quantize on these inputs: W* (C, d) minimising
        ||W X_ref^T - W* X^T||^2 + lam ||W* - W||^2 row by row, i.e. per group
        W*^T = (H + lam I)^-1 (A + lam I) W^T with A = X^T X_ref / N and lam the
        ridge of ``finalize`` (damp * mean diag H). Quantizing W* in the metric H
        then minimises the error against the reference outputs W X_ref^T: the
        cross term of sequential calibration. With X = X_ref it returns W.

        Needs ``cross=True``. Where d > FEEDBACK_MAX_D no cross term is kept
        (its d x d matrix would be too large): W itself is returned.
        """
        if not self.cross:
            raise ValueError('InputStats.target_weight needs cross=True')
        if self.n == 0:
            raise ValueError('InputStats.target_weight: no rows were accumulated')
        check_weight(W, 'W')
        if W.shape[1] != self.d or W.shape[0] % self.groups:
            raise ValueError(f'W {tuple(W.shape)} does not fit d={self.d}, '
                             f'groups={self.groups}')
        if self.cross_acc is None:
            return W.detach().float().clone()
        G, d = self.groups, self.d
        H = (self._feedback_acc() / self.n).double()
        A = (self.cross_acc / self.n).double()
        lam = _ridge(H, self.damp)
        eye = torch.eye(d, dtype=H.dtype)
        Wg = W.detach().double().cpu().reshape(G, -1, d)            # (G, Cg, d)
        rhs = torch.bmm(A + lam * eye, Wg.transpose(1, 2))           # (G, d, Cg)
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        out = torch.cholesky_solve(rhs, L).transpose(1, 2)
        # a group whose H is not positive definite (no ridge, dead inputs) keeps W
        ok = (info == 0)[:, None, None] & torch.isfinite(out).all((1, 2), keepdim=True)
        return torch.where(ok, out, Wg).reshape(W.shape).float()

    def finalize_feedback(self, block: int | None = None, order: bool = True):
        """The ``Feedback`` of this layer: exact (or block-diagonal) H with the same
        ridge as ``finalize``; ``order``: see ``Feedback``. Needs ``feedback=True``."""
        if not self.feedback:
            raise ValueError('InputStats.finalize_feedback needs feedback=True')
        if self.n == 0:
            raise ValueError('InputStats.finalize_feedback: no rows were accumulated')
        if self._fb is None or self._fb.order != order:
            damp = self.damp
            acc = (self._feedback_acc() / self.n).float()
            if self.fb_block is None:
                metric = ExactH(acc + _ridge(acc, damp) * torch.eye(self.d))
            else:
                # the padding columns of the last block get the ridge only
                diag = torch.diagonal(acc, dim1=-2, dim2=-1)
                mean = diag.sum((-2, -1)) / self.d
                metric = BlockH(acc + damp * mean[:, None, None, None] *
                                torch.eye(self.fb_block), self.d)
            self._fb = Feedback(metric, DEFAULT_BLOCK if block is None else block,
                                order=order)
        return self._fb

    def finalize(self) -> HForm:
        if self.form == 'identity':
            return IdentityH(self.d, self.groups)
        if self.n == 0:
            raise ValueError('InputStats.finalize: no rows were accumulated (update '
                             'was never called)')
        acc = (self.acc / self.n).float()
        # With fewer rows than d (e.g. a 1x1 feature map), H is singular and the
        # search could move error into unseen directions for free. A small ridge,
        # damp * mean(diag H), keeps those directions priced (as GPTQ's damping).
        damp = self.damp
        if self.form == 'diag':
            return DiagH(acc)
        if self.form == 'block':
            eye = torch.eye(self.block_size)
            mean = torch.diagonal(acc, dim1=-2, dim2=-1).mean((-2, -1), keepdim=True)[..., None]
            return BlockH(acc + damp * mean * eye, self.d)
        if getattr(self, 'sketch', False):
            k = min(int(self.opts['rank']), self.d)
            e, U = _nystrom(acc, self.omega, k)
            h = (self.diag / self.n).float()
            r = (h - (U * U * e[:, None, :]).sum(-1)).clamp_min(0)
            return LowRankH(U, e, r + damp * h.mean(-1, keepdim=True))
        acc = acc + _ridge(acc, damp) * torch.eye(self.d)
        opts = {k: v for k, v in self.opts.items() if k != 'damp'}
        return hform_from_dense(acc, self.form, generator=self.generator, **opts)


def random_correlated_rows(n: int, d: int, groups: int = 1, rank: int = 8,
                           generator=None, relu: bool = True) -> Tensor:
    """Synthetic inputs (G, n, d) with a few strong shared directions, a non-zero
    mean (as after a ReLU) and heterogeneous per-feature scales."""
    gen = _default_generator(generator)
    rank = min(rank, d)
    Z = torch.randn(groups, n, rank, generator=gen)
    M = torch.randn(groups, rank, d, generator=gen) * \
        (torch.rand(groups, rank, 1, generator=gen) * 2 + 0.2)
    X = torch.bmm(Z, M) + 0.5 * torch.randn(groups, n, d, generator=gen)
    X = X * torch.exp(0.5 * torch.randn(groups, 1, d, generator=gen))
    return X.clamp_min(0) if relu else X


def random_hform(d: int, groups: int = 1, form: str = DEFAULT_FORM,
                 generator=None, n_rows: int | None = None, **opts) -> HForm:
    """A form built from synthetic correlated inputs. For the large layers of a
    timing run, 'lowrank'/'diag'/'block' are generated directly in their compact
    shape (no d x d matrix is formed)."""
    check_choice(form, 'form', FORMS)
    gen = _default_generator(generator)
    o = {**DEFAULT_FORM_OPTS.get(form, {}), **opts}
    if form == 'identity':
        return IdentityH(d, groups)
    if form == 'diag':
        return DiagH(torch.rand(groups, d, generator=gen) + 0.1)
    if form == 'lowrank' and n_rows is None and d > 256:
        k = min(o['rank'], d)
        U, _ = torch.linalg.qr(torch.randn(groups, d, k, generator=gen))
        s = torch.sort(torch.rand(groups, k, generator=gen) * d, descending=True).values
        r = torch.rand(groups, d, generator=gen) + 0.1
        return LowRankH(U, s, r)
    if form == 'block' and n_rows is None and d > 256:
        b = min(o['block_size'], d)
        nb = math.ceil(d / b)
        A = torch.randn(groups, nb, b, b, generator=gen)
        blocks = A @ A.transpose(-1, -2) / b + 0.1 * torch.eye(b)
        return BlockH(blocks, d)
    n = n_rows or max(2 * d, 64)
    st = InputStats(d, groups, form, generator=gen, **opts)
    st.update(random_correlated_rows(n, d, groups, generator=gen))
    return st.finalize()
