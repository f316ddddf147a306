"""Where SSDLite's W2 loss sits: the per-layer report of the default W2 run by kind of
layer, then each layer_bits probe against that run.

    python experiments/ssdlite_w2/where.py REPORT.json BASELINE.md PROBE.md ...

REPORT.json: the W2 run's mpq_report.json; BASELINE.md and the probes: tools/
eval_matrix.py tables (--out), the baseline's ssdlite_mbv2q mpq_w2 row is used.
"""
import json
import sys


def kind(r: dict) -> str:
    if r['shape'][1] == 1:
        return 'depthwise 3x3'
    if r['name'].startswith('bbox_head'):
        return 'head 1x1'
    return next((k for k in ('linear_conv', 'expand_conv', 'pointwise_conv')
                 if k in r['name']), 'other dense')


def row(path: str) -> list[str]:
    for line in open(path):
        c = [x.strip() for x in line.strip().strip('|').split('|')]
        if c[:2] == ['ssdlite_mbv2q', 'mpq_w2']:
            return c
    raise SystemExit(f'{path}: no ssdlite_mbv2q mpq_w2 row')


def main(report: str, baseline: str, *probes: str) -> None:
    layers = json.load(open(report))['layers']
    agg: dict[str, list] = {}
    for r in layers:
        a = agg.setdefault(kind(r), [0, 0, 0, 0.0, 0.0])
        a[0] += 1
        a[1] += r['weights']
        a[2] += r['scales']
        a[3] += r['rel_err_final'] or 0.0
        a[4] += r['macs_per_image']
    print('| layers | n | weights | scales (32-bit) | scale bits per weight | '
          'summed relative output error | MACs per image |')
    print('|---|---|---|---|---|---|---|')
    for k, (n, w, s, e, m) in sorted(agg.items(), key=lambda kv: -kv[1][3]):
        print(f'| {k} | {n} | {w} | {s} | {32 * s / w:.2f} | {e:.3f} | {m:.2e} |')
    print()
    print('| layers with the largest relative output error | shape | points | error |')
    print('|---|---|---|---|')
    for r in sorted(layers, key=lambda r: -(r['rel_err_final'] or 0))[:6]:
        print(f"| {r['name']} | {'x'.join(map(str, r['shape']))} | {r['points_mean']:.2f} "
              f"| {r['rel_err_final']:.4f} |")
    print()
    base = row(baseline)
    print('| run | VOC (x100) | COCO (x100) | change VOC / COCO | bits/weight |')
    print('|---|---|---|---|---|')
    print(f'| W2, defaults | {base[2]} | {base[3]} | | {base[5]} |')
    for p in probes:
        c = row(p)
        name = p.rsplit('/', 1)[-1].removeprefix('probe_').removesuffix('.md')
        print(f'| {name} | {c[2]} | {c[3]} | {float(c[2]) - float(base[2]):+.2f} / '
              f'{float(c[3]) - float(base[3]):+.1f} | {c[5]} |')


if __name__ == '__main__':
    main(*sys.argv[1:])
