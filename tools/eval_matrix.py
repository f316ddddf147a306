"""Run tools/test.py over detectors x settings x {VOC, COCO} and print one table.

The main demo (`make demo`, tools/demo.py) runs it for FP, W4 and W3, then exports and reloads.
Every figure in the table is read back from the run's own outputs
(``metrics.json`` written by tools/test.py, ``mpq_report.json`` written by the hook).
"""
import argparse
import json
import os
import os.path as osp
import re
import subprocess
import sys

ENV = dict(os.environ)
RUNS = ('fp', 'mpq_w4', 'mpq_w3', 'mpq_w2', 'rtn_w3', 'mse_w3', 'ocs_w3', 'mpq_w3_fl8', 'rtn_w3_fl8')
DETECTORS = ('retinanet_r18q', 'fcos_r18q', 'faster_rcnn_r18q', 'ssdlite_mbv2q')


def config_of(det: str, run: str, ds: str) -> str:
    if run == 'fp':
        return f'configs/detectors/{det}_synth_{ds}.py'
    return f'configs/mpq/{det}_synth_{ds}_{run}.py'


BOTH = """_base_ = ['{base}']
# The COCO config's images and boxes, scored by COCO mAP and by VOC's 11-point mAP@0.5
# in one pass (the same numbers as the separate VOCDataset run; see README).
test_evaluator = [{{{{_base_.test_evaluator}}}},
                  dict(type='NamedVOCMetric', metric='mAP', eval_mode='11points')]
"""


# what a streamed run shows: progress (calibration bar, test loop) and results
SHOW = re.compile(r'task/s|Epoch\(test\)|MultipointQuantHook:|bbox_mAP |\| mAP|mAP:|summary:')


def _run_logged(cmd: list, log: str, stream: bool) -> int:
    """Runs cmd with its output in ``log``; with ``stream`` the progress and result
    lines are also shown as they come."""
    with open(log, 'wb') as f:
        if not stream:
            return subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
        pending = b''
        while True:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            f.write(chunk)
            pending += chunk
            *parts, pending = re.split(rb'[\r\n]', pending)
            for part in parts:
                text = part.decode(errors='replace')
                if SHOW.search(text):
                    end = '\r' if 'task/s' in text else '\n'
                    print('    ' + text.strip()[-150:], end=end, flush=True)
        return proc.wait()


def run_one(det: str, run: str, ds: str, work_root: str, extra: list,
            checkpoint: str | None = None, tag: str | None = None,
            stream: bool = False) -> dict:
    """tools/test.py of one detector x run x dataset; returns its metrics and, for a
    quantized run, the hook's report summary. ``checkpoint`` defaults to the committed
    one; ``tag`` names the work dir (default: the run)."""
    tag = tag or run
    wd = osp.join(work_root, det, f'{tag}_{ds}')
    config = config_of(det, run, 'coco' if ds == 'both' else ds)
    if ds == 'both':
        os.makedirs(wd, exist_ok=True)
        config_both = osp.join(wd, 'config_both.py')
        with open(config_both, 'w') as f:
            f.write(BOTH.format(base=osp.abspath(config)))
        config = config_both
    cmd = [sys.executable, 'tools/test.py', config,
           checkpoint or f'data/checkpoints/{det}.pth', '--work-dir', wd] + extra
    print('$', ' '.join(cmd), flush=True)
    os.makedirs(work_root, exist_ok=True)
    log = osp.join(work_root, f'{det}_{tag}_{ds}.log')
    rc = _run_logged(cmd, log, stream)
    if rc != 0:
        raise SystemExit(f'{" ".join(cmd)} failed (exit {rc}); see {log}')
    out = json.load(open(osp.join(wd, 'metrics.json')))
    rep = osp.join(wd, 'mpq_report.json')
    if run != 'fp' and osp.exists(rep):
        out['summary'] = json.load(open(rep))['summary']
    out['work_dir'] = wd
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--detectors', nargs='+', default=['retinanet_r18q'], choices=DETECTORS)
    p.add_argument('--runs', nargs='+', default=['fp', 'mpq_w4', 'mpq_w3'], choices=RUNS)
    p.add_argument('--datasets', nargs='+', default=['both'], choices=['voc', 'coco', 'both'],
                   help="'both': one run of the COCO config scored by COCO and VOC metrics")
    p.add_argument('--work-dir', default='work_dirs/eval_matrix')
    p.add_argument('--out', help='also write the table as markdown here')
    p.add_argument('--cfg-options', nargs='+', default=[], help='passed to every quantized run')
    p.add_argument('--threads', type=int, default=None,
                   help='OMP_NUM_THREADS of each run (default: inherit)')
    a = p.parse_args()
    if a.threads:
        ENV['OMP_NUM_THREADS'] = str(a.threads)
    rows = []
    for det in a.detectors:
        for run in a.runs:
            res = {ds: run_one(det, run, ds, a.work_dir,
                               ['--cfg-options', *a.cfg_options] if a.cfg_options and run != 'fp'
                               else []) for ds in a.datasets}
            s = next((r['summary'] for r in res.values() if 'summary' in r), None)
            rows.append(dict(
                detector=det, run=run,
                voc=res.get('voc', res.get('both', {})).get('pascal_voc/mAP'),
                coco=res.get('coco', res.get('both', {})).get('coco/bbox_mAP'),
                coco50=res.get('coco', res.get('both', {})).get('coco/bbox_mAP_50'),
                bpw=None if s is None else s['bits_per_weight'],
                mem=None if s is None else s['memory_overhead'],
                comp=None if s is None else s.get('compute_overhead'),
                # as deployed on the hook's target (int8: merged points are one row)
                mem_t=None if s is None else s.get('memory_overhead_deployed'),
                comp_t=None if s is None else s.get('compute_overhead_deployed'),
                qtime=None if s is None else s['quant_time_s'],
                ctime=None if s is None else s['calib_and_quant_time_s']))
    f = lambda v, fmt: '-' if v is None else format(v, fmt)  # noqa: E731
    lines = ['| detector | run | VOC mAP@0.5 (x100) | COCO mAP (x100) | COCO mAP50 (x100) | '
             'bits/weight | mem overhead | compute overhead | quant s | calib+quant s | '
             'mem on target | compute on target |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(
            f"| {r['detector']} | {r['run']} | {f(r['voc'] and 100 * r['voc'], '.2f')} | "
            f"{f(r['coco'] and 100 * r['coco'], '.2f')} | {f(r['coco50'] and 100 * r['coco50'], '.2f')} | "
            f"{f(r['bpw'], '.3f')} | {f(r['mem'], '.2%')} | {f(r['comp'], '.2%')} | "
            f"{f(r['qtime'], '.2f')} | "
            f"{f(r['ctime'], '.2f')} | {f(r['mem_t'], '.2%')} | {f(r['comp_t'], '.2%')} |")
    table = '\n'.join(lines)
    print(table)
    if a.out:
        with open(a.out, 'w') as fh:
            fh.write(table + '\n')


if __name__ == '__main__':
    main()
