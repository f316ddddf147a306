"""Steps 3, 4 and 7 of the int8 graph (``qdq``): where activations are quantized, and
the requantizations with ranges calibrated on images.

- A quantized conv's input QuantizeLinear has the layer's own activation scale and
  zero point, so it rounds where the PyTorch fake quantization rounds (both round half
  to even): ``input_qdq``.
- onnxruntime fuses a conv only if a QuantizeLinear follows it (through a Relu/Clip,
  which it removes when the Q range lies inside it). When the output feeds quantized
  convs, their input Q is that QuantizeLinear: no rounding that PyTorch does not do.
  Its other consumers (a residual Add) then read the same dequantized tensor: that
  rounding is extra. Otherwise a Q/DQ pair with a range calibrated on images is
  inserted (an extra 8-bit rounding): ``route_output``. That includes the convs that
  make the raw head outputs (float with ``int8_outputs=False``); a sigmoid
  classification output's range starts at its score floor (``convert.score_floors``):
  below it mmdet drops the prior anyway.
- With integer Adds, a residual Add's identity input reads the next conv's
  requantized input too, so that onnxruntime runs the Add as QLinearAdd.
- The sum of a multipoint layer's rows is requantized like a one-point conv's output,
  so that its Add and a residual Add after it run as QLinearAdd (float, they took a
  quarter of RetinaNet-R50's time): one more 8-bit rounding where no quantized conv
  reads it directly. Not for a raw head output, whose sum nothing integer reads:
  there it is a float Add.

The graph is built without the calibrated requantizations first (``calib`` lists the
tensors that need a range), run in onnxruntime for their ranges (``tensor_ranges``),
then ``insert`` adds them.
"""
from __future__ import annotations

import numpy as np
from torch import Tensor

from ..quant.grid import act_qparams
from .graph import Graph
from .records import ConvRecord, DeployReport
from .rows import sum_rows


class Requantizer:
    """The activation quantizers of the graph ``G``: conv inputs, conv outputs and
    the sums of multipoint rows (``calib``: tensor -> ('rows', ConvUnit) | ('out',
    ConvRecord), the tensors that need a calibrated range)."""

    def __init__(self, G: Graph, int8_outputs: bool, output_floors: dict[str, float],
                 report: DeployReport):
        self.G = G
        self.int8_outputs = int8_outputs
        self.output_floors = output_floors  # raw output -> lowest value that matters
        self.report = report
        self.calib: dict[str, tuple] = {}
        self._act_q: dict[tuple, tuple[str, str]] = {}  # (x, scale, zero) -> (Q, DQ out)

    def input_qdq(self, x: str, scale: float, zero: float, bits: int = 8,
                  symmetric: bool = False) -> str:
        """The dequantized output of a Q/DQ pair on ``x`` with this scale and zero
        point (one pair per tensor and quantizer, shared by the convs reading it)."""
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

    def route_output(self, t: str, rec: ConvRecord, multipoint: bool = False) -> None:
        """Finds or inserts the QuantizeLinear after a conv's output ``t`` (for a
        multipoint conv, ``t`` is the sum of its rows)."""
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

    def requantize_add_inputs(self) -> None:
        """An Add input that also feeds a quantized conv (a residual block's identity)
        reads that conv's requantized input instead of the float tensor: with both
        inputs dequantized and a QuantizeLinear after it, onnxruntime runs the Add as
        QLinearAdd. The identity is then rounded to 8 bits, which PyTorch does not do."""
        G = self.G
        for (x, _, _), (q_name, dq_out) in self._act_q.items():
            prod = G.producer(x)
            if prod is None or prod.op_type == 'Conv':
                continue  # a conv output's consumers were routed by route_output
            for nd in G.consumers(x):
                if nd.op_type == 'Add':
                    for i, name in enumerate(nd.input):
                        if name == x:
                            nd.input[i] = dq_out
                    self.report.requantized_add_inputs += 1

    def insert(self, ranges: dict[str, tuple[float, float]]) -> None:
        """Inserts a Q/DQ pair on each tensor of ``calib`` with its calibrated range
        (from its score floor for a floored raw output); the rows of a multipoint
        conv are requantized before their sum instead."""
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
                unit.post = sum_rows(G, raw, y, lay, C, (s, scale, z))
            else:
                prod = G.producer(t)
                pre = G.uniq(t + '_float')
                for i, o in enumerate(prod.output):
                    if o == t:
                        prod.output[i] = pre
                qn = G.node('QuantizeLinear', [pre, s, z])
                G.node('DequantizeLinear', [qn.output[0], s, z], [t])


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
