"""Conversions of a quantized model: dequantized float checkpoint, common-operands
model, float ONNX, and the raw-output helpers that check each one.

These read a model rebuilt from an export (``mpq_det.export.load_quantized_model``);
the int8 QDQ ONNX graph is in ``mpq_det.deploy.qdq``.
"""
from __future__ import annotations

import copy
import io
import os
import os.path as osp
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..checkpoint_io import atomic_save
from ..export import (FORMAT_VERSION, QBUF_NAMES, checkpoint_error, load_quantized_model,
                      log, read_checkpoint, unwrap_model)
from ..modules import QConv2d, QLinear
from ..qstate import swap_module


class UnsupportedInput(ValueError):
    """An input the deployment tools do not cover: a two-stage detector, a float
    checkpoint where a quantized export is needed, a graph written for another model.
    The tools print it and exit 2 (no stack trace)."""


# ----------------------------------------------------------------------- conversions
def folded_weight(m: QConv2d | QLinear) -> Tensor:
    """The dequantized weight on the layer's own inputs (OCS duplicates summed back)."""
    w = m.weight.detach().clone()
    if m.in_index is None:
        return w
    n_in = m.in_channels if isinstance(m, QConv2d) else m.in_features
    out = w.new_zeros(w.shape[0], n_in, *w.shape[2:])
    return out.index_add_(1, m.in_index.to(w.device), w)


def dequantized_state_dict(model: nn.Module) -> OrderedDict:
    """The float state_dict plain mmdet loads: each quantized layer -> weight (+bias)."""
    model = unwrap_model(model)
    sd = OrderedDict()
    qlayers = {n: m for n, m in model.named_modules() if isinstance(m, (QConv2d, QLinear))}
    for name, m in qlayers.items():
        if m.act_bits is not None:
            raise UnsupportedInput(f'layer {name!r} fake-quantizes its input activations '
                                   f'to {m.act_bits} bits; a plain float model cannot do '
                                   'that, so --to-float would not reproduce the quantized '
                                   'model')
    drop = {f'{n}.{b}' for n in qlayers for b in QBUF_NAMES}
    for k, v in model.state_dict().items():
        if k in drop:
            continue
        sd[k] = v.detach().cpu().clone()
    for name, m in qlayers.items():
        sd[f'{name}.weight'] = folded_weight(m).cpu()
    return sd


def save_float_checkpoint(model: nn.Module, path: str, export_meta: dict | None = None,
                          dataset_meta: dict | None = None) -> None:
    """A dequantized float checkpoint (no mpq_det objects in it)."""
    meta: dict = dict(mpq_dequantized=dict(
        format_version=FORMAT_VERSION,
        source_export_settings=None if export_meta is None else export_meta.get('settings'),
        layers=None if export_meta is None else export_meta.get('layers')))
    if dataset_meta is not None:
        meta['dataset_meta'] = dataset_meta
    atomic_save({'state_dict': dequantized_state_dict(model), 'meta': meta}, path)


def _act_fake_quant(x: Tensor, bits: int | None, symmetric: bool, scale: Tensor,
                    zero: Tensor) -> Tensor:
    if bits is None:
        return x
    s, z = scale.to(x.dtype), zero.to(x.dtype)
    if symmetric:
        q = 2 ** (bits - 1) - 1
        return torch.clamp(torch.round(x / s), -q, q) * s
    return (torch.clamp(torch.round(x / s) + z, 0, 2 ** bits - 1) - z) * s


class _CommonOperands(nn.Module):
    def _init_common(self, q: QConv2d | QLinear, scale: Tensor, chan: Tensor) -> None:
        self.register_buffer('scale', scale.detach().clone().float())
        self.register_buffer('chan', chan.detach().clone().to(torch.int64))
        self.register_buffer('in_index', None if q.in_index is None
                             else q.in_index.detach().clone())
        self.bias = None if q.bias is None else nn.Parameter(q.bias.detach().clone(),
                                                             requires_grad=False)
        self.act_bits = q.act_bits
        self.act_symmetric = q.act_symmetric
        self.register_buffer('act_scale', q.act_scale.detach().clone())
        self.register_buffer('act_zero', q.act_zero.detach().clone())

    def _prep(self, x: Tensor, dim: int) -> Tensor:
        if self.in_index is not None:
            x = x.index_select(dim, self.in_index)
        return _act_fake_quant(x, self.act_bits, self.act_symmetric, self.act_scale,
                               self.act_zero)


class CommonOperandsConv2d(_CommonOperands):
    """A quantized conv in common operands: ``int_conv`` (an ordinary nn.Conv2d whose
    weights are the integer codes, one output row per point), then scale-and-sum of
    each output channel's rows (a multiply and a scatter-add)."""

    def __init__(self, q: QConv2d):
        super().__init__()
        wint, scale, chan = q._expanded(torch.float32, q.codes.device)
        self.out_channels = q.out_channels
        self.int_conv = nn.Conv2d(q.weight_in_channels, wint.shape[0], q.kernel_size,
                                  q.stride, q.padding, q.dilation, q.groups, bias=False,
                                  padding_mode=q.padding_mode)
        self.int_conv.weight = nn.Parameter(wint.detach().clone(), requires_grad=False)
        self._init_common(q, scale, chan)

    def forward(self, x: Tensor) -> Tensor:
        y = self.int_conv(self._prep(x, 1)) * self.scale[None, :, None, None].to(x.dtype)
        out = y.new_zeros(y.shape[0], self.out_channels + 1, y.shape[2], y.shape[3])
        idx = self.chan[None, :, None, None].expand_as(y)
        out = out.scatter_add(1, idx, y)[:, :self.out_channels]
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)[None, :, None, None]
        return out


class CommonOperandsLinear(_CommonOperands):
    """A quantized linear in common operands: nn.Linear of integer codes, then
    scale-and-sum."""

    def __init__(self, q: QLinear):
        super().__init__()
        wint, scale, chan = q._expanded(torch.float32, q.codes.device)
        self.out_features = q.out_features
        self.int_linear = nn.Linear(wint.shape[1], wint.shape[0], bias=False)
        self.int_linear.weight = nn.Parameter(wint.detach().clone(), requires_grad=False)
        self._init_common(q, scale, chan)

    def forward(self, x: Tensor) -> Tensor:
        y = self.int_linear(self._prep(x, x.dim() - 1)) * self.scale.to(x.dtype)
        out = y.new_zeros(*y.shape[:-1], self.out_features)
        idx = self.chan.expand_as(y)
        out = out.scatter_add(y.dim() - 1, idx, y)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out


def without_act_quant(model: nn.Module) -> tuple[nn.Module, int]:
    """(``model``, 0) when no quantized layer fake-quantizes its input activations;
    else (a copy in which none does, how many did)."""
    model = unwrap_model(model)
    names = [n for n, m in model.named_modules()
             if isinstance(m, (QConv2d, QLinear)) and m.act_bits is not None]
    if not names:
        return model, 0
    model = copy.deepcopy(model)
    for n in names:
        model.get_submodule(n).act_bits = None
    return model, len(names)


def expand_model(model: nn.Module) -> nn.Module:
    """Replaces (in place) every QConv2d/QLinear by its common-operands module."""
    model = unwrap_model(model)
    qlayers = [(n, m) for n, m in model.named_modules() if isinstance(m, (QConv2d, QLinear))]
    if not qlayers:
        raise ValueError('the model has no quantized layers to expand')
    for name, m in qlayers:
        new = CommonOperandsConv2d(m) if isinstance(m, QConv2d) else CommonOperandsLinear(m)
        swap_module(model, name, new)
    return model


def save_expanded_model(model: nn.Module, path: str) -> None:
    """``torch.save`` of the whole common-operands nn.Module (load it with
    ``load_expanded_model`` or ``torch.load(path, weights_only=False)``; mmdet and
    mpq_det must be importable)."""
    model = expand_model(copy.deepcopy(unwrap_model(model)).cpu())
    atomic_save({'model': model, 'format': 'mpq-det common operands',
                 'format_version': FORMAT_VERSION}, path)


def load_expanded_model(path: str) -> nn.Module:
    """Loads a ``save_expanded_model`` file (a full pickle: only from a trusted source)."""
    if not osp.isfile(path):
        raise checkpoint_error(path, 'no such file')
    try:
        obj = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:  # noqa: BLE001
        first = str(e).splitlines()[0][:200]
        raise checkpoint_error(path, f'cannot read the expanded model ({first})') from None
    if not (isinstance(obj, dict) and obj.get('format') == 'mpq-det common operands'):
        raise checkpoint_error(path, 'not an mpq-det common-operands model file')
    return obj['model'].eval()


def write_bytes_atomic(data: bytes, path: str) -> None:
    """A temporary file, then rename: a failed write leaves no partial file."""
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------- raw outputs
class RawOutputs(nn.Module):
    """``detector(inputs, mode='tensor')`` with its nested outputs flattened to a tuple."""

    def __init__(self, detector: nn.Module, data_samples: list | None = None):
        super().__init__()
        self.detector = detector
        self.data_samples = data_samples  # two-stage detectors need the image metas

    def forward(self, inputs: Tensor):
        return tuple(flatten_outputs(self.detector(inputs, self.data_samples, mode='tensor')))


def flatten_outputs(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten_outputs(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in flatten_outputs(out[k])]
    if out is None:
        return []
    raise TypeError(f'unexpected raw output type {type(out).__name__}')


def max_rel_diff(a: list[Tensor], b: list[Tensor]) -> float:
    """max over outputs of max|a - b| / max|b| (b: the reference)."""
    if len(a) != len(b):
        raise ValueError(f'{len(a)} outputs vs {len(b)} reference outputs')
    worst = 0.0
    for x, y in zip(a, b):
        x, y = torch.as_tensor(x).double(), torch.as_tensor(y).double()
        if x.shape != y.shape:
            raise ValueError(f'output shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}')
        if y.numel() == 0:
            continue
        worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)))
    return worst


def rel_l2_diff(a: list[Tensor], b: list[Tensor]) -> float:
    """max over outputs of ||a - b|| / ||b|| (b: the reference): unlike max_rel_diff,
    a few flipped roundings barely move it."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        x, y = torch.as_tensor(x).double(), torch.as_tensor(y).double()
        worst = max(worst, float((x - y).norm() / y.norm().clamp_min(1e-12)))
    return worst


@torch.no_grad()
def raw_outputs(model: nn.Module, inputs: Tensor, data_samples: list | None = None
                ) -> list[Tensor]:
    """``model(inputs, data_samples, mode='tensor')`` flattened (two-stage detectors
    include their RoI head outputs on the RPN proposals, hence need data_samples)."""
    samples = copy.deepcopy(data_samples)
    return [t.detach().cpu() for t in RawOutputs(unwrap_model(model).eval(), samples)(inputs)]


def score_floors(model: nn.Module, inputs: Tensor) -> dict[str, float]:
    """{raw output name: floor} for the sigmoid classification outputs of a one-stage
    detector's dense head: floor = logit(score_thr / 2) of its ``test_cfg``.

    mmdet keeps a prior only where sigmoid(logit) > score_thr, before anything else
    reads the scores (``filter_scores_and_topk``), so every logit below the floor is
    dropped whatever its value: an 8-bit output range clipped there loses no
    detection and rounds the logits that matter finer. (RetinaNet r18q's range went
    from [-21.5, 3.0] to [-3.7, 3.0].) Softmax heads (SSD) get none: there every logit
    moves the others' probabilities."""
    import math
    model = unwrap_model(model)
    head = getattr(model, 'bbox_head', None)
    thr = float(((getattr(head, 'test_cfg', None) or {}).get('score_thr')) or 0.0)
    if head is None or not getattr(head, 'use_sigmoid_cls', False) or not 0 < thr < 1:
        return {}
    with torch.no_grad():
        out = model(inputs[:1], None, mode='tensor')
    if not (isinstance(out, (tuple, list)) and isinstance(out[0], (tuple, list))):
        return {}
    p = thr / 2
    return {f'out{i}': math.log(p / (1 - p)) for i in range(len(out[0]))}


def require_one_stage(model: nn.Module | Mapping, what: str) -> None:
    """Refuses (UnsupportedInput) a two-stage detector, which ``what`` (a graph from the
    image batch to the raw head outputs) does not cover: its RoI head runs on
    data-dependent RPN proposals. ``model``: the detector, or its config dict (a
    check before anything is built or loaded)."""
    if isinstance(model, nn.Module):
        model = unwrap_model(model)
        kind, roi_head = type(model).__name__, getattr(model, 'roi_head', None)
    else:
        kind = getattr(model.get('type'), '__name__', model.get('type'))
        roi_head = model.get('roi_head')
    if roi_head is not None:
        raise UnsupportedInput(f'{what} covers one-stage detectors with a dense head (e.g. '
                               'RetinaNet, FCOS, SSD): backbone, neck and dense head up to '
                               f'the raw outputs; {kind} is a two-stage detector, whose RoI '
                               'head runs on data-dependent RPN proposals: not covered')


@torch.no_grad()
def export_onnx(model: nn.Module, inputs: Tensor, path: str, opset: int = 17,
                check: bool = True) -> float | None:
    """ONNX of the network up to the raw head outputs (common operands), then (check)
    the max relative difference of onnxruntime's outputs vs ``model``'s in PyTorch."""
    model = unwrap_model(model).eval()
    require_one_stage(model, 'ONNX export')
    ref = raw_outputs(model, inputs)
    expanded = RawOutputs(expand_model(copy.deepcopy(model).cpu()).eval())
    names = [f'out{i}' for i in range(len(ref))]
    buf = io.BytesIO()
    torch.onnx.export(expanded, (inputs.cpu(),), buf, dynamo=False, opset_version=opset,
                      input_names=['inputs'], output_names=names,
                      dynamic_axes={'inputs': {0: 'batch', 2: 'height', 3: 'width'}})
    write_bytes_atomic(buf.getvalue(), path)
    if not check:
        return None
    import onnxruntime as ort
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    got = sess.run(None, {'inputs': inputs.cpu().numpy()})
    return max_rel_diff([torch.from_numpy(g) for g in got], ref)


def sample_inputs(cfg, model: nn.Module, num_images: int = 1,
                  split: str = 'test') -> tuple[Tensor, list]:
    """Preprocessed (inputs, data_samples) of the first images of a dataloader."""
    from mmengine.runner import Runner
    dl_cfg = copy.deepcopy(cfg[f'{split}_dataloader'])
    dl_cfg['batch_size'] = num_images
    dl_cfg['num_workers'] = 0
    dl_cfg['persistent_workers'] = False
    loader = Runner.build_dataloader(dl_cfg)
    batch = next(iter(loader))
    data = unwrap_model(model).data_preprocessor(batch, False)
    return data['inputs'], data['data_samples']


# ----------------------------------------------------------------------- tools/convert
CONVERT_TOL = 1e-4


def build_float_model(cfg) -> nn.Module:
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model = MODELS.build(cfg.model)
    return model.eval()


def convert_export(cfg, path: str, to_float: str | None = None,
                   to_expanded: str | None = None, onnx: str | None = None,
                   num_images: int = 1) -> dict[str, float]:
    """Writes the requested conversions of the export ``path`` and checks each one's
    raw outputs against the quantized model's on the first test images. Returns
    {conversion: max relative difference}.

    The ONNX graph is float: an export that fake-quantizes activations is written
    without that (its layers' weights as they are) and checked against the same
    model with activation quantization off, under the key 'onnx (activation
    quantization off)'. (With it, the graph's roundings flip wherever onnxruntime's
    convs differ from PyTorch's in the last bits; the int8 graph with quantized
    activations is tools/deploy.py's.)"""
    if onnx:
        require_one_stage(cfg.model, 'the ONNX graph of --onnx')  # before loading anything
    model = load_quantized_model(cfg, path)
    meta = read_checkpoint(path)['meta']
    inputs, samples = sample_inputs(cfg, model, num_images)
    ref = raw_outputs(model, inputs, samples)
    diffs = {}
    if to_float:
        save_float_checkpoint(model, to_float, meta['mpq'], meta.get('dataset_meta'))
        plain = build_float_model(cfg)
        from mmengine.runner.checkpoint import load_checkpoint
        load_checkpoint(plain, to_float, map_location='cpu', strict=True, logger='silent')
        diffs['float'] = max_rel_diff(raw_outputs(plain, inputs, samples), ref)
        log(f'--to-float {to_float}: plain-mmdet float model vs quantized raw outputs: '
            f'max rel diff {diffs["float"]:.3e}')
    if to_expanded:
        save_expanded_model(model, to_expanded)
        expanded = load_expanded_model(to_expanded)
        diffs['expanded'] = max_rel_diff(raw_outputs(expanded, inputs, samples), ref)
        log(f'--to-expanded {to_expanded}: common-operands model vs quantized raw outputs: '
            f'max rel diff {diffs["expanded"]:.3e}')
    if onnx:
        net, n_act = without_act_quant(model)
        off = ' (activation quantization off)' if n_act else ''
        if n_act:
            log(f'--onnx {onnx}: {n_act} quantized layers of the export fake-quantize their '
                'input activations; the float ONNX graph is written without that and '
                'checked against the same model with activation quantization off (the int8 '
                'graph with quantized activations: tools/deploy.py)')
        diffs['onnx' + off] = export_onnx(net, inputs, onnx)
        log(f'--onnx {onnx}: onnxruntime vs PyTorch quantized raw outputs{off}: max rel '
            f'diff {diffs["onnx" + off]:.3e}')
    return diffs
