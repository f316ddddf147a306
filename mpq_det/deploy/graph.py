"""Steps 1 and 2 of the int8 graph (``qdq``): the quantized model's float twin exported
by torch.onnx, a small editor over its nodes, and BatchNorm folding.

The float twin has each ``QConv2d`` as an ``nn.Conv2d`` holding its dequantized weight,
BatchNorm kept, so that every Conv node of the exported graph keeps its parameter name
and maps back to its layer. A BatchNormalization that is a Conv's only consumer is
then folded: into the per-row weight scales of a quantized conv (by the builder: a
negative factor flips the codes' sign, exact on the symmetric grid), into the
weights of a float conv (``fold_into_float_conv``).
"""
from __future__ import annotations

import copy
import io

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from ..export import unwrap_model
from ..modules import QConv2d, QLinear
from ..qstate import swap_module
from .convert import RawOutputs, folded_weight, raw_outputs

OPSET = 21  # INT4 initializers (and Cast from them) need opset 21
PREFIX = 'detector.'  # RawOutputs wraps the detector: parameter names start with it


def float_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every QConv2d/QLinear an ordinary float layer holding
    its dequantized weight (no activation fake quantization)."""
    twin = copy.deepcopy(unwrap_model(model)).cpu().eval()
    for name, m in list(twin.named_modules()):
        if isinstance(m, QConv2d):
            new = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride,
                            m.padding, m.dilation, m.groups, bias=m.bias is not None,
                            padding_mode=m.padding_mode)
        elif isinstance(m, QLinear):
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        else:
            continue
        new.weight.data.copy_(folded_weight(m))
        if m.bias is not None:
            new.bias.data.copy_(m.bias.detach())
        swap_module(twin, name, new.eval())
    return twin


def torch_to_onnx(net: nn.Module, inputs: Tensor, fold_bn: bool = True,
                  opset: int = OPSET):
    """torch.onnx export of ``net`` up to its flattened raw outputs (an onnx.ModelProto);
    ``fold_bn=False`` keeps BatchNormalization nodes (for our own folding)."""
    import onnx
    net = unwrap_model(net).eval()
    n_out = len(raw_outputs(net, inputs[:1]))
    buf = io.BytesIO()
    mode = torch.onnx.TrainingMode.EVAL if fold_bn else torch.onnx.TrainingMode.PRESERVE
    with torch.no_grad():
        torch.onnx.export(RawOutputs(net).eval(), (inputs.cpu(),), buf, dynamo=False,
                          opset_version=opset, training=mode, input_names=['inputs'],
                          output_names=[f'out{i}' for i in range(n_out)],
                          dynamic_axes={'inputs': {0: 'batch', 2: 'height', 3: 'width'}})
    return onnx.load_from_string(buf.getvalue())


def layer_name(conv) -> str:
    """The module name of a Conv node of a ``torch_to_onnx`` graph (from its weight's
    parameter name), or the node's own name for an unnamed weight."""
    w = conv.input[1]
    if w.startswith(PREFIX) and w.endswith('.weight'):
        return w[len(PREFIX):-len('.weight')]
    return conv.name


class Graph:
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


def fold_batchnorms(G: Graph) -> dict[str, tuple[np.ndarray, np.ndarray]]:
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


def fold_into_float_conv(G: Graph, conv, mult: np.ndarray, bias: np.ndarray) -> None:
    """A folded BatchNorm's per-channel ``mult`` and ``bias`` into a float conv's
    weight and bias."""
    w = G.const(conv.input[1]).astype(np.float64)
    G.set_init(conv.input[1], (w * mult[:, None, None, None]).astype(np.float32))
    b = G.init('bias', bias.astype(np.float32))
    if len(conv.input) > 2:
        conv.input[2] = b
    else:
        conv.input.append(b)
