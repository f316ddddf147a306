"""Prints the README's issue-9 tables from the runs' own outputs (metrics.json from
tools/test.py, mpq_report.json from the hook) under work_dirs/final (see batch_*.sh)."""
import json
import sys

R = sys.argv[1] if len(sys.argv) > 1 else 'work_dirs/final'
DETS = [('retinanet_r18q', 'RetinaNet r18q'), ('faster_rcnn_r18q', 'Faster R-CNN r18q'),
        ('fcos_r18q', 'FCOS r18q'), ('ssdlite_mbv2q', 'SSDLite')]
ABL = [('A', 'A: no feedback, memory budget only'), ('B', 'B: no feedback'),
       ('C', 'C: memory budget only'), ('D', 'D: no act-order'),
       ('E', "E: feedback 'first', 1 point"), ('matrix', 'F: defaults'),
       ('G', 'G: + bias correction'), ('S', 'S: + sequential (blocks)'),
       ('SC', "SC: + sequential ('components')")]
TARGET = {'mpq_w4': (0.3, 0.6), 'mpq_w3': (1.0, 2.0), 'mpq_w2': (4.0, 6.0)}


def get(cfg, det, run):
    wd = f'{R}/{cfg}/{det}/{run}_both'
    try:
        m = json.load(open(f'{wd}/metrics.json'))
    except FileNotFoundError:
        return None
    out = dict(voc=100 * m['pascal_voc/mAP'], coco=100 * m['coco/bbox_mAP'])
    try:
        s = json.load(open(f'{wd}/mpq_report.json'))['summary']
        out.update(mem=100 * s['memory_overhead'], comp=100 * s['compute_overhead'],
                   q=s['quant_time_s'], cq=s['calib_and_quant_time_s'])
    except FileNotFoundError:
        pass
    return out


MATRIX = ('fp', 'mpq_w4', 'mpq_w3', 'mpq_w2', 'rtn_w3', 'mse_w3', 'ocs_w3', 'mpq_w3_fl8',
          'rtn_w3_fl8')


def matrix_table():
    """tools/eval_matrix.py's table, read back from the matrix runs."""
    print('| detector | run | VOC mAP@0.5 (x100) | COCO mAP (x100) | COCO mAP50 (x100) | '
          'bits/weight | mem overhead | compute overhead | quant s | calib+quant s |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for det, _ in DETS:
        for run in MATRIX:
            wd = f'{R}/matrix/{det}/{run}_both'
            try:
                m = json.load(open(f'{wd}/metrics.json'))
            except FileNotFoundError:
                continue
            cells = [f"{100 * m['pascal_voc/mAP']:.2f}", f"{100 * m['coco/bbox_mAP']:.2f}",
                     f"{100 * m['coco/bbox_mAP_50']:.2f}"]
            try:
                s = json.load(open(f'{wd}/mpq_report.json'))['summary']
                cells += [f"{s['bits_per_weight']:.3f}", f"{100 * s['memory_overhead']:.2f}%",
                          f"{100 * s['compute_overhead']:.2f}%", f"{s['quant_time_s']:.2f}",
                          f"{s['calib_and_quant_time_s']:.2f}"]
            except FileNotFoundError:
                cells += ['-'] * 5
            print(f'| {det} | {run} | ' + ' | '.join(cells) + ' |')
    print()


def main():
    matrix_table()
    print('| detector | bits (budget) | FP VOC / COCO | VOC / COCO | loss VOC / COCO '
          '(target) | met | mem / compute overhead | quant s / calib+quant s |')
    print('|---|---|---|---|---|---|---|---|')
    for det, label in DETS:
        fp = get('matrix', det, 'fp')
        for run, bb in (('mpq_w4', 'W4 (0.05)'), ('mpq_w3', 'W3 (0.05)'),
                        ('mpq_w2', 'W2 (0.10)')):
            a = get('matrix', det, run)
            if a is None or fp is None:
                print(f'| {label} | {bb} | - | - | - | - | - | - |')
                continue
            lv, lc = fp['voc'] - a['voc'], fp['coco'] - a['coco']
            tv, tc = TARGET[run]
            met = 'yes' if lv <= tv + 1e-9 and lc <= tc + 1e-9 else 'no'
            print(f"| {label} | {bb} | {fp['voc']:.2f} / {fp['coco']:.1f} | "
                  f"{a['voc']:.2f} / {a['coco']:.1f} | {lv:.2f} / {lc:.1f} ({tv} / {tc}) "
                  f"| {met} | {a['mem']:.1f}% / {a['comp']:.1f}% | {a['q']:.2f} / {a['cq']:.2f} |")
    print()
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
