"""Synthetic data, the VOC metric's names, mmengine checkpoints on torch >= 2.6, SSD."""
import collections
import json
import os
import os.path as osp
import pickle

import pytest
import torch

import mpq_det  # noqa: F401
from mpq_det.datasets.synth import CLASSES, SynthSpec, make_synth_dataset

from conftest import ROOT, tiny_cfg


def test_synth_is_deterministic_and_in_range(tmp_path):
    spec = SynthSpec(num_train=12, num_test=4, seed=7)
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    make_synth_dataset(a, spec, log=lambda *x: None)
    make_synth_dataset(b, spec, log=lambda *x: None)
    ja = json.load(open(osp.join(a, 'annotations/instances_train.json')))
    jb = json.load(open(osp.join(b, 'annotations/instances_train.json')))
    assert ja == jb
    jpg = 'VOCdevkit/VOC2007/JPEGImages/000003.jpg'
    assert open(osp.join(a, jpg), 'rb').read() == open(osp.join(b, jpg), 'rb').read()
    assert len(ja['categories']) == len(CLASSES) >= 6
    per_img = {}
    for ann in ja['annotations']:
        per_img[ann['image_id']] = per_img.get(ann['image_id'], 0) + 1
    assert all(1 <= n <= 8 for n in per_img.values())
    for im in ja['images']:
        assert 160 <= im['width'] <= 256 and 160 <= im['height'] <= 256
    c = make_synth_dataset(str(tmp_path / 'c'), SynthSpec(num_train=12, num_test=4, seed=8),
                           log=lambda *x: None)
    jc = json.load(open(osp.join(tmp_path, 'c/annotations/instances_train.json')))
    assert jc != ja and c['train']['images'] == 12


def test_voc_and_coco_describe_the_same_images(tiny_data, tmp_path):
    from mmdet.registry import DATASETS
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    voc = tiny_cfg('configs/detectors/retinanet_r18q_synth_voc.py', tiny_data, str(tmp_path))
    coco = tiny_cfg('configs/detectors/retinanet_r18q_synth_coco.py', tiny_data, str(tmp_path))
    dv = DATASETS.build(voc.test_dataloader.dataset)
    dc = DATASETS.build(coco.test_dataloader.dataset)
    assert dv.metainfo['classes'] == dc.metainfo['classes'] == CLASSES
    assert len(dv) == len(dc) == 8
    for i in range(len(dv)):
        iv, ic = dv.get_data_info(i), dc.get_data_info(i)
        assert osp.basename(iv['img_path']) == osp.basename(ic['img_path'])
        bv = sorted((x['bbox_label'], *[round(v) for v in x['bbox']]) for x in iv['instances'])
        bc = sorted((x['bbox_label'], *[round(v) for v in x['bbox']]) for x in ic['instances'])
        assert bv == bc


def test_named_voc_metric_prints_our_class_names(tiny_data, tmp_path, capsys):
    from mmdet.evaluation import VOCMetric
    from mmdet.registry import DATASETS, METRICS
    from mmengine.logging import MMLogger
    from mmengine.registry import init_default_scope
    from mmengine.structures import InstanceData
    init_default_scope('mmdet')
    MMLogger.get_instance('test_voc_names')
    cfg = tiny_cfg('configs/detectors/retinanet_r18q_synth_voc.py', tiny_data, str(tmp_path))
    ds = DATASETS.build(cfg.test_dataloader.dataset)
    assert ds.metainfo.get('dataset_type') == 'VOC2007'  # the case mmdet gets wrong
    outs = {}
    for cls in (METRICS.get('NamedVOCMetric'), VOCMetric):
        metric = cls(metric='mAP', eval_mode='11points')
        metric.dataset_meta = ds.metainfo
        samples = []
        for i in range(len(ds)):
            info = ds.get_data_info(i)
            boxes = torch.tensor([x['bbox'] for x in info['instances']], dtype=torch.float32)
            labels = torch.tensor([x['bbox_label'] for x in info['instances']])
            pred = InstanceData(bboxes=boxes, scores=torch.ones(len(labels)), labels=labels)
            samples.append(dict(
                pred_instances=pred, gt_instances=dict(bboxes=boxes, labels=labels),
                ignored_instances=dict(bboxes=torch.zeros(0, 4), labels=torch.zeros(0).long())))
        capsys.readouterr()
        metric.process({}, samples)
        res = metric.evaluate(len(samples))
        outs[cls.__name__] = (res, capsys.readouterr().out)
    res, text = outs['NamedVOCMetric']
    assert res['pascal_voc/mAP'] == pytest.approx(1.0)
    assert res == outs['VOCMetric'][0]
    assert 'circle' in text and 'aeroplane' not in text
    assert 'aeroplane' in outs['VOCMetric'][1]  # mmdet's own names: why the subclass exists


@pytest.fixture(scope='module')
def trained_ckpt(tiny_data, tmp_path_factory):
    """A real mmengine training checkpoint (optimizer + message_hub), 2 iterations."""
    from mmengine.runner import Runner
    wd = str(tmp_path_factory.mktemp('train'))
    cfg = tiny_cfg('configs/detectors/retinanet_r18q_synth_voc.py', tiny_data, wd)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=2, val_interval=100)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=2, by_epoch=False)
    cfg.param_scheduler = []
    Runner.from_cfg(cfg).train()
    return osp.join(wd, 'iter_2.pth')


def test_training_checkpoint_loads_with_weights_only(trained_ckpt):
    from mmengine.runner import load_checkpoint as _unused  # noqa: F401
    from mmengine.runner.checkpoint import _load_checkpoint
    ckpt = _load_checkpoint(trained_ckpt, map_location='cpu')  # what tools/test.py does
    assert 'message_hub' in ckpt and 'optimizer' in ckpt and 'state_dict' in ckpt
    # and in a fresh process, where no HistoryBuffer was created yet (tools/test.py)
    import subprocess
    import sys
    code = ('import mpq_det\nfrom mmengine.runner.checkpoint import _load_checkpoint\n'
            f'print(sorted(_load_checkpoint({trained_ckpt!r}, map_location="cpu")))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert 'message_hub' in out.stdout
    # the safety stays on for everything else: an arbitrary global is still refused
    class Evil:
        def __reduce__(self):
            return (os.system, ('true',))
    bad = osp.join(osp.dirname(trained_ckpt), 'evil.pth')
    torch.save({'x': Evil()}, bad)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(bad)
    # the getattr stand-in resolves HistoryBuffer's statistics methods only
    class Sneaky:
        def __reduce__(self):
            return (getattr, (collections.OrderedDict, 'fromkeys'))
    torch.save({'x': Sneaky()}, bad)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(bad)


def test_publish_checkpoint_keeps_weights_only(trained_ckpt, tmp_path):
    from mpq_det.checkpoint_io import strip_checkpoint
    out = str(tmp_path / 'small.pth')
    strip_checkpoint(trained_ckpt, out)
    ck = torch.load(out)
    assert set(ck) == {'state_dict', 'meta'}
    assert os.path.getsize(out) < os.path.getsize(trained_ckpt)


def test_ssd_head_runs_inference(tiny_data, tmp_path):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = tiny_cfg('configs/detectors/ssdlite_mbv2q_synth_voc.py', tiny_data, str(tmp_path))
    model = MODELS.build(cfg.model).eval()
    from mmdet.structures import DetDataSample
    ds = DetDataSample(metainfo=dict(img_shape=(128, 128), ori_shape=(128, 128),
                                     scale_factor=(1.0, 1.0), pad_shape=(128, 128)))
    with torch.no_grad():
        out = model.predict(torch.randn(1, 3, 128, 128), [ds])
    assert 'bboxes' in out[0].pred_instances


def test_check_readable_names_the_file(tmp_path):
    from mpq_det.checkpoint_io import check_readable
    good = str(tmp_path / 'good.pth')
    torch.save({'state_dict': {'w': torch.ones(3)}}, good)
    check_readable(good)
    data = open(good, 'rb').read()
    cases = {'trunc.pth': data[:len(data) // 2], 'junk.pth': b'hello world' * 10,
             'flip.pth': data[:40] + bytes([data[40] ^ 0xFF]) + data[41:]}
    for name, content in cases.items():
        p = str(tmp_path / name)
        open(p, 'wb').write(content)
        with pytest.raises(ValueError, match=name):
            check_readable(p)
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        check_readable(str(tmp_path / 'missing.pth'))
