"""Differences between two tools/eval_matrix.py tables (--out markdown), run by run:
the second minus the first, VOC / COCO mAP (x100), and the mean COCO change per run.

    python experiments/point_scales/compare.py FIRST.md SECOND.md
"""
import sys

NAMES = {'retinanet_r18q': 'RetinaNet r18q', 'fcos_r18q': 'FCOS r18q',
         'faster_rcnn_r18q': 'Faster R-CNN r18q', 'ssdlite_mbv2q': 'SSDLite'}


def read(path):
    """{(detector, run): (VOC, COCO)} of an eval_matrix table."""
    out = {}
    for line in open(path):
        c = [x.strip() for x in line.strip().strip('|').split('|')]
        if len(c) >= 4 and c[0] in NAMES:
            out[c[0], c[1]] = (float(c[2]), float(c[3]))
    return out


def main(first, second):
    a, b = read(first), read(second)
    keys = [k for k in b if k in a]
    runs = list(dict.fromkeys(r for _, r in keys))
    dets = list(dict.fromkeys(d for d, _ in keys))
    print('| detector | ' + ' | '.join(runs) + ' |')
    print('|---' * (len(runs) + 1) + '|')
    for d in dets:
        cells = []
        for r in runs:
            if (d, r) not in a or (d, r) not in b:
                cells.append('-')
                continue
            dv, dc = (y - x for x, y in zip(a[d, r], b[d, r]))
            cells.append(f'{dv:+.2f} / {dc:+.1f}')
        print(f'| {NAMES[d]} | ' + ' | '.join(cells) + ' |')
    print()
    print('| run | mean COCO change | detectors |')
    print('|---|---|---|')
    for r in runs:
        ds = [b[d, r][1] - a[d, r][1] for d in dets if (d, r) in a and (d, r) in b]
        print(f'| {r} | {sum(ds) / len(ds):+.2f} | {len(ds)} |')


if __name__ == '__main__':
    main(*sys.argv[1:3])
