"""An int8 QDQ ONNX graph of a quantized one-stage detector, for onnxruntime.

The graph covers what ``convert.export_onnx`` covers: the network from the
preprocessed image batch to the raw head outputs (backbone, neck, dense head).
onnxruntime's CPU provider fuses each ``DequantizeLinear -> Conv -> QuantizeLinear``
unit into one QLinearConv (uint8 activations, int8 weights, int32 accumulation).

How it is built:

1. The quantized model's float twin (each ``QConv2d`` an ``nn.Conv2d`` with its
   dequantized weight, BatchNorm kept) is exported by torch.onnx. Its Conv nodes
   keep the parameter names, so each maps back to its layer.
2. A BatchNormalization that is a Conv's only consumer is folded: into the per-row
   weight scales of a quantized conv (a negative factor flips the codes' sign, which
   is exact on the symmetric grid), into the weights of a float conv.
3. A quantized conv becomes ``DQ(Q(x)) -> Conv(DQ(int8 codes), bias)`` (step 8: the bias).
   The input QuantizeLinear has the layer's own activation scale and zero point,
   so it does what the PyTorch fake quantization does (both round half to even).
4. Output requantization. onnxruntime fuses only if a QuantizeLinear follows the
   Conv (through a Relu/Clip, which it removes when the Q range lies inside it).
   When the output (after Relu/Clip) feeds quantized convs, their input Q is that
   QuantizeLinear: no rounding that PyTorch does not do. Its other consumers (a
   residual Add) then read the same dequantized tensor: that rounding is extra.
   Otherwise a Q/DQ pair with a range calibrated on images is inserted (an extra
   8-bit rounding). That includes the convs that make the raw head outputs (float
   with ``int8_outputs=False``); a sigmoid classification output's range starts at
   its score floor (``convert.score_floors``): below it mmdet drops the prior anyway. With ``integer_adds``, a residual Add's identity
   input reads the next conv's requantized input too, so that the Add is integer.
5. Extra points, dense convs with few extra rows (issue 11's second option). A
   layer with sum_j n_j > C_out rows is one Conv with the main rows first and the
   extra rows after them, level by level. Its output is requantized per tensor,
   which would crush the small extra rows, so the weight scales of the i-th extra
   points are multiplied by 2^k_i (k_i = the smallest floor(log2(main scale / point
   scale)) of that level): they are rounded 2^k_i finer. A 1x1 integer conv over the
   E extra rows only (E*C multiply-adds per pixel, weights 2^(k_max - k_i) at
   (channel, its row), a power-of-two scale) divides the 2^k_i back and puts each
   row on its channel; an integer Add adds that to the main rows. Cost: the layer's
   output rounded once more than in PyTorch (calibrated range), the E*C 1x1 conv and
   its own rounding. (When the powers of two differ by more than 6, a float sum of
   Slices, Adds and a Concat does it instead.)
6. Extra points, grouped and depthwise convs, and dense convs where most channels
   have an extra point (the first option; ``levels_cheaper`` decides for dense
   convs): one conv of the same shape per point level (zero rows for the channels
   without that point), each with its own output scale, summed by integer Adds. No
   2^k and no segment sum; the zero rows cost their multiply-adds. Extra rows inside
   the groups would take onnxruntime off its depthwise kernel (SSDLite ran 15x
   slower); under the compute-aware budget, cheap early layers of RetinaNet-R50 got
   an extra point on nearly every channel, where the E*C segment sum cost more than
   the layer itself.
7. The sum of a multipoint layer's rows is requantized like a one-point conv's
   output (step 4), so that its Add and a residual Add after it run as QLinearAdd
   (float, they took a quarter of RetinaNet-R50's time): one more 8-bit rounding
   where no quantized conv reads it directly. Not for a raw head output, whose sum
   nothing integer reads: there it is a float Add.
8. File size: weight DequantizeLinears without zero points (0 by default), float
   biases holding the int32-grid values (onnxruntime quantizes a QDQ conv's float
   bias to int32 itself: 4 bytes per row instead of an int32 and its scale), no
   all-zero biases, short tensor names, equal initializers stored once (``compact``).
"""
from __future__ import annotations

import copy
import hashlib
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from ..export import _unwrap
from ..modules import QConv2d, QLinear
from ..qstate import swap_module
from ..quant.grid import act_qparams
from ..quant.multipoint import merge_pow2
from .convert import RawOutputs, _folded_weight, is_two_stage, raw_outputs, score_floors

OPSET = 21  # INT4 initializers (and Cast from them) need opset 21
MAX_SEGMENT_SHIFT = 6  # int8 weights 2^(k_max - k) of the segment-sum conv: up to 64
# multiply-adds that one element read or written by an Add/Slice costs (memory-bound
# ops against int8 GEMMs, roughly, on this machine's CPU provider)
ELEMENT_COST = 8
PREFIX = 'detector.'  # RawOutputs wraps the detector: parameter names start with it


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
                       "custom_hooks.0.point_scales=pow2 merges extra points into int8 rows)")
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


# --------------------------------------------------------------------- float twin
def float_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every QConv2d/QLinear an ordinary float layer holding
    its dequantized weight (no activation fake quantization)."""
    twin = copy.deepcopy(_unwrap(model)).cpu().eval()
    for name, m in list(twin.named_modules()):
        if isinstance(m, QConv2d):
            new = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride,
                            m.padding, m.dilation, m.groups, bias=m.bias is not None,
                            padding_mode=m.padding_mode)
        elif isinstance(m, QLinear):
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        else:
            continue
        new.weight.data.copy_(_folded_weight(m))
        if m.bias is not None:
            new.bias.data.copy_(m.bias.detach())
        swap_module(twin, name, new.eval())
    return twin


def torch_to_onnx(net: nn.Module, inputs: Tensor, fold_bn: bool = True,
                  opset: int = OPSET):
    """torch.onnx export of ``net`` up to its flattened raw outputs (an onnx.ModelProto);
    ``fold_bn=False`` keeps BatchNormalization nodes (for our own folding)."""
    import onnx
    net = _unwrap(net).eval()
    n_out = len(raw_outputs(net, inputs[:1]))
    buf = io.BytesIO()
    mode = torch.onnx.TrainingMode.EVAL if fold_bn else torch.onnx.TrainingMode.PRESERVE
    with torch.no_grad():
        torch.onnx.export(RawOutputs(net).eval(), (inputs.cpu(),), buf, dynamo=False,
                          opset_version=opset, training=mode, input_names=['inputs'],
                          output_names=[f'out{i}' for i in range(n_out)],
                          dynamic_axes={'inputs': {0: 'batch', 2: 'height', 3: 'width'}})
    return onnx.load_from_string(buf.getvalue())


# --------------------------------------------------------------------- graph edits
class _Graph:
    """Small helpers over an onnx model: the nodes are edited as a plain list of
    standalone NodeProtos (a protobuf repeated field copies on append), and written
    back in topological order by ``proto()``."""

    def __init__(self, proto):
        self._proto = proto
        self.g = proto.graph
        self.nodes = [copy.deepcopy(nd) for nd in self.g.node]
        self._n = 0

    def uniq(self, base: str) -> str:
        self._n += 1
        return f'{base}/mpq{self._n}'

    def consumers(self, name: str) -> list:
        return [nd for nd in self.nodes if name in nd.input]

    def producer(self, name: str):
        return next((nd for nd in self.nodes if name in nd.output), None)

    def by_name(self, name: str):
        return next(nd for nd in self.nodes if nd.name == name)

    def is_output(self, name: str) -> bool:
        return any(o.name == name for o in self.g.output)

    def const(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper
        for t in self.g.initializer:
            if t.name == name:
                return numpy_helper.to_array(t)
        nd = self.producer(name)
        if nd is not None and nd.op_type == 'Constant':
            return numpy_helper.to_array(nd.attribute[0].t)
        if nd is not None and nd.op_type == 'Identity':  # torch.onnx dedups equal tensors
            return self.const(nd.input[0])
        return None

    def init(self, base: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper
        name = self.uniq(base)
        self.g.initializer.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def init_int4(self, base: str, codes: np.ndarray) -> str:
        """An INT4 initializer of integer ``codes`` in [-8, 7] (two's complement
        nibbles, the first element in the low nibble: ONNX's packing)."""
        from onnx import TensorProto
        name = self.uniq(base)
        nib = (codes.astype(np.int8).ravel() & 0xF).astype(np.uint8)
        if nib.size % 2:
            nib = np.append(nib, np.uint8(0))
        t = TensorProto(name=name, data_type=TensorProto.INT4, dims=codes.shape,
                        raw_data=(nib[0::2] | (nib[1::2] << 4)).tobytes())
        self.g.initializer.append(t)
        return name

    def set_init(self, name: str, arr: np.ndarray) -> None:
        from onnx import numpy_helper
        for i, t in enumerate(self.g.initializer):
            if t.name == name:
                self.g.initializer[i].CopyFrom(numpy_helper.from_array(np.asarray(arr), name))
                return
        raise KeyError(name)

    def node(self, op: str, inputs: list[str], outputs: list[str] | None = None,
             **attrs):
        from onnx import helper
        nd = helper.make_node(op, inputs, outputs or [self.uniq(op)], name=self.uniq(op),
                              **attrs)
        self.nodes.append(nd)
        return nd

    def remove(self, nd) -> None:
        self.nodes = [n for n in self.nodes if n.name != nd.name]

    def descendants_have(self, name: str, op: str) -> bool:
        seen, todo = set(), [name]
        while todo:
            for nd in self.consumers(todo.pop()):
                if nd.op_type == op:
                    return True
                for o in nd.output:
                    if o not in seen:
                        seen.add(o)
                        todo.append(o)
        return False

    def proto(self):
        """A copy of the model with the current nodes, topologically sorted and
        without unused initializers."""
        have = {i.name for i in self.g.input} | {t.name for t in self.g.initializer} | {''}
        nodes, done = list(self.nodes), []
        while nodes:
            rest = []
            for nd in nodes:
                if all(x in have for x in nd.input):
                    done.append(nd)
                    have.update(nd.output)
                else:
                    rest.append(nd)
            if len(rest) == len(nodes):
                raise RuntimeError(f'graph has a cycle or a dangling input near '
                                   f'{rest[0].name} {list(rest[0].input)}')
            nodes = rest
        self.nodes = done
        out = copy.deepcopy(self._proto)
        del out.graph.node[:]
        out.graph.node.extend(done)
        used = {x for nd in done for x in nd.input} | {o.name for o in out.graph.output}
        keep = [t for t in out.graph.initializer if t.name in used]
        del out.graph.initializer[:]
        out.graph.initializer.extend(keep)
        out.graph.ClearField('value_info')
        return out


def _fold_batchnorms(G: _Graph) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Folds every BatchNormalization whose input is a Conv's only output use.
    Returns {conv node name: (multiplier, bias)} per output channel."""
    folded = {}
    for conv in [nd for nd in G.nodes if nd.op_type == 'Conv']:
        y = conv.output[0]
        cons = G.consumers(y)
        if len(cons) != 1 or cons[0].op_type != 'BatchNormalization' or G.is_output(y):
            continue
        bn = cons[0]
        gamma, beta, mean, var = (G.const(x).astype(np.float64) for x in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == 'epsilon'), 1e-5)
        mult = gamma / np.sqrt(var + eps)
        w = G.const(conv.input[1])
        c_out = w.shape[0]
        b = G.const(conv.input[2]).astype(np.float64) if len(conv.input) > 2 else \
            np.zeros(c_out)
        folded[conv.name] = (mult, (b - mean) * mult + beta)
        G.remove(bn)
        conv.output[0] = bn.output[0]
    return folded


# ------------------------------------------------------------------ multipoint rows
def merged_points(q: QConv2d) -> tuple[QConv2d, int]:
    """(``q`` with each channel's leading power-of-two chain of points merged into
    one int8 row (``quant.merge_pow2``: exact), the number of extra points merged).
    Such points cost nothing on int8 hardware: the row is one int8 weight row. ``q``
    itself when none merges (``point_scales='free'`` exports almost never do)."""
    npts = q.npoints.cpu()
    if int(npts.max()) == 1:
        return q, 0
    codes, scales = q.codes.cpu(), q.scales.cpu()
    start = (torch.cumsum(npts, 0) - npts).tolist()
    out_c, out_s, out_n, merged = [], [], [], 0
    for j, n in enumerate(npts.tolist()):
        s, c = scales[start[j]:start[j] + n], codes[start[j]:start[j] + n]
        if n > 1:
            s, c, m = merge_pow2(s, c)
            merged += m - 1
        out_c.append(c)
        out_s.append(s)
        out_n.append(s.numel())
    if not merged:
        return q, 0
    view = copy.copy(q)
    view._buffers = dict(q._buffers)
    view.codes = torch.cat(out_c).to(torch.int8)
    view.scales = torch.cat(out_s).float()
    view.npoints = torch.tensor(out_n, dtype=torch.int64)
    return view, merged


def row_layout(q: QConv2d, first_point_only: bool = False) -> dict:
    """Rows of the deployed conv: per group, the group's main rows (one per channel,
    the channel's first point), then its extra rows, then zero rows up to the largest
    group (plus one zero row when a channel lacks an extra point that another has).

    Returns codes (rows, d) int8, scales, the channel of each row (-1: zero row), its
    power-of-two factor 2^-k (1 for main rows), ``main`` (C,) the main row of each
    channel, ``extra`` the extra rows, and ``levels``: for the i-th extra point, the
    row of each channel's i-th extra point or a zero row."""
    codes = q.codes.cpu().numpy().astype(np.int8)
    scales = q.scales.cpu().numpy().astype(np.float64)
    npts = q.npoints.cpu().numpy().astype(np.int64)
    C, G = npts.size, q.groups
    start = np.concatenate([[0], np.cumsum(npts)[:-1]])
    if first_point_only:  # what the graph costs without extra points (not the same weights)
        codes, scales, npts = codes[start], scales[start], np.ones_like(npts)
        start = np.arange(C)
    cpg = C // G
    per_group = []
    for g in range(G):
        chans = range(g * cpg, (g + 1) * cpg)
        main = [(j, start[j]) for j in chans]
        # level-major: a dense conv's i-th extra points are one contiguous block
        extra = [(j, start[j] + i) for i in range(1, int(npts.max())) for j in chans
                 if i < npts[j]]
        per_group.append(main + extra)
    Rg = max(len(r) for r in per_group)
    n_levels = int(npts.max()) - 1
    if n_levels and (npts <= n_levels).any() and all(len(r) == Rg for r in per_group):
        Rg += 1  # a zero row for the channels without an i-th extra point
    R, d = G * Rg, codes.shape[1]
    out = dict(codes=np.zeros((R, d), np.int8), scales=np.ones(R), chan=np.full(R, -1),
               fac=np.ones(R), main=np.zeros(C, np.int64), extra=[])
    zero_row = next((g * Rg + len(r) for g, r in enumerate(per_group) if len(r) < Rg), -1)
    out['levels'] = [np.full(C, zero_row, np.int64) for _ in range(n_levels)]
    extra = []  # (row, src, channel, level, largest k for this row)
    for g, rows in enumerate(per_group):
        for i, (j, src) in enumerate(rows):
            r = g * Rg + i
            out['codes'][r] = codes[src]
            out['chan'][r] = j
            if src == start[j]:
                out['main'][j] = r
                out['scales'][r] = scales[src]
                continue
            main_s, s = abs(scales[start[j]]), abs(scales[src])
            k = int(math.floor(math.log2(main_s / s))) if s > 0 and main_s > 0 else 0
            level = src - start[j] - 1
            extra.append((r, src, level, k))
            out['levels'][level][j] = r
    # one 2^k per level (the smallest the level's rows allow), so that a per-tensor
    # DequantizeLinear of the gathered level divides it back
    out['level_k'] = [min([k for _, _, lv, k in extra if lv == i] or [0]) for i in
                      range(n_levels)]
    out['level_k'] = [min(max(k, 0), 24) for k in out['level_k']]
    for r, src, level, _ in extra:
        k = out['level_k'][level]
        out['scales'][r] = scales[src] * 2.0 ** k
        out['fac'][r] = 2.0 ** -k
    out['extra'] = np.asarray([e[0] for e in extra], np.int64)
    return out


def levels_cheaper(q: QConv2d) -> bool:
    """Whether a dense multipoint conv costs less as one conv per point level (C rows
    each, zero rows for the channels without that point, summed by integer Adds)
    than as one conv with the E extra rows plus the E x C segment-sum conv (step 5).
    Per output pixel: conv and segment-sum multiply-adds, plus the elements the Adds
    and Slices read or write at ELEMENT_COST each. When most channels have an extra
    point (cheap early layers under a compute budget), the E x C sum costs more than
    the layer itself."""
    npts = q.npoints.cpu().numpy().astype(np.int64)
    C, L, E = npts.size, int(npts.max()) - 1, int(npts.sum()) - npts.size
    K = q.in_channels // q.groups * int(np.prod(q.kernel_size))
    levels = L * C * K + ELEMENT_COST * 3 * L * C
    rows = E * K + E * C + ELEMENT_COST * (2 * (C + E) + 3 * C)
    return levels < rows


# --------------------------------------------------------------------------- build
@dataclass
class _QConvUnit:
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


class Int8Builder:
    """Builds the int8 QDQ graph of a quantized model in two phases: ``build()``
    makes the graph without the calibrated requantizations (``calib_tensors`` lists
    what needs a range), ``finish(ranges)`` inserts them."""

    def __init__(self, model: nn.Module, inputs: Tensor, int8_outputs: bool = True,
                 opset: int = OPSET, first_point_only: bool = False,
                 integer_adds: bool = True, output_floors: dict[str, float] | None = None,
                 int4: bool = True):
        model = _unwrap(model).eval()
        if is_two_stage(model):
            raise ValueError('the int8 ONNX graph covers one-stage detectors (backbone, '
                             'neck and dense head up to the raw outputs); a two-stage '
                             "detector's RoI head runs on data-dependent RPN proposals")
        self.qlayers = {n: m for n, m in model.named_modules()
                        if isinstance(m, (QConv2d, QLinear))}
        if not self.qlayers:
            raise ValueError('the model has no quantized layers: give a quantized export '
                             '(tools/export.py ... --cfg-options custom_hooks.0.act_bits=8)')
        self.int8_outputs = int8_outputs
        self.output_floors = output_floors or {}  # raw output -> lowest value that matters
        self.first_point_only = first_point_only
        self.int4 = int4  # codes in [-8, 7] stored as INT4 (W2-W4); else int8
        self.integer_adds = integer_adds
        self.G = _Graph(torch_to_onnx(float_twin(model), inputs, False, opset))
        self.report = DeployReport()
        self.units: list[_QConvUnit] = []
        self.calib: dict[str, tuple] = {}  # tensor -> ('rows', unit) | ('out', conv)
        self._act_q: dict[tuple, tuple[str, str]] = {}  # (x, scale, zero) -> (Q, DQ out)
        self._weights_seen: dict[str, tuple[str, str]] = {}  # content -> (weight DQ, bias)
        self._sums: list[tuple[str, ConvRecord]] = []  # multipoint sums to requantize

    # -------------------------------------------------------------------- phase 1
    def build(self) -> list[str]:
        G = self.G
        folded = _fold_batchnorms(G)
        records = {}
        for conv in [nd for nd in G.nodes if nd.op_type == 'Conv']:
            w = conv.input[1]
            name = w[len(PREFIX):-len('.weight')] if w.startswith(PREFIX) and \
                w.endswith('.weight') else conv.name
            q = self.qlayers.get(name)
            mult, bias = folded.get(conv.name, (None, None))
            rec = ConvRecord(name, False, out_channels=int(G.const(w).shape[0]),
                             groups=next((a.i for a in conv.attribute if a.name == 'group'), 1))
            rec.rows = rec.out_channels
            records[conv.name] = rec
            reason = self._why_float(q)
            if reason:
                rec.reason = reason
                self._keep_float(conv, q, mult, bias)
                continue
            self._quantize_conv(conv, q, mult, bias, rec)
        for unit in self.units:
            if unit.fac is None and not unit.routed:
                self._route_output(unit.raw, records[unit.conv])
        for y, rec in self._sums:  # else the sum's Add and a residual Add after it stay float
            self._route_output(y, rec, multipoint=True)
        if self.integer_adds:
            self._requantized_add_inputs()
        self.report.convs = list(records.values())
        return list(self.calib)

    def _requantized_add_inputs(self) -> None:
        """An Add input that also feeds a quantized conv (a residual block's identity)
        reads that conv's requantized input instead of the float tensor: with both
        inputs dequantized and a QuantizeLinear after it, onnxruntime runs the Add as
        QLinearAdd. The identity is then rounded to 8 bits, which PyTorch does not do."""
        G = self.G
        for (x, _, _), (q_name, dq_out) in self._act_q.items():
            prod = G.producer(x)
            if prod is None or prod.op_type == 'Conv':
                continue  # a conv output's consumers were routed by _route_output
            for nd in G.consumers(x):
                if nd.op_type == 'Add':
                    for i, name in enumerate(nd.input):
                        if name == x:
                            nd.input[i] = dq_out
                    self.report.requantized_add_inputs += 1

    @staticmethod
    def _why_float(q) -> str:
        if q is None:
            return 'not quantized in the export (kept in floating point)'
        if isinstance(q, QLinear):
            return 'a Linear layer'
        if q.act_bits is None:
            return 'weights-only quantization (act_bits=None): export with act_bits=8'
        if q.act_bits != 8:
            return f'act_bits={q.act_bits}: onnxruntime runs 8-bit activations only'
        if q.act_symmetric:
            return 'symmetric activations (uint8 asymmetric is what the export needs)'
        if q.in_index is not None:
            return 'OCS input duplication (run as a float conv on the folded weight)'
        return ''

    def _keep_float(self, conv, q, mult, bias) -> None:
        G = self.G
        if mult is not None:
            w = G.const(conv.input[1]).astype(np.float64)
            G.set_init(conv.input[1], (w * mult[:, None, None, None]).astype(np.float32))
            b = G.init('bias', bias.astype(np.float32))
            if len(conv.input) > 2:
                conv.input[2] = b
            else:
                conv.input.append(b)
        if isinstance(q, QConv2d) and q.act_bits is not None:
            # the activation fake quantization still applies (as Q/DQ before a float conv)
            conv.input[0] = self._act_qdq(conv.input[0], float(q.act_scale),
                                          float(q.act_zero), q.act_bits, q.act_symmetric)

    def _act_qdq(self, x: str, scale: float, zero: float, bits: int = 8,
                 symmetric: bool = False) -> str:
        key = (x, scale, zero)
        if key not in self._act_q:
            G = self.G
            zt = np.int8 if symmetric else np.uint8
            s = G.init('act_scale', np.array(scale, np.float32))
            z = G.init('act_zero', np.array(zero, zt))
            qn = G.node('QuantizeLinear', [x, s, z])
            dq = G.node('DequantizeLinear', [qn.output[0], s, z])
            self._act_q[key] = (qn.name, dq.output[0])
        return self._act_q[key][1]

    def _weights(self, codes: np.ndarray, scales: np.ndarray, chan: np.ndarray,
                 mult: np.ndarray, bias: np.ndarray, kernel) -> tuple[str, str, np.ndarray]:
        """(weight DQ output, float bias initializer, weight scales) of conv rows: the
        BN factor of each row's channel (``chan`` -1: a zero row) folded into its scale,
        a negative scale or factor as flipped codes. One copy per distinct content (a
        head shared by the pyramid levels is one Conv node per level)."""
        G = self.G
        R = codes.shape[0]
        mrow = np.where(chan >= 0, mult[np.maximum(chan, 0)], 1.0)
        codes = codes.astype(np.int16) * np.where(mrow < 0, -1, 1)[:, None]
        w_scales = (scales * np.abs(mrow)).astype(np.float32)
        codes[w_scales < 0] *= -1
        w_scales = np.abs(w_scales)
        zero = w_scales == 0  # a zero BN factor (zero_init_residual) or scale: a zero row
        codes[zero] = 0
        w_scales[zero] = 1.0
        codes = codes.astype(np.int8).reshape(R, -1, *kernel)
        bias = bias.astype(np.float32)
        key = hashlib.sha1(codes.tobytes() + w_scales.tobytes() + bias.tobytes() +
                           str(codes.shape).encode()).hexdigest()
        if key not in self._weights_seen:
            w = G.init('w_int8', codes)
            if self.int4 and codes.min() >= -8 and codes.max() <= 7:
                # 4-bit codes stored as INT4 (two per byte) and cast to int8 once:
                # onnxruntime folds the Cast at load, then fuses DQ -> Conv -> Q
                from onnx import TensorProto
                w = G.node('Cast', [G.init_int4('w_int4', codes)], to=TensorProto.INT8
                           ).output[0]
            # no zero point inputs (optional, 0 by default): 1 byte per row less
            wdq = G.node('DequantizeLinear', [w, G.init('w_scale', w_scales)],
                         axis=0).output[0]
            self._weights_seen[key] = (wdq, G.init('bias', bias))
        return (*self._weights_seen[key], w_scales)

    def _quantize_conv(self, conv, q: QConv2d, mult, bias, rec: ConvRecord) -> None:
        G = self.G
        C = q.out_channels
        m = np.ones(C) if mult is None else mult
        if not self.first_point_only:
            q, rec.merged = merged_points(q)
        b = (np.zeros(C) if q.bias is None else q.bias.detach().cpu().double().numpy()) \
            if bias is None else bias
        x_scale = float(q.act_scale)
        xdq = self._act_qdq(conv.input[0], x_scale, float(q.act_zero))
        y = conv.output[0]
        final = not self.int8_outputs and not G.descendants_have(y, 'Conv')
        rec.integer = True
        if int(q.npoints.max()) > 1 and not self.first_point_only and (
                q.groups > 1 or levels_cheaper(q)):
            return self._grouped_levels(conv, q, m, b, xdq, x_scale, y, final, rec)
        lay = row_layout(q, self.first_point_only)
        R = lay['codes'].shape[0]
        row_bias = np.zeros(R)
        row_bias[lay['main']] = b
        wdq, bname, w_scales = self._weights(lay['codes'], lay['scales'], lay['chan'], m,
                                             row_bias, q.kernel_size)
        multipoint = R > C
        raw = G.uniq(y + '_rows') if multipoint else y
        del conv.input[:]
        conv.input.extend([xdq, wdq, bname])
        conv.output[0] = raw
        unit = _QConvUnit(rec.name, conv.name, xdq, x_scale, w_scales, row_bias, bname, raw,
                          lay['fac'] if multipoint else None)
        self.units.append(unit)
        rec.rows = R
        if not multipoint:
            return
        unit.sum_args = (raw, y, lay, C)
        unit.post = self._sum_rows(raw, y, lay, C)
        rec.reason = (f'{int(lay["extra"].size)} extra rows, {R - C - int(lay["extra"].size)} '
                      'padding rows')
        if final:
            rec.integer, rec.output_q = False, 'float'
            rec.reason += '; makes a raw head output, kept float (int8_outputs=False)'
            return
        self.calib[raw] = ('rows', unit)
        if 'seg_out' in lay:  # the integer segment sum's own output scale
            self.calib[lay['seg_out']] = ('out', rec)
        rec.output_q = 'calibrated'
        self._sums.append((y, rec))

    def _grouped_levels(self, conv, q: QConv2d, m, b, xdq: str, x_scale: float, y: str,
                        final: bool, rec: ConvRecord) -> None:
        """A grouped (depthwise) multipoint conv: one conv of the same shape per point
        level (zero rows for the channels without that point), each with its own
        output scale, summed by Adds (issue 11's first option). Extra rows inside the
        groups would make onnxruntime leave its depthwise kernel for a per-group GEMM,
        and make the rows' sum a Gather."""
        G = self.G
        C = q.out_channels
        codes = q.codes.cpu().numpy()
        scales = q.scales.cpu().numpy().astype(np.float64)
        npts = q.npoints.cpu().numpy().astype(np.int64)
        start = np.concatenate([[0], np.cumsum(npts)[:-1]])
        attrs = {a.name: a for a in conv.attribute}
        outs = []
        for lvl in range(int(npts.max())):
            has = npts > lvl
            lc = np.zeros((C, codes.shape[1]), np.int8)
            ls = np.zeros(C)
            lc[has] = codes[start[has] + lvl]
            ls[has] = scales[start[has] + lvl]
            lb = b if lvl == 0 else np.zeros(C)
            wdq, bname, w_scales = self._weights(lc, ls, np.arange(C), m, lb, q.kernel_size)
            raw = G.uniq(f'{y}_point{lvl}')
            if lvl == 0:
                nd = conv
                del nd.input[:]
                nd.input.extend([xdq, wdq, bname])
                nd.output[0] = raw
            else:
                nd = G.node('Conv', [xdq, wdq, bname], [raw])
                nd.attribute.extend(copy.deepcopy(list(attrs.values())))
            self.units.append(_QConvUnit(f'{rec.name}[point {lvl}]', nd.name, xdq, x_scale,
                                         w_scales, lb, bname, raw, None, routed=True))
            if not final:
                self.calib[raw] = ('out', rec)
            outs.append(raw)
        acc = outs[0]
        for o in outs[1:]:
            acc = G.node('Add', [acc, o]).output[0]
        G.node('Identity', [acc], [y])
        rec.rows = C * len(outs)
        rec.reason = (f'{len(outs) - 1} extra point levels as convs of their own '
                      f'({int(npts.sum()) - C} extra rows, {C * len(outs) - int(npts.sum())} '
                      'zero rows)')
        if final:
            rec.integer, rec.output_q = False, 'float'
            rec.reason += '; makes a raw head output, kept float (int8_outputs=False)'
        else:
            rec.output_q = 'calibrated'
            self._sums.append((y, rec))

    def _sum_rows(self, raw: str, y: str, lay: dict, C: int,
                  q: tuple[str, float, str] | None = None) -> list[str]:
        """y = main rows + each channel's extra rows times 2^-k of their level. ``q`` =
        (scale init, scale, zero init): ``raw`` is requantized per tensor and its slices
        dequantized; else float (calibration graph). Returns the nodes made.

        The extra rows (E of them, after the C main rows) go through a 1x1 integer conv
        E -> C whose weights are 2^(k_max - k) at (channel, its extra row) and 0
        elsewhere (E*C multiply-adds per pixel, the E extra rows only, not the C main
        rows), then an integer Add: onnxruntime runs both as integer kernels. When
        the levels' powers of two differ by more than 6 (weights beyond int8), the sum
        is Slices, Adds and a Concat in float."""
        ex = lay['extra']
        k_row = np.round(-np.log2(lay['fac'][ex])).astype(np.int64)
        chan = lay['chan'][ex]
        k_max = np.zeros(C, np.int64)
        np.maximum.at(k_max, chan, k_row)
        if (k_max[chan] - k_row).max(initial=0) > MAX_SEGMENT_SHIFT:
            return self._sum_rows_slices(raw, y, lay, C, q)
        G = self.G
        made: list[str] = []
        node = self._recording_node(made)

        def sl(t: str, a: int, b: int) -> str:
            return node('Slice', [t, G.init('i', np.array([a])), G.init('i', np.array([b])),
                                  G.init('i', np.array([1]))])
        E = ex.size
        w = np.zeros((C, E, 1, 1), np.int8)
        w[chan, np.arange(E), 0, 0] = 2 ** (k_max[chan] - k_row)
        w_scale = (2.0 ** -k_max).astype(np.float32)
        seg_w = node('DequantizeLinear', [G.init('seg_w', w), G.init('seg_scale', w_scale)],
                     axis=0)
        seg = lay.setdefault('seg_out', G.uniq(y + '_extra_sum'))
        if q is None:
            main, extra = sl(raw, 0, C), sl(raw, C, C + E)
        else:
            src = node('QuantizeLinear', [raw, q[0], q[2]])
            main = node('DequantizeLinear', [sl(src, 0, C), q[0], q[2]])
            extra = node('DequantizeLinear', [sl(src, C, C + E), q[0], q[2]])
        node('Conv', [extra, seg_w], [seg], kernel_shape=[1, 1])
        node('Add', [main, seg], [y])
        return made

    def _recording_node(self, made: list[str]):
        """``G.node`` that also records each new node's name in ``made`` and returns
        its first output (the row-sum builders report the nodes they added)."""
        def node(*a, **kw) -> str:
            nd = self.G.node(*a, **kw)
            made.append(nd.name)
            return nd.output[0]
        return node

    def _sum_rows_slices(self, raw: str, y: str, lay: dict, C: int,
                         q: tuple[str, float, str] | None = None) -> list[str]:
        """The float sum of ``_sum_rows``: main rows plus, per level, the slices of
        that level's rows, joined by a Concat."""
        G = self.G
        made: list[str] = []
        node = self._recording_node(made)
        src = raw if q is None else node('QuantizeLinear', [raw, q[0], q[2]])

        def deq(t: str, k: int) -> str:
            if q is None:
                return t if k == 0 else node('Mul', [t, G.init('fac', np.array(2.0 ** -k,
                                                                          np.float32))])
            return node('DequantizeLinear', [t, G.init('y_scale', np.array(
                q[1] * 2.0 ** -k, np.float32)), q[2]])
        def sl(t: str, a: int, b: int) -> str:
            return node('Slice', [t, G.init('i', np.array([a])), G.init('i', np.array([b])),
                                  G.init('i', np.array([1]))])
        if not np.array_equal(lay['main'], np.arange(C)):
            raise ValueError('grouped multipoint convs are deployed as one conv per point '
                             'level (_grouped_levels)')
        # dense conv: Slice/Add/Concat only, which onnxruntime's layout optimizer moves
        # its NHWC transposes through (a Gather stops them: a transpose pair per layer)
        main = deq(sl(src, 0, C), 0)
        levels, start = [], C
        for i, idx in enumerate(lay['levels']):
            n = int((lay['chan'][idx] >= 0).sum())
            levels.append(deq(sl(src, start, start + n), lay['level_k'][i]))
            start += n
        npts = 1 + sum((lay['chan'][idx] >= 0).astype(np.int64) for idx in lay['levels'])
        pos = [0] * len(levels)  # next channel of each level block
        parts, a = [], 0
        while a < C:  # runs of channels with the same number of points
            b = a
            while b < C and npts[b] == npts[a]:
                b += 1
            piece = sl(main, a, b)
            for i in range(int(npts[a]) - 1):
                piece = node('Add', [piece, sl(levels[i], pos[i], pos[i] + b - a)])
                pos[i] += b - a
            parts.append(piece)
            a = b
        node('Concat', parts, [y], axis=1) if len(parts) > 1 else node('Identity', parts, [y])
        return made

    def _route_output(self, t: str, rec: ConvRecord, multipoint: bool = False) -> None:
        """Finds or inserts the QuantizeLinear after a conv's output ``t`` (step 4;
        for a multipoint conv, ``t`` is the sum of its rows)."""
        G = self.G
        cons = G.consumers(t)
        if not G.is_output(t) and len(cons) == 1 and cons[0].op_type in ('Relu', 'Clip'):
            t = cons[0].output[0]
            cons = G.consumers(t)
        if not G.descendants_have(t, 'Conv') and not self.int8_outputs:
            rec.integer, rec.output_q = False, 'float'
            rec.reason = 'makes a raw head output, kept float (int8_outputs=False)'
            return
        if multipoint and not G.descendants_have(t, 'Conv'):
            # a raw head output: its requantized parts are added in float, and no
            # integer op reads the sum, so rounding it would only add error
            rec.reason += '; a raw head output: the sum of its parts stays float'
            return
        act_q = {v[0]: v[1] for v in self._act_q.values()}
        mine = [nd for nd in cons if nd.name in act_q]
        if mine and not G.is_output(t):
            qn = mine[0]
            dq_out = act_q[qn.name]
            others = [nd for nd in cons if nd.name != qn.name]
            for nd in others:  # they read the requantized tensor (extra rounding for them)
                for i, x in enumerate(nd.input):
                    if x == t:
                        nd.input[i] = dq_out
            if multipoint:  # its rows' requantization stays what the record says
                return
            rec.output_q = 'next layer'
            if others:
                rec.reason = (f'its output also feeds {sorted({n.op_type for n in others})} '
                              'through the next layer\'s input rounding')
            return
        if multipoint and any(nd.op_type == 'Conv' for nd in cons):
            return  # a float conv reads it: requantized, onnxruntime would run it in int8
        self.calib[t] = ('out', rec)
        if multipoint:
            rec.reason += '; the sum requantized at a calibrated scale'
        else:
            rec.output_q = 'calibrated'

    # -------------------------------------------------------------------- phase 2
    def finish(self, ranges: dict[str, tuple[float, float]]):
        """Inserts the calibrated requantizations, makes the biases int32; returns the
        onnx.ModelProto."""
        G = self.G
        missing = [t for t in self.calib if t not in ranges]
        if missing:
            raise ValueError(f'no calibrated range for {missing[:3]}')
        for t, (kind, obj) in self.calib.items():
            lo, hi = ranges[t]
            if t in self.output_floors:  # clipped values are dropped by mmdet anyway
                lo = min(max(lo, self.output_floors[t]), hi)
                self.report.floored_outputs[t] = (ranges[t][0], lo, hi)
            scale, zero = act_qparams(lo, hi, 8, False)
            s = G.init('y_scale', np.array(scale, np.float32))
            z = G.init('y_zero', np.array(zero, np.uint8))
            if kind == 'rows':
                unit = obj
                for n in unit.post:  # the float sum of the calibration graph
                    G.remove(G.by_name(n))
                raw, y, lay, C = unit.sum_args
                unit.post = self._sum_rows(raw, y, lay, C, (s, scale, z))
            else:
                prod = G.producer(t)
                pre = G.uniq(t + '_float')
                for i, o in enumerate(prod.output):
                    if o == t:
                        prod.output[i] = pre
                qn = G.node('QuantizeLinear', [pre, s, z])
                G.node('DequantizeLinear', [qn.output[0], s, z], [t])
        biases: dict[tuple, str] = {}
        for unit in self.units:
            # the bias on the int32 grid x_scale * w_scale (what QLinearConv adds), stored
            # as float: onnxruntime's bias quantization turns a float bias of a QDQ conv
            # into that int32 itself, and a float takes 4 bytes per row where an int32
            # and its DequantizeLinear scale take 8
            conv = G.by_name(unit.conv)
            if not unit.bias.any():  # the extra point levels: no bias at all
                del conv.input[2:]
                continue
            key = (unit.bias_name, unit.x_scale)
            if key not in biases:
                bs = (np.float32(unit.x_scale) * unit.w_scales).astype(np.float32)
                bq = np.clip(np.round(unit.bias / bs), -2 ** 31, 2 ** 31 - 1)
                biases[key] = G.init('bias', (bq * bs).astype(np.float32))
            conv.input[2] = biases[key]
        self._count_float_ops()
        return G.proto()

    def _count_float_ops(self) -> None:
        skip = {'QuantizeLinear', 'DequantizeLinear', 'Conv', 'Constant', 'Shape', 'Expand'}
        inits = {t.name for t in self.G.g.initializer}
        counts = defaultdict(int)
        for nd in self.G.nodes:
            if nd.op_type in skip or (nd.op_type == 'Cast' and nd.input[0] in inits):
                continue  # a Cast of INT4 codes is folded when the graph loads
            counts[nd.op_type] += 1
        self.report.other_float_ops = dict(counts)


# --------------------------------------------------------------------- calibration
def tensor_ranges(proto, names: list[str], batches: list[Tensor]) -> dict:
    """Min/max of graph tensors ``names`` over ``batches``, run in onnxruntime."""
    import onnx
    import onnxruntime as ort
    m = proto
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), opts,
                                providers=['CPUExecutionProvider'])
    ranges: dict[str, list[float]] = {}
    for x in batches:
        outs = sess.run(names, {'inputs': x.cpu().numpy()})
        for n, v in zip(names, outs):
            lo, hi = float(v.min()), float(v.max())
            r = ranges.setdefault(n, [lo, hi])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)
    return {n: (r[0], r[1]) for n, r in ranges.items()}


def compact(proto) -> None:
    """Short names for the tensors and initializers, names kept on Conv nodes only,
    Constant nodes as initializers, equal initializers stored once. Names are no part
    of the computation, but torch.onnx's long ones took 8% of SSDLite's int8 file."""
    from onnx import TensorProto, numpy_helper
    g = proto.graph
    keep = {i.name for i in g.input} | {o.name for o in g.output}
    rename: dict[str, str] = {}
    shared: dict[tuple, str] = {}  # content -> initializer: equal tensors stored once
    inits = []

    def share(t) -> str:
        t = copy.deepcopy(t)
        t.name = ''
        if not t.HasField('raw_data') and t.data_type not in (TensorProto.INT4,
                                                               TensorProto.UINT4):
            t = numpy_helper.from_array(numpy_helper.to_array(t))  # one encoding
        key = t.SerializeToString()
        if key not in shared:
            shared[key] = t.name = f'_i{len(shared):x}'
            inits.append(t)
        return shared[key]
    for t in g.initializer:
        rename[t.name] = share(t)
    nodes = []
    for nd in g.node:
        if nd.op_type == 'Constant' and [a.name for a in nd.attribute] == ['value'] \
                and nd.output[0] not in keep:
            rename[nd.output[0]] = share(nd.attribute[0].t)
            continue
        nodes.append(nd)
    del g.initializer[:]
    g.initializer.extend(inits)
    n = 0
    for nd in nodes:
        for x in nd.output:
            if x and x not in keep:
                rename[x] = f'_t{n:x}'
                n += 1
    for nd in nodes:
        for field_ in (nd.input, nd.output):
            new = [rename.get(x, x) for x in field_]
            del field_[:]
            field_.extend(new)
        if nd.op_type != 'Conv':
            nd.name = ''
    del g.node[:]
    g.node.extend(nodes)


def build_int8_onnx(model: nn.Module, example: Tensor, calib_batches: list[Tensor],
                    int8_outputs: bool = True, opset: int = OPSET,
                    first_point_only: bool = False, integer_adds: bool = True,
                    int4: bool = True):
    """(onnx.ModelProto, DeployReport) of the int8 QDQ graph of ``model`` (a quantized
    one-stage detector with act_bits=8). ``calib_batches``: preprocessed images whose
    ranges set the inserted requantizations. ``first_point_only`` drops the extra
    points (a benchmark of their cost, not a model to use). ``int8_outputs=False``
    keeps the convs that make the raw head outputs float (no 8-bit rounding of the
    outputs, at the price of float convs over the largest maps)."""
    floors = score_floors(model, example) if int8_outputs else {}
    b = Int8Builder(model, example, int8_outputs, opset, first_point_only, integer_adds,
                    floors, int4)
    names = b.build()
    ranges = tensor_ranges(b.G.proto(), names, calib_batches) if names else {}
    proto = b.finish(ranges)
    compact(proto)
    return proto, b.report
