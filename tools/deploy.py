"""Write a quantized one-stage detector as an int8 QDQ ONNX graph for onnxruntime.

    python tools/deploy.py CONFIG QUANTIZED.pth --out model_int8.onnx [--fp32 model_fp32.onnx]
    python tools/deploy.py CONFIG FLOAT.pth --fp32 model_fp32.onnx [--ort-static model_ort_w8a8.onnx]

QUANTIZED.pth is an export made with 8-bit activations:
    python tools/export.py CONFIG FLOAT.pth QUANTIZED.pth \
        --cfg-options custom_hooks.0.activations.bits=8
The graph runs from the preprocessed image batch to the raw head outputs (backbone,
neck, dense head) of a one-stage detector (RetinaNet, FCOS, SSD ...; a two-stage
detector such as Faster R-CNN is refused: its RoI head runs on data-dependent
proposals); test it with ``tools/test.py CONFIG QUANTIZED.pth --onnx model_int8.onnx``.
The convs that make the raw outputs are integer too (the 8-bit range of sigmoid
scores starts at the score floor, below which mmdet drops the prior anyway);
--float-outputs keeps them float. It prints what stays float and why, the convs
onnxruntime runs as QLinearConv, and how far the raw outputs are from PyTorch's: the
max relative difference and the relative L2 difference (exit code 1 when the latter is
above --tol; exit code 2 for an input it does not cover). Both models round
activations to 8 bits; a value that lands on a rounding boundary in one and not the
other moves by one step, and such flips multiply with depth, so the max difference of
a deep net is large while its relative L2 stays small.
"""
import argparse
import sys

from mmengine.config import DictAction

import mpq_det  # noqa: F401
from mpq_det.deploy.convert import UnsupportedInput
from mpq_det.deploy.tools import deploy
from mpq_det.launch import config_with_options


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='int8 QDQ ONNX of a quantized detector')
    p.add_argument('config')
    p.add_argument('checkpoint', help='quantized export (8-bit activations), or a float checkpoint '
                                      'with --fp32 alone')
    p.add_argument('--out', help='int8 QDQ ONNX graph to write')
    p.add_argument('--fp32', metavar='OUT', help='also write the FP32 ONNX graph')
    p.add_argument('--ort-static', metavar='OUT',
                   help="onnxruntime's own quantize_static W8A8 (QDQ, per-channel) of the "
                        'FP32 graph, calibrated on the same images (the peer row)')
    p.add_argument('--float-outputs', action='store_true',
                   help='keep the convs that make the raw head outputs float (no 8-bit '
                        'rounding of the outputs; slower)')
    p.add_argument('--int8-weights', action='store_true',
                   help='store W2-W4 codes as int8 initializers instead of INT4 (for a '
                        'runtime without opset 21 INT4; the file is larger, nothing else '
                        'changes)')
    p.add_argument('--check-images', type=int, default=4)
    p.add_argument('--calib-images', type=int, help='calibration images of the inserted '
                                                    'requantizations (default: the export\'s)')
    # the trained detectors measure 0.04-0.09 (flipped roundings, extra roundings);
    # a broken graph (a wrong layout or scale) gives O(1)
    p.add_argument('--tol', type=float, default=0.2,
                   help='largest relative L2 difference of the int8 raw outputs vs PyTorch')
    p.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = p.parse_args(argv)
    if not (args.out or args.fp32 or args.ort_static):
        p.error('give --out, --fp32 and/or --ort-static')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_with_options(args.config, args.cfg_options)
    calib = None if args.calib_images is None else dict(num_images=args.calib_images)
    try:
        r = deploy(cfg, args.checkpoint, args.out, args.fp32, not args.float_outputs,
                   args.check_images, calib, args.ort_static, int4=not args.int8_weights)
    except UnsupportedInput as e:
        print(f'tools/deploy.py: error: {e}', file=sys.stderr)
        return 2
    if 'int8_max_rel_diff' in r:
        k = r['kernels']
        print(f'int8: {k["integer_convs"]} QLinearConv, {k["conv_integer"]} ConvInteger, '
              f'{k["float_convs"]} float convs; vs PyTorch: max rel diff '
              f'{r["int8_max_rel_diff"]:.3e}, relative L2 {r["int8_rel_l2_diff"]:.3e} '
              f'(tol {args.tol:g})')
    if 'fp32_max_rel_diff' in r:
        print(f'fp32: max rel diff vs PyTorch {r["fp32_max_rel_diff"]:.3e}')
    if 'ort_rel_l2_diff' in r:
        k = r['ort_kernels']
        print(f'ort W8A8: {k["integer_convs"]} QLinearConv, {k["conv_integer"]} ConvInteger, '
              f'{k["float_convs"]} float convs; vs PyTorch: max rel diff '
              f'{r["ort_max_rel_diff"]:.3e}, relative L2 {r["ort_rel_l2_diff"]:.3e}')
    if max(r.get('int8_rel_l2_diff', 0.0), r.get('ort_rel_l2_diff', 0.0)) > args.tol or \
            r.get('fp32_max_rel_diff', 0.0) > 1e-4:
        print('FAILED: above tolerance', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
