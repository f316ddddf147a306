"""onnxruntime glue: sessions, integer kernels in the optimized graph, and a hook that
runs a detector's backbone + neck + dense head in onnxruntime under tools/test.py
(mmdet does the preprocessing, post-processing, NMS and metrics)."""
from __future__ import annotations

import os
import os.path as osp
import tempfile
from collections import Counter

import numpy as np
import torch
from mmengine.hooks import Hook
from mmdet.registry import HOOKS
from torch import Tensor

from ..export import log, unwrap_model
from .convert import UnsupportedInput, raw_outputs, require_one_stage

# metadata_props of the graphs tools/deploy.py writes: where they come from
SOURCE_CONFIG = 'mpq_det.config'
SOURCE_CHECKPOINT = 'mpq_det.checkpoint'

# op types of the optimized graph (any domain: onnxruntime rewrites to NHWC/NCHWc ops)
INTEGER_CONV_OPS = ('QLinearConv',)
FLOAT_CONV_OPS = ('Conv', 'FusedConv')


def make_session(path: str, threads: int = 1, optimized_path: str | None = None,
                 level: str = 'all'):
    """An onnxruntime CPU session, ``threads`` intra-op threads, sequential execution;
    ``optimized_path`` saves the graph as onnxruntime optimized it."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = {
        'all': ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        'extended': ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        'basic': ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}[level]
    opts.log_severity_level = 3
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    return ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])


def run_session(sess, inputs: Tensor) -> list[np.ndarray]:
    return sess.run(None, {sess.get_inputs()[0].name: inputs.detach().cpu().numpy()})


def op_counts(onnx_path: str) -> Counter:
    import onnx
    return Counter(nd.op_type for nd in onnx.load(onnx_path).graph.node)


def integer_kernel_counts(path: str, threads: int = 1) -> dict:
    """Convolutions of onnxruntime's optimized graph of ``path`` (ORT_ENABLE_ALL, the
    level the benchmark runs): integer (QLinearConv), ConvInteger, float."""
    with tempfile.TemporaryDirectory() as tmp:
        opt = osp.join(tmp, 'optimized.onnx')
        make_session(path, threads, optimized_path=opt)
        ops = op_counts(opt)
    return dict(integer_convs=sum(ops[o] for o in INTEGER_CONV_OPS),
                conv_integer=ops['ConvInteger'],
                float_convs=sum(ops[o] for o in FLOAT_CONV_OPS),
                ops=dict(sorted(ops.items())))


# ------------------------------------------------------------------ tools/test.py
def _regroup(flat: list[Tensor], num_levels: int) -> tuple[list[Tensor], ...]:
    """The flattened raw outputs back into the head's (outputs per kind, per level)."""
    if len(flat) % num_levels:
        raise ValueError(f'{len(flat)} ONNX outputs do not split into {num_levels} levels')
    return tuple(flat[i:i + num_levels] for i in range(0, len(flat), num_levels))


def attach_onnx(model: torch.nn.Module, path: str, threads: int = 1,
                model_desc: str = 'the model') -> None:
    """Makes ``model`` (an mmdet one-stage detector) run its backbone, neck and dense
    head as the ONNX graph ``path`` (raw outputs in ``flatten_outputs`` order);
    preprocessing and ``predict_by_feat`` (decoding, NMS) stay in mmdet. A graph that
    does not fit ``model`` (``model_desc`` names it) is refused (``check_graph_fits``)."""
    det = unwrap_model(model)
    require_one_stage(det, 'an ONNX graph run by OnnxRuntimeHook')
    if getattr(det, 'bbox_head', None) is None:
        raise UnsupportedInput(f'{type(det).__name__} has no dense bbox_head, whose raw '
                               'outputs an ONNX graph run by OnnxRuntimeHook replaces')
    if not osp.isfile(path):
        raise FileNotFoundError(f'ONNX file {path} does not exist')
    sess = make_session(path, threads)
    check_graph_fits(sess, path, det, model_desc)
    num_levels = det.bbox_head.prior_generator.num_levels

    def head_forward(x: Tensor):
        outs = [torch.from_numpy(o) for o in run_session(sess, x)]
        return _regroup(outs, num_levels)
    det.extract_feat = lambda inputs: inputs  # the graph starts from the image batch
    det.bbox_head.forward = head_forward
    det.onnx_session = sess


# the dummy batch's height and width where the graph leaves them free: divisible by
# the coarsest pyramid stride of the repo's detectors (128)
FIT_CHECK_SIZE = 128


def check_graph_fits(sess, path: str, model: torch.nn.Module, model_desc: str) -> None:
    """Refuses (UnsupportedInput) a graph whose raw outputs on a dummy batch differ
    from ``model``'s in number or in shape (channels, height, width): a graph written
    for another detector (other classes, channels or pyramid levels) would otherwise
    run the whole test and score near zero. Names the graph's source when
    tools/deploy.py recorded it."""
    dims = sess.get_inputs()[0].shape
    shape = [d if isinstance(d, int) and d > 0 else free
             for d, free in zip(dims, (1, 3, FIT_CHECK_SIZE, FIT_CHECK_SIZE))]
    x = torch.zeros(shape)
    meta = sess.get_modelmeta().custom_metadata_map
    source = (f' (tools/deploy.py wrote it from {meta[SOURCE_CONFIG]} and '
              f'{meta[SOURCE_CHECKPOINT]})' if SOURCE_CONFIG in meta else '')
    where = f'ONNX graph {path}{source} does not fit {model_desc}'
    def dims(t) -> str:
        return 'x'.join(map(str, t.shape[1:]))
    batch = 'x'.join(map(str, shape))
    try:
        got = [dims(o) for o in run_session(sess, x)]
    except Exception as e:  # noqa: BLE001  onnxruntime raises its own error types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UnsupportedInput(f'{where}: onnxruntime cannot run it on a {batch} batch '
                               f'({first})') from None
    want = [dims(t) for t in raw_outputs(model, x)]
    if got == want:
        return
    if len(got) != len(want):
        what = (f'the graph has {len(got)} raw outputs, the model\'s head {len(want)} '
                f'(graph {got}, model {want})')
    else:
        i = next(i for i, (g, w) in enumerate(zip(got, want)) if g != w)
        what = f'raw output {i} (of {len(got)}) is {got[i]} in the graph and {want[i]} in the model'
    raise UnsupportedInput(f'{where}: {what} (channels x height x width, on a {batch} '
                           'batch); it was written for another detector (other classes, '
                           'channels or pyramid levels)')


@HOOKS.register_module()
class OnnxRuntimeHook(Hook):
    """``custom_hooks = [dict(type='OnnxRuntimeHook', onnx='model_int8.onnx')]``:
    test with the ONNX graph instead of the PyTorch backbone, neck and head (after
    MultipointQuantHook, which has a higher priority, rebuilt the model). A graph
    that does not fit the model is refused before the test loop starts."""
    priority = 'LOWEST'

    def __init__(self, onnx: str, threads: int = 1):
        self.onnx = onnx
        self.threads = int(threads)

    def before_test(self, runner) -> None:
        cfg = runner.cfg
        desc = (f'the model of {getattr(cfg, "filename", None) or "the config"} '
                f'(checkpoint {cfg.get("load_from")})')
        attach_onnx(runner.model, self.onnx, self.threads, desc)
        log(f'OnnxRuntimeHook: backbone, neck and head run in onnxruntime from '
            f'{self.onnx} ({self.threads} thread(s)); mmdet post-processes')


def file_mib(path: str) -> float:
    return os.path.getsize(path) / 2 ** 20


# ------------------------------------------------------------------ benchmarking
def time_graphs(paths: dict[str, str], inputs: np.ndarray, threads: int, warmup: int = 3,
                repeats: int = 20) -> dict[str, list[float]]:
    """Seconds per run of each graph on the same input, in this process. The graphs
    take turns run by run, so that load from other processes hits them alike."""
    import time
    sessions = {k: make_session(p, threads) for k, p in paths.items()}
    feed = {k: {s.get_inputs()[0].name: inputs} for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(warmup):
            s.run(None, feed[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feed[k])
            times[k].append(time.perf_counter() - t0)
    return times


_PEAK_SCRIPT = '''
import numpy as np, onnxruntime as ort
def hwm():  # peak resident set (kB); ru_maxrss would carry the parent's peak over exec
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))
x = np.random.default_rng(0).standard_normal({shape}).astype(np.float32)
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak to the current size
base = hwm()
o = ort.SessionOptions(); o.intra_op_num_threads = {threads}; o.log_severity_level = 3
s = ort.InferenceSession({path!r}, o, providers=['CPUExecutionProvider'])
s.run(None, {{s.get_inputs()[0].name: x}})
print((hwm() - base) / 1024)
'''


def peak_memory_mib(path: str, shape: tuple[int, ...], threads: int = 1) -> float:
    """Peak resident memory that loading ``path`` in onnxruntime and one run add, in a
    fresh process (MiB; peak RSS after minus before, the input already allocated; Linux)."""
    import subprocess
    import sys
    code = _PEAK_SCRIPT.format(shape=tuple(shape), threads=int(threads), path=path)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       env=env, timeout=1800)
    if r.returncode:
        raise RuntimeError(f'peak memory run of {path} failed: {r.stderr[-2000:]}')
    return float(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------- onnxruntime's own quantization
def ort_quantize_static(fp32_path: str, out_path: str, batches: list[np.ndarray],
                        per_channel: bool = True) -> str:
    """onnxruntime's own post-training quantization of an FP32 graph (the peer row):
    ``quant_pre_process`` (shape inference and graph optimization, without which its
    int8 graph ran slower than FP32), then ``quantize_static`` in the QDQ format,
    W8A8 with per-channel int8 weights and uint8 activations (the u8s8 kernels our
    graph uses too), MinMax ranges over ``batches`` (preprocessed image batches).
    Writes ``out_path`` and returns it."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                          QuantFormat, QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = make_session(fp32_path).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(batches)

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {name: np.ascontiguousarray(x, np.float32)}

    with tempfile.TemporaryDirectory() as tmp:
        pre = osp.join(tmp, 'preprocessed.onnx')
        quant_pre_process(fp32_path, pre)
        quantize_static(pre, out_path, Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return out_path
