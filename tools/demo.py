"""The main demo (`make demo`): a trained detector, FP against multipoint W4 and W3,
then the W4 model exported with tools/export.py and reloaded with tools/test.py.

    python tools/demo.py [--detector retinanet_r18q] [--work-dir work_dirs/demo]

Each step is a user's command (printed as it runs; its full log is in the work dir).
Every run scores the 500 synthetic test images with COCO mAP and VOC mAP@0.5 in one
pass. The table is read back from the runs' own outputs; the demo fails if the
reloaded export does not give the in-memory W4 model's mAP exactly.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import subprocess
import sys
import time

from eval_matrix import DETECTORS, config_of, run_one


def mib(path: str) -> float:
    return os.path.getsize(path) / 2 ** 20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--detector', default='retinanet_r18q', choices=DETECTORS)
    p.add_argument('--work-dir', default='work_dirs/demo')
    a = p.parse_args()
    det, wd = a.detector, a.work_dir
    t0 = time.perf_counter()
    ckpt = f'data/checkpoints/{det}.pth'
    res = {run: run_one(det, run, 'both', wd, [], stream=True)
           for run in ('fp', 'mpq_w4', 'mpq_w3')}
    q = osp.join(wd, f'{det}_mpq_w4.pth')
    cmd = [sys.executable, 'tools/export.py', config_of(det, 'mpq_w4', 'coco'), ckpt, q,
           '--work-dir', osp.join(wd, det, 'export')]
    print('$', ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    res['mpq_w4 reloaded'] = run_one(det, 'mpq_w4', 'both', wd, [], checkpoint=q,
                                     tag='mpq_w4_reloaded', stream=True)
    files = {'fp': ckpt, 'mpq_w4 reloaded': q}

    def cell(v, fmt):
        return '-' if v is None else format(v, fmt)
    lines = [f'{det}: 500 synthetic test images',
             '| run | VOC mAP@0.5 (x100) | COCO mAP (x100) | bits/weight | file MiB | '
             'quant s | calib+quant s |', '|---|---|---|---|---|---|---|']
    for run, r in res.items():
        s = r.get('summary') or {}
        f = files.get(run)
        lines.append(f"| {run} | {100 * r['pascal_voc/mAP']:.2f} | {100 * r['coco/bbox_mAP']:.2f} | "
                     f"{cell(s.get('bits_per_weight'), '.3f')} | {cell(f and mib(f), '.3f')} | "
                     f"{cell(s.get('quant_time_s'), '.2f')} | "
                     f"{cell(s.get('calib_and_quant_time_s'), '.2f')} |")
    print('\n'.join(lines))
    same = all(res['mpq_w4'][k] == res['mpq_w4 reloaded'][k]
               for k in ('pascal_voc/mAP', 'coco/bbox_mAP'))
    print(f"reloaded export vs in-memory W4: {'identical mAP' if same else 'DIFFERENT mAP'} "
          f"(VOC {res['mpq_w4']['pascal_voc/mAP']} vs {res['mpq_w4 reloaded']['pascal_voc/mAP']}, "
          f"COCO {res['mpq_w4']['coco/bbox_mAP']} vs {res['mpq_w4 reloaded']['coco/bbox_mAP']})")
    for run in ('mpq_w4', 'mpq_w3'):
        print(f"per-layer picture of {run}: {osp.join(res[run]['work_dir'], 'mpq_report.png')}")
    print(f'demo wall time {time.perf_counter() - t0:.0f} s')
    return 0 if same else 1


if __name__ == '__main__':
    sys.exit(main())
