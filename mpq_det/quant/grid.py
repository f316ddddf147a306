"""Symmetric b-bit grid, per-channel rounding and argument validation.

The grid for ``bits`` = b is G_b = {-Q, ..., -1, 0, 1, ..., Q} with
Q = 2**(b-1) - 1, i.e. 2**b - 1 levels (b = 4: -7..7). Codes are stored as int8.
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


def round_to_grid(r: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Codes clip(round(r / scale), -Q, Q) as int8.

    ``r`` is (C, d); ``scale`` is (C,) or (C, 1). A zero scale gives zero codes.
    """
    q = qmax(bits)
    if scale.dim() == 1:
        scale = scale[:, None]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(r / safe).clamp_(-q, q)
    codes = torch.where(scale > 0, codes, torch.zeros_like(codes))
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
