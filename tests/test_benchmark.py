"""tools/benchmark.py's pieces: quanto's bit count, resume, outputs."""
import json
import os.path as osp

import pytest
import torch
from torch import nn

import mpq_det  # noqa: F401
from mpq_det import benchmark as bm


def test_quanto_bits_against_a_hand_count():
    from optimum import quanto
    torch.manual_seed(0)
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Linear(256, 6))
    model.bbox_head = nn.Conv2d(16, 4, 1)          # left in FP: 32 bits
    model.data_preprocessor = nn.Linear(3, 3)      # not a component: not counted
    quanto.quantize(model.backbone, weights=quanto.qint4)
    quanto.freeze(model.backbone)
    got = bm.quanto_bits(model)
    conv = 16 * 72 * 4 + 2 * 16 * 32          # codes + one fp32 scale and shift per row
    w = model.backbone[1].weight                # 256 = 2 groups of 128 per row
    groups = w._scale.numel()
    assert groups == 6 * 2
    lin = 6 * 256 * 4 + 2 * groups * 32
    head = 16 * 4 * 32
    n = 16 * 72 + 6 * 256 + 64
    assert got['weights'] == n
    assert got['bits_per_weight'] == pytest.approx((conv + lin + head) / n, rel=1e-12)


def test_resume_runs_each_cell_once(tmp_path, monkeypatch):
    calls = []

    def fake_run(cfg, ckpt, cell, wd):
        calls.append(bm.cell_id(cell))
        return dict(id=bm.cell_id(cell), group=cell['group'], kind=cell['kind'],
                    hook=cell.get('hook'), metrics={'coco/bbox_mAP': 0.1 * len(calls)},
                    bits_per_weight=3.0)
    monkeypatch.setattr(bm, 'run_cell', fake_run)
    cells = bm.sweep_cells(bits=(3,), budgets=(0.0, 0.05), methods=('rtn', 'multipoint'),
                           activations=False, quanto=())
    ids = [bm.cell_id(c) for c in cells]
    assert ids == ['fp', 'rtn_w3', 'multipoint_w3_b0', 'multipoint_w3_b0.05']
    rows = bm.run_sweep(None, 'x.pth', cells[:2], str(tmp_path), 'det')
    assert calls == ids[:2]
    rows = bm.run_sweep(None, 'x.pth', cells, str(tmp_path), 'det')   # resumes
    assert calls == ids
    assert [r['id'] for r in rows] == ids
    assert rows[0]['metrics'] == {'coco/bbox_mAP': pytest.approx(0.1)}  # the first run's
    rows2 = bm.run_sweep(None, 'x.pth', cells, str(tmp_path), 'other')  # another detector
    assert calls == ids + ids
    saved = json.load(open(tmp_path / 'results.json'))['rows']
    assert len(saved) == 2 * len(ids)
    md = bm.results_markdown(rows + rows2)
    assert md.count('\n') == 2 + 2 * len(ids) and 'COCO mAP' in md


def test_ablation_cells_cover_placement_forms_and_levers():
    from mpq_det.quant import FORMS
    cells = bm.ablation_cells({'global allocation': dict(allocation='layer')})
    groups = {}
    for c in cells:
        groups.setdefault(c['group'], []).append(c['hook'])
    assert len(groups['placement']) == 2 * 2 * 3
    assert {(h['allocation'], h['points']['rank_by']) for h in groups['placement']} == {
        (a, b) for a in ('layer', 'global') for b in ('output', 'weight', 'random')}
    assert [h['stats']['form'] for h in groups['h_form']] == list(FORMS) * 2
    assert groups['lever:global allocation'] == [
        dict(method='multipoint', bits=3, budget=0.05, allocation='layer'),
        dict(method='multipoint', bits=2, budget=0.1, allocation='layer')]


def test_plots_are_written(tmp_path):
    rows = [dict(detector='d', group='sweep', kind='fp', id='fp', hook=None,
                 metrics={'coco/bbox_mAP': 0.3}, bits_per_weight=32.0)]
    for bits, m in ((2, 0.1), (3, 0.2), (4, 0.28)):
        for meth, budgets in (('rtn', (0.0,)), ('multipoint', (0.0, 0.05, 0.1))):
            for b in budgets:
                rows.append(dict(detector='d', group='sweep', kind='mpq',
                                 id=f'{meth}{bits}{b}', metrics={'coco/bbox_mAP': m + b},
                                 hook=dict(method=meth, bits=bits, budget=b),
                                 bits_per_weight=bits + b,
                                 points_hist={'backbone': [90, 10], 'head': [50, 1, 1]}))
    rows.append(dict(detector='d', group='sweep', kind='quanto', id='quanto_qint4',
                     hook=None, metrics={'coco/bbox_mAP': 0.27}, bits_per_weight=4.6))
    paths = bm.plot_results(rows, str(tmp_path))
    assert [osp.basename(p) for p in paths] == ['d_map_vs_bits.png', 'd_map_vs_budget.png',
                                                'd_points_hist.png']
    for p in paths:
        assert open(p, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'


def test_act_cells_ids_and_table():
    """The activation sweep: one cell per setting x protocol x method x range, ids that
    keep the range apart, and a table with a column per range method."""
    cells = bm.act_cells(('W4A4', 'W2A4'), ('ours', 'literature'),
                         ('minmax', 'shrink0.7', 'fisher'), ('multipoint', 'rtn'))
    ids = [bm.cell_id(c) for c in cells]
    assert len(ids) == len(set(ids)) == 2 * 2 * 2 * 3
    assert 'multipoint_w2_b0.1_a4_activations.range=fisher_protocol=literature' in ids
    assert 'rtn_w4_a4_activations.range=minmax_activations.shrink=0.7_protocol=ours' in ids
    assert bm.cell_id(bm.mpq('multipoint', 4, 0.05, activations=dict(bits=8))) == \
        'multipoint_w4_b0.05_a8'                  # the sweep's W4A8 cells keep their ids
    rows = [dict(detector='d', group='sweep', kind='fp', hook=None,
                 metrics={'pascal_voc/mAP': 0.5, 'coco/bbox_mAP': 0.3})]
    rows += [dict(detector='d', group='act', kind='mpq', hook=c['hook'],
                  metrics={'pascal_voc/mAP': 0.4, 'coco/bbox_mAP': 0.1 + 0.01 * i})
             for i, c in enumerate(cells)]
    md = bm.act_markdown(rows)
    lines = md.splitlines()
    assert '| minmax | shrink0.7 | fisher |' in lines[2] and 'simulated' in lines[0]
    assert len(lines) == 4 + 2 * 2 * 2                    # a row per setting x protocol x method
    assert '| d | literature | W2A4 b0.1 | multipoint | ' in md
    assert '40.00 / 10.00 (-20.00)' in md                  # the first cell, against FP
