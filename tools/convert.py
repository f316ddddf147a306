"""Convert a quantized checkpoint (tools/export.py, or the hook's ``export=``).

    python tools/convert.py CONFIG QUANTIZED.pth --to-float FLOAT.pth
    python tools/convert.py CONFIG QUANTIZED.pth --to-expanded EXPANDED.pt --onnx NET.onnx

--to-float     dequantized float checkpoint; plain mmdet loads it without mpq_det.
--to-expanded  the common-operands model (integer-weight convs + scale-and-sum), a
               torch.save'd nn.Module: torch.load(path, weights_only=False)['model'].
--onnx         the network up to the raw head outputs in common operands, checked
               in onnxruntime (needs onnx + onnxruntime); a float graph: an export
               that fake-quantizes activations is written and checked with that off
               (the int8 graph with 8-bit activations: tools/deploy.py).
Each output is checked against the quantized model's raw outputs on the first test
image; the max relative difference is printed, and the exit code is 1 above --tol
(2 for an input it does not cover: --onnx of a two-stage detector, --to-float of an
export with activation quantization).
"""
import argparse
import sys

from mmengine.config import DictAction

import mpq_det  # noqa: F401
from mpq_det.deploy.convert import CONVERT_TOL, UnsupportedInput, convert_export
from mpq_det.launch import config_with_options


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Convert a quantized checkpoint')
    p.add_argument('config')
    p.add_argument('checkpoint', help='quantized checkpoint (export)')
    p.add_argument('--to-float', metavar='OUT')
    p.add_argument('--to-expanded', metavar='OUT')
    p.add_argument('--onnx', metavar='OUT')
    p.add_argument('--num-images', type=int, default=1, help='images for the check')
    p.add_argument('--tol', type=float, default=CONVERT_TOL)
    p.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = p.parse_args(argv)
    if not (args.to_float or args.to_expanded or args.onnx):
        p.error('give at least one of --to-float, --to-expanded, --onnx')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_with_options(args.config, args.cfg_options)
    try:
        diffs = convert_export(cfg, args.checkpoint, to_float=args.to_float,
                               to_expanded=args.to_expanded, onnx=args.onnx,
                               num_images=args.num_images)
    except UnsupportedInput as e:
        print(f'tools/convert.py: error: {e}', file=sys.stderr)
        return 2
    bad = {k: v for k, v in diffs.items() if not v <= args.tol}
    for k, v in diffs.items():
        print(f'{k}: max rel diff vs quantized {v:.3e} (tol {args.tol:g})')
    if bad:
        print(f'FAILED: {sorted(bad)} above tol', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
