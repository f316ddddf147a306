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

convert_tool = load_tool('convert')
deploy_tool = load_tool('deploy')
export_tool = load_tool('export')


@pytest.fixture(scope='module')
def tiny(tiny_data, tmp_path_factory):
    wd = tmp_path_factory.mktemp('deploy')
    cfg = tiny_cfg('configs/detectors/retinanet_r18q_synth_voc.py', tiny_data, str(wd / 'w'))
    cfg.model.test_cfg.score_thr = 0.0
    cfg.custom_hooks = [dict(type='MultipointQuantHook', calib=CALIB, activations=dict(bits=8))]
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
# 0.04-0.09 (tools/deploy.py) and their mAP is what counts (docs/deploy.md).
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


def test_deploy_tool_refuses_a_float_checkpoint_for_int8(tiny, capsys):
    assert deploy_tool.main([tiny['cfg_path'], tiny['src'], '--out',
                             str(tiny['dir'] / 'x.onnx')]) == 2
    err = capsys.readouterr().err
    assert 'float checkpoint' in err and 'activations.bits=8' in err


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
    assert k['integer_convs'] > 0 and k['conv_integer'] == 0 and k['float_convs'] == 0
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


def test_deploy_tool_refuses_a_two_stage_detector(tiny_data, tmp_path, capsys, monkeypatch):
    """Faster R-CNN (RoI heads) is refused from its config, before any checkpoint is
    loaded, with a message that says which detectors the graph covers (it used to
    fail deep inside mmdet with "'NoneType' object is not iterable")."""
    from mpq_det.deploy import tools

    def no_loading(*a, **kw):
        raise AssertionError('the checkpoint was loaded before the detector was checked')
    monkeypatch.setattr(tools, 'load_detector', no_loading)
    cfg = tiny_cfg('configs/mpq/faster_rcnn_r18q_synth_voc_mpq_w4.py', tiny_data,
                   str(tmp_path))
    cfg_path = str(tmp_path / 'cfg.py')
    cfg.dump(cfg_path)
    q = str(tmp_path / 'w4a8.pth')  # never read
    assert deploy_tool.main([cfg_path, q, '--out', str(tmp_path / 'x.onnx'),
                             '--fp32', str(tmp_path / 'y.onnx')]) == 2
    err = capsys.readouterr().err
    assert 'FasterRCNN is a two-stage detector' in err and 'RoI head' in err
    assert 'one-stage detectors' in err and 'RetinaNet, FCOS, SSD' in err
    assert not any(tmp_path.glob('*.onnx'))


def test_a_graph_of_another_detector_is_refused_before_the_test_loop(tiny, tmp_path):
    """tools/test.py --onnx with a graph written for other classes: refused in
    before_test, naming the graph (and the config and checkpoint it was written
    from), the config and checkpoint tested, and the output that differs."""
    from mmengine.runner import Runner
    from mpq_det.deploy.convert import UnsupportedInput
    other = copy.deepcopy(tiny['cfg'])
    other.model.bbox_head.num_classes = 3
    other_cfg, other_ckpt = str(tmp_path / 'other_cfg.py'), str(tmp_path / 'other.pth')
    other.dump(other_cfg)
    save_random_checkpoint(other, other_ckpt)
    graph = str(tmp_path / 'other_fp32.onnx')
    assert deploy_tool.main([other_cfg, other_ckpt, '--fp32', graph,
                             '--check-images', '1']) == 0
    cfg = copy.deepcopy(tiny['cfg'])
    cfg.load_from = tiny['q']
    cfg.work_dir = str(tmp_path / 'test')
    cfg.custom_hooks = cfg.custom_hooks + [dict(type='OnnxRuntimeHook', onnx=graph)]
    runner = Runner.from_cfg(cfg)
    iters = []
    runner.test_loop.run_iter = lambda *a: iters.append(a)
    with pytest.raises(UnsupportedInput) as e:
        runner.test()
    msg = str(e.value)
    print(msg)
    assert not iters
    assert f'ONNX graph {graph}' in msg and other_cfg in msg and other_ckpt in msg
    assert tiny['q'] in msg and cfg.filename in msg
    # RetinaNet's classification output: 9 anchors x classes channels
    n_cls = tiny['cfg'].model.bbox_head.num_classes
    assert 'raw output 0 ' in msg and f'{9 * 3}x' in msg and f'{9 * n_cls}x' in msg


def test_attach_refuses_a_graph_with_other_outputs(tiny_data, tiny, tmp_path):
    """A graph of another kind of detector (FCOS: three outputs per level where
    RetinaNet has two) is refused by attach_onnx, the outputs counted."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    from mpq_det.deploy.convert import UnsupportedInput
    from mpq_det.deploy.graph import torch_to_onnx
    init_default_scope('mmdet')
    fcos = MODELS.build(tiny_cfg('configs/detectors/fcos_r18q_synth_voc.py', tiny_data,
                                 str(tmp_path)).model).eval()
    graph = str(tmp_path / 'fcos.onnx')
    onnx.save(torch_to_onnx(fcos, torch.zeros(1, 3, 64, 64)), graph)
    model, _ = load_detector(copy.deepcopy(tiny['cfg']), tiny['src'])
    L = model.bbox_head.prior_generator.num_levels
    with pytest.raises(UnsupportedInput, match=f'the graph has {3 * L} raw outputs, '
                                               f"the model's head {2 * L}"):
        attach_onnx(model, graph, model_desc='the tiny RetinaNet')
    assert not hasattr(model, 'onnx_session')


def test_convert_onnx_of_an_export_with_activation_quantization(tiny, tmp_path, capsys):
    """tools/convert.py --onnx on a W4A8 export writes a float graph (no activation
    rounding, which flips wherever onnxruntime's convs differ from PyTorch's in the
    last bits: "above tol" on the trained RetinaNet) and checks it against the same
    model with activation quantization off, saying so."""
    o = str(tmp_path / 'net.onnx')
    assert convert_tool.main([tiny['cfg_path'], tiny['q'], '--onnx', o]) == 0
    out = capsys.readouterr().out
    assert 'onnx (activation quantization off): max rel diff' in out
    ops = {n.op_type for n in onnx.load(o).graph.node}
    assert 'ScatterElements' in ops and 'Round' not in ops  # common operands, float inputs


def test_convert_refuses_onnx_of_a_two_stage_detector(tiny_data, tmp_path, capsys):
    """--onnx of Faster R-CNN: refused from the config before the export is read."""
    cfg = tiny_cfg('configs/mpq/faster_rcnn_r18q_synth_voc_mpq_w4.py', tiny_data,
                   str(tmp_path))
    cfg_path = str(tmp_path / 'cfg.py')
    cfg.dump(cfg_path)
    assert convert_tool.main([cfg_path, str(tmp_path / 'missing.pth'), '--onnx',
                              str(tmp_path / 'x.onnx')]) == 2
    assert 'FasterRCNN is a two-stage detector' in capsys.readouterr().err
