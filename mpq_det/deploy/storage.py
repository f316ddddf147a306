"""Step 8 of the int8 graph (``qdq``): how weights and biases are stored, and a compact
file.

- Weights are the b-bit codes with per-row scales. Codes in [-8, 7] (W2-W4) are INT4
  initializers (two per byte, opset 21) read through a Cast to int8, which
  onnxruntime folds when it loads the graph, so its DQ -> Conv -> Q fusion is
  unchanged; wider codes are int8 initializers. Scales in the graph are positive: a
  row with a negative scale (the full grid's signed scales) or BatchNorm factor has
  its codes negated. On the full grid that can take a W4 row to [-7, 8], outside
  INT4: such rows are stored as they were (in [-8, 7]) and negated by a Mul with a
  per-row sign after the Cast, folded at load like the Cast. Weight DequantizeLinears have no
  zero-point input (0 by default). Equal weights are stored once (a head shared by
  the pyramid levels is one Conv node per level).
- Biases are floats holding the values on the int32 grid x_scale * w_scale:
  onnxruntime quantizes a QDQ conv's float bias to that int32 itself, and a float
  costs 4 bytes per row where an int32 and its scale cost 8. All-zero biases are
  dropped.
- ``compact``: short tensor names, names kept on Conv nodes only, Constants as
  initializers, equal initializers stored once.
"""
from __future__ import annotations

import copy
import hashlib

import numpy as np

from .graph import Graph
from .records import ConvUnit


def init_int4(G: Graph, base: str, codes: np.ndarray) -> str:
    """An INT4 initializer of integer ``codes`` in [-8, 7] (two's complement nibbles,
    the first element in the low nibble: ONNX's packing)."""
    from onnx import TensorProto
    name = G.uniq(base)
    nib = (codes.astype(np.int8).ravel() & 0xF).astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    t = TensorProto(name=name, data_type=TensorProto.INT4, dims=codes.shape,
                    raw_data=(nib[0::2] | (nib[1::2] << 4)).tobytes())
    G.g.initializer.append(t)
    return name


class WeightStore:
    """The weight DequantizeLinears and bias initializers of the integer convs of
    ``G``, one copy per distinct content; ``int4``: codes in [-8, 7] as INT4."""

    def __init__(self, G: Graph, int4: bool = True):
        self.G = G
        self.int4 = int4
        self._seen: dict[str, tuple[str, str]] = {}  # content -> (weight DQ, bias)

    def add(self, codes: np.ndarray, scales: np.ndarray, chan: np.ndarray,
            mult: np.ndarray, bias: np.ndarray, kernel) -> tuple[str, str, np.ndarray]:
        """(weight DQ output, float bias initializer, weight scales) of conv rows: the
        BN factor of each row's channel (``chan`` -1: a zero row) folded into its
        scale, a negative scale or factor as flipped codes."""
        G = self.G
        R = codes.shape[0]
        mrow = np.where(chan >= 0, mult[np.maximum(chan, 0)], 1.0)
        w_scales = (scales * mrow).astype(np.float32)
        sign = np.where(w_scales < 0, -1, 1).astype(np.int8)
        w_scales = np.abs(w_scales)
        stored = codes.astype(np.int16)
        zero = w_scales == 0  # a zero BN factor (zero_init_residual) or scale: a zero row
        stored[zero] = 0
        w_scales[zero] = 1.0
        codes = (stored * sign[:, None]).astype(np.int8).reshape(R, -1, *kernel)
        bias = bias.astype(np.float32)
        key = hashlib.sha1(codes.tobytes() + w_scales.tobytes() + bias.tobytes() +
                           str(codes.shape).encode()).hexdigest()
        if key not in self._seen:
            w = G.init('w_int8', codes)
            if self.int4 and (codes.min() >= -8 and codes.max() <= 7 or
                              stored.min() >= -8 and stored.max() <= 7):
                # 4-bit codes stored as INT4 (two per byte) and cast to int8 once:
                # onnxruntime folds the Cast (and the sign's Mul) at load, then fuses
                # DQ -> Conv -> Q
                from onnx import TensorProto
                fits = codes.min() >= -8 and codes.max() <= 7
                w4 = codes if fits else stored.astype(np.int8).reshape(codes.shape)
                w = G.node('Cast', [init_int4(G, 'w_int4', w4)], to=TensorProto.INT8
                           ).output[0]
                if not fits:
                    w = G.node('Mul', [w, G.init('w_sign', sign.reshape(
                        R, *[1] * (codes.ndim - 1)))]).output[0]
            # no zero point inputs (optional, 0 by default): 1 byte per row less
            wdq = G.node('DequantizeLinear', [w, G.init('w_scale', w_scales)],
                         axis=0).output[0]
            self._seen[key] = (wdq, G.init('bias', bias))
        return (*self._seen[key], w_scales)


def store_biases(G: Graph, units: list[ConvUnit]) -> None:
    """Each integer conv's bias on the int32 grid x_scale * w_scale (what QLinearConv
    adds), stored as float; none for an all-zero bias (the extra point levels)."""
    biases: dict[tuple, str] = {}
    for unit in units:
        conv = G.by_name(unit.conv)
        if not unit.bias.any():
            del conv.input[2:]
            continue
        key = (unit.bias_name, unit.x_scale)
        if key not in biases:
            bs = (np.float32(unit.x_scale) * unit.w_scales).astype(np.float32)
            bq = np.clip(np.round(unit.bias / bs), -2 ** 31, 2 ** 31 - 1)
            biases[key] = G.init('bias', (bq * bs).astype(np.float32))
        conv.input[2] = biases[key]


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
