"""MultipointQuantHook: quantize an mmdet detector right after its checkpoint loads."""
from __future__ import annotations

import inspect
import json
import os
import os.path as osp
import time
from typing import Any

import torch
from mmengine.dist import broadcast_object_list, get_rank, get_world_size, is_main_process
from mmengine.hooks import Hook
from mmengine.logging import MMLogger
from mmengine.model import is_model_wrapper
from mmengine.runner.loops import BaseLoop
from mmdet.registry import HOOKS

from .calibration import build_calib_loader, run_calibration
from .sensitivity import score_backward
from .model_pass import QUANTIZABLE, QuantResult, summarize
from .qstate import apply_quantized_state, quantized_state
from .quantizer import MultipointQuantizer
from .report import format_report, overheads, plot_report


def _register_mmcv_wrappers() -> None:
    """mmcv.cnn's Conv2d/Linear only add empty-batch handling (DETR-family heads use
    them), so they are quantized like torch's own."""
    from mmcv.cnn.bricks.wrappers import Conv2d, Linear
    QUANTIZABLE.update({Conv2d, Linear})


_register_mmcv_wrappers()


# the flat arguments that the groups replaced, named in the error for unknown ones
MOVED = dict(act_bits='activations=dict(bits=...)', h_form='stats=dict(form=...)',
             sequential='stats=dict(sequential=...)',
             error_feedback='feedback=dict(...) (None: off)',
             feedback_points='feedback=dict(points=...)',
             feedback_mode='feedback=dict(mode=...)',
             feedback_order='feedback=dict(order=...)',
             budget_on='points=dict(budget_on=...)', rank_points_by='points=dict(rank_by=...)',
             point_scales='points=dict(scales=...)')


@HOOKS.register_module()
class MultipointQuantHook(Hook):
    """Post-training multipoint quantization of the detector under test.

    Takes ``MultipointQuantizer``'s arguments, grouped by concern (docs/hook.md has
    a table per group)::

        bits=4, method='multipoint', budget=0.05, allocation='global', max_points=4,
        grid='full', target='int8',
        components=None, skip=(), layer_bits=None,
        points=dict(budget_on='both', rank_by='output', scales=None),  # None: target's
        feedback=dict(points=4, mode='joint', order=True),     # None: off
        stats=dict(form='lowrank', sequential=False),
        bias_correction=False,
        activations=None,        # dict(bits=8): W*A8; dict(bits=4, range='fisher', ...)
        protocol='ours',         # 'literature': heads FP, the first conv at 8 bits
        calib=dict(split='train', num_images=32, batch_size=4, seed=0),

    plus ``export`` (write the quantized checkpoint there) and ``report`` (the
    per-layer table, ``mpq_report.json`` and ``mpq_report.png`` in the work dir).

    It quantizes in ``before_test`` (and ``before_val`` of a standalone
    ``runner.val()``), i.e. after the checkpoint is loaded. Validation during training
    is left alone (logged): quantizing there would overwrite the weights being trained.
    Given a checkpoint written by ``export``, it rebuilds the quantized layers in
    ``after_load_checkpoint`` instead of calibrating again.
    """

    priority = 'VERY_HIGH'  # before other before_test hooks see the model

    def __init__(self, export: str | None = None, report: bool = True,
                 **kwargs: Any) -> None:
        allowed = tuple(inspect.signature(MultipointQuantizer).parameters)
        unknown = set(kwargs) - set(allowed)
        if unknown:
            hints = ''.join(f'; {k} is now {MOVED[k]}' for k in sorted(unknown) if k in MOVED)
            raise ValueError(f'MultipointQuantHook got unknown argument(s) {sorted(unknown)}; '
                             f'allowed: {(*allowed, "export", "report")}{hints}')
        self.quantizer = MultipointQuantizer(**kwargs)
        if export is not None and not isinstance(export, str):
            raise ValueError(f'export={export!r} must be a file path or None')
        self.export = export
        self.report = bool(report)
        from .export import allow_exports
        allow_exports()  # exports (quantized checkpoints) load only with this hook
        self.loaded_export: dict | None = None   # meta['mpq'] of a reloaded export
        self.result: QuantResult | None = None
        self._done = False

    def settings(self) -> dict:
        """Everything that decides the quantized weights (stored in exports)."""
        return self.quantizer.settings()

    @staticmethod
    def _notes(plans) -> list[str]:
        notes = set()
        for p in plans:
            s = p.settings
            if s.method in ('rtn', 'mse') and s.budget > 0:
                notes.add(f'{p.component}: method {s.method} takes no extra points; '
                          f'budget={s.budget} is ignored')
            if s.method == 'ocs' and getattr(p.module, 'groups', 1) != 1:
                notes.add(f'{p.name}: OCS cannot split a grouped conv; quantized with rtn')
        return sorted(notes)

    @staticmethod
    def _act_notes(result: QuantResult) -> list[str]:
        """What the report says about the quantized inputs: the layer that reads the
        image and its bits, and that inputs below 8 bits are simulated only."""
        rows = [r for r in result.layers if r.get('act_bits') is not None]
        if not rows:
            return []
        notes = []
        image = next((r for r in rows if r['name'] == result.summary.get('image_layer')),
                     None)
        if image is not None:
            notes.append(f"{image['name']} reads the image: its input at "
                         f"{image['act_bits']} bits, range {image['act_method']} "
                         f"(activations.image_bits)")
        low = sorted({r['act_bits'] for r in rows if r['act_bits'] < 8})
        if low:
            methods = sorted({r['act_method'] for r in rows})
            notes.append(f"inputs at {'/'.join(map(str, low))} bits are simulated (fake "
                         f"quantization; onnxruntime has no kernels for them, tools/deploy.py "
                         f"keeps such layers float); ranges: {', '.join(methods)}")
        return notes

    def _plot(self, work_dir: str, logger) -> None:
        """mpq_report.png next to the JSON; a plotting failure only warns, since the
        quantized model is what the user came for."""
        path = osp.join(work_dir, 'mpq_report.png')
        s = self.result.summary
        title = (f'{len(self.result.layers)} layers, {s.get("bits_per_weight", 0):.3f} '
                 f'bits/weight\n{overheads(s)}')
        try:
            plot_report(self.result.layers, path, title)
        except Exception as e:  # noqa: BLE001  (any backend or font failure)
            logger.warning(f'MultipointQuantHook: could not draw {path}: {e!r}; the '
                           f'quantization and mpq_report.json are unaffected')

    # ---- mmengine hook points ------------------------------------------------------
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        from .export import is_quantized_checkpoint, prepare_model_for_export
        if not is_quantized_checkpoint(checkpoint):
            return
        logger = MMLogger.get_current_instance()
        meta = checkpoint['meta']['mpq']
        stored, mine = meta['settings'], self.settings()
        if stored != mine:
            diff = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
            logger.warning(f'MultipointQuantHook: the checkpoint is a quantized export; its '
                           f'settings win over the config\'s (they differ in {diff})')
        prepare_model_for_export(self._model(runner), checkpoint,
                                 filename=runner.cfg.get('load_from'))
        self.loaded_export = meta
        self._done = True
        logger.info(f'MultipointQuantHook: rebuilt {len(meta["layers"])} quantized layers '
                    f'from the export (no calibration)')

    def before_val(self, runner) -> None:
        if isinstance(getattr(runner, '_train_loop', None), BaseLoop):
            MMLogger.get_current_instance().info(
                'MultipointQuantHook: validation during training is not quantized, so that '
                'the weights being trained are never altered; quantize with tools/test.py')
            return
        self._quantize(runner)

    def before_test(self, runner) -> None:
        self._quantize(runner)

    # ---- work ----------------------------------------------------------------------
    @staticmethod
    def _model(runner) -> torch.nn.Module:
        return runner.model.module if is_model_wrapper(runner.model) else runner.model

    def _quantize(self, runner) -> None:
        if self._done:
            return
        logger = MMLogger.get_current_instance()
        model = self._model(runner)
        q = self.quantizer
        q.check_model(model)
        t0 = time.perf_counter()
        payload = [None]
        if is_main_process():
            loader = build_calib_loader(runner.cfg, **q.calib)
            result, plans, skipped = q.quantize(
                model, lambda m, ref: run_calibration(m, loader, reference=ref),
                f'{len(loader.dataset)} {q.calib["split"]} images', logger,
                backward=score_backward(loader, q.calib['seed']))
            result.skipped = skipped
            result.summary['notes'] = self._notes(plans) + self._act_notes(result)
            result.summary.update(summarize(result, model, plans))
            result.summary['calib_and_quant_time_s'] = time.perf_counter() - t0
            result.summary['settings'] = self.settings()
            self.result = result
            payload = [(quantized_state(model), result)]
        if get_world_size() > 1:
            # rank 0's weights are sent to every rank, so all ranks are bit-identical
            broadcast_object_list(payload, src=0)
            if get_rank() != 0:
                state, self.result = payload[0]
                apply_quantized_state(model, state)
        self._done = True
        if self.report and is_main_process():
            text = format_report(self.result)
            logger.info('\n' + text)
            os.makedirs(runner.work_dir, exist_ok=True)
            with open(osp.join(runner.work_dir, 'mpq_report.json'), 'w') as f:
                json.dump(dict(layers=self.result.layers,
                               skipped=[vars(s) for s in self.result.skipped],
                               summary=self.result.summary), f, indent=1)
            self._plot(runner.work_dir, logger)
        if self.export and is_main_process():
            from .export import save_quantized_checkpoint
            save_quantized_checkpoint(model, self.export, source=runner.cfg.get('load_from'),
                                      settings=self.settings(), report=self.result)
