"""What the int8 graph builder (``qdq``) records: per Conv node, what it became and
why (``ConvRecord``, summed up by ``DeployReport``), and per integer conv, what its
requantization and bias need (``ConvUnit``)."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ConvRecord:
    """One Conv node of the deployed graph."""
    name: str                 # module name (or the ONNX node name of an unnamed conv)
    integer: bool             # DQ input, DQ int8 weight and a Q after: fusable
    rows: int = 0             # conv output rows (main + extra + padding)
    out_channels: int = 0
    groups: int = 1
    merged: int = 0           # extra points merged into int8 rows (power-of-two scales)
    output_q: str = ''        # 'next layer' | 'calibrated' | 'float'
    reason: str = ''          # why it is not integer (or what it costs)


@dataclass
class DeployReport:
    convs: list[ConvRecord] = field(default_factory=list)
    other_float_ops: dict[str, int] = field(default_factory=dict)
    requantized_add_inputs: int = 0
    # raw output -> (calibrated min, range start, max): the score floors applied
    floored_outputs: dict[str, tuple[float, float, float]] = field(default_factory=dict)

    @property
    def non_integer(self) -> list[ConvRecord]:
        return [c for c in self.convs if not c.integer]

    def lines(self) -> list[str]:
        n, k = len(self.convs), sum(c.integer for c in self.convs)
        out = [f'conv nodes of the exported net: {n} (a shared head: one per pyramid level), '
               f'integer-ready (DQ -> Conv -> Q): {k}']
        calib = sum(c.output_q == 'calibrated' for c in self.convs)
        extra = sum(c.rows > c.out_channels for c in self.convs)
        out.append(f'output requantized at the next layer\'s input scale: '
                   f'{sum(c.output_q == "next layer" for c in self.convs)}, at a calibrated '
                   f'scale (an extra 8-bit rounding): {calib}, multipoint layers (extra rows): '
                   f'{extra}')
        merged = sum(c.merged for c in self.convs)
        if extra and not merged:
            out.append('  (their extra rows are extra compute; an export made with '
                       "custom_hooks.0.points.scales=pow2 merges extra points into int8 rows)")
        if merged:
            out.append(f'extra points merged into int8 rows (power-of-two scale ratios, no '
                       f'extra compute): {merged}, in {sum(c.merged > 0 for c in self.convs)} '
                       'conv nodes')
        if self.requantized_add_inputs:
            out.append(f'Add inputs that read the next conv\'s requantized input (an extra '
                       f'8-bit rounding, for integer Adds): {self.requantized_add_inputs}')
        for t, (lo, floor, hi) in sorted(self.floored_outputs.items()):
            out.append(f'  output {t} (sigmoid scores): 8-bit range [{floor:.3f}, {hi:.3f}] '
                       f'(calibrated min {lo:.3f}; below the floor mmdet drops the prior)')
        for c in self.non_integer:
            out.append(f'  float conv {c.name}: {c.reason}')
        if self.other_float_ops:
            out.append('float ops between integer convs: ' + ', '.join(
                f'{k} x{v}' for k, v in sorted(self.other_float_ops.items())))
        return out


@dataclass
class ConvUnit:
    """An integer Conv node of the graph (a layer, or one point level of it)."""
    name: str                  # the layer
    conv: str                  # the Conv node's name
    x_dq: str                  # its dequantized input
    x_scale: float
    w_scales: np.ndarray       # (rows,) positive
    bias: np.ndarray           # (rows,) float
    bias_name: str
    raw: str                   # conv output: rows before the sum
    fac: np.ndarray | None     # per-row 2^-k (multipoint) or None
    sum_args: tuple = ()       # (conv output, layer output, row_layout, C) if multipoint
    routed: bool = False       # its output requantization is already decided
    post: list[str] = field(default_factory=list)  # nodes that sum the rows


def count_float_ops(nodes: list, initializers: set[str]) -> dict[str, int]:
    """{op type: count} of the graph's float ops besides convs and Q/DQ."""
    skip = {'QuantizeLinear', 'DequantizeLinear', 'Conv', 'Constant', 'Shape', 'Expand'}
    counts = defaultdict(int)
    for nd in nodes:
        if nd.op_type in skip or (nd.op_type == 'Cast' and nd.input[0] in initializers):
            continue  # a Cast of INT4 codes is folded when the graph loads
        counts[nd.op_type] += 1
    return dict(counts)
