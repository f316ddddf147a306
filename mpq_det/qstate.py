"""The quantized layers of a model as plain tensors, and back.

Used to send rank 0's quantization to the other ranks and by the export format:
both rebuild ``QConv2d``/``QLinear`` from the float layers of a freshly built model
plus these tensors, with no calibration.
"""
from __future__ import annotations

from torch import nn

from .modules import QConv2d, QLinear
from .quant import QuantizedWeight

_KINDS = {'conv2d': QConv2d, 'linear': QLinear}


def swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition('.')
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantized_state(model: nn.Module) -> dict[str, dict]:
    """{layer name: its codes (int8, unpacked), scales, points, OCS index, act params}."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (QConv2d, QLinear)):
            out[name] = dict(
                kind='conv2d' if isinstance(m, QConv2d) else 'linear', bits=m.bits,
                grid=m.grid,
                codes=m.codes.cpu(), scales=m.scales.cpu(), npoints=m.npoints.cpu(),
                in_index=None if m.in_index is None else m.in_index.cpu(),
                act_bits=m.act_bits, act_symmetric=m.act_symmetric,
                act_scale=m.act_scale.cpu(), act_zero=m.act_zero.cpu())
    return out


def apply_quantized_state(model: nn.Module, state: dict[str, dict]) -> None:
    """Replaces each named float layer by its quantized version from ``state``."""
    for name, s in state.items():
        m = model.get_submodule(name)
        cls = _KINDS[s['kind']]
        if isinstance(m, (QConv2d, QLinear)):
            raise ValueError(f'layer {name!r} is already quantized')
        # states written before the full grid existed hold symmetric codes
        qw = QuantizedWeight(s['codes'], s['scales'], s['npoints'], s['bits'],
                             s.get('grid', 'symmetric'))
        q = cls.from_float(m, qw, in_index=s['in_index'], act_bits=s['act_bits'],
                           act_symmetric=s['act_symmetric'])
        q.act_scale.copy_(s['act_scale'])
        q.act_zero.copy_(s['act_zero'])
        swap_module(model, name, q)
