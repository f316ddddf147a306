"""Packing of b-bit codes into bytes, vectorized, for every b in 2..8.

A code c in lo..hi (``grid.code_range``) is stored as the unsigned field u = c - lo:
on the symmetric grid u = c + Q (0..2Q < 2**b, the format of every export written
before the full grid existed), on the full grid u = c + 2**(b-1) (0..2**b - 1).
Layout: a little-endian bitstream. Codes are taken in groups of 8 (the last group
zero-padded); a group holds 8*b bits = exactly b bytes, code i of the group in
bits [i*b, (i+1)*b) of the group's little-endian integer. So ``numel`` codes take
ceil(numel / 8) * b bytes.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .grid import check_bits, code_range

_CHUNK = 1 << 20      # groups of 8 codes per vectorized chunk


def packed_nbytes(numel: int, bits: int) -> int:
    return math.ceil(int(numel) / 8) * check_bits(bits)


def pack_codes(codes: Tensor, bits: int, grid: str = 'symmetric') -> Tensor:
    """int8 codes (any shape) of ``grid`` -> flat uint8 tensor of ``packed_nbytes``
    bytes."""
    bits = check_bits(bits)
    lo, hi = code_range(bits, grid)
    if not isinstance(codes, Tensor) or codes.dtype != torch.int8:
        raise ValueError('codes must be an int8 tensor')
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < lo or int(flat.max()) > hi):
        raise ValueError(f'codes must lie in {lo}..{hi} for bits={bits} on the {grid} '
                         'grid')
    u = (flat.to(torch.int64) - lo)
    n = flat.numel()
    pad = (-n) % 8
    if pad:
        u = torch.cat([u, u.new_zeros(pad)])
    if bits == 8:
        return u.to(torch.uint8).cpu()
    g = u.reshape(-1, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=g.device) * bits
    bshift = torch.arange(bits, dtype=torch.int64, device=g.device) * 8
    out = torch.empty(g.shape[0], bits, dtype=torch.uint8)
    for s in range(0, g.shape[0], _CHUNK):      # bounded int64 temporaries
        word = (g[s:s + _CHUNK] << shifts).sum(1)                # < 2**56
        out[s:s + _CHUNK] = ((word[:, None] >> bshift) & 0xFF).to(torch.uint8).cpu()
    return out.reshape(-1)


def unpack_codes(packed: Tensor, bits: int, numel: int, grid: str = 'symmetric') -> Tensor:
    """Inverse of ``pack_codes``: flat int8 tensor of ``numel`` codes of ``grid``."""
    bits = check_bits(bits)
    lo, hi = code_range(bits, grid)
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
        raise ValueError('packed must be a uint8 tensor')
    if isinstance(numel, bool) or int(numel) < 0:
        raise ValueError(f'numel must be an integer >= 0, got {numel!r}')
    numel = int(numel)
    expect = packed_nbytes(numel, bits)
    packed = packed.reshape(-1)
    if packed.numel() != expect:
        raise ValueError(f'packed has {packed.numel()} bytes but {numel} codes of '
                         f'{bits} bits need {expect}')
    if bits == 8:
        u = packed.to(torch.int64)[:numel]
    else:
        b = packed.reshape(-1, bits)
        bshift = torch.arange(bits, dtype=torch.int64) * 8
        shifts = torch.arange(8, dtype=torch.int64) * bits
        u = torch.empty(b.shape[0], 8, dtype=torch.int64)
        for s in range(0, b.shape[0], _CHUNK):
            word = (b[s:s + _CHUNK].to(torch.int64) << bshift).sum(1)
            u[s:s + _CHUNK] = (word[:, None] >> shifts) & ((1 << bits) - 1)
        u = u.reshape(-1)[:numel]
    if u.numel() and int(u.max()) > hi - lo:
        raise ValueError(f'packed data holds a field above {hi - lo}: not {bits}-bit '
                         f'codes of the {grid} grid')
    return (u + lo).to(torch.int8)
