"""An int8 QDQ ONNX graph of a quantized one-stage detector, for onnxruntime.

The graph covers what ``convert.export_onnx`` covers: the network from the
preprocessed image batch to the raw head outputs (backbone, neck, dense head).
onnxruntime's CPU provider fuses each ``DequantizeLinear -> Conv -> QuantizeLinear``
unit into one QLinearConv (uint8 activations, int8 weights, int32 accumulation).

How it is built (``Int8Builder``; each step's details are in its module):

1. The quantized model's float twin (each ``QConv2d`` an ``nn.Conv2d`` with its
   dequantized weight, BatchNorm kept) is exported by torch.onnx; its Conv nodes keep
   the parameter names, so each maps back to its layer (``graph``).
2. A BatchNormalization that is a Conv's only consumer is folded: into the per-row
   weight scales of a quantized conv (a negative factor, like a negative scale of
   the full grid, flips the codes' sign: within int8 on both grids, since the full
   grid is two's complement below 8 bits only; ``storage``), into the weights of a
   float conv (``graph``).
3. A quantized conv becomes ``DQ(Q(x)) -> Conv(DQ(int8 codes), bias)``; the input
   QuantizeLinear has the layer's own activation scale and zero point (``requant``).
4. Each conv output is requantized: by the next quantized conv's input quantizer where
   one reads it, else at a range calibrated on images; a sigmoid score output's range
   starts at its score floor (``requant``).
5. Multipoint dense convs with few extra rows: one conv with the extra rows after the
   main rows, scaled by powers of two, summed back by a 1x1 integer conv (``rows``).
   Points with power-of-two scale ratios are merged into one int8 row first.
6. Multipoint grouped and depthwise convs, and dense convs where most channels have
   an extra point: one conv per point level, summed by integer Adds (``rows``).
7. The sum of a multipoint layer's rows is requantized like a one-point conv's output,
   so that the Adds after it are integer (``requant``).
8. File size: INT4 codes, float biases on the int32 grid, short names, equal
   initializers stored once (``storage``).
"""
from __future__ import annotations

import numpy as np
import torch.nn as nn
from torch import Tensor

from ..export import unwrap_model
from ..modules import QConv2d, QLinear
from .convert import require_one_stage, score_floors
from .graph import (OPSET, Graph, float_twin, fold_batchnorms, fold_into_float_conv,
                    layer_name, torch_to_onnx)
from .records import ConvRecord, ConvUnit, DeployReport, count_float_ops
from .requant import Requantizer, tensor_ranges
from .rows import merged_points, point_level_convs, row_layout, runs_as_point_levels, sum_rows
from .storage import WeightStore, compact, store_biases

# what other code imports from here (the steps' modules hold them)
__all__ = ['ConvRecord', 'DeployReport', 'Int8Builder', 'build_int8_onnx', 'compact',
           'float_twin', 'merged_points', 'row_layout', 'tensor_ranges', 'torch_to_onnx']


class Int8Builder:
    """Builds the int8 QDQ graph of a quantized model in two phases: ``build()``
    makes the graph without the calibrated requantizations and returns the tensors
    that need a range, ``finish(ranges)`` inserts them."""

    def __init__(self, model: nn.Module, inputs: Tensor, int8_outputs: bool = True,
                 opset: int = OPSET, first_point_only: bool = False,
                 integer_adds: bool = True, output_floors: dict[str, float] | None = None,
                 int4: bool = True):
        model = unwrap_model(model).eval()
        require_one_stage(model, 'the int8 ONNX graph')
        self.qlayers = {n: m for n, m in model.named_modules()
                        if isinstance(m, (QConv2d, QLinear))}
        if not self.qlayers:
            raise ValueError('the model has no quantized layers: give a quantized export '
                             '(tools/export.py ... --cfg-options '
                             'custom_hooks.0.activations.bits=8)')
        self.int8_outputs = int8_outputs
        self.first_point_only = first_point_only
        self.integer_adds = integer_adds
        self.G = Graph(torch_to_onnx(float_twin(model), inputs, False, opset))
        self.report = DeployReport()
        self.units: list[ConvUnit] = []
        self.rq = Requantizer(self.G, int8_outputs, output_floors or {}, self.report)
        self.weights = WeightStore(self.G, int4)
        self._sums: list[tuple[str, ConvRecord]] = []  # multipoint sums to requantize

    # -------------------------------------------------------------------- phase 1
    def build(self) -> list[str]:
        G = self.G
        folded = fold_batchnorms(G)
        records = {}
        for conv in [nd for nd in G.nodes if nd.op_type == 'Conv']:
            name = layer_name(conv)
            q = self.qlayers.get(name)
            mult, bias = folded.get(conv.name, (None, None))
            rec = ConvRecord(name, False, out_channels=int(G.const(conv.input[1]).shape[0]),
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
                self.rq.route_output(unit.raw, records[unit.conv])
        for y, rec in self._sums:  # else the sum's Add and a residual Add after it stay float
            self.rq.route_output(y, rec, multipoint=True)
        if self.integer_adds:
            self.rq.requantize_add_inputs()
        self.report.convs = list(records.values())
        return list(self.rq.calib)

    @staticmethod
    def _why_float(q) -> str:
        if q is None:
            return 'not quantized in the export (kept in floating point)'
        if isinstance(q, QLinear):
            return 'a Linear layer'
        if q.act_bits is None:
            return ('weights-only quantization (activations=None): export with '
                    'activations=dict(bits=8)')
        if q.act_bits != 8:
            return f'act_bits={q.act_bits}: onnxruntime runs 8-bit activations only'
        if q.act_symmetric:
            return 'symmetric activations (uint8 asymmetric is what the export needs)'
        if q.in_index is not None:
            return 'OCS input duplication (run as a float conv on the folded weight)'
        return ''

    def _keep_float(self, conv, q, mult, bias) -> None:
        if mult is not None:
            fold_into_float_conv(self.G, conv, mult, bias)
        if isinstance(q, QConv2d) and q.act_bits is not None:
            # the activation fake quantization still applies (as Q/DQ before a float conv)
            conv.input[0] = self.rq.input_qdq(conv.input[0], float(q.act_scale),
                                              float(q.act_zero), q.act_bits, q.act_symmetric)

    def _quantize_conv(self, conv, q: QConv2d, mult, bias, rec: ConvRecord) -> None:
        G = self.G
        C = q.out_channels
        m = np.ones(C) if mult is None else mult
        if not self.first_point_only:
            q, rec.merged = merged_points(q)
        b = (np.zeros(C) if q.bias is None else q.bias.detach().cpu().double().numpy()) \
            if bias is None else bias
        x_scale = float(q.act_scale)
        xdq = self.rq.input_qdq(conv.input[0], x_scale, float(q.act_zero))
        y = conv.output[0]
        final = not self.int8_outputs and not G.descendants_have(y, 'Conv')
        rec.integer = True
        if not self.first_point_only and runs_as_point_levels(q):
            return self._point_levels(conv, q, m, b, xdq, x_scale, y, final, rec)
        lay = row_layout(q, self.first_point_only)
        R = lay['codes'].shape[0]
        row_bias = np.zeros(R)
        row_bias[lay['main']] = b
        wdq, bname, w_scales = self.weights.add(lay['codes'], lay['scales'], lay['chan'], m,
                                                row_bias, q.kernel_size)
        multipoint = R > C
        raw = G.uniq(y + '_rows') if multipoint else y
        del conv.input[:]
        conv.input.extend([xdq, wdq, bname])
        conv.output[0] = raw
        unit = ConvUnit(rec.name, conv.name, xdq, x_scale, w_scales, row_bias, bname, raw,
                        lay['fac'] if multipoint else None)
        self.units.append(unit)
        rec.rows = R
        if not multipoint:
            return
        unit.sum_args = (raw, y, lay, C)
        unit.post = sum_rows(G, raw, y, lay, C)
        rec.reason = (f'{int(lay["extra"].size)} extra rows, {R - C - int(lay["extra"].size)} '
                      'padding rows')
        if final:
            rec.integer, rec.output_q = False, 'float'
            rec.reason += '; makes a raw head output, kept float (int8_outputs=False)'
            return
        self.rq.calib[raw] = ('rows', unit)
        if 'seg_out' in lay:  # the integer segment sum's own output scale
            self.rq.calib[lay['seg_out']] = ('out', rec)
        rec.output_q = 'calibrated'
        self._sums.append((y, rec))

    def _point_levels(self, conv, q: QConv2d, m, b, xdq: str, x_scale: float, y: str,
                      final: bool, rec: ConvRecord) -> None:
        """A multipoint conv as one conv per point level (``rows.point_level_convs``),
        each level's output requantized at its own calibrated scale."""
        C = q.out_channels
        units = point_level_convs(self.G, conv, q, m, b, xdq, x_scale, y, self.weights.add,
                                  rec.name)
        for unit in units:
            self.units.append(unit)
            if not final:
                self.rq.calib[unit.raw] = ('out', rec)
        npts = q.npoints.cpu().numpy().astype(np.int64)
        rec.rows = C * len(units)
        rec.reason = (f'{len(units) - 1} extra point levels as convs of their own '
                      f'({int(npts.sum()) - C} extra rows, {C * len(units) - int(npts.sum())} '
                      'zero rows)')
        if final:
            rec.integer, rec.output_q = False, 'float'
            rec.reason += '; makes a raw head output, kept float (int8_outputs=False)'
        else:
            rec.output_q = 'calibrated'
            self._sums.append((y, rec))

    # -------------------------------------------------------------------- phase 2
    def finish(self, ranges: dict[str, tuple[float, float]]):
        """Inserts the calibrated requantizations, puts the biases on the int32 grid;
        returns the onnx.ModelProto."""
        self.rq.insert(ranges)
        store_biases(self.G, self.units)
        self.report.other_float_ops = count_float_ops(
            self.G.nodes, {t.name for t in self.G.g.initializer})
        return self.G.proto()


def build_int8_onnx(model: nn.Module, example: Tensor, calib_batches: list[Tensor],
                    int8_outputs: bool = True, opset: int = OPSET,
                    first_point_only: bool = False, integer_adds: bool = True,
                    int4: bool = True):
    """(onnx.ModelProto, DeployReport) of the int8 QDQ graph of ``model`` (a quantized
    one-stage detector with 8-bit activations). ``calib_batches``: preprocessed images whose
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
