"""Forms of the calibration statistic H (positive semi-definite, per conv group).

For a layer with weight W (C_out, d) and input rows X (N, d), the output error of
channel j with weight error d_j is d_j^T H d_j with H = X^T X / N. A conv with
``groups`` = G has one H per group; output channel j belongs to group j // (C_out // G).

Forms (all give ``quad``, ``matvec`` and ``bilinear``):

* ``exact``    full (G, d, d) matrix. Memory G*d*d, cost C*d^2 per evaluation.
* ``diag``     diagonal of H only. Memory G*d, cost C*d.
* ``block``    diagonal blocks of ``block_size`` consecutive entries of d (for a conv:
               neighbouring taps and input channels). Memory G*d*b, cost C*d*b.
* ``lowrank``  top-``rank`` eigenpairs of H plus the exact diagonal of the rest:
               H ~ U S U^T + diag(H - U S U^T). Cost C*d*k.
* ``identity`` H = I: the weight-space metric, so the same code gives the
               paper's weight-space variant.

How H is accumulated from calibration inputs is ``stats.InputStats``'s concern.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .grid import check_choice, check_positive_int

FORMS = ('exact', 'diag', 'block', 'lowrank', 'identity')
DEFAULT_FORM = 'lowrank'
DEFAULT_FORM_OPTS = {'block': {'block_size': 64},
                     'lowrank': {'rank': 32, 'dense_max_d': 4096}}


def _default_generator(generator):
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    return generator


_GATHER_MAX = 2 ** 25   # floats gathered at most for per-row group matrices
class HForm:
    """An approximation of H for one layer, aware of conv groups.

    ``quad(D)`` -> (C,) d_j^T H_g(j) d_j; ``matvec(D)`` -> (C, d) H_g(j) d_j.
    ``gidx`` (C,) optionally gives each row's group explicitly (for row subsets);
    otherwise rows are the full layer and channel j is in group j // (C // G).
    """
    kind = 'base'

    def __init__(self, d: int, groups: int = 1):
        self.d = int(d)
        self.groups = int(groups)

    # subclasses implement _quad_g / _matvec_g on (G, Cg, d) and _rows variants
    def _grouped(self, D: Tensor) -> Tensor:
        C, d = D.shape
        if d != self.d:
            raise ValueError(f'D has {d} columns but H is for d={self.d}')
        if C % self.groups:
            raise ValueError(f'{C} output channels are not divisible by '
                             f'groups={self.groups}')
        return D.reshape(self.groups, C // self.groups, d)

    def _check_rows(self, D, gidx):
        if D.dim() != 2 or D.shape[1] != self.d:
            raise ValueError(f'D must be (C, {self.d}), got {tuple(D.shape)}')
        if gidx is not None and gidx.shape != (D.shape[0],):
            raise ValueError('gidx must have one entry per row of D')

    def quad(self, D: Tensor, gidx: Tensor | None = None) -> Tensor:
        self._check_rows(D, gidx)
        if gidx is None or self.groups == 1:
            return self._quad_g(self._grouped(D) if gidx is None
                                else D[None]).reshape(-1)
        return self._quad_rows(D, gidx)

    def quad_many(self, D: Tensor, gidx: Tensor | None = None) -> Tensor:
        """(m, C): ``quad`` of each of m stacked row sets D (m, C, d) (e.g. the codes
        of m candidate scales), in one batched call; ``gidx`` (C,) as in ``quad``."""
        m, C, d = D.shape
        if gidx is None and self.groups > 1:
            G = self.groups
            self._grouped(D[0])                    # checks d and C % G
            Dg = D.reshape(m, G, C // G, d).transpose(0, 1).reshape(G, -1, d)
            return self._quad_g(Dg).reshape(G, m, C // G).transpose(0, 1).reshape(m, C)
        return self.quad(D.reshape(m * C, d), None if gidx is None else
                         gidx.repeat(m)).reshape(m, C)

    def matvec(self, D: Tensor, gidx: Tensor | None = None) -> Tensor:
        self._check_rows(D, gidx)
        if gidx is None or self.groups == 1:
            return self._matvec_g(self._grouped(D) if gidx is None
                                  else D[None]).reshape(D.shape)
        return self._matvec_rows(D, gidx)

    def bilinear(self, A: Tensor, B: Tensor, gidx: Tensor | None = None) -> Tensor:
        """(C,) a_j^T H b_j."""
        return torch.linalg.vecdot(A, self.matvec(B, gidx))

    # generic per-row fallbacks: loop over the groups present (not over channels)
    def _quad_rows(self, D, gidx):
        out = D.new_empty(D.shape[0])
        for g in gidx.unique().tolist():
            m = gidx == g
            out[m] = self._sub(g)._quad_g(D[m][None]).reshape(-1)
        return out

    def _matvec_rows(self, D, gidx):
        out = torch.empty_like(D)
        for g in gidx.unique().tolist():
            m = gidx == g
            out[m] = self._sub(g)._matvec_g(D[m][None])[0]
        return out

    def dense(self) -> Tensor:
        """(G, d, d) dense matrix of this form (for tests and small layers)."""
        eye = torch.eye(self.d)
        return torch.stack([self._sub(g)._matvec_g(eye[None])[0]
                            for g in range(self.groups)])

    def diagonal(self) -> Tensor:
        return torch.stack([self.dense()[g].diagonal() for g in range(self.groups)])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self):
        return []

    def __repr__(self):
        return f'{type(self).__name__}(d={self.d}, groups={self.groups})'


class IdentityH(HForm):
    """H = I: the weight-space metric."""
    kind = 'identity'

    def _quad_g(self, Dg):
        return torch.linalg.vecdot(Dg, Dg)

    def _matvec_g(self, Dg):
        return Dg.clone()

    def _sub(self, g):
        return IdentityH(self.d, 1)

    def quad(self, D, gidx=None):
        self._check_rows(D, gidx)
        return torch.linalg.vecdot(D, D)

    def matvec(self, D, gidx=None):
        self._check_rows(D, gidx)
        return D.clone()


class ExactH(HForm):
    kind = 'exact'

    def __init__(self, H: Tensor):
        if H.dim() == 2:
            H = H[None]
        super().__init__(H.shape[-1], H.shape[0])
        self.H = H.float().contiguous()

    def _quad_g(self, Dg):
        return torch.linalg.vecdot(torch.bmm(Dg, self.H), Dg)

    def _matvec_g(self, Dg):
        return torch.bmm(Dg, self.H)

    def _sub(self, g):
        return ExactH(self.H[g:g + 1])

    def _matvec_rows(self, D, gidx):
        if D.shape[0] * self.d * self.d > _GATHER_MAX:
            return super()._matvec_rows(D, gidx)
        return torch.bmm(D[:, None, :], self.H[gidx])[:, 0]

    def _quad_rows(self, D, gidx):
        return torch.linalg.vecdot(self._matvec_rows(D, gidx), D)

    def dense(self):
        return self.H.clone()

    def _tensors(self):
        return [self.H]


class DiagH(HForm):
    kind = 'diag'

    def __init__(self, h: Tensor):
        if h.dim() == 1:
            h = h[None]
        super().__init__(h.shape[-1], h.shape[0])
        self.h = h.float().contiguous()

    def _quad_g(self, Dg):
        return torch.bmm(Dg * Dg, self.h[:, :, None])[..., 0]

    def _matvec_g(self, Dg):
        return Dg * self.h[:, None, :]

    def _sub(self, g):
        return DiagH(self.h[g:g + 1])

    def _quad_rows(self, D, gidx):
        return torch.linalg.vecdot(D * self.h[gidx], D)

    def _matvec_rows(self, D, gidx):
        return D * self.h[gidx]

    def _tensors(self):
        return [self.h]


class BlockH(HForm):
    """Block-diagonal along d: blocks (G, nb, b, b); d padded to nb * b."""
    kind = 'block'

    def __init__(self, blocks: Tensor, d: int):
        G, nb, b, _ = blocks.shape
        super().__init__(d, G)
        self.blocks = blocks.float().contiguous()
        self.block_size = b
        self.nb = nb

    def _pad(self, Dg):
        pad = self.nb * self.block_size - self.d
        return F.pad(Dg, (0, pad)) if pad else Dg

    def _matvec_g(self, Dg):
        G, Cg, _ = Dg.shape
        b, nb = self.block_size, self.nb
        X = self._pad(Dg).reshape(G, Cg, nb, b).permute(0, 2, 1, 3)   # G nb Cg b
        Y = torch.matmul(X, self.blocks)                                # G nb Cg b
        Y = Y.permute(0, 2, 1, 3).reshape(G, Cg, nb * b)
        return Y[..., :self.d]

    def _quad_g(self, Dg):
        G, Cg, _ = Dg.shape
        b, nb = self.block_size, self.nb
        X = self._pad(Dg).reshape(G, Cg, nb, b).permute(0, 2, 1, 3)
        Y = torch.matmul(X, self.blocks)
        return (X * Y).sum((1, 3))

    def _sub(self, g):
        return BlockH(self.blocks[g:g + 1], self.d)

    def _matvec_rows(self, D, gidx):
        n = D.shape[0]
        if n * self.nb * self.block_size ** 2 > _GATHER_MAX:
            return super()._matvec_rows(D, gidx)
        X = self._pad(D[None])[0].reshape(n, self.nb, 1, self.block_size)
        Y = torch.matmul(X, self.blocks[gidx])          # n nb 1 b
        return Y.reshape(n, -1)[:, :self.d]

    def _quad_rows(self, D, gidx):
        return torch.linalg.vecdot(self._matvec_rows(D, gidx), D)

    def _tensors(self):
        return [self.blocks]


class LowRankH(HForm):
    """H ~ U diag(s) U^T + diag(r): U (G, d, k), s (G, k), r (G, d) >= 0."""
    kind = 'lowrank'

    def __init__(self, U: Tensor, s: Tensor, r: Tensor):
        if U.dim() == 2:
            U, s, r = U[None], s[None], r[None]
        super().__init__(U.shape[1], U.shape[0])
        self.U = U.float().contiguous()
        self.s = s.float().contiguous()
        self.r = r.float().contiguous()
        self.Us = (self.U * self.s[:, None, :].clamp_min(0).sqrt()).contiguous()

    def _quad_g(self, Dg):
        P = torch.bmm(Dg, self.Us)
        return torch.linalg.vecdot(P, P) + torch.bmm(Dg * Dg, self.r[:, :, None])[..., 0]

    def _matvec_g(self, Dg):
        P = torch.bmm(Dg, self.Us)
        return torch.bmm(P, self.Us.transpose(1, 2)) + Dg * self.r[:, None, :]

    def _sub(self, g):
        return LowRankH(self.U[g:g + 1], self.s[g:g + 1], self.r[g:g + 1])

    def _quad_rows(self, D, gidx):
        if D.shape[0] * self.d * self.Us.shape[2] > _GATHER_MAX:
            return super()._quad_rows(D, gidx)
        P = torch.bmm(D[:, None, :], self.Us[gidx])[:, 0]
        return torch.linalg.vecdot(P, P) + torch.linalg.vecdot(D * self.r[gidx], D)

    def _matvec_rows(self, D, gidx):
        if D.shape[0] * self.d * self.Us.shape[2] > _GATHER_MAX:
            return super()._matvec_rows(D, gidx)
        Us = self.Us[gidx]
        P = torch.bmm(D[:, None, :], Us)
        return torch.bmm(P, Us.transpose(1, 2))[:, 0] + D * self.r[gidx]

    def _tensors(self):
        return [self.U, self.s, self.r]


# ------------------------------------------------------------------ constructors
def _topk_eig(H: Tensor, k: int, generator=None, n_iter: int = 4,
              oversample: int = 8) -> tuple[Tensor, Tensor]:
    """Top-k eigenpairs of PSD matrices H (G, d, d) by seeded subspace iteration."""
    G, d, _ = H.shape
    if k >= d or d <= 256:
        e, V = torch.linalg.eigh(H.double())
        e, V = e.flip(-1)[:, :k], V.flip(-1)[:, :, :k]
        return e.float().clamp_min(0), V.float()
    gen = _default_generator(generator)
    p = min(d, k + oversample)
    Q = torch.randn(G, d, p, generator=gen).to(H)
    for _ in range(n_iter):
        Q, _ = torch.linalg.qr(torch.bmm(H, Q))
    T = torch.bmm(Q.transpose(1, 2), torch.bmm(H, Q)).double()
    e, V = torch.linalg.eigh(T)
    e, V = e.flip(-1)[:, :k].float(), V.flip(-1)[:, :, :k].float()
    return e.clamp_min(0), torch.bmm(Q, V)


def _nystrom(Y: Tensor, omega: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k eigenpairs of PSD H from the sketch Y = H omega (G, d, p): single-pass
    Nystrom H ~ Y (omega^T Y)^+ Y^T, with the pseudo-inverse square root taken on
    the eigenvalues above 1e-6 of the largest (Y is accumulated in float32)."""
    Y, omega = Y.double(), omega.double()
    core = torch.bmm(omega.transpose(1, 2), Y)
    core = 0.5 * (core + core.transpose(1, 2))
    lam, V = torch.linalg.eigh(core)
    keep = lam > 1e-6 * lam.amax(-1, keepdim=True).clamp_min(1e-300)
    inv_sqrt = torch.where(keep, lam.clamp_min(1e-300).rsqrt(), torch.zeros_like(lam))
    B = torch.bmm(Y, V * inv_sqrt[:, None, :])                  # (G, d, p)
    U, S, _ = torch.linalg.svd(B, full_matrices=False)
    return (S * S)[:, :k].float(), U[:, :, :k].float()


def hform_from_dense(H: Tensor, form: str = DEFAULT_FORM, generator=None,
                     **opts) -> HForm:
    """Build a form from dense H: (d, d) or (G, d, d)."""
    check_choice(form, 'form', FORMS)
    if H.dim() == 2:
        H = H[None]
    if H.dim() != 3 or H.shape[1] != H.shape[2]:
        raise ValueError(f'H must be (G, d, d), got {tuple(H.shape)}')
    H = H.float()
    G, d, _ = H.shape
    o = {**DEFAULT_FORM_OPTS.get(form, {}), **opts}
    if form == 'exact':
        return ExactH(H)
    if form == 'identity':
        return IdentityH(d, G)
    if form == 'diag':
        return DiagH(H.diagonal(dim1=1, dim2=2))
    if form == 'block':
        b = min(check_positive_int(o['block_size'], 'block_size'), d)
        nb = math.ceil(d / b)
        Hp = F.pad(H, (0, nb * b - d, 0, nb * b - d))
        idx = torch.arange(nb)
        blocks = Hp.reshape(G, nb, b, nb, b)[:, idx, :, idx, :]   # nb G b b
        return BlockH(blocks.permute(1, 0, 2, 3).contiguous(), d)
    if form == 'lowrank':
        k = min(check_positive_int(o['rank'], 'rank'), d)
        if o.get('sketch', False):      # what InputStats does above dense_max_d
            p = min(d, 2 * k + 16)
            sg = torch.Generator().manual_seed(int(o.get('sketch_seed', 0)))
            omega = torch.randn(G, d, p, generator=sg)
            e, U = _nystrom(torch.bmm(H, omega), omega, k)
        else:
            e, U = _topk_eig(H, k, generator)
        r = (H.diagonal(dim1=1, dim2=2) - (U * U * e[:, None, :]).sum(-1)).clamp_min(0)
        return LowRankH(U, e, r)
    raise AssertionError(form)


def identity_hform(d: int, groups: int = 1) -> HForm:
    return IdentityH(d, groups)
