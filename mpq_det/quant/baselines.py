"""Baselines with the same interface: RTN, MSE clipping and OCS.

Each takes the code grid (``grid.GRIDS``) of the method it is compared with, so
that comparisons stay fair; on the full grid the min-max scale is signed (its sign
puts the largest |w| on the extra level, ``grid.grid_extent``).

* ``rtn``: per-channel min-max scale (max|w| / Q on the symmetric grid), round to
  nearest.
* ``mse_clip``: per-channel clip ratio rho from ``ratios`` (scale rho * the min-max
  scale) minimizing the weight MSE, no refit (the classic clipping baseline).
* ``ocs_split``: outlier channel splitting (Zhao et al. 2019). s = floor(
  expand_ratio * C_in) times, the input channel holding the largest |w| is halved
  and duplicated, so y = W_split x[in_index] equals W x before rounding. floor so
  that the extra storage s / C_in never exceeds the budget. Then ``rtn``.
"""
from __future__ import annotations

import heapq
import math

import torch
from torch import Tensor

from .grid import (check_budget, check_weight, code_range, grid_extent, minmax_scale,
                   round_to_grid)
from .multipoint import QuantizedWeight


def rtn(W: Tensor, bits: int, grid: str = 'symmetric') -> tuple[Tensor, Tensor]:
    """Per-channel min-max round-to-nearest: (scales (C,), codes (C, d) int8)."""
    W = check_weight(W, 'W').detach().float()
    scales = minmax_scale(W, bits, grid)
    return scales, round_to_grid(W, scales, bits, grid)


def default_mse_grid() -> Tensor:
    return torch.linspace(1.0, 0.2, 81)


def mse_clip(W: Tensor, bits: int, ratios: Tensor | None = None,
             grid: str = 'symmetric') -> tuple[Tensor, Tensor]:
    """Per-channel clip ratio minimizing ||w - a q||^2 over ``ratios`` (of the
    min-max scale; default 1.0 down to 0.2 in steps of 0.01), codes on ``grid``."""
    Q = -code_range(bits, grid)[0]
    W = check_weight(W, 'W').detach().float()
    ratios = default_mse_grid() if ratios is None else torch.as_tensor(ratios).float()
    if ratios.dim() != 1 or ratios.numel() == 0 or bool((ratios <= 0).any()):
        raise ValueError('ratios must be a non-empty 1-D tensor of ratios > 0')
    side, m = grid_extent(W, bits, grid)
    best = torch.full((W.shape[0],), float('inf'))
    best_s = side * m / Q
    for rho in ratios.tolist():
        s = side * m * (rho / Q)
        codes = round_to_grid(W, s, bits, grid).float()
        err = ((W - s[:, None] * codes) ** 2).sum(1)
        better = err < best
        best = torch.where(better, err, best)
        best_s = torch.where(better, s, best_s)
    return best_s, round_to_grid(W, best_s, bits, grid)


def ocs_split(W: Tensor, expand_ratio: float) -> tuple[Tensor, Tensor]:
    """Split input channels: W (C_out, C_in, *k) -> (W_split (C_out, C_in + s, *k),
    in_index (C_in + s,) long) with s = floor(expand_ratio * C_in).

    Conv2d (groups=1) or Linear: sum_c W_split[:, c] x[in_index[c]] == W x.
    """
    expand_ratio = check_budget(expand_ratio, 'expand_ratio')
    if not isinstance(W, Tensor) or W.dim() < 2:
        raise ValueError('W must be a (C_out, C_in, ...) tensor with at least 2 '
                         'dimensions')
    W = check_weight(W, 'W', ndim=None).detach().float()
    C_in = W.shape[1]
    s = math.floor(expand_ratio * C_in + 1e-9)
    colmax = W.abs().transpose(0, 1).reshape(C_in, -1).amax(1)
    src = list(range(C_in))
    factor = [1.0] * C_in
    heap = [(-v, c) for c, v in enumerate(colmax.tolist())]
    heapq.heapify(heap)
    for _ in range(s):
        v, c = heapq.heappop(heap)          # largest |w| (lowest index on ties)
        factor[c] *= 0.5
        new = len(src)
        factor.append(factor[c])
        src.append(src[c])
        heapq.heappush(heap, (v * 0.5, c))
        heapq.heappush(heap, (v * 0.5, new))
    in_index = torch.tensor(src, dtype=torch.int64)
    f = torch.tensor(factor, dtype=W.dtype).reshape(1, -1, *([1] * (W.dim() - 2)))
    return W[:, in_index] * f, in_index


def ocs_fold(W_split: Tensor, in_index: Tensor, C_in: int) -> Tensor:
    """Inverse of the split for evaluation: the equivalent (C_out, C_in, *k) weight."""
    out = torch.zeros(W_split.shape[0], C_in, *W_split.shape[2:], dtype=W_split.dtype)
    return out.index_add_(1, in_index, W_split)


def ocs(W: Tensor, bits: int, expand_ratio: float, grid: str = 'symmetric'
        ) -> tuple[QuantizedWeight, Tensor]:
    """OCS then RTN: (QuantizedWeight of W_split.reshape(C_out, -1), in_index)."""
    W_split, in_index = ocs_split(W, expand_ratio)
    s, q = rtn(W_split.reshape(W_split.shape[0], -1), bits, grid)
    return QuantizedWeight.from_single(s, q, bits, grid), in_index


def rtn_qw(W: Tensor, bits: int, grid: str = 'symmetric') -> QuantizedWeight:
    """``rtn`` as a QuantizedWeight."""
    return QuantizedWeight.from_single(*rtn(W, bits, grid), bits, grid)


def mse_qw(W: Tensor, bits: int, ratios: Tensor | None = None,
           grid: str = 'symmetric') -> QuantizedWeight:
    """``mse_clip`` as a QuantizedWeight."""
    return QuantizedWeight.from_single(*mse_clip(W, bits, ratios, grid), bits, grid)
