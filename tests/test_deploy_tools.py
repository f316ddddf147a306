"""tools/deploy.py and the onnxruntime hook of tools/test.py on a tiny mmdet RetinaNet
(random init, tiny synthetic set): a W4A8 export becomes a checked int8 graph, and
a graph attached to the detector gives PyTorch's predictions through mmdet's
post-processing."""
import copy
import os.path as osp

import onnx
import pytest
import torch

import mpq_det  # noqa: F401
from mpq_det.deploy.convert import sample_inputs
from mpq_det.deploy.ort import attach_onnx, integer_kernel_counts, make_session, run_session
from mpq_det.deploy.qdq import Int8Builder
from mpq_det.deploy.tools import load_detector

from conftest import ROOT, load_tool, save_random_checkpoint, tiny_cfg

CALIB = dict(num_images=4, batch_size=2)




deploy_tool = load_tool('deploy')
export_tool = load_tool('export')


@pytest.fixture(scope='module')
def tiny(tiny_data, tmp_path_factory):
    wd = tmp_path_factory.mktemp('deploy')
    cfg = tiny_cfg('configs/detectors/retinanet_r18q_synth_voc.py', tiny_data, str(wd / 'w'))
    cfg.model.test_cfg.score_thr = 0.0
    cfg.custom_hooks = [dict(type='MultipointQuantHook', calib=CALIB, act_bits=8)]
    cfg_path = str(wd / 'cfg.py')
    cfg.dump(cfg_path)
    src = str(wd / 'float.pth')
    save_random_checkpoint(cfg, src)
    q = str(wd / 'w4a8.pth')
    assert export_tool.main([cfg_path, src, q, '--work-dir', str(wd / 'e')]) == 0
    return dict(cfg=cfg, cfg_path=cfg_path, src=src, q=q, dir=wd)


# Relative L2 of the raw outputs. A random-init detector has no redundancy, and its
# tiny regression outputs (init std 0.01) sit on 8-bit-rounded features: measured
# 0.12 here (a zero BN factor left unzeroed gave 7.5). The trained detectors measure
# 0.04-0.09 (tools/deploy.py) and their mAP is what counts (README).
TOOL_TOL = 0.3


def test_deploy_tool_writes_a_checked_int8_graph(tiny, capsys):
    out, fp32 = str(tiny['dir'] / 'int8.onnx'), str(tiny['dir'] / 'fp32.onnx')
    assert deploy_tool.main([tiny['cfg_path'], tiny['q'], '--out', out, '--fp32', fp32,
                             '--check-images', '2', '--tol', str(TOOL_TOL)]) == 0
    printed = capsys.readouterr().out
    assert 'QLinearConv' in printed and 'relative L2' in printed
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert {'QuantizeLinear', 'DequantizeLinear', 'Conv'} <= ops
    assert 'BatchNormalization' not in ops  # folded
    k = integer_kernel_counts(out)
    # every conv integer by default, the head output convs included
    assert k['integer_convs'] > 0 and k['conv_integer'] == 0 and k['float_convs'] == 0
    assert integer_kernel_counts(fp32)['integer_convs'] == 0
    # the int8 file holds 4-bit codes (INT4): well under the float graph
    assert osp.getsize(out) < 0.3 * osp.getsize(fp32)
    inits = onnx.load(out).graph.initializer
    assert any(t.data_type == onnx.TensorProto.INT4 for t in inits)
    wide = str(tiny['dir'] / 'int8_weights.onnx')
    assert deploy_tool.main([tiny['cfg_path'], tiny['q'], '--out', wide, '--int8-weights',
                             '--check-images', '1', '--tol', str(TOOL_TOL)]) == 0
    assert not any(t.data_type == onnx.TensorProto.INT4
                   for t in onnx.load(wide).graph.initializer)
    assert osp.getsize(wide) > 1.5 * osp.getsize(out)


def test_deploy_tool_refuses_a_float_checkpoint_for_int8(tiny):
    with pytest.raises(ValueError, match='act_bits=8'):
        deploy_tool.main([tiny['cfg_path'], tiny['src'], '--out',
                          str(tiny['dir'] / 'x.onnx')])


def test_ort_static_peer_graph(tiny, capsys):
    """--ort-static: onnxruntime's own quantize_static W8A8 of the float detector,
    calibrated on the train images, runs with integer convolutions."""
    out = str(tiny['dir'] / 'ort_w8a8.onnx')
    assert deploy_tool.main([tiny['cfg_path'], tiny['src'], '--ort-static', out,
                             '--calib-images', '4', '--check-images', '1',
                             '--tol', str(TOOL_TOL)]) == 0
    assert 'ort W8A8' in capsys.readouterr().out
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert {'QuantizeLinear', 'DequantizeLinear'} <= ops
    k = integer_kernel_counts(out)
    # every conv integer by default, the head output convs included
    assert k['integer_convs'] > 0 and k['conv_integer'] == 0 and k['float_convs'] == 0 and k['float_convs'] == 0
    sess = make_session(out)
    x = torch.randn(1, 3, 64, 64)
    assert all(o.size for o in run_session(sess, x))


def test_attached_graph_gives_pytorch_predictions(tiny):
    """The FP32 graph of the trained RetinaNet, attached: the head outputs regroup as
    mmdet's, and its decoding and NMS on onnxruntime's outputs give PyTorch's boxes
    (a random init ties its scores, so the order of its boxes is arbitrary)."""
    ckpt = osp.join(ROOT, 'data', 'checkpoints', 'retinanet_r18q.pth')
    fp32 = str(tiny['dir'] / 'trained_fp32.onnx')
    assert deploy_tool.main([tiny['cfg_path'], ckpt, '--fp32', fp32]) == 0
    cfg = copy.deepcopy(tiny['cfg'])
    model, meta = load_detector(cfg, ckpt)
    assert meta is None
    inputs, samples = sample_inputs(cfg, model, 2)
    with torch.no_grad():
        ref_raw = model.bbox_head(model.extract_feat(inputs))
        ref = model.predict(inputs, copy.deepcopy(samples))
        attach_onnx(model, fp32)
        got_raw = model.bbox_head(model.extract_feat(inputs))
        got = model.predict(inputs, copy.deepcopy(samples))
    assert len(got_raw) == len(ref_raw) == 2
    for a, b in zip(got_raw, ref_raw):
        assert len(a) == len(b) == model.bbox_head.prior_generator.num_levels
        for x, y in zip(a, b):
            assert x.shape == y.shape and torch.allclose(x, y, atol=1e-4)
    for a, b in zip(got, ref):
        a, b = a.pred_instances, b.pred_instances
        assert a.bboxes.shape[0] > 0 and a.bboxes.shape == b.bboxes.shape
        assert torch.allclose(a.bboxes, b.bboxes, atol=1e-2)
        assert torch.allclose(a.scores, b.scores, atol=1e-4)
        assert torch.equal(a.labels, b.labels)


def test_hook_runs_the_test_loop(tiny):
    from mmengine.runner import Runner
    out = str(tiny['dir'] / 'int8_hook.onnx')
    assert deploy_tool.main([tiny['cfg_path'], tiny['q'], '--out', out,
                             '--check-images', '1', '--tol', str(TOOL_TOL)]) == 0
    cfg = copy.deepcopy(tiny['cfg'])
    cfg.load_from = tiny['q']
    cfg.work_dir = str(tiny['dir'] / 'hook')
    cfg.custom_hooks = cfg.custom_hooks + [dict(type='OnnxRuntimeHook', onnx=out)]
    runner = Runner.from_cfg(cfg)
    metrics = runner.test()
    assert 'pascal_voc/mAP' in metrics
    assert hasattr(runner.model, 'onnx_session')


def test_score_floors(tiny_data, tmp_path):
    """Sigmoid heads get a floor logit(score_thr / 2) on each level's scores (mmdet
    drops a prior below score_thr before reading anything else); softmax heads (SSD)
    and score_thr 0 get none."""
    import math
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    from mpq_det.deploy.convert import score_floors
    init_default_scope('mmdet')
    x = torch.zeros(1, 3, 64, 64)
    for name, want in (('retinanet_r18q', 0.05), ('fcos_r18q', 0.05), ('ssdlite_mbv2q', None)):
        cfg = tiny_cfg(f'configs/detectors/{name}_synth_voc.py', tiny_data, str(tmp_path))
        model = MODELS.build(cfg.model).eval()
        floors = score_floors(model, x)
        if want is None:
            assert floors == {}
            continue
        assert model.bbox_head.test_cfg.score_thr == want
        L = model.bbox_head.prior_generator.num_levels
        assert floors == {f'out{i}': pytest.approx(math.log(0.025 / 0.975)) for i in range(L)}
        model.bbox_head.test_cfg.score_thr = 0.0
        assert score_floors(model, x) == {}


def test_two_stage_is_refused(tiny_data, tmp_path):
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    cfg = tiny_cfg('configs/detectors/faster_rcnn_r18q_synth_voc.py', tiny_data,
                   str(tmp_path))
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model).eval()
    with pytest.raises(ValueError, match='one-stage'):
        Int8Builder(model, torch.zeros(1, 3, 64, 64))
