"""Per-tensor activation ranges chosen by error, on plain tensors.

A quantized layer's input x is fake-quantized per tensor before the layer runs
(``fake_quant``): asymmetric, ``bits`` bits, the range [lo, hi] (widened to hold
0) mapped onto the codes 0..2**bits - 1. The range decides the error: a wide one
rounds coarsely, a narrow one clips the tail. The methods (``RANGES``) choose it
from a sample of the layer's calibration inputs:

* ``'minmax'``: the smallest and largest value seen (nothing clipped); with a
  uniform ``shrink`` factor, the baseline of the literature.
* ``'mse'``: the range that minimizes the activation's own quantization error
  E (x - Q(x))^2 (MQBench's MSE observer).
* ``'fisher'``: the range that minimizes E sum_i g_i^2 (x_i - Q(x_i))^2, where g
  is the gradient, at this input, of a random projection v^T f of the outputs f
  whose error matters (Hutchinson: E_v g_i^2 is the i-th diagonal entry of
  J^T J, J the Jacobian of f). This is the first-order error that the
  activation's quantization causes in f, without the cross terms between
  inputs: the layer-local MSE with every input weighted by how much the outputs
  move with it. The caller chooses f; for a detector, the scores and the
  score-weighted boxes (``mpq_det.sensitivity``).

``search_range`` scans candidate lower and upper bounds, fractions
``DEFAULT_FACTORS`` of the min/max bounds, and keeps the pair of least error.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .grid import act_qparams, check_bits

RANGES = ('minmax', 'mse', 'fisher')
# candidate fractions of the min/max bounds: from nothing clipped down to a tenth
DEFAULT_FACTORS = tuple(round(1.0 - 0.05 * i, 2) for i in range(19))
# candidates evaluated at once (bounds the (candidates, samples) temporary)
_CHUNK = 16


def fake_quant(x: Tensor, step: float | Tensor, zero: float | Tensor, bits: int,
               symmetric: bool = False) -> Tensor:
    """Fake-quantizes ``x`` per tensor with ``step`` and ``zero`` point.

    Args:
        x: any tensor.
        step: quantization step (> 0), as given by ``act_qparams``.
        zero: zero point, an integer value (ignored when ``symmetric``).
        bits: 2..8.
        symmetric: codes -(2**(bits-1) - 1)..2**(bits-1) - 1 around 0; else the
            asymmetric codes 0..2**bits - 1, shifted by ``zero``.

    Returns:
        A tensor of ``x``'s shape and dtype: ``(clamp(round(x / step) + zero, 0,
        2**bits - 1) - zero) * step`` (asymmetric) or ``clamp(round(x / step),
        -Q, Q) * step`` (symmetric).
    """
    if symmetric:
        q = 2 ** (bits - 1) - 1
        return torch.clamp(torch.round(x / step), -q, q) * step
    return (torch.clamp(torch.round(x / step) + zero, 0, 2 ** bits - 1) - zero) * step


def quantize_to_range(x: Tensor, lo: float, hi: float, bits: int) -> Tensor:
    """``x`` fake-quantized asymmetrically to ``bits`` bits over [lo, hi].

    Args:
        x: any tensor.
        lo, hi: the range, lo <= hi; widened to hold 0 (see ``act_qparams``).
        bits: 2..8.

    Returns:
        ``fake_quant(x, *act_qparams(lo, hi, bits, False), bits)``.
    """
    step, zero = act_qparams(float(lo), float(hi), check_bits(bits), False)
    return fake_quant(x, step, zero, bits)


def shrink_range(lo: float, hi: float, factor: float) -> tuple[float, float]:
    """The range [lo, hi] scaled by ``factor`` about 0 (a uniform shrink of min/max
    for ``factor`` < 1).

    Raises:
        ValueError: ``factor`` is not in (0, 1].
    """
    check_factor(factor)
    return lo * factor, hi * factor


def check_factor(factor, name: str = 'shrink') -> float:
    """``factor`` as a float, or ValueError unless it is a number in (0, 1]."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) \
            or not 0 < float(factor) <= 1:
        raise ValueError(f'{name}={factor!r} is not allowed; use a number in (0, 1]')
    return float(factor)


def clip_candidates(lo: float, hi: float, factors=DEFAULT_FACTORS) -> Tensor:
    """(K, 2) candidate ranges (lo * a, hi * b) for a, b in ``factors``.

    A bound at 0 (e.g. after a ReLU, lo = 0) has the one candidate 0, so a
    one-sided input gets len(factors) candidates and a two-sided one
    len(factors)**2. Rows are ordered with the widest range first.
    """
    f = torch.tensor(sorted({float(a) for a in factors}, reverse=True),
                     dtype=torch.float64)
    if not len(f) or float(f.min()) <= 0 or float(f.max()) > 1:
        raise ValueError(f'factors must be numbers in (0, 1], got {tuple(factors)}')
    los = f * lo if lo < 0 else torch.zeros(1, dtype=torch.float64)
    his = f * hi if hi > 0 else torch.zeros(1, dtype=torch.float64)
    grid = torch.cartesian_prod(los, his)
    return grid.reshape(-1, 2)


def range_errors(x: Tensor, candidates: Tensor, bits: int,
                 weight: Tensor | None = None) -> Tensor:
    """Quantization error of a sample under each candidate range.

    Args:
        x: (n,) sample of the layer's input values.
        candidates: (K, 2) ranges [lo, hi] (``clip_candidates``).
        bits: 2..8.
        weight: (n,) non-negative weight of each value (None: all 1).

    Returns:
        (K,) float64: ``sum_i weight_i (x_i - Q_k(x_i))**2`` for each candidate k,
        with Q_k the asymmetric ``bits``-bit quantizer of range k (as
        ``quantize_to_range``).
    """
    bits = check_bits(bits)
    x = x.detach().reshape(-1).float()
    w = None if weight is None else weight.detach().reshape(-1).float()
    if w is not None and w.shape != x.shape:
        raise ValueError(f'weight {tuple(w.shape)} must match x {tuple(x.shape)}')
    qp = [act_qparams(float(lo), float(hi), bits, False) for lo, hi in candidates.tolist()]
    step = torch.tensor([s for s, _ in qp])
    zero = torch.tensor([z for _, z in qp])
    out = torch.empty(len(qp), dtype=torch.float64)
    for i in range(0, len(qp), _CHUNK):
        s, z = step[i:i + _CHUNK, None], zero[i:i + _CHUNK, None]
        e = (fake_quant(x[None], s, z, bits) - x[None]) ** 2
        if w is not None:
            e = e * w[None]
        out[i:i + _CHUNK] = e.sum(1, dtype=torch.float64)
    return out


def search_range(x: Tensor, lo: float, hi: float, bits: int,
                 weight: Tensor | None = None, factors=DEFAULT_FACTORS
                 ) -> tuple[float, float]:
    """The candidate range of least (weighted) quantization error.

    Args:
        x: (n,) sample of the layer's input values.
        lo, hi: the min/max range of the calibration inputs (lo <= hi).
        bits: 2..8.
        weight: (n,) per-value weight (None: the activation's own MSE, ``'mse'``;
            squared output gradients: ``'fisher'``).
        factors: fractions of ``lo`` and of ``hi`` to try (``clip_candidates``);
            1.0 among them keeps min/max a candidate.

    Returns:
        (lo', hi') minimizing ``range_errors``; on ties the wider range. An empty
        sample or an all-zero weight returns (lo, hi).
    """
    if not lo <= hi:
        raise ValueError(f'need lo <= hi, got ({lo}, {hi})')
    cands = clip_candidates(lo, hi, factors)
    if x.numel() == 0 or (weight is not None and not bool((weight > 0).any())):
        return float(lo), float(hi)
    err = range_errors(x, cands, bits, weight)
    k = int(torch.argmin(err))        # the first minimum: candidates go widest first
    return float(cands[k, 0]), float(cands[k, 1])


def random_projection(outputs: list[tuple[Tensor, Tensor | float]],
                      generator: torch.Generator | None = None) -> Tensor:
    """The scalar ``sum_t sum(v_t * w_t * t)`` with v_t random signs (Rademacher).

    Its gradient with respect to any input x of the outputs is g = J^T (w * v), so
    E_v g_i^2 is the i-th diagonal entry of J^T diag(w^2) J: backpropagating it once
    per batch gives the weights of ``'fisher'`` (Hutchinson's estimator).

    Args:
        outputs: (tensor t, weight w) pairs, w a tensor broadcastable to t or a
            float; t must require grad.
        generator: for the signs (seed 0 when None).

    Returns:
        A 0-dim tensor to call ``backward()`` on.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    total = None
    for t, w in outputs:
        v = torch.randint(0, 2, t.shape, generator=gen).to(t) * 2 - 1
        term = (v * w * t).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError('random_projection needs at least one output')
    return total
