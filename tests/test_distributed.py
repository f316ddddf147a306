"""MultipointQuantHook under tools/dist_test.sh: 2 processes, gloo, CPU.

A random-init RetinaNet-r18q checkpoint is tested on the tiny synthetic VOC set twice
through the real CLI, with the hook in custom_hooks: once with tools/test.py alone and
once with tools/dist_test.sh on 2 ranks. A small hook written to tmp (imported with
``custom_imports``) runs after the quantization hook and writes the sha256 of every
quantized layer's tensors to ``{work_dir}/rank{r}.sha``. We assert:

* both ranks hold bit-identical quantized layers, equal to the single-process ones;
* the dumped predictions are bit-identical and metrics.json is equal.

For results to be bit-comparable across the two runs, each image is run alone
(``batch_size=1``: batches of 2 would pad differently on 1 and 2 ranks) and both runs
use one intra-op thread (torchrun sets OMP_NUM_THREADS=1 for its workers).
"""
from __future__ import annotations

import json
import os
import os.path as osp
import pickle
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, save_random_checkpoint, tiny_cfg

CFG = 'configs/detectors/retinanet_r18q_synth_voc.py'
TIMEOUT = 600

SHA_HOOK = textwrap.dedent('''
    """Test helper: the sha256 of every quantized layer, per rank, after before_test."""
    import hashlib
    import os.path as osp

    from mmengine.dist import get_rank
    from mmengine.hooks import Hook
    from mmengine.model import is_model_wrapper
    from mmdet.registry import HOOKS

    from mpq_det.modules import QConv2d, QLinear


    @HOOKS.register_module()
    class QuantShaHook(Hook):
        priority = 'LOWEST'   # after MultipointQuantHook (VERY_HIGH)

        def before_test(self, runner):
            model = runner.model.module if is_model_wrapper(runner.model) else runner.model
            h, n = hashlib.sha256(), 0
            for name, m in model.named_modules():
                if isinstance(m, (QConv2d, QLinear)):
                    n += 1
                    h.update(name.encode())
                    for k, t in sorted(m.state_dict().items()):
                        h.update(k.encode())
                        h.update(t.detach().cpu().contiguous().numpy().tobytes())
            with open(osp.join(runner.work_dir, f'rank{get_rank()}.sha'), 'w') as f:
                f.write(f'{n} {h.hexdigest()}\\n')
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def setup(tiny_data, tmp_path_factory):
    """A dumped config (hook + sha hook + tiny data) and a random-init checkpoint."""
    tmp = tmp_path_factory.mktemp('dist')
    (tmp / 'quant_sha_hook.py').write_text(SHA_HOOK)
    cfg = tiny_cfg(CFG, tiny_data, str(tmp / 'unused'))
    cfg.test_dataloader.batch_size = 1
    cfg.val_dataloader.batch_size = 1
    # a random-init RetinaNet scores ~0.01 everywhere: keep every box it ranks
    cfg.model.test_cfg.score_thr = 0.0
    cfg.custom_imports = dict(imports=['mpq_det', 'quant_sha_hook'],
                              allow_failed_imports=False)
    cfg.custom_hooks = [
        dict(type='MultipointQuantHook', bits=4, budget=0.05,
             calib=dict(split='train', num_images=4, batch_size=2, seed=0)),
        dict(type='QuantShaHook'),
    ]
    config = str(tmp / 'retinanet_dist.py')
    cfg.dump(config)

    ckpt = str(tmp / 'float.pth')
    save_random_checkpoint(cfg, ckpt)
    return tmp, config, ckpt


def _env(tmp) -> dict:
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([str(tmp), ROOT, env.get('PYTHONPATH', '')])
    env['OMP_NUM_THREADS'] = '1'
    env['PYTHON'] = sys.executable
    env['PORT'] = str(_free_port())
    return env


def _run(cmd: list[str], env: dict, log: str) -> None:
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=TIMEOUT)
    with open(log, 'w') as f:
        f.write(p.stdout + p.stderr)
    assert p.returncode == 0, f'{cmd[:3]} failed (rc={p.returncode}):\n' + \
        (p.stdout + p.stderr)[-4000:]


def _sha(path: str) -> tuple[int, str]:
    n, digest = open(path).read().split()
    return int(n), digest


def test_dist_test_matches_single_process(setup):
    tmp, config, ckpt = setup
    single, dist = str(tmp / 'single'), str(tmp / 'dist')
    env = _env(tmp)
    _run([sys.executable, 'tools/test.py', config, ckpt, '--work-dir', single,
          '--out', osp.join(single, 'preds.pkl')], env, str(tmp / 'single.log'))
    _run(['bash', 'tools/dist_test.sh', config, ckpt, '2', '--work-dir', dist,
          '--out', osp.join(dist, 'preds.pkl')], env, str(tmp / 'dist.log'))

    # every rank holds the same quantized layers, equal to the single-process ones
    n0, h0 = _sha(osp.join(dist, 'rank0.sha'))
    n1, h1 = _sha(osp.join(dist, 'rank1.sha'))
    ns, hs = _sha(osp.join(single, 'rank0.sha'))
    assert n0 == n1 == ns > 10
    assert h0 == h1, 'ranks 0 and 1 ended with different quantized weights'
    assert h0 == hs, 'the distributed quantization differs from the single-process one'

    # the same predictions, bit for bit, and so the same mAP
    with open(osp.join(single, 'preds.pkl'), 'rb') as f:
        p_single = pickle.load(f)
    with open(osp.join(dist, 'preds.pkl'), 'rb') as f:
        p_dist = pickle.load(f)
    assert len(p_single) == len(p_dist) == 8
    for a, b in zip(p_single, p_dist):
        assert a['img_id'] == b['img_id']
        for k in ('bboxes', 'scores', 'labels'):
            assert torch.equal(a['pred_instances'][k], b['pred_instances'][k]), k
    assert sum(len(p['pred_instances']['scores']) for p in p_single) > 0
    m_single = json.load(open(osp.join(single, 'metrics.json')))
    m_dist = json.load(open(osp.join(dist, 'metrics.json')))
    assert 'pascal_voc/mAP' in m_single
    assert m_dist == m_single
    # the report is written once, by rank 0, with the same layers
    r_single = json.load(open(osp.join(single, 'mpq_report.json')))
    r_dist = json.load(open(osp.join(dist, 'mpq_report.json')))
    assert [r['name'] for r in r_dist['layers']] == [r['name'] for r in r_single['layers']]
