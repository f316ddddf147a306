"""Test (and evaluate) a detector: mmdet's tools/test.py CLI with mpq_det loaded.

With ``MultipointQuantHook`` in the config's custom_hooks, the model is quantized
right after CHECKPOINT loads, so the printed mAP is the quantized detector's.
``--onnx GRAPH.onnx`` runs the backbone, neck and dense head of a one-stage detector
in onnxruntime instead (``OnnxRuntimeHook``; tools/deploy.py writes the graph), while
mmdet preprocesses, decodes, runs NMS and scores.
"""
import json
import os
import os.path as osp

from mmengine.dist import is_main_process
from mmengine.runner import Runner

import mpq_det  # noqa: F401  (registers the hook, metric and compat fixes)
from mpq_det.checkpoint_io import check_readable
from mpq_det.launch import finish, load_tool_cfg, tool_parser


def main() -> None:
    p = tool_parser('Test (and eval) a detector', checkpoint=True)
    p.add_argument('--out', help='dump predictions to a .pkl file')
    p.add_argument('--onnx', help='run backbone + neck + head from this ONNX graph')
    p.add_argument('--ort-threads', type=int, default=1, help='onnxruntime intra-op threads')
    args = p.parse_args()
    cfg = load_tool_cfg(args)
    if args.onnx:
        cfg.custom_hooks = list(cfg.get('custom_hooks') or []) + [
            dict(type='OnnxRuntimeHook', onnx=args.onnx, threads=args.ort_threads)]
    if '://' not in args.checkpoint:
        check_readable(args.checkpoint)  # a clear message instead of torch's zip errors
    cfg.load_from = args.checkpoint
    runner = Runner.from_cfg(cfg)
    if args.out is not None:
        from mmdet.evaluation import DumpDetResults
        assert args.out.endswith(('.pkl', '.pickle')), 'The dump file must be a pkl file.'
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    metrics = runner.test()
    # machine-readable copy of what the evaluator printed (tools/eval_matrix.py reads it)
    if is_main_process():
        os.makedirs(runner.work_dir, exist_ok=True)
        with open(osp.join(runner.work_dir, 'metrics.json'), 'w') as f:
            json.dump({k: float(v) for k, v in (metrics or {}).items()
                       if isinstance(v, (int, float))}, f, indent=1)
    finish()


if __name__ == '__main__':
    main()
