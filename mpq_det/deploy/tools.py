"""Glue of tools/deploy.py and tools/bench_deploy.py: load a detector (float or a
quantized export), calibration and check images, write and check ONNX graphs."""
from __future__ import annotations

import os.path as osp
import tempfile

import onnx
import torch
from torch import Tensor

from ..calibration import build_calib_loader
from ..export import (is_quantized_checkpoint, load_quantized_model, log, read_checkpoint,
                      unwrap_model)
from ..quantizer import parse_group
from .convert import (UnsupportedInput, build_float_model, max_rel_diff, raw_outputs,
                      rel_l2_diff, require_one_stage, sample_inputs, write_bytes_atomic)
from .graph import float_twin, torch_to_onnx
from .ort import (SOURCE_CHECKPOINT, SOURCE_CONFIG, integer_kernel_counts, make_session,
                  ort_quantize_static, run_session)
from .qdq import build_int8_onnx
from .records import DeployReport


def load_detector(cfg, checkpoint: str) -> tuple[torch.nn.Module, dict | None]:
    """(model, the export's meta['mpq'] or None): a quantized export is rebuilt, a
    float checkpoint loaded into ``cfg.model``."""
    ckpt = read_checkpoint(checkpoint)
    if is_quantized_checkpoint(ckpt):
        return load_quantized_model(cfg, checkpoint), ckpt['meta']['mpq']
    from mmengine.runner.checkpoint import load_checkpoint
    model = build_float_model(cfg)
    load_checkpoint(model, checkpoint, map_location='cpu', strict=True, logger='silent')
    return model.eval(), None


@torch.no_grad()
def calib_batches(cfg, model: torch.nn.Module, calib: dict | None = None) -> list[Tensor]:
    """Preprocessed image batches of the calibration split (the export's own calib
    settings when it has them)."""
    loader = build_calib_loader(cfg, **parse_group('calib', calib))
    pre = unwrap_model(model).data_preprocessor
    return [pre(batch, False)['inputs'] for batch in loader]


def record_source(proto, cfg, checkpoint: str) -> None:
    """Records in the graph's metadata the config and checkpoint it is written from
    (``OnnxRuntimeHook`` names them when the graph does not fit the model tested)."""
    onnx.helper.set_model_props(proto, {SOURCE_CONFIG: str(cfg.filename),
                                        SOURCE_CHECKPOINT: checkpoint})


def deploy(cfg, checkpoint: str, out: str | None = None, fp32: str | None = None,
           int8_outputs: bool = True, check_images: int = 4,
           calib: dict | None = None, ort_static: str | None = None,
           int4: bool = True) -> dict:
    """Writes the int8 QDQ graph of the quantized export ``checkpoint`` to ``out``
    and/or the FP32 graph (of a float checkpoint, or of an export's dequantized
    weights) to ``fp32``, and/or onnxruntime's own ``quantize_static`` W8A8 of that
    FP32 graph to ``ort_static`` (calibrated on the same images as ``out``); checks
    each against PyTorch on ``check_images`` test images. Returns the figures printed.
    UnsupportedInput: a two-stage detector (from ``cfg``, before anything is loaded),
    or a float checkpoint for ``out``."""
    require_one_stage(cfg.model, 'the deployed ONNX graph')  # before loading anything
    model, meta = load_detector(cfg, checkpoint)
    if out and meta is None:
        raise UnsupportedInput(f'{checkpoint} is a float checkpoint: the int8 graph needs a '
                               'quantized export with 8-bit activations (tools/export.py ... '
                               '--cfg-options custom_hooks.0.activations.bits=8); --fp32 '
                               'and --ort-static work with it')
    inputs, _ = sample_inputs(cfg, model, check_images)
    ref = raw_outputs(model, inputs)
    result: dict = {}
    # the export's own calibration images (or the hook's defaults for a float model)
    calib = calib or ((meta or {}).get('settings') or {}).get('calib')
    batches = calib_batches(cfg, model, calib) if out or ort_static else []
    if out:
        proto, report = build_int8_onnx(model, batches[0], batches, int8_outputs,
                                        int4=int4)
        record_source(proto, cfg, checkpoint)
        onnx.checker.check_model(proto)
        write_bytes_atomic(proto.SerializeToString(), out)
        got = [torch.from_numpy(g) for g in run_session(make_session(out), inputs)]
        # below a score floor every value means "dropped": compare them as the floor
        floors = {int(t[3:]): f for t, (_, f, _) in report.floored_outputs.items()}
        ref_f = [r.clamp(min=floors[i]) if i in floors else r for i, r in enumerate(ref)]
        result['int8_max_rel_diff'] = max_rel_diff(got, ref_f)
        result['int8_rel_l2_diff'] = rel_l2_diff(got, ref_f)
        result['report'] = report
        result['kernels'] = integer_kernel_counts(out)
        for line in report.lines():
            log(line)
        k = result['kernels']
        log(f'int8 graph {out}: onnxruntime optimized graph has {k["integer_convs"]} '
            f'QLinearConv, {k["conv_integer"]} ConvInteger, {k["float_convs"]} float convs; '
            f'raw outputs vs PyTorch on {check_images} test images: max rel diff '
            f'{result["int8_max_rel_diff"]:.3e}, relative L2 {result["int8_rel_l2_diff"]:.3e}')
    if fp32 or ort_static:
        with tempfile.TemporaryDirectory() as tmp:
            fp32_path = fp32 or osp.join(tmp, 'fp32.onnx')
            proto = torch_to_onnx(float_twin(model), inputs[:1], fold_bn=True)
            record_source(proto, cfg, checkpoint)
            write_bytes_atomic(proto.SerializeToString(), fp32_path)
            ref_fp = raw_outputs(float_twin(model), inputs)
            what = 'dequantized weights, no act quantization' if meta else 'float model'
            if fp32:
                got = [torch.from_numpy(g) for g in run_session(make_session(fp32), inputs)]
                result['fp32_max_rel_diff'] = max_rel_diff(got, ref_fp)
                log(f'fp32 graph {fp32}: raw outputs vs PyTorch ({what}): max rel diff '
                    f'{result["fp32_max_rel_diff"]:.3e}')
            if ort_static:
                ort_quantize_static(fp32_path, ort_static, [b.numpy() for b in batches])
                got = [torch.from_numpy(g) for g in run_session(make_session(ort_static),
                                                                inputs)]
                result['ort_max_rel_diff'] = max_rel_diff(got, ref_fp)
                result['ort_rel_l2_diff'] = rel_l2_diff(got, ref_fp)
                result['ort_kernels'] = k = integer_kernel_counts(ort_static)
                log(f'onnxruntime quantize_static W8A8 graph {ort_static} ({len(batches)} '
                    f'calibration batches): {k["integer_convs"]} QLinearConv, '
                    f'{k["conv_integer"]} ConvInteger, {k["float_convs"]} float convs; raw '
                    f'outputs vs PyTorch ({what}): max rel diff '
                    f'{result["ort_max_rel_diff"]:.3e}, relative L2 '
                    f'{result["ort_rel_l2_diff"]:.3e}')
    return result


__all__ = ['DeployReport', 'calib_batches', 'deploy', 'load_detector']


# -------------------------------------------------------------- mmdet RetinaNet-R50
def _strip_pretrained(cfg) -> None:
    """Drops 'Pretrained' init_cfgs and ``pretrained=`` (nothing to download here)."""
    if isinstance(cfg, dict):
        for k in list(cfg.keys()):
            if k == 'pretrained':
                cfg[k] = None
            elif k == 'init_cfg' and isinstance(cfg[k], dict) and \
                    cfg[k].get('type') == 'Pretrained':
                cfg[k] = None
            else:
                _strip_pretrained(cfg[k])
    elif isinstance(cfg, list):
        for v in cfg:
            _strip_pretrained(v)


def r50_graphs(out_dir: str, calib_size: tuple[int, int] = (320, 320), bits: int = 4,
               budget: float = 0.05, seed: int = 0) -> dict[str, str]:
    """mmdet's packaged RetinaNet-R50 (random init), quantized W{bits}A8 by our model
    pass (multipoint, global budget, the hook's defaults: target 'int8', so the extra
    points merge into int8 rows) on two random images of ``calib_size``, written as
    FP32, int8, int8 with float head outputs, int8-without-extra-points, int8 of the
    same pass with ``target='lowbit'`` (free point scales: each extra point is a row
    of its own), and onnxruntime's own ``quantize_static`` W8A8 of the FP32 graph
    (dynamic image size). Returns {kind: path}. For speed only: the weights are
    random."""
    import copy
    import os
    import os.path as osp

    import mmdet
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS

    from ..quantizer import MultipointQuantizer
    from ..model_pass import summarize
    os.makedirs(out_dir, exist_ok=True)
    cfg = Config.fromfile(osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs',
                                   'retinanet', 'retinanet_r50_fpn_1x_coco.py'))
    init_default_scope('mmdet')
    model_cfg = cfg.model.to_dict() if hasattr(cfg.model, 'to_dict') else dict(cfg.model)
    _strip_pretrained(model_cfg)
    torch.manual_seed(seed)
    fp_model = MODELS.build(model_cfg).eval()
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(1, 3, *calib_size, generator=g) for _ in range(2)]

    @torch.no_grad()
    def calibrate(m: torch.nn.Module, reference: torch.nn.Module | None) -> None:
        for x in batches:
            if reference is not None:
                reference(x, None, mode='tensor')
            m(x, None, mode='tensor')

    def quantized(**kw) -> torch.nn.Module:
        # the hook's own defaults (budget_on, error feedback, ...), as tools/test.py runs it
        model = copy.deepcopy(fp_model)
        q = MultipointQuantizer(bits=bits, budget=budget, activations=dict(bits=8),
                                calib=dict(seed=seed), **kw)
        result, plans, _ = q.quantize(model, calibrate, f'{len(batches)} random images')
        sm = summarize(result, model, plans)
        log(f'RetinaNet-R50 W{bits}A8 (budget {budget}, points={q.points}, '
            f'feedback={q.feedback}): '
            f'extra points add memory {sm["memory_overhead"]:.1%}, MACs '
            f'{sm["compute_overhead"]:.1%} as rows, '
            f'{sm.get("compute_overhead_deployed", sm["compute_overhead"]):.1%} on '
            f'{q.target} (at the calibration size)')
        return model
    model = quantized()
    paths = {k: osp.join(out_dir, f'retinanet_r50_{k}.onnx') for k in
             ['fp32', 'int8', 'int8_float_outputs', 'int8_one_point', 'int8_lowbit']}
    write_bytes_atomic(torch_to_onnx(float_twin(fp_model), batches[0]).SerializeToString(),
                       paths['fp32'])
    for kind, m, kw in (('int8', model, {}),
                        ('int8_float_outputs', model, dict(int8_outputs=False)),
                        ('int8_one_point', model, dict(first_point_only=True)),
                        ('int8_lowbit', quantized(target='lowbit'), {})):
        proto, _ = build_int8_onnx(m, batches[0], batches, **kw)
        write_bytes_atomic(proto.SerializeToString(), paths[kind])
    # the peer row: onnxruntime's own W8A8 of the float model, same calibration images
    paths['ort_w8a8'] = ort_quantize_static(paths['fp32'], osp.join(
        out_dir, 'retinanet_r50_ort_w8a8.onnx'), [x.numpy() for x in batches])
    return paths
