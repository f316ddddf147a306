"""The b-bit code grids, per-channel rounding and argument validation.

Two grids (``GRIDS``) for ``bits`` = b, codes stored as int8:

* ``'symmetric'``: {-Q, ..., -1, 0, 1, ..., Q} with Q = 2**(b-1) - 1, 2**b - 1
  levels (b = 4: -7..7). Scales are >= 0.
* ``'full'``: all 2**b codes of two's complement, {-2**(b-1), ..., 2**(b-1) - 1}
  (b = 2: -2..1). Scales are signed: a channel's values are scale * code, so the
  sign of the scale is the side of the extra level (a negative scale puts it on the
  positive side). At 8 bits it is the symmetric grid: the int8 graph makes every
  scale positive by negating codes (a negative scale, a negative BatchNorm factor),
  and -(-128) does not fit in int8; below 8 bits the negated codes always do. One
  level of 255 is not worth an inexact graph.
"""
from __future__ import annotations

import contextlib
import math
import numbers

import torch
from torch import Tensor

MIN_BITS = 2
MAX_BITS = 8


def check_bits(bits, name: str = 'bits') -> int:
    """Return ``bits`` as int, or raise ValueError naming the argument and 2..8."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise ValueError(f'{name} must be an integer in {MIN_BITS}..{MAX_BITS}, '
                         f'got {bits!r}')
    bits = int(bits)
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f'{name} must be an integer in {MIN_BITS}..{MAX_BITS}, '
                         f'got {bits}')
    return bits


def qmax(bits: int) -> int:
    """Largest code of the symmetric grid: 2**(bits-1) - 1."""
    bits = check_bits(bits)
    return 2 ** (bits - 1) - 1


GRIDS = ('full', 'symmetric')


def check_grid(grid, name: str = 'grid') -> str:
    """``grid`` if it is one of ``GRIDS``, else ValueError naming the allowed ones."""
    if grid not in GRIDS:
        raise ValueError(f'{name} must be one of {list(GRIDS)}, got {grid!r}')
    return grid


def signed_scales(bits: int, grid: str = 'symmetric') -> bool:
    """Whether the grid is two's complement, with signed scales (each its side of the
    extra level): the full grid below 8 bits."""
    return check_grid(grid) == 'full' and check_bits(bits) < MAX_BITS


def code_range(bits: int, grid: str = 'symmetric') -> tuple[int, int]:
    """(lowest, highest) code of the b-bit ``grid``: (-2**(b-1), 2**(b-1) - 1) where
    ``signed_scales``, else (-Q, Q)."""
    if signed_scales(bits, grid):
        half = 2 ** (bits - 1)
        return -half, half - 1
    q = qmax(bits)
    return -q, q


def grid_extent(R: Tensor, bits: int, grid: str = 'symmetric',
                side: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(side (C,) of +-1, extent (C,)) of rows R (C, d): on that side, the scale
    side * extent / -lo (``code_range``) is the smallest that clips no entry.

    Symmetric grid: side 1, extent max|r|. Two's complement (``signed_scales``):
    extent = max(max(-side * r), max(side * r) * -lo / hi); the side, unless given,
    the one with the smaller extent, which puts the entry of largest |r| on the extra
    level -2**(b-1) (side = -sign of that entry; 1 on ties)."""
    if not signed_scales(bits, grid):
        M = R.abs().amax(1)
        return torch.ones_like(M), M
    lo, hi = code_range(bits, grid)
    if side is None:
        side = torch.where(R.amax(1) > -R.amin(1), -1.0, 1.0)
    Rs = R * side[:, None]
    return side, torch.maximum(-Rs.amin(1), Rs.amax(1) * (-lo / hi))


def minmax_scale(R: Tensor, bits: int, grid: str = 'symmetric') -> Tensor:
    """(C,) per-row min-max scale of R (C, d) on ``grid`` (signed on the full grid,
    see ``grid_extent``)."""
    side, extent = grid_extent(R, bits, grid)
    return side * extent / -code_range(bits, grid)[0]


def positive_scales(scales: Tensor, codes: Tensor, bits: int, grid: str = 'symmetric'
                    ) -> tuple[Tensor, Tensor]:
    """Where scales are signed (``signed_scales``): unchanged; else (|scales|, codes
    negated where a scale was negative), the same values with scales >= 0 (the grid
    is symmetric). ``codes`` has the scales' shape plus a last dimension."""
    if signed_scales(bits, grid):
        return scales, codes
    sign = torch.where(scales < 0, -1.0, 1.0)
    return scales.abs(), codes * sign[..., None].to(codes.dtype)


def act_qparams(lo: float, hi: float, bits: int, symmetric: bool) -> tuple[float, float]:
    """(step, zero point) of per-tensor activation quantization for the range [lo, hi].

    Symmetric: step = max(|lo|, |hi|) / Q, zero 0, codes -Q..Q. Asymmetric: the range
    is widened to hold 0, step = (hi - lo) / (2**b - 1), zero round(-lo / step),
    codes 0..2**b - 1. A zero range gives step 1e-8.
    """
    if symmetric:
        step, zero = max(abs(lo), abs(hi)) / qmax(bits), 0.0
    else:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        step = (hi - lo) / (2 ** check_bits(bits) - 1)
        zero = float(round(-lo / step)) if step > 0 else 0.0
    return (step if step > 0 else 1e-8), zero


def check_budget(budget, name: str = 'budget') -> float:
    """Budget: a finite real number >= 0 (extra weight storage fraction)."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise ValueError(f'{name} must be a finite number >= 0, got {budget!r}')
    budget = float(budget)
    if not math.isfinite(budget) or budget < 0:
        raise ValueError(f'{name} must be a finite number >= 0, got {budget}')
    return budget


def check_max_points(n, name: str = 'max_points') -> int:
    """Most points per output channel: an integer >= 1."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or int(n) < 1:
        raise ValueError(f'{name} must be an integer >= 1, got {n!r}')
    return int(n)


def check_weight(w, name: str = 'weight', ndim: int | None = 2) -> Tensor:
    """A non-empty, finite, floating-point tensor with ``ndim`` dimensions."""
    if not isinstance(w, Tensor):
        raise ValueError(f'{name} must be a torch.Tensor, got {type(w).__name__}')
    if not w.is_floating_point():
        raise ValueError(f'{name} must be a floating-point tensor, got {w.dtype}')
    if ndim is not None and w.dim() != ndim:
        raise ValueError(f'{name} must have {ndim} dimensions (C_out, d), '
                         f'got shape {tuple(w.shape)}')
    if w.numel() == 0:
        raise ValueError(f'{name} must be non-empty, got shape {tuple(w.shape)}')
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f'{name} must be finite: it contains NaN or Inf values')
    return w


def check_positive_int(n, name: str, minimum: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or int(n) < minimum:
        raise ValueError(f'{name} must be an integer >= {minimum}, got {n!r}')
    return int(n)


def check_choice(value, name: str, choices) -> str:
    if value not in choices:
        raise ValueError(f'{name} must be one of {list(choices)}, got {value!r}')
    return value


def round_to_grid(r: Tensor, scale: Tensor, bits: int, grid: str = 'symmetric') -> Tensor:
    """Codes clip(round(r / scale), lo, hi) as int8 (``code_range``).

    ``r`` is (C, d); ``scale`` is (C,) or (C, 1), signed on the full grid. A zero
    scale gives zero codes.
    """
    lo, hi = code_range(bits, grid)
    if scale.dim() == 1:
        scale = scale[:, None]
    nz = scale != 0
    safe = torch.where(nz, scale, torch.ones_like(scale))
    codes = torch.round(r / safe).clamp_(lo, hi)
    codes = torch.where(nz, codes, torch.zeros_like(codes))
    return codes.to(torch.int8)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch intra-op threads set to ``n`` inside the block and restored after;
    None leaves them as they are."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(check_positive_int(n, 'num_threads'))
    try:
        yield
    finally:
        torch.set_num_threads(old)
