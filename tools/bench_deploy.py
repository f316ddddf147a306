"""Time FP32 ONNX against int8 ONNX in onnxruntime (CPU provider), same inputs.

    python tools/bench_deploy.py --graphs retinanet_r18q FP32.onnx INT8.onnx [ORT_W8A8.onnx] \
        [--graphs NAME FP32.onnx INT8.onnx ...] [--size 256 256] [--r50] [--threads 1 2]

Per graph pair and thread count: median and spread of ``--repeats`` timed runs after
``--warmup`` runs (the two graphs take turns, in one process), file sizes, the peak
memory onnxruntime adds (a fresh process per graph), and the convolutions of the
optimized graph that run as integer kernels (QLinearConv) or in float. ``--r50``
adds mmdet's RetinaNet-R50 (random init, quantized W4A8 by our model pass at the
hook's defaults) at mmdet's test scale (800x1333, padded to 800x1344), batch 1, with
three more int8 graphs: with its head output convs float (--float-outputs of
tools/deploy.py), without the extra points (what they cost), quantized with
target='lowbit' (free point scales: extra points as rows of their own), and
onnxruntime's own quantize_static W8A8 of the FP32
graph (tools/deploy.py --ort-static, the optional 4th graph of --graphs); the last line is
``int8_speedup=<fp32 median / int8 median>`` for it at 1 thread.
"""
import argparse
import os.path as osp
import statistics
import sys

import numpy as np

import mpq_det  # noqa: F401
from mpq_det.deploy.ort import file_mib, integer_kernel_counts, peak_memory_mib, time_graphs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='FP32 vs int8 ONNX in onnxruntime')
    p.add_argument('--graphs', nargs='+', action='append', default=[],
                   metavar='NAME FP32 INT8 [ORT_W8A8]')
    p.add_argument('--size', nargs=2, type=int, default=[256, 256],
                   help='input height width of --graphs')
    p.add_argument('--r50', action='store_true', help="also mmdet's RetinaNet-R50")
    p.add_argument('--r50-size', nargs=2, type=int, default=[800, 1344])
    p.add_argument('--threads', nargs='+', type=int, default=[1, 2])
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--repeats', type=int, default=20)
    p.add_argument('--r50-repeats', type=int, default=7)
    p.add_argument('--no-memory', action='store_true', help='skip the peak memory runs')
    p.add_argument('--work-dir', default='work_dirs/bench_deploy')
    args = p.parse_args(argv)
    if not args.graphs and not args.r50:
        p.error('give --graphs and/or --r50')
    for g in args.graphs:
        if len(g) not in (3, 4):
            p.error(f'--graphs takes NAME FP32 INT8 [ORT_W8A8], got {g}')
    return args


def bench(name: str, paths: dict, shape: tuple, args, repeats: int) -> dict[int, dict]:
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    sizes = {k: file_mib(p) for k, p in paths.items()}
    kernels = {k: integer_kernel_counts(p) for k, p in paths.items()}
    mem = {} if args.no_memory else {k: peak_memory_mib(p, shape, 1) for k, p in paths.items()}
    out = {}
    for t in args.threads:
        times = time_graphs(paths, x, t, args.warmup, repeats)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[t] = med
        for k, p in paths.items():
            v = sorted(times[k])
            kc = kernels[k]
            peak = f' | peak mem {mem[k]:.0f} MiB' if mem else ''
            print(f'{name} | {k} | {t} thread(s) | median {med[k] * 1e3:.1f} ms '
                  f'(min {v[0] * 1e3:.1f}, max {v[-1] * 1e3:.1f}, n={len(v)}) | '
                  f'speedup vs fp32 {med["fp32"] / med[k]:.2f}x | file {sizes[k]:.3f} MiB '
                  f'({sizes[k] / sizes["fp32"]:.3f} of fp32){peak} | convs: '
                  f'{kc["integer_convs"]} QLinearConv, {kc["conv_integer"]} ConvInteger, '
                  f'{kc["float_convs"]} float', flush=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f'input shapes: --graphs 1x3x{args.size[0]}x{args.size[1]}, R50 '
          f'1x3x{args.r50_size[0]}x{args.r50_size[1]}; warmup {args.warmup}, '
          f'repeats {args.repeats} (R50 {args.r50_repeats})')
    for name, *graphs in args.graphs:
        paths = dict(zip(('fp32', 'int8', 'ort_w8a8'), graphs))
        bench(name, paths, (1, 3, *args.size), args, args.repeats)
    if args.r50:
        from mpq_det.deploy.tools import r50_graphs
        paths = r50_graphs(osp.join(args.work_dir, 'r50'))
        res = bench('retinanet_r50', paths, (1, 3, *args.r50_size), args, args.r50_repeats)
        for t, med in res.items():
            print(f'retinanet_r50 | {t} thread(s) | extra points cost (vs the same graph '
                  f'without them): int8 (target int8, the default) '
                  f'{med["int8"] / med["int8_one_point"] - 1:+.1%}, int8_lowbit (target '
                  f'lowbit) {med["int8_lowbit"] / med["int8_one_point"] - 1:+.1%}')
        t = min(res)  # 1 thread unless not asked
        print(f'int8_speedup={res[t]["fp32"] / res[t]["int8"]:.2f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
