"""The benchmark sweep: methods x bits x budgets (+ activations, + optimum-quanto) on
any mmdet config and checkpoint, with resume, a results table and plots.

Each cell is one ``Runner.test()`` of the config on its own test split (optionally
its first ``num_images`` images) with the cell's ``MultipointQuantHook`` (or quanto's
eager swap, or nothing for FP). A cell's figures are read back from what that run
produced: the evaluator's metrics and the hook's report. Finished cells are kept in
``results.json`` and not rerun.
"""
from __future__ import annotations

import copy
import json
import os
import os.path as osp
import time
from typing import Callable, Iterable

import torch

from .components import component_of

METHODS = ('rtn', 'mse', 'ocs', 'multipoint')
BITS = (2, 3, 4, 8)
BUDGETS = (0.0, 0.05, 0.1)
QUANTO = ('qint2', 'qint4', 'qint8')
CALIB = dict(split='train', num_images=32, batch_size=4, seed=0)


# ----------------------------------------------------------------------------- cells
def cell_id(c: dict) -> str:
    if c['kind'] != 'mpq':
        return c['kind'] if c['kind'] == 'fp' else f"quanto_{c['quanto']}"
    h = c['hook']
    s = f"{h['method']}_w{h['bits']}"
    if h['method'] in ('multipoint', 'ocs'):
        s += f"_b{h['budget']:g}"
    if act_bits(h):
        s += f"_a{act_bits(h)}"
    extra = {f'activations.{k}': v for k, v in (h.get('activations') or {}).items()
             if k != 'bits'}
    for k, v in h.items():
        if k in ('method', 'bits', 'budget', 'activations'):
            continue
        if isinstance(v, dict):   # a group of hook arguments: one label per key
            extra.update({f'{k}.{kk}': vv for kk, vv in v.items()})
        else:
            extra[k] = v
    s += ''.join(f'_{k}={v}' for k, v in sorted(extra.items()))
    return s


def act_bits(h: dict) -> int | None:
    """The activation bits of a cell's hook arguments (None: float activations)."""
    return (h.get('activations') or {}).get('bits')


def mpq(method: str, bits: int, budget: float = 0.0, group: str = 'sweep', **more) -> dict:
    return dict(kind='mpq', group=group, hook=dict(method=method, bits=bits, budget=budget,
                                                   **more))


def sweep_cells(bits: Iterable[int] = BITS, budgets: Iterable[float] = BUDGETS,
                methods: Iterable[str] = METHODS, activations: bool = True,
                quanto: Iterable[str] = QUANTO, targets: Iterable[str] = ()) -> list[dict]:
    """FP; rtn/mse at every bits; multipoint/ocs at every bits x budget; W4A8 and W8A8
    (budget 0.05) for multipoint and rtn; quanto's weight types. ``targets``: further
    deployment targets (besides the hook's default) of every multipoint cell with a
    budget: the target only changes where extra points go."""
    cells = [dict(kind='fp', group='sweep')]
    for b in bits:
        for m in methods:
            if m in ('rtn', 'mse'):
                cells.append(mpq(m, b))
            else:
                cells += [mpq(m, b, bu) for bu in budgets if not (m == 'ocs' and bu == 0)]
            if m == 'multipoint':
                cells += [mpq(m, b, bu, target=t) for t in targets for bu in budgets if bu]
    if activations:
        for b in (4, 8):
            a8 = dict(activations=dict(bits=8))
            cells += [mpq('multipoint', b, 0.05, **a8), mpq('rtn', b, **a8)]
    cells += [dict(kind='quanto', group='sweep', quanto=q) for q in quanto]
    return cells


# the activation sweep: (weight bits, activation bits, budget) settings, and the range
# methods by name (the activations group's keys besides bits)
ACT_SETTINGS = {'W4A4': (4, 4, 0.05), 'W3A4': (3, 4, 0.05), 'W2A4': (2, 4, 0.1),
                'W4A8': (4, 8, 0.05)}
ACT_RANGES = {'minmax': dict(range='minmax'), 'shrink0.7': dict(range='minmax', shrink=0.7),
              'shrink0.5': dict(range='minmax', shrink=0.5),
              'mse': dict(range='mse'), 'fisher': dict(range='fisher'),
              # the weights fitted to the inputs through the chosen ranges (ablation)
              'fisher_fitq': dict(range='fisher', fit='quantized')}
PROTOCOLS = ('ours', 'literature')


def act_cells(settings: Iterable[str] = tuple(ACT_SETTINGS),
              protocols: Iterable[str] = PROTOCOLS, ranges: Iterable[str] = tuple(ACT_RANGES),
              methods: Iterable[str] = ('multipoint',), **more) -> list[dict]:
    """Quantized activations: every setting (``ACT_SETTINGS``) x protocol x weight
    method x range method (``ACT_RANGES``), in group 'act'. rtn and mse weights take
    no budget. ``more``: further hook arguments of every cell (e.g. an ablation's
    ``stats=dict(sequential=True)``)."""
    cells = []
    for name in settings:
        wb, ab, budget = ACT_SETTINGS[name]
        for proto in protocols:
            for m in methods:
                for r in ranges:
                    cells.append(mpq(m, wb, budget if m == 'multipoint' else 0.0,
                                     group='act', protocol=proto,
                                     activations=dict(bits=ab, **ACT_RANGES[r]), **more))
    return cells


def range_label(h: dict) -> str:
    """The ``ACT_RANGES`` name of a cell's activations group (other keys appended)."""
    a = {k: v for k, v in (h.get('activations') or {}).items() if k != 'bits'}
    for name, keys in ACT_RANGES.items():
        if all(a.get(k) == v for k, v in keys.items()) and \
                all(k in keys for k in a if k in ('range', 'shrink')):
            rest = {k: v for k, v in a.items() if k not in keys}
            return name + ''.join(f' {k}={v}' for k, v in sorted(rest.items()))
    return ' '.join(f'{k}={v}' for k, v in sorted(a.items()))


def _act_row_key(r: dict) -> tuple:
    """(detector, protocol, weight bits, act bits, method, budget, other hook args):
    what a row of ``act_markdown`` holds fixed."""
    h = r['hook']
    rest = {k: v for k, v in h.items()
            if k not in ('method', 'bits', 'budget', 'activations', 'protocol')}
    return (r['detector'], h.get('protocol', 'ours'), h['bits'], act_bits(h), h['method'],
            h.get('budget'), repr(rest))


def act_markdown(rows: list[dict]) -> str:
    """The activation sweep as one table: per detector, protocol, setting and weight
    method, a column per range method with the metrics (x100) and, in brackets, the
    last metric's change against FP. A4 is simulated (onnxruntime has no 4-bit
    activation kernels)."""
    act = [r for r in rows if r['group'] == 'act' and r['metrics']]
    if not act:
        return ''
    mets = metric_names(rows)
    last = mets[-1][0]
    fp = {r['detector']: r['metrics'] for r in rows if r['kind'] == 'fp'}
    labels = list(dict.fromkeys(range_label(r['hook']) for r in act))
    table = {(_act_row_key(r), range_label(r['hook'])): r['metrics'] for r in act}
    out = [' / '.join(lab for _, lab in mets) + f' (x100); in brackets {mets[-1][1]} '
           'against FP. A4 is simulated: onnxruntime has no 4-bit activation kernels.', '',
           '| detector | protocol | setting | weights | ' + ' | '.join(labels) + ' |',
           '|---|---|---|---|' + '---|' * len(labels)]
    for key in dict.fromkeys(_act_row_key(r) for r in act):
        det, proto, wb, ab, meth, budget, rest = key
        cells = []
        for lab in labels:
            m = table.get((key, lab))
            if m is None:
                cells.append('-')
                continue
            c = ' / '.join(format(100 * m[k], '.2f') for k, _ in mets if k in m)
            if last in m and last in fp.get(det, {}):
                c += f' ({100 * (m[last] - fp[det][last]):+.2f})'
            cells.append(c)
        name = f'W{wb}A{ab}' + (f' b{budget:g}' if meth == 'multipoint' else '')
        more = '' if rest == '{}' else f' {rest}'
        out.append(f'| {det} | {proto} | {name} | {meth}{more} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(out) + '\n'


def ablation_cells(levers: dict[str, dict] | None = None) -> list[dict]:
    """Where the extra points go (output error / weight error / random, within each
    layer and across layers) at W3 b0.05 and W2 b0.1; the H forms by mAP; and each
    lever in ``levers`` ({name: hook kwargs that switch it off}) one at a time."""
    from .quant import FORMS
    cells = []
    for bits, budget in ((3, 0.05), (2, 0.1)):
        for alloc in ('layer', 'global'):
            for by in ('output', 'weight', 'random'):
                cells.append(mpq('multipoint', bits, budget, group='placement',
                                 allocation=alloc, points=dict(rank_by=by)))
        for form in FORMS:
            cells.append(mpq('multipoint', bits, budget, group='h_form',
                             stats=dict(form=form)))
        for name, off in (levers or {}).items():
            cells.append(mpq('multipoint', bits, budget, group=f'lever:{name}', **off))
    return cells


# ----------------------------------------------------------------------------- bits
def quanto_bits(model: torch.nn.Module) -> dict:
    """Effective bits per weight of a quanto-quantized model, counted as ours is: over
    every Conv2d/Linear weight of backbone, neck and heads, quanto's codes at their
    bits plus its stored scales and shifts at their dtype's bits; FP layers at 32."""
    from optimum.quanto import QModuleMixin
    total_bits = weights = 0
    for name, m in model.named_modules():
        if component_of(name) is None or not isinstance(getattr(m, 'weight', None),
                                                         torch.Tensor):
            continue
        if isinstance(m, QModuleMixin) and m.weight_qtype is not None:
            w = m.weight
            n = w.numel()
            extra = sum(t.numel() * t.element_size() * 8
                        for t in (getattr(w, '_scale', None), getattr(w, '_shift', None))
                        if t is not None)
            total_bits += n * m.weight_qtype.bits + extra
            weights += n
        elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            total_bits += 32 * m.weight.numel()
            weights += m.weight.numel()
    return dict(bits_per_weight=total_bits / max(weights, 1), weights=weights)


def points_histograms(model: torch.nn.Module) -> dict[str, list[int]]:
    """{component: channels with 1, 2, ... points} over the quantized layers."""
    from .modules import QConv2d, QLinear
    out: dict[str, list[int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, (QConv2d, QLinear)):
            h = torch.bincount(m.npoints.cpu()).tolist()[1:]
            acc = out.setdefault(component_of(name) or 'other', [])
            acc += [0] * (len(h) - len(acc))
            for i, v in enumerate(h):
                acc[i] += v
    return out


# ----------------------------------------------------------------------------- runs
def subset_coco_ann(ann_file: str, num_images: int, out: str) -> str:
    """A COCO json of the first ``num_images`` images of ``ann_file`` (CocoMetric
    scores every image of its ann_file, so a test subset needs its own)."""
    with open(ann_file) as f:
        coco = json.load(f)
    keep = {im['id'] for im in coco['images'][:num_images]}
    coco['images'] = coco['images'][:num_images]
    coco['annotations'] = [a for a in coco['annotations'] if a['image_id'] in keep]
    out = osp.abspath(out)  # datasets join a relative ann_file to their data_root
    os.makedirs(osp.dirname(out), exist_ok=True)
    with open(out, 'w') as f:
        json.dump(coco, f)
    return out


def limit_test_images(cfg, num_images: int, work_dir: str) -> None:
    """The config's test split cut to its first ``num_images`` images, its COCO
    evaluators pointed at the matching annotations."""
    ds = cfg.test_dataloader.dataset
    evals = cfg.test_evaluator if isinstance(cfg.test_evaluator, list) else [cfg.test_evaluator]
    coco = [e for e in evals if e.get('type') == 'CocoMetric']
    if coco:
        src = coco[0].get('ann_file') or osp.join(ds.get('data_root', ''), ds.ann_file)
        sub = subset_coco_ann(src, num_images, osp.join(work_dir, f'ann_first{num_images}.json'))
        ds.ann_file = sub
        for e in coco:
            e['ann_file'] = sub
    else:
        ds.indices = num_images


def run_cell(cfg, checkpoint: str, cell: dict, work_dir: str) -> dict:
    """One Runner.test() of ``cfg`` (already cut to its images) for ``cell``."""
    from mmengine.runner import Runner, load_checkpoint
    cfg = copy.deepcopy(cfg)
    cfg.work_dir = work_dir
    cfg.custom_hooks = [h for h in (cfg.get('custom_hooks') or [])
                        if not (isinstance(h, dict) and 'MultipointQuantHook' in str(h.get('type')))]
    row: dict = dict(id=cell_id(cell), group=cell['group'], kind=cell['kind'],
                     hook=cell.get('hook'), quanto=cell.get('quanto'))
    torch.manual_seed(0)
    if cell['kind'] == 'quanto':
        from optimum import quanto
        cfg.load_from = None
        runner = Runner.from_cfg(cfg)
        load_checkpoint(runner.model, checkpoint, map_location='cpu', logger='silent')
        t0 = time.perf_counter()
        for name, child in runner.model.named_children():
            if component_of(name):
                quanto.quantize(child, weights=getattr(quanto, cell['quanto']))
                quanto.freeze(child)
        row['quant_time_s'] = time.perf_counter() - t0
        row.update(quanto_bits(runner.model))
        metrics = runner.test()
    else:
        cfg.load_from = checkpoint
        if cell['kind'] == 'mpq':
            cfg.custom_hooks.append(dict(type='MultipointQuantHook', calib=dict(CALIB),
                                         **cell['hook']))
        runner = Runner.from_cfg(cfg)
        metrics = runner.test()
        if cell['kind'] == 'mpq':
            hook = next(h for h in runner.hooks if type(h).__name__ == 'MultipointQuantHook')
            s = hook.result.summary
            row.update(bits_per_weight=s['bits_per_weight'],
                       memory_overhead=s['memory_overhead'],
                       compute_overhead=s['compute_overhead'],
                       quant_time_s=s['quant_time_s'],
                       calib_and_quant_time_s=s['calib_and_quant_time_s'],
                       points_hist=points_histograms(runner.model))
        else:
            row['bits_per_weight'] = 32.0
    row['metrics'] = {k: float(v) for k, v in (metrics or {}).items()
                      if isinstance(v, (int, float))}
    return row


def run_sweep(cfg, checkpoint: str, cells: list[dict], out_dir: str, name: str,
              log: Callable[[str], None] = print) -> list[dict]:
    """Runs every cell not yet in ``{out_dir}/results.json`` (resume), saving after
    each one, and returns this detector's rows in cell order."""
    path = osp.join(out_dir, 'results.json')
    done = load_results(path)
    rows = []
    for i, cell in enumerate(cells):
        key = f'{name}/{cell_id(cell)}'
        if key in done:
            rows.append(done[key])
            continue
        log(f'[benchmark] {name}: cell {i + 1}/{len(cells)} {cell_id(cell)}')
        row = run_cell(cfg, checkpoint, cell, osp.join(out_dir, 'runs', name, cell_id(cell)))
        row['detector'] = name
        done[key] = row
        save_results(path, done)
        rows.append(row)
    return rows


def load_results(path: str) -> dict[str, dict]:
    if not osp.exists(path):
        return {}
    with open(path) as f:
        return {f"{r['detector']}/{r['id']}": r for r in json.load(f)['rows']}


def save_results(path: str, rows: dict[str, dict]) -> None:
    tmp = path + '.tmp'
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    with open(tmp, 'w') as f:
        json.dump(dict(rows=list(rows.values())), f, indent=1)
    os.replace(tmp, path)  # a killed run never leaves half a file


# ----------------------------------------------------------------------------- outputs
def metric_names(rows: list[dict]) -> list[tuple[str, str]]:
    """(key, label) of the headline metrics present: VOC mAP@0.5 and COCO mAP."""
    keys = set().union(*(r['metrics'] for r in rows)) if rows else set()
    out = [(k, lab) for k, lab in (('pascal_voc/mAP', 'VOC mAP@0.5'),
                                   ('coco/bbox_mAP', 'COCO mAP')) if k in keys]
    return out or [(k, k) for k in sorted(keys)[:1]]


def method_of(r: dict) -> str:
    if r['kind'] != 'mpq':
        return 'fp' if r['kind'] == 'fp' else 'quanto'
    h = r['hook']
    return h['method'] + (f"+A{act_bits(h)}" if act_bits(h) else '') + \
        (f" ({h['target']})" if h.get('target') else '')


def results_markdown(rows: list[dict]) -> str:
    mets = metric_names(rows)
    head = ('| detector | group | cell | ' + ' | '.join(f'{lab} (x100)' for _, lab in mets)
            + ' | bits/weight | mem over | MAC over | quant s | calib+quant s |')
    lines = [head, '|' + '---|' * (head.count('|') - 1)]
    f = lambda v, fmt: '-' if v is None else format(v, fmt)  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['detector']} | {r['group']} | {r['id']} | "
            + ' | '.join(f(r['metrics'].get(k) and 100 * r['metrics'][k], '.2f') for k, _ in mets)
            + f" | {f(r.get('bits_per_weight'), '.3f')} | {f(r.get('memory_overhead'), '.2%')} | "
            f"{f(r.get('compute_overhead'), '.2%')} | {f(r.get('quant_time_s'), '.2f')} | "
            f"{f(r.get('calib_and_quant_time_s'), '.2f')} |")
    return '\n'.join(lines) + '\n'


def plot_results(rows: list[dict], out_dir: str) -> list[str]:
    """mAP vs bits per weight (one line per method), mAP vs budget at W2/W3, and the
    points-per-channel histograms per component; one PNG set per detector."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    paths = []
    for det in sorted({r['detector'] for r in rows}):
        rs = [r for r in rows if r['detector'] == det and r['group'] == 'sweep']
        mets = metric_names(rs)
        fig, axes = plt.subplots(1, len(mets), figsize=(6 * len(mets), 4.5), squeeze=False)
        for ax, (key, lab) in zip(axes[0], mets):
            fp = next((r for r in rs if r['kind'] == 'fp'), None)
            if fp is not None:
                ax.axhline(100 * fp['metrics'][key], color='k', ls='--', lw=1, label='FP')
            for meth in sorted({method_of(r) for r in rs} - {'fp'}):
                pts = {}
                for r in rs:
                    if method_of(r) != meth or key not in r['metrics']:
                        continue
                    h = r.get('hook') or {}
                    # one point per bits: the run with the default budget (0.05) or none
                    if h.get('budget') not in (None, 0.0, 0.05):
                        continue
                    if h.get('method') in ('multipoint', 'ocs') and h.get('budget') == 0.0:
                        continue
                    pts[r['bits_per_weight']] = 100 * r['metrics'][key]
                if pts:
                    xs = sorted(pts)
                    ax.plot(xs, [pts[x] for x in xs], 'o-', label=meth)
            ax.set_xscale('log', base=2)
            ax.set_xlabel('effective bits per weight (codes + scales, FP layers at 32)')
            ax.set_ylabel(f'{lab} (x100)')
            ax.set_title(f'{det}: {lab} against bits')
            ax.legend(fontsize=8, title='multipoint/ocs: budget 0.05', title_fontsize=8)
        fig.tight_layout()
        paths.append(osp.join(out_dir, f'{det}_map_vs_bits.png'))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)

        fig, axes = plt.subplots(1, len(mets), figsize=(6 * len(mets), 4.5), squeeze=False)
        for ax, (key, lab) in zip(axes[0], mets):
            for meth in ('multipoint', 'ocs'):
                for bits in (2, 3):
                    pts = sorted((r['hook']['budget'], 100 * r['metrics'][key]) for r in rs
                                 if r['kind'] == 'mpq' and r['hook']['method'] == meth
                                 and r['hook']['bits'] == bits and not act_bits(r['hook'])
                                 and key in r['metrics'])
                    if pts:
                        ax.plot(*zip(*pts), 'o-', label=f'{meth} W{bits}')
            ax.set_xlabel('budget (extra weight storage, fraction)')
            ax.set_ylabel(f'{lab} (x100)')
            ax.set_title(f'{det}: {lab} against budget')
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(osp.join(out_dir, f'{det}_map_vs_budget.png'))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)

        hists = [r for r in rs if r.get('points_hist') and r['hook']['method'] == 'multipoint'
                 and not act_bits(r['hook']) and r['hook']['budget'] > 0]
        if hists:
            fig, axes = plt.subplots(1, len(hists), figsize=(4 * len(hists), 3.5), squeeze=False)
            for ax, r in zip(axes[0], hists):
                comps = sorted(r['points_hist'])
                width = 0.8 / max(len(comps), 1)
                n = max(len(r['points_hist'][c]) for c in comps)
                for i, c in enumerate(comps):
                    h = r['points_hist'][c]
                    ax.bar([k + 1 + (i - (len(comps) - 1) / 2) * width for k in range(len(h))],
                           h, width, label=c)
                ax.set_xticks(range(1, n + 1))
                ax.set_yscale('log')
                ax.set_xlabel('points per channel')
                ax.set_ylabel('channels')
                ax.set_title(r['id'], fontsize=9)
                ax.legend(fontsize=7)
            fig.tight_layout()
            paths.append(osp.join(out_dir, f'{det}_points_hist.png'))
            fig.savefig(paths[-1], dpi=100)
            plt.close(fig)
    return paths
