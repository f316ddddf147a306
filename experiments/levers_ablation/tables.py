"""The two ablation tables (W3 and W2) from the runs' own outputs: metrics.json from
tools/test.py and mpq_report.json from the hook, under the work dir of run.sh.

    python experiments/levers_ablation/tables.py work_dirs/experiments/levers
"""
import json
import sys

R = sys.argv[1] if len(sys.argv) > 1 else 'work_dirs/experiments/levers'
DETS = [('retinanet_r18q', 'RetinaNet r18q'), ('faster_rcnn_r18q', 'Faster R-CNN r18q'),
        ('fcos_r18q', 'FCOS r18q'), ('ssdlite_mbv2q', 'SSDLite')]
ABL = [('A', 'A: no feedback, memory budget only'), ('B', 'B: no feedback'),
       ('C', 'C: memory budget only'), ('D', 'D: no act-order'),
       ('E', "E: feedback 'first', 1 point"), ('F', 'F: defaults'),
       ('G', 'G: + bias correction'), ('S', 'S: + sequential (blocks)'),
       ('SC', "SC: + sequential ('components')")]


def get(cfg, det, run):
    wd = f'{R}/{cfg}/{det}/{run}_both'
    try:
        m = json.load(open(f'{wd}/metrics.json'))
        s = json.load(open(f'{wd}/mpq_report.json'))['summary']
    except FileNotFoundError:
        return None
    return dict(voc=100 * m['pascal_voc/mAP'], coco=100 * m['coco/bbox_mAP'],
                mem=100 * s['memory_overhead'], comp=100 * s['compute_overhead'])


def main():
    for run, bb in (('mpq_w3', 'W3, budget 0.05'), ('mpq_w2', 'W2, budget 0.10')):
        print(f'{bb}: VOC / COCO (x100) (memory / compute overhead)\n')
        print('| run | ' + ' | '.join(l for _, l in DETS) + ' | mean COCO |')
        print('|---' * (len(DETS) + 2) + '|')
        for c, l in ABL:
            cells, cs = [], []
            for det, _ in DETS:
                v = get(c, det, run)
                if v is None:
                    cells.append('-')
                    continue
                cs.append(v['coco'])
                cells.append(f"{v['voc']:.2f} / {v['coco']:.1f} ({v['mem']:.1f}%, "
                             f"{v['comp']:.1f}%)")
            mean = f'{sum(cs) / len(cs):.2f}' if len(cs) == len(DETS) else '-'
            print(f'| {l} | ' + ' | '.join(cells) + f' | {mean} |')
        print()


if __name__ == '__main__':
    main()
