"""Quantized checkpoints: writing, checking and reloading them (the format alone;
the float, expanded and ONNX conversions are in ``mpq_det.deploy``).

Format (``FORMAT_VERSION`` 1), an mmengine-loadable checkpoint dict::

    {'state_dict': every tensor of the quantized model's state_dict that is NOT a
                   quantized layer's code buffer, as it was (BN, FP layers, the
                   quantized layers' biases ...),
     'mpq_layers': {layer name: dict(kind, bits, grid, shape=(rows, d), codes=<packed uint8>,
                                     scales float32 (rows,), npoints int16 (C_out,),
                                     in_index int64 | None, act_bits, act_symmetric,
                                     act_scale, act_zero)},
     'meta': {'mpq': dict(format_version, settings, source, source_sha256, report,
                          layers, sizes, versions),
              'dataset_meta': ... (copied from the source checkpoint, if it had it)},
     'mpq_requires_hook': RequiresMultipointQuantHook(format_version)}

``grid`` is the code grid the codes were packed for ('full' or 'symmetric', see
``mpq_det.quant.packing``); exports written before it existed lack it and hold
symmetric codes, which is what a missing ``grid`` means.

The last entry is a marker. torch >= 2.6 loads with ``weights_only=True`` and refuses
any global it does not know, so plain mmdet/mmengine fail on an export with an error
that names ``mpq_det.export.RequiresMultipointQuantHook``. ``MultipointQuantHook``
(and our tools) call ``allow_exports()``, which allowlists it. Loading with
``weights_only=False`` but without the hook fails too: unpickling the marker raises
``QuantizedCheckpointError`` telling the user to add the hook. Without the marker,
mmengine's non-strict load would silently leave the quantized layers randomly
initialised.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import os.path as osp
import pickle
import zipfile
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .checkpoint_io import atomic_save
from .modules import QConv2d, QLinear
from .qstate import apply_quantized_state, quantized_state
from .quant import check_grid, pack_codes, packed_nbytes, unpack_codes

FORMAT_VERSION = 1
MARKER_KEY = 'mpq_requires_hook'
LAYERS_KEY = 'mpq_layers'
# the buffers a quantized layer holds instead of its float weight
QBUF_NAMES = ('codes', 'scales', 'npoints', 'in_index', 'act_scale', 'act_zero')
_LAYER_KEYS = ('kind', 'bits', 'shape', 'codes', 'scales', 'npoints', 'in_index',
               'act_bits', 'act_symmetric', 'act_scale', 'act_zero')
HOOK_HINT = ("add the hook to the config: custom_imports = dict(imports=['mpq_det']) and "
             "custom_hooks = [dict(type='MultipointQuantHook')] (the settings stored in "
             "the export are used)")


class QuantizedCheckpointError(ValueError):
    """A file that is not a readable mpq-det quantized export (names file + problem)."""


_ALLOWED = False


class RequiresMultipointQuantHook:
    """Marker pickled into every export, see the module docstring."""

    def __new__(cls, format_version: int = FORMAT_VERSION, _check: bool = True):
        if _check and not _ALLOWED:
            raise QuantizedCheckpointError(
                'this checkpoint is an mpq-det quantized export; it loads only with '
                f'MultipointQuantHook: {HOOK_HINT}')
        obj = super().__new__(cls)
        obj.format_version = format_version
        return obj

    def __reduce__(self):
        return (type(self), (self.format_version,))

    def __repr__(self) -> str:
        return f'RequiresMultipointQuantHook(format_version={self.format_version})'


def allow_exports() -> None:
    """Lets exports load (called by MultipointQuantHook.__init__ and our tools)."""
    global _ALLOWED
    _ALLOWED = True
    if hasattr(torch.serialization, 'add_safe_globals'):
        torch.serialization.add_safe_globals([RequiresMultipointQuantHook])


# ---------------------------------------------------------------------------- helpers
def unwrap_model(model: nn.Module) -> nn.Module:
    """The detector inside a distributed wrapper (DDP), or ``model`` itself."""
    from mmengine.model import is_model_wrapper
    return model.module if is_model_wrapper(model) else model


def log(msg: str) -> None:
    """One line to mmengine's current logger (the runner's, or the console)."""
    from mmengine.logging import print_log
    print_log(msg, logger='current')


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def _jsonable(obj: Any) -> Any:
    """A JSON round trip (tuples become lists, numpy/tensor scalars floats)."""
    def default(o):
        if isinstance(o, Tensor) and o.numel() == 1:
            return o.item()
        if hasattr(o, 'item'):
            return o.item()
        if hasattr(o, '__dict__'):
            return vars(o)
        if isinstance(o, (set, frozenset)):
            return sorted(o)
        return str(o)
    return json.loads(json.dumps(obj, default=default))


def _report_dict(report: Any) -> dict | None:
    if report is None:
        return None
    if isinstance(report, dict):
        return _jsonable(report)
    return _jsonable(dict(layers=list(getattr(report, 'layers', [])),
                          skipped=[vars(s) if hasattr(s, '__dict__') else s
                                   for s in getattr(report, 'skipped', [])],
                          summary=dict(getattr(report, 'summary', {}))))


def _float_numel(m: nn.Module) -> int:
    """Weights of the float layer a QConv2d/QLinear replaced (no OCS extra inputs)."""
    if isinstance(m, QConv2d):
        kh, kw = m.kernel_size
        return m.out_channels * (m.in_channels // m.groups) * kh * kw
    return m.out_features * m.in_features


def _nbytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def content_sha256(ckpt: dict) -> str:
    """sha256 over every stored tensor and layer field (torch does not detect flipped
    bytes inside an archive entry)."""
    h = hashlib.sha256()

    def feed(key: str, v: Any) -> None:
        h.update(key.encode())
        if isinstance(v, Tensor):
            t = v.detach().cpu().reshape(-1).contiguous()
            h.update(f'{t.dtype}{tuple(v.shape)}'.encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(v).encode())
    for k in sorted(ckpt['state_dict']):
        feed('s:' + k, ckpt['state_dict'][k])
    for name in sorted(ckpt[LAYERS_KEY]):
        rec = ckpt[LAYERS_KEY][name]
        for k in sorted(rec):
            feed(f'l:{name}:{k}', rec[k])
    return h.hexdigest()


def _source_meta(source: str | None) -> tuple[str | None, dict | None]:
    """(sha256, dataset_meta) of a local source checkpoint; (None, None) if absent."""
    if not (isinstance(source, str) and osp.isfile(source)):
        return None, None
    sha = file_sha256(source)
    try:
        ckpt = torch.load(source, map_location='cpu', weights_only=True)
        meta = ckpt.get('meta', {}) if isinstance(ckpt, dict) else {}
        dm = meta.get('dataset_meta') if isinstance(meta, dict) else None
    except Exception as e:  # noqa: BLE001  the sha is what matters; meta is a bonus
        log(f'mpq export: could not read dataset_meta from {source}: {e}'.splitlines()[0])
        dm = None
    return sha, dm


# ---------------------------------------------------------------------------- writing
def build_export(model: nn.Module, source: str | None = None, settings: dict | None = None,
                 report: Any = None) -> dict:
    """The export dict of a quantized model (see the module docstring)."""
    model = unwrap_model(model)
    qstate = quantized_state(model)
    if not qstate:
        raise ValueError('the model has no quantized layers (QConv2d/QLinear): quantize it '
                         'first (MultipointQuantHook)')
    drop = {f'{name}.{b}' for name in qstate for b in QBUF_NAMES}
    state_dict = OrderedDict()
    for k, v in model.state_dict().items():
        if k in drop:
            continue
        v = v.detach().cpu()
        if v.untyped_storage().nbytes() != v.numel() * v.element_size():
            v = v.clone()  # a view: do not store the whole storage
        state_dict[k] = v
    layers, q_bytes, q_codes_bytes, q_meta_bytes, fp_bytes = {}, 0, 0, 0, 0
    bound_bytes = 0.0
    modules = dict(model.named_modules())
    for name, s in qstate.items():
        codes = s['codes']
        packed = pack_codes(codes, s['bits'], s['grid'])
        npoints = s['npoints']
        np_dtype = torch.int16 if int(npoints.max()) < 2 ** 15 else torch.int32
        rec = dict(kind=s['kind'], bits=int(s['bits']), grid=s['grid'],
                   shape=[int(x) for x in codes.shape],
                   codes=packed, scales=s['scales'].float().clone(),
                   npoints=npoints.to(np_dtype), in_index=s['in_index'],
                   act_bits=s['act_bits'], act_symmetric=bool(s['act_symmetric']),
                   act_scale=s['act_scale'].clone(), act_zero=s['act_zero'].clone())
        layers[name] = rec
        n_float = _float_numel(modules[name])
        fp_bytes += 4 * n_float
        q_codes_bytes += packed.numel()
        q_meta_bytes += _nbytes(rec['scales']) + _nbytes(rec['npoints']) + _nbytes(
            rec['in_index'])
        bound_bytes += s['bits'] / 32 * 4 * n_float
    q_bytes = q_codes_bytes + q_meta_bytes
    other_bytes = sum(_nbytes(v) for v in state_dict.values())
    budgets = _budgets(settings)
    budget = max(budgets) if budgets else None
    sizes = dict(
        quantized_layers_float32_bytes=fp_bytes, quantized_layers_codes_bytes=q_codes_bytes,
        quantized_layers_scales_points_bytes=q_meta_bytes,
        quantized_layers_bytes=q_bytes, codes_ratio=q_codes_bytes / max(fp_bytes, 1),
        ratio=q_bytes / max(fp_bytes, 1),
        codes_bound_ratio=(None if budget is None else
                           bound_bytes * (1 + budget) / max(fp_bytes, 1)),
        other_tensors_bytes=other_bytes,
        model_float32_bytes=fp_bytes + other_bytes, model_export_tensor_bytes=q_bytes + other_bytes)
    sha, dataset_meta = _source_meta(source)
    import mmdet
    import mmengine
    meta: dict = dict(mpq=dict(
        format_version=FORMAT_VERSION,
        settings=_jsonable(settings) if settings is not None else None,
        source=source if isinstance(source, str) else None, source_sha256=sha,
        report=_report_dict(report), layers=list(layers), sizes=sizes,
        versions=dict(torch=str(torch.__version__), mmdet=str(mmdet.__version__),
                      mmengine=str(mmengine.__version__))))
    if dataset_meta is not None:
        meta['dataset_meta'] = dataset_meta
    ckpt = {'state_dict': state_dict, LAYERS_KEY: layers, 'meta': meta,
            MARKER_KEY: RequiresMultipointQuantHook(FORMAT_VERSION, _check=False)}
    meta['mpq']['content_sha256'] = content_sha256(ckpt)
    return ckpt


def _budgets(settings: dict | None) -> list[float]:
    if not isinstance(settings, dict):
        return []
    out = []
    base = settings.get('base') or {}
    if 'budget' in base:
        out.append(float(base['budget']))
    for comp in (settings.get('components') or {}).values():
        if isinstance(comp, dict) and 'budget' in comp:
            out.append(float(comp['budget']))
    return out


def format_sizes(sizes: dict) -> str:
    mib = 1 / 2 ** 20
    s = sizes
    text = (f'quantized layers: float32 {s["quantized_layers_float32_bytes"] * mib:.3f} MiB -> '
            f'{s["quantized_layers_bytes"] * mib:.3f} MiB (codes '
            f'{s["quantized_layers_codes_bytes"] * mib:.3f} MiB + scales/points '
            f'{s["quantized_layers_scales_points_bytes"] * mib:.3f} MiB), ratio '
            f'{s["ratio"]:.4f} (codes alone {s["codes_ratio"]:.4f}')
    if s.get('codes_bound_ratio') is not None:
        text += f', bound bits/32*(1+budget) = {s["codes_bound_ratio"]:.4f}'
    text += (f'); whole model: float32 {s["model_float32_bytes"] * mib:.3f} MiB -> '
             f'{s["model_export_tensor_bytes"] * mib:.3f} MiB, ratio '
             f'{s["model_export_tensor_bytes"] / max(s["model_float32_bytes"], 1):.4f}')
    if 'file_bytes' in s:
        text += f'; file {s["file_bytes"] * mib:.3f} MiB'
    return text


def save_quantized_checkpoint(model: nn.Module, path: str, source: str | None = None,
                              settings: dict | None = None, report: Any = None) -> dict:
    """Writes the export of a quantized model atomically; returns its ``meta['mpq']``.

    ``source`` (the float checkpoint quantized) is only read, for its sha256 and
    dataset_meta; writing onto it is refused.
    """
    if isinstance(source, str) and osp.exists(source) and osp.exists(path) and \
            osp.samefile(source, path):
        raise ValueError(f'export path {path} is the source checkpoint; refusing to '
                         f'overwrite it')
    ckpt = build_export(model, source, settings, report)
    atomic_save(ckpt, path)
    sizes = ckpt['meta']['mpq']['sizes']
    sizes['file_bytes'] = os.path.getsize(path)
    log(f'mpq export written to {path}: ' + format_sizes(sizes))
    return ckpt['meta']['mpq']


# ---------------------------------------------------------------------------- reading
def is_quantized_checkpoint(ckpt: Any) -> bool:
    return (isinstance(ckpt, dict) and isinstance(ckpt.get('meta'), dict)
            and isinstance(ckpt['meta'].get('mpq'), dict))


def checkpoint_error(filename: str | None, problem: str) -> QuantizedCheckpointError:
    """The error for a bad file: ``'<filename>: <problem>'``."""
    where = filename if filename else 'quantized checkpoint'
    return QuantizedCheckpointError(f'{where}: {problem}')


def validate_export(ckpt: Any, filename: str | None = None) -> dict:
    """Checks the structure of an export dict; returns its ``meta['mpq']``."""
    if not isinstance(ckpt, dict):
        raise checkpoint_error(filename, 'not a checkpoint: the file holds a '
                                         f'{type(ckpt).__name__}, not a dict')
    if not is_quantized_checkpoint(ckpt):
        if 'state_dict' in ckpt:
            raise checkpoint_error(filename, 'a plain (float) checkpoint, not an mpq-det '
                                             'quantized export; quantize it with '
                                             'tools/export.py or tools/test.py with '
                                             'MultipointQuantHook')
        raise checkpoint_error(filename, f'not an mpq-det quantized export (a dict with keys '
                                         f'{sorted(map(str, ckpt))[:8]}, no state_dict/meta.mpq)')
    meta = ckpt['meta']['mpq']
    ver = meta.get('format_version')
    if ver != FORMAT_VERSION:
        raise checkpoint_error(filename, f'quantized export format_version {ver!r}; this '
                                         f'mpq_det reads format_version {FORMAT_VERSION} only '
                                         '(re-export it with this version, or use the mpq_det '
                                         'that wrote it)')
    layers = ckpt.get(LAYERS_KEY)
    if not isinstance(layers, dict) or not isinstance(ckpt.get('state_dict'), dict):
        raise checkpoint_error(filename, f'corrupt quantized export: missing {LAYERS_KEY!r} or '
                                         "'state_dict'")
    if sorted(layers) != sorted(meta.get('layers', [])):
        raise checkpoint_error(filename, 'corrupt quantized export: meta.mpq.layers does not '
                                         'list the stored layers')
    for name, rec in layers.items():
        if not isinstance(rec, dict) or any(k not in rec for k in _LAYER_KEYS):
            raise checkpoint_error(filename, f'corrupt quantized export: layer {name!r} lacks '
                                             f'{[k for k in _LAYER_KEYS if k not in (rec or {})]}')
        try:
            rows, d = (int(x) for x in rec['shape'])
            if rec['kind'] not in ('conv2d', 'linear'):
                raise ValueError(f'kind {rec["kind"]!r}')
            check_grid(_grid(rec))
            codes, scales, npoints = rec['codes'], rec['scales'], rec['npoints']
            if not (isinstance(codes, Tensor) and codes.dtype == torch.uint8):
                raise ValueError('codes are not packed uint8')
            if codes.numel() != packed_nbytes(rows * d, rec['bits']):
                raise ValueError(f'{codes.numel()} code bytes, {rows}x{d} codes of '
                                 f'{rec["bits"]} bits need {packed_nbytes(rows * d, rec["bits"])}')
            if tuple(scales.shape) != (rows,) or int(npoints.sum()) != rows:
                raise ValueError(f'scales {tuple(scales.shape)} / points sum '
                                 f'{int(npoints.sum())} do not match {rows} rows')
        except Exception as e:  # noqa: BLE001
            raise checkpoint_error(filename,
                                   f'corrupt quantized export: layer {name!r}: {e}') from None
    try:
        digest = content_sha256(ckpt)
    except Exception as e:  # noqa: BLE001
        raise checkpoint_error(filename, f'corrupt quantized export: {str(e)[:200]}') from None
    if digest != meta.get('content_sha256'):
        raise checkpoint_error(filename, 'corrupt quantized export: content checksum mismatch (the '
                                         'tensors were damaged or modified after export)')
    return meta


def _grid(rec: dict) -> str:
    """The code grid of a stored layer; 'symmetric' for exports older than the grid."""
    return rec.get('grid', 'symmetric')


def unpacked_state(ckpt: dict, filename: str | None = None) -> dict[str, dict]:
    """``qstate``-style {layer: tensors} with the codes unpacked (int8)."""
    out = {}
    for name, rec in ckpt[LAYERS_KEY].items():
        rows, d = (int(x) for x in rec['shape'])
        try:
            codes = unpack_codes(rec['codes'], rec['bits'], rows * d,
                                 _grid(rec)).reshape(rows, d)
        except ValueError as e:
            raise checkpoint_error(filename,
                                   f'corrupt quantized export: layer {name!r}: {e}') from None
        out[name] = dict(kind=rec['kind'], bits=int(rec['bits']), grid=_grid(rec), codes=codes,
                         scales=rec['scales'].float(), npoints=rec['npoints'].to(torch.int64),
                         in_index=rec['in_index'], act_bits=rec['act_bits'],
                         act_symmetric=rec['act_symmetric'], act_scale=rec['act_scale'],
                         act_zero=rec['act_zero'])
    return out


def prepare_model_for_export(model: nn.Module, checkpoint: dict,
                             filename: str | None = None) -> None:
    """Rebuilds ``model``'s quantized layers and rewrites ``checkpoint['state_dict']``.

    Called before mmengine loads ``checkpoint['state_dict']`` into ``model``: afterwards
    the state_dict holds exactly ``model``'s keys (codes unpacked), so mmengine's own
    load fills every tensor and the model is bit-identical to the one exported.
    """
    model = unwrap_model(model)
    validate_export(checkpoint, filename)
    state = unpacked_state(checkpoint, filename)
    for name in state:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise checkpoint_error(filename, f'the export has quantized layer {name!r}, which this '
                                             f'model (config) does not have') from None
        if isinstance(m, (QConv2d, QLinear)):
            raise checkpoint_error(filename, f'layer {name!r} of the model is already quantized; '
                                             'load a quantized export into a freshly built model')
    try:
        apply_quantized_state(model, state)
    except ValueError as e:
        raise checkpoint_error(filename,
                               f'the export does not fit this model (config): {e}') from None
    sd = OrderedDict(checkpoint['state_dict'])
    for name, s in state.items():
        for b in QBUF_NAMES:
            if s[b] is not None:
                sd[f'{name}.{b}'] = s[b]
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    if missing or extra:
        raise checkpoint_error(filename, 'the export does not fit this model (config): '
                                         f'missing {missing[:5]}'
                                         f'{"..." if len(missing) > 5 else ""}, unexpected '
                                         f'{extra[:5]}{"..." if len(extra) > 5 else ""}')
    checkpoint['state_dict'].clear()
    checkpoint['state_dict'].update((k, sd[k]) for k in want)


def _classify_load_error(path: str, e: Exception) -> str:
    first = str(e).strip().splitlines()
    detail = ''
    for line in first:  # the WeightsUnpickler line is the informative one
        if 'Unsupported global' in line or 'WeightsUnpickler' in line:
            detail = line.strip()
            break
    if not detail and first:
        detail = first[0].strip()
    with open(path, 'rb') as f:
        head = f.read(4)
    if isinstance(e, pickle.UnpicklingError) and 'Unsupported global' in detail:
        import re
        g = re.search(r'GLOBAL (\S+)', detail)
        what = g.group(1) if g else detail[:200]
        return ('not an mpq-det quantized export: it pickles an object a checkpoint does '
                f'not contain ({what}), which weights-only loading refuses')
    if head == b'PK\x03\x04':
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                return f'corrupt torch archive (bad CRC in {bad})'
        except (zipfile.BadZipFile, OSError, EOFError) as ze:
            return f'truncated or corrupt torch archive ({ze})'
        return f'corrupt torch file ({detail[:300]})'
    if head[:1] == b'\x80':
        return 'not a PyTorch checkpoint (a plain pickle, or a legacy torch file torch ' \
               'cannot read)'
    return 'not a PyTorch checkpoint (neither a torch zip archive nor a pickle)'


def read_checkpoint(path: str) -> Any:
    """``torch.load`` (weights_only, exports allowed) with errors that name the file."""
    if not isinstance(path, str) or not path:
        raise QuantizedCheckpointError(f'{path!r}: not a file path')
    if not osp.exists(path):
        raise checkpoint_error(path, 'no such file')
    if not osp.isfile(path):
        raise checkpoint_error(path, 'not a regular file')
    if osp.getsize(path) == 0:
        raise checkpoint_error(path, 'empty file (0 bytes)')
    allow_exports()
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except QuantizedCheckpointError as e:
        raise checkpoint_error(path, str(e)) from None
    except Exception as e:  # noqa: BLE001  torch raises many types; name the file
        problem = _classify_load_error(path, e)
    raise checkpoint_error(path, problem)


def load_quantized_checkpoint(path: str) -> dict:
    """Reads and checks an export; ``QuantizedCheckpointError`` on any problem."""
    ckpt = read_checkpoint(path)
    validate_export(ckpt, path)
    unpacked_state(ckpt, path)  # the packed codes decode
    return ckpt


def load_quantized_model(cfg, path: str, device: str = 'cpu') -> nn.Module:
    """Builds ``cfg.model`` and loads the export ``path`` into it (no calibration)."""
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    ckpt = load_quantized_checkpoint(path)
    model = MODELS.build(cfg.model)
    prepare_model_for_export(model, ckpt, path)
    model.load_state_dict(ckpt['state_dict'], strict=True)
    if ckpt['meta'].get('dataset_meta') is not None:
        model.dataset_meta = ckpt['meta']['dataset_meta']
    return model.to(device).eval()


# ----------------------------------------------------------------------- tools/export
def _is_quant_hook(h: Any) -> bool:
    t = h.get('type') if isinstance(h, dict) else None
    return t == 'MultipointQuantHook' or getattr(t, '__name__', None) == 'MultipointQuantHook'


def quantize_and_export(cfg, checkpoint: str, out: str, work_dir: str | None = None) -> dict:
    """Loads ``checkpoint`` into ``cfg``'s model, quantizes it with the config's
    MultipointQuantHook (one with default settings if it has none) and writes the
    export ``out``; the test set is not evaluated. Returns the export's meta['mpq']."""
    from mmengine.runner import Runner
    allow_exports()
    cfg = copy.deepcopy(cfg)
    hooks = list(cfg.get('custom_hooks') or [])
    found = [i for i, h in enumerate(hooks) if _is_quant_hook(h)]
    if not found:
        log('mpq export: the config has no MultipointQuantHook; using its defaults')
        hooks.append(dict(type='MultipointQuantHook'))
        found = [len(hooks) - 1]
    hooks[found[0]] = dict(hooks[found[0]], export=out)
    cfg.custom_hooks = hooks
    cfg.load_from = checkpoint
    cfg.resume = False
    if work_dir is not None:
        cfg.work_dir = work_dir
    if isinstance(checkpoint, str) and osp.exists(out) and osp.exists(checkpoint) and \
            osp.samefile(out, checkpoint):
        raise ValueError(f'OUT {out} is the source checkpoint; refusing to overwrite it')
    runner = Runner.from_cfg(cfg)
    runner.load_or_resume()  # after_load_checkpoint: rebuilds an export given as input
    hook = next(h for h in runner.hooks if type(h).__name__ == 'MultipointQuantHook')
    if hook.loaded_export is not None:  # the input is already an export: rewrite it
        meta = hook.loaded_export
        return save_quantized_checkpoint(runner.model, out, source=checkpoint,
                                         settings=meta.get('settings'),
                                         report=meta.get('report'))
    hook._quantize(runner)
    return load_quantized_checkpoint(out)['meta']['mpq']
