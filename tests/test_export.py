"""Quantized checkpoints: export, exact reload, size, conversions, safety.

One one-stage (RetinaNet) and one two-stage (Faster R-CNN) detector, random-init on
the tiny synthetic set, so predictions are compared as tensors (score_thr=0 keeps
them non-empty); the trained-checkpoint mAP check is the slow test at the end.
"""
import copy
import hashlib
import json
import os
import os.path as osp
import pickle
import random
import subprocess
import sys
import zipfile
from types import SimpleNamespace

import pytest
import torch

import mpq_det  # noqa: F401
from mpq_det import export as ex
from mpq_det.deploy import convert as cv
from mpq_det.deploy.convert import max_rel_diff, raw_outputs, sample_inputs
from mpq_det.export import (QuantizedCheckpointError, RequiresMultipointQuantHook,
                            load_quantized_checkpoint, save_quantized_checkpoint)
from mpq_det.modules import QConv2d, QLinear

from conftest import ROOT, load_tool, save_random_checkpoint, tiny_cfg





convert_tool = load_tool('convert')
export_tool = load_tool('export')

DETECTORS = ['retinanet_r18q', 'faster_rcnn_r18q']
CALIB = dict(num_images=4, batch_size=2)
TOL = 1e-4


def sha(path) -> str:
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()


def make_cfg(name, data, work_dir):
    cfg = tiny_cfg(f'configs/detectors/{name}_synth_voc.py', data, str(work_dir))
    tc = cfg.model.test_cfg
    if 'rcnn' in tc:
        tc.rcnn.score_thr = 0.0
    else:
        tc.score_thr = 0.0
    cfg.custom_hooks = []
    return cfg


def the_hook(runner):
    return next(h for h in runner.hooks if type(h).__name__ == 'MultipointQuantHook')


def predictions(model, inputs, samples):
    with torch.no_grad():
        out = model.predict(inputs, copy.deepcopy(samples))
    return [(p.pred_instances.bboxes, p.pred_instances.scores, p.pred_instances.labels)
            for p in out]


def assert_same_predictions(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x[0].shape[0] > 0
        for u, v in zip(x, y):
            assert torch.equal(u, v)


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """The machine is shared (2 cores); one thread avoids OpenMP oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module', params=DETECTORS)
def exported(request, tiny_data, tmp_path_factory):
    """Quantized in memory by the hook (export=...) during Runner.test()."""
    from mmengine.runner import Runner
    name = request.param
    wd = tmp_path_factory.mktemp(name)
    cfg = make_cfg(name, tiny_data, wd / 'work')
    cfg_path = str(wd / 'cfg.py')
    dumped = copy.deepcopy(cfg)
    dumped.custom_hooks = [dict(type='MultipointQuantHook', calib=CALIB)]
    dumped.dump(cfg_path)
    src = str(wd / 'float.pth')
    dataset_meta = dict(classes=('a', 'b'), note='from the source')
    model = save_random_checkpoint(cfg, src, {'dataset_meta': dataset_meta})
    qpath = str(wd / 'quantized.pth')
    run_cfg = copy.deepcopy(cfg)
    run_cfg.load_from = src
    run_cfg.custom_hooks = [dict(type='MultipointQuantHook', calib=CALIB, export=qpath)]
    runner = Runner.from_cfg(run_cfg)
    metrics = runner.test()
    qmodel = runner.model.eval()
    inputs, samples = sample_inputs(cfg, qmodel, 2)
    return SimpleNamespace(
        name=name, dir=wd, cfg=cfg, cfg_path=cfg_path, src=src, src_sha=sha(src),
        qpath=qpath, model=qmodel, metrics=metrics, inputs=inputs, samples=samples,
        raw=raw_outputs(qmodel, inputs, samples),
        preds=predictions(qmodel, inputs, samples), dataset_meta=dataset_meta,
        hook=the_hook(runner))


# --------------------------------------------------------------------------- reload
def test_reload_through_the_hook_is_bit_identical(exported, tmp_path):
    from mmengine.runner import Runner
    cfg = copy.deepcopy(exported.cfg)
    cfg.work_dir = str(tmp_path)
    cfg.load_from = exported.qpath
    # different settings in the config: the export's win (and no calibration runs)
    cfg.custom_hooks = [dict(type='MultipointQuantHook', bits=3, calib=CALIB)]
    runner = Runner.from_cfg(cfg)
    metrics = runner.test()
    hook = the_hook(runner)
    assert hook.loaded_export is not None and hook.result is None
    model = runner.model.eval()
    q = {n: m for n, m in model.named_modules() if isinstance(m, (QConv2d, QLinear))}
    assert sorted(q) == sorted(hook.loaded_export['layers']) and q
    assert all(m.bits == 4 for m in q.values())
    raw = raw_outputs(model, exported.inputs, exported.samples)
    assert len(raw) == len(exported.raw)
    assert all(torch.equal(a, b) for a, b in zip(raw, exported.raw))
    assert_same_predictions(predictions(model, exported.inputs, exported.samples),
                            exported.preds)
    assert metrics == exported.metrics
    sd, ref = model.state_dict(), exported.model.state_dict()
    assert sorted(sd) == sorted(ref)
    assert all(torch.equal(sd[k], ref[k]) for k in sd)


def test_format_size_and_meta(exported):
    ckpt = load_quantized_checkpoint(exported.qpath)
    assert set(ckpt) == {'state_dict', 'meta', ex.LAYERS_KEY, ex.MARKER_KEY}  # no optimizer
    mpq = ckpt['meta']['mpq']
    assert mpq['format_version'] == ex.FORMAT_VERSION
    assert mpq['source_sha256'] == exported.src_sha
    assert mpq['settings'] == exported.hook.settings()
    assert len(mpq['report']['layers']) == len(mpq['layers']) > 0
    assert 'summary' in mpq['report'] and 'skipped' in mpq['report']
    json.dumps(mpq['report'])
    assert ckpt['meta']['dataset_meta'] == exported.dataset_meta
    # every non-quantized tensor stored as it was
    msd = exported.model.state_dict()
    for k, v in ckpt['state_dict'].items():
        assert torch.equal(v, msd[k]), k
    # size: packed codes <= bits/32 * (1 + budget) of the float32 weights (+ padding)
    fsd = torch.load(exported.src, weights_only=True)['state_dict']
    budget = mpq['settings']['base']['budget']
    fp = codes = extra = pad = 0
    for name, rec in ckpt[ex.LAYERS_KEY].items():
        assert rec['codes'].dtype == torch.uint8 and rec['bits'] == 4
        fp += 4 * fsd[f'{name}.weight'].numel()
        codes += rec['codes'].numel()
        extra += 4 * rec['scales'].numel() + rec['npoints'].numel() * \
            rec['npoints'].element_size()
        pad += rec['bits']  # pack_codes pads each layer to whole bytes
    assert codes <= 4 / 32 * (1 + budget) * fp + pad
    # the rest is one float32 scale per point and one count per output channel
    for name, rec in ckpt[ex.LAYERS_KEY].items():
        assert rec['npoints'].numel() == fsd[f'{name}.weight'].shape[0], name
        assert rec['scales'].numel() == int(rec['npoints'].sum()), name
        assert rec['scales'].dtype == torch.float32
    assert codes + extra < 0.15 * fp
    assert mpq['sizes']['quantized_layers_float32_bytes'] == fp
    assert mpq['sizes']['quantized_layers_codes_bytes'] == codes
    print(f'{exported.name}: ' + ex.format_sizes(mpq['sizes']))


def test_tools_export_writes_the_same_export(exported, tmp_path):
    out = str(tmp_path / 'tool.pth')
    assert export_tool.main([exported.cfg_path, exported.src, out, '--work-dir',
                             str(tmp_path)]) == 0
    a = load_quantized_checkpoint(out)
    b = load_quantized_checkpoint(exported.qpath)
    assert a['meta']['mpq']['layers'] == b['meta']['mpq']['layers']
    for name in a[ex.LAYERS_KEY]:
        for k in ('codes', 'scales', 'npoints'):
            assert torch.equal(a[ex.LAYERS_KEY][name][k], b[ex.LAYERS_KEY][name][k])
    assert sha(exported.src) == exported.src_sha


# ---------------------------------------------------------------------- conversions
def test_to_expanded(exported, tmp_path):
    e = str(tmp_path / 'expanded.pt')
    assert convert_tool.main([exported.cfg_path, exported.qpath, '--to-expanded', e]) == 0
    expanded = cv.load_expanded_model(e)
    assert not any(isinstance(m, (QConv2d, QLinear)) for m in expanded.modules())
    convs = [m for m in expanded.modules() if isinstance(m, cv.CommonOperandsConv2d)]
    assert convs and all(torch.equal(c.int_conv.weight, c.int_conv.weight.round())
                         for c in convs)
    raw = raw_outputs(expanded, exported.inputs, exported.samples)
    d = max_rel_diff(raw, exported.raw)
    print(f'{exported.name}: expanded vs quantized max rel diff {d:.3e}')
    assert d <= TOL


def test_to_float_loads_in_plain_mmdet(exported, tmp_path):
    """A fresh process that never imports mpq_det loads the float checkpoint."""
    f = str(tmp_path / 'float.pth')
    assert convert_tool.main([exported.cfg_path, exported.qpath, '--to-float', f]) == 0
    with zipfile.ZipFile(f) as z:  # it references no mpq_det object
        pkl = [n for n in z.namelist() if n.endswith('data.pkl')]
        assert pkl and b'mpq_det' not in z.read(pkl[0])
    inp = str(tmp_path / 'inputs.pt')
    torch.save({'inputs': exported.inputs, 'samples': exported.samples}, inp)
    out = str(tmp_path / 'outputs.pt')
    script = f'''
import sys, torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner.checkpoint import load_checkpoint
from mmdet.registry import MODELS
cfg = Config.fromfile({exported.cfg_path!r}, import_custom_modules=False)
init_default_scope('mmdet')
model = MODELS.build(cfg.model).eval()
load_checkpoint(model, {f!r}, map_location='cpu', strict=True)
d = torch.load({inp!r}, weights_only=False)
def flat(o):
    return [o] if isinstance(o, torch.Tensor) else [t for x in o for t in flat(x)]
with torch.no_grad():
    outs = flat(model(d['inputs'], d['samples'], mode='tensor'))
assert not any(m.startswith('mpq_det') for m in sys.modules), 'mpq_det was imported'
torch.save(outs, {out!r})
'''
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, '-c', script], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(out)
    ref = exported.raw
    d = max_rel_diff(got, ref)
    print(f'{exported.name}: plain-mmdet float vs quantized max rel diff {d:.3e}')
    assert d <= 1e-5


def test_onnx_in_onnxruntime(exported, tmp_path, capsys):
    if exported.name != 'retinanet_r18q':
        with pytest.raises(ValueError, match='one-stage'):
            cv.export_onnx(exported.model, exported.inputs, str(tmp_path / 'x.onnx'))
        return
    o = str(tmp_path / 'net.onnx')
    assert convert_tool.main([exported.cfg_path, exported.qpath, '--onnx', o]) == 0
    assert 'onnx: max rel diff' in capsys.readouterr().out
    import onnx
    import onnxruntime as ort
    ops = {n.op_type for n in onnx.load(o).graph.node}
    assert 'Conv' in ops and 'ScatterElements' in ops
    sess = ort.InferenceSession(o, providers=['CPUExecutionProvider'])
    got = sess.run(None, {'inputs': exported.inputs.numpy()})
    d = max_rel_diff([torch.from_numpy(g) for g in got], exported.raw)
    print(f'{exported.name}: onnxruntime vs quantized max rel diff {d:.3e}')
    assert d <= TOL


# --------------------------------------------------------------------------- safety
def test_failed_write_leaves_no_file(exported, tmp_path, monkeypatch):
    good = str(tmp_path / 'q.pth')
    save_quantized_checkpoint(exported.model, good, source=exported.src,
                              settings=exported.hook.settings(), report=exported.hook.result)
    good_sha = sha(good)
    real_save = torch.save

    def boom(obj, f, *args, **kwargs):
        real_save({'partial': torch.zeros(1000)}, f)  # bytes reach the disk, then fail
        raise OSError('injected failure mid-write')
    monkeypatch.setattr(torch, 'save', boom)
    for target in (good, str(tmp_path / 'new.pth')):
        with pytest.raises(OSError, match='injected'):
            save_quantized_checkpoint(exported.model, target, source=exported.src,
                                      settings=exported.hook.settings(), report=None)
    if exported.name == 'faster_rcnn_r18q':  # also through tools/export.py
        with pytest.raises(OSError, match='injected'):
            export_tool.main([exported.cfg_path, exported.src, good, '--work-dir',
                              str(tmp_path / 'wd')])
    monkeypatch.undo()
    assert sorted(p for p in os.listdir(tmp_path) if p != 'wd') == ['q.pth']
    assert sha(good) == good_sha
    assert sha(exported.src) == exported.src_sha
    load_quantized_checkpoint(good)


def test_export_refuses_to_overwrite_the_source(exported):
    with pytest.raises(ValueError, match='source checkpoint'):
        save_quantized_checkpoint(exported.model, exported.src, source=exported.src)
    assert sha(exported.src) == exported.src_sha


def _corrupt_files(exported, tmp: str) -> dict:
    data = open(exported.qpath, 'rb').read()
    files = {}

    def put(key, blob):
        p = osp.join(tmp, f'{key}.pth')
        with open(p, 'wb') as f:
            f.write(blob)
        files[key] = p
    put('empty', b'')
    put('truncated_half', data[:len(data) // 2])
    put('truncated_tail', data[:-64])
    put('random_bytes', random.Random(0).randbytes(4096))
    put('text', b'this is not a checkpoint\n' * 20)
    torch.save([1, 2, 3], osp.join(tmp, 'foreign_list.pth'))
    files['foreign_list'] = osp.join(tmp, 'foreign_list.pth')
    torch.save({'weights': torch.ones(3)}, osp.join(tmp, 'foreign_dict.pth'))
    files['foreign_dict'] = osp.join(tmp, 'foreign_dict.pth')
    with open(osp.join(tmp, 'foreign_pickle.pth'), 'wb') as f:
        pickle.dump(SimpleNamespace(a=1), f)
    files['foreign_pickle'] = osp.join(tmp, 'foreign_pickle.pth')
    torch.save(SimpleNamespace(a=1), osp.join(tmp, 'foreign_object.pth'))
    files['foreign_object'] = osp.join(tmp, 'foreign_object.pth')
    files['plain_mmdet'] = exported.src
    ck = load_quantized_checkpoint(exported.qpath)
    ck['meta']['mpq']['format_version'] = 99
    torch.save(ck, osp.join(tmp, 'wrong_version.pth'))
    files['wrong_version'] = osp.join(tmp, 'wrong_version.pth')
    ck = load_quantized_checkpoint(exported.qpath)
    name = next(iter(ck[ex.LAYERS_KEY]))
    ck[ex.LAYERS_KEY][name]['codes'] = ck[ex.LAYERS_KEY][name]['codes'][:-3].clone()
    torch.save(ck, osp.join(tmp, 'bad_layer.pth'))
    files['bad_layer'] = osp.join(tmp, 'bad_layer.pth')
    files['missing'] = osp.join(tmp, 'does_not_exist.pth')
    # one flipped byte inside the largest tensor (torch itself does not notice)
    with zipfile.ZipFile(exported.qpath) as z:
        big = max((i for i in z.infolist() if '/data/' in i.filename),
                  key=lambda i: i.file_size)
    flipped = bytearray(data)
    h = big.header_offset  # the local header's name/extra lengths give the data start
    start = h + 30 + int.from_bytes(data[h + 26:h + 28], 'little') + \
        int.from_bytes(data[h + 28:h + 30], 'little')
    flipped[start + 7] ^= 0x10
    put('bit_flip', bytes(flipped))
    return files


EXPECT = dict(empty='empty', truncated_half='truncated', truncated_tail='truncated',
              random_bytes='not a PyTorch checkpoint', text='not a PyTorch checkpoint',
              foreign_list='not a checkpoint', foreign_dict='not an mpq-det quantized export',
              foreign_pickle='not a PyTorch checkpoint (a plain pickle',
              bit_flip='checksum mismatch',
              foreign_object='not an mpq-det quantized export',
              plain_mmdet='plain (float) checkpoint', wrong_version='format_version 99',
              bad_layer='corrupt quantized export', missing='no such file')


def test_corrupt_files_get_clear_errors(exported, tmp_path):
    files = _corrupt_files(exported, str(tmp_path))
    assert set(files) == set(EXPECT)
    for key, path in files.items():
        with pytest.raises(QuantizedCheckpointError) as e:
            load_quantized_checkpoint(path)
        msg = str(e.value)
        assert msg.startswith(path + ': '), (key, msg)
        assert EXPECT[key] in msg, (key, msg)
        assert e.value.__cause__ is None and (e.value.__context__ is None or
                                              e.value.__suppress_context__), key
        assert '\n' not in msg, (key, msg)
    # the hook path names the file too (wrong version, via mmengine's loader)
    from mmengine.runner import Runner
    cfg = copy.deepcopy(exported.cfg)
    cfg.work_dir = str(tmp_path / 'wd')
    cfg.load_from = files['wrong_version']
    cfg.custom_hooks = [dict(type='MultipointQuantHook', calib=CALIB)]
    runner = Runner.from_cfg(cfg)
    with pytest.raises(QuantizedCheckpointError, match='format_version 99') as e:
        runner.load_or_resume()
    assert files['wrong_version'] in str(e.value)


def test_loading_without_the_hook_fails_and_says_add_it(exported, tmp_path, monkeypatch):
    from mmengine.runner import Runner
    from mmengine.runner.checkpoint import _load_checkpoint
    ser = torch.serialization
    saved = list(ser.get_safe_globals())
    monkeypatch.setattr(ex, '_ALLOWED', False)
    ser.clear_safe_globals()
    ser.add_safe_globals([g for g in saved if (g[0] if isinstance(g, tuple) else g)
                          is not RequiresMultipointQuantHook])
    try:
        with pytest.raises(Exception) as e:  # plain mmengine: weights_only refuses it
            _load_checkpoint(exported.qpath, map_location='cpu')
        assert 'RequiresMultipointQuantHook' in str(e.value)
        with pytest.raises(QuantizedCheckpointError, match='MultipointQuantHook') as e:
            torch.load(exported.qpath, weights_only=False)  # the marker refuses
        assert "custom_hooks = [dict(type='MultipointQuantHook')]" in str(e.value)
        cfg = copy.deepcopy(exported.cfg)
        cfg.work_dir = str(tmp_path)
        cfg.load_from = exported.qpath
        runner = Runner.from_cfg(cfg)  # no hook in the config
        with pytest.raises(Exception, match='MultipointQuantHook'):
            runner.load_or_resume()
    finally:
        ser.clear_safe_globals()
        ser.add_safe_globals(saved)


# ----------------------------------------------------------------- trained checkpoint
def map_roundtrip(ckpt: str, tmp_path, indices: int | None = None) -> dict:
    """mAPs of: the hook quantizing ``ckpt`` (writing an export), the export reloaded
    through the hook, and plain mmdet (no hook) on its --to-float conversion."""
    from mmengine.config import Config
    from mmengine.runner import Runner
    cfg_path = osp.join(ROOT, 'configs/detectors/retinanet_r18q_synth_voc.py')
    q, f = str(tmp_path / 'q.pth'), str(tmp_path / 'float.pth')

    def run(load_from, hooks, wd):
        cfg = Config.fromfile(cfg_path)
        cfg.work_dir = str(tmp_path / wd)
        cfg.load_from = load_from
        cfg.custom_hooks = hooks
        cfg.default_hooks.visualization = dict(type='DetVisualizationHook')
        for k in ('test_dataloader', 'val_dataloader', 'train_dataloader'):
            cfg[k].num_workers = 0
            cfg[k].persistent_workers = False
        if indices is not None:
            cfg.test_dataloader.dataset.indices = indices
        return Runner.from_cfg(cfg).test()
    out = dict(quantized=run(ckpt, [dict(type='MultipointQuantHook', export=q)], 'quant'))
    out['reloaded'] = run(q, [dict(type='MultipointQuantHook')], 'reload')
    assert convert_tool.main([cfg_path, q, '--to-float', f]) == 0
    out['to_float_plain'] = run(f, [], 'float')
    out['sizes'] = load_quantized_checkpoint(q)['meta']['mpq']['sizes']
    return out


@pytest.mark.slow
def test_trained_retinanet_map_reload_and_float(tmp_path):
    """On the trained checkpoint: quantized mAP == reloaded == plain-mmdet --to-float."""
    ckpt = osp.join(ROOT, 'data/checkpoints/retinanet_r18q.pth')
    if not osp.exists(ckpt):
        pytest.skip(f'{ckpt} is missing (make checkpoints)')
    src_sha = sha(ckpt)
    r = map_roundtrip(ckpt, tmp_path)
    print(f"trained retinanet_r18q mAP: quantized {r['quantized']} reloaded "
          f"{r['reloaded']} to-float (plain mmdet) {r['to_float_plain']}; "
          + ex.format_sizes(r['sizes']))
    assert r['quantized']['pascal_voc/mAP'] > 0
    assert r['quantized'] == r['reloaded'] == r['to_float_plain']
    assert sha(ckpt) == src_sha
