"""Prototype: min/max, shrink 0.7 / 0.5, activation MSE and the score-space diagonal
criterion, each with and without folding the layer's mean output shift on the
calibration images into its bias; RetinaNet W4A4, the 500 test images.

    python experiments/a4_ranges/criteria_bias_correction.py
"""
import sys, time, copy, torch
sys.path.insert(0, 'experiments/a4_ranges')
from probe import *
torch.set_num_threads(1)
det = sys.argv[1] if len(sys.argv) > 1 else 'retinanet_r18q'
N = int(sys.argv[2]) if len(sys.argv) > 2 else 500
cfg, runner, fp = setup(det, N, '/tmp/probe500_' + det)
print(det, 'fp', ['%.2f' % v for v in evaluate(runner, copy.deepcopy(fp))], flush=True)
for proto, kw in [('lit', LIT), ('ours', {})]:
    m0, res, tq = quantize(fp, cfg, bits=4, activations=dict(bits=4), **kw)
    allq = list(qlayers(m0))
    names = [n for n in allq if n != 'backbone.conv1']
    st = collect(fp, cfg, allq)
    bits = {n: (8 if n == 'backbone.conv1' else 4) for n in st}
    P = collect_prop(fp, cfg, names, score, {n: st[n][:2] for n in names}, F)
    R = {}
    R['minmax'] = {n: st[n][:2] for n in allq}
    R['shrink0.7'] = {n: (st[n][0] * (1 if n == 'backbone.conv1' else .7), st[n][1] * (1 if n == 'backbone.conv1' else .7)) for n in allq}
    R['shrink0.5'] = {n: (st[n][0] * (1 if n == 'backbone.conv1' else .5), st[n][1] * (1 if n == 'backbone.conv1' else .5)) for n in allq}
    R['mse'] = {n: search(st[n][2], *st[n][:2], factors=F)[1:] if n != 'backbone.conv1' else st[n][:2] for n in allq}
    R['sdiag'] = {n: P[n][0][int(torch.argmin(P[n][2]))] if n != 'backbone.conv1' else st[n][:2] for n in allq}
    for k, r in R.items():
        for bc in (False, True):
            if bc and k in ('minmax',):
                continue
            m = copy.deepcopy(m0); set_ranges(m, r, bits)
            if bc:
                act_bias_correct(m, fp, cfg, allq)
            print(det, proto, k, 'bc' if bc else '', ['%.2f' % v for v in evaluate(runner, m)], flush=True)
