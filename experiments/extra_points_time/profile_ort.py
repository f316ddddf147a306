"""Per-op and per-node time of an ONNX graph in onnxruntime (1 thread, 4 runs at
800x1344): python experiments/extra_points_time/profile_ort.py GRAPH.onnx nodes.json"""
import sys, os, json, collections, numpy as np, onnxruntime as ort
path = sys.argv[1]
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.enable_profiling = True; o.log_severity_level = 3
o.profile_file_prefix = os.path.join(os.path.dirname(os.path.abspath(sys.argv[2])), 'ort_profile')
s = ort.InferenceSession(path, o, providers=['CPUExecutionProvider'])
x = np.random.default_rng(0).standard_normal((1, 3, 800, 1344)).astype(np.float32)
for _ in range(4): s.run(None, {'inputs': x})
f = s.end_profiling()
ev = [e for e in json.load(open(f)) if e.get('cat') == 'Node' and e['name'].endswith('_kernel_time')]
by_op = collections.defaultdict(float); by_node = collections.defaultdict(float)
for e in ev:
    op = e['args'].get('op_name'); by_op[op] += e['dur'] / 4e3
    by_node[(op, e['name'][:-12])] += e['dur'] / 4e3
print('total ms/run (incl warmup avg)', sum(by_op.values()))
for k, v in sorted(by_op.items(), key=lambda t: -t[1]): print(f'  {k}: {v:.1f} ms')
json.dump({f'{k[0]}|{k[1]}': v for k, v in by_node.items()}, open(sys.argv[2], 'w'))
