"""Prototype: which outputs to weight the activation error by (Hutchinson diagonal,
one random projection per batch, 16k values per layer and batch): the neck's features,
the raw head outputs, or the score-space outputs; RetinaNet W4A4, first 100 test images.

    python experiments/a4_ranges/criteria_outputs.py
"""
import sys, time, copy, torch
sys.path.insert(0, 'experiments/a4_ranges')
from probe import *
torch.set_num_threads(1)
det = sys.argv[1] if len(sys.argv) > 1 else 'retinanet_r18q'
cfg, runner, fp = setup(det, 100, '/tmp/probe_' + det)
def neck(m, x):
    return [(f, 1.0) for f in m.extract_feat(x)]
def raw(m, x):
    cls, reg = m._forward(x)
    return [(t, 1.0) for t in cls + reg]
for proto, kw, fns in [('lit', LIT, dict(neck=neck, score=score)), ('ours', {}, dict(score=score, raw=raw))]:
    m0, res, tq = quantize(fp, cfg, bits=4, activations=dict(bits=4), **kw)
    names = list(qlayers(m0))
    st = collect(fp, cfg, names)
    bits = {n: (8 if n == 'backbone.conv1' else 4) for n in names}
    for fname, fn in fns.items():
        t = time.time()
        sens = collect_sens(fp, cfg, names, fn)
        print('sens time', time.time() - t)
        r = {}
        for n in names:
            v, g2 = sens[n]
            lo, hi = st[n][0], st[n][1]
            if n == 'backbone.conv1':
                r[n] = (lo, hi); continue
            e, l2, h2 = search(v, lo, hi, g2)
            r[n] = (l2, h2)
        print(proto, fname, 'factors', ['%.2f' % (r[n][1] / st[n][1]) for n in names])
        m = copy.deepcopy(m0); set_ranges(m, r, bits)
        print(det, proto, fname, ['%.2f' % v for v in evaluate(runner, m)], flush=True)
