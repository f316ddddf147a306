"""Prototype: the linearized score-space error with its cross terms (full: sum over
images of (g . (Q(x) - x))^2) against its diagonal (sum g^2 (Q(x) - x)^2, what
range='fisher' minimizes), each layer's range alone; RetinaNet W4A4, 100 test images.

    python experiments/a4_ranges/criteria_full_vs_diag.py
"""
import sys, time, copy, torch
sys.path.insert(0, 'experiments/a4_ranges')
from probe import *
torch.set_num_threads(1)
det = sys.argv[1] if len(sys.argv) > 1 else 'retinanet_r18q'
cfg, runner, fp = setup(det, 100, '/tmp/probe_' + det)
for proto, kw in [('lit', LIT), ('ours', {})]:
    m0, res, tq = quantize(fp, cfg, bits=4, activations=dict(bits=4), **kw)
    names = [n for n in qlayers(m0) if n != 'backbone.conv1']
    st = collect(fp, cfg, list(qlayers(m0)))
    bits = {n: (8 if n == 'backbone.conv1' else 4) for n in st}
    t = time.time()
    P = collect_prop(fp, cfg, names, score, {n: st[n][:2] for n in names}, F)
    print('prop time', time.time() - t, flush=True)
    for crit in ('full', 'diag'):
        r = {'backbone.conv1': st['backbone.conv1'][:2]}
        fac = []
        for n in names:
            c, full, diag = P[n]
            i = int(torch.argmin(full if crit == 'full' else diag))
            r[n] = c[i]; fac.append('%.2f/%.2f' % (c[i][0] / st[n][0] if st[n][0] < 0 else 1, c[i][1] / st[n][1]))
        print(proto, crit, fac)
        m = copy.deepcopy(m0); set_ranges(m, r, bits)
        print(det, proto, crit, ['%.2f' % v for v in evaluate(runner, m)], flush=True)
