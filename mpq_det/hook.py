"""MultipointQuantHook: quantize an mmdet detector right after its checkpoint loads."""
from __future__ import annotations

import json
import os
import os.path as osp
import time
from dataclasses import asdict, replace
from typing import Any, Callable, Sequence

import torch
from mmengine.dist import broadcast_object_list, get_rank, get_world_size, is_main_process
from mmengine.hooks import Hook
from mmengine.logging import MMLogger
from mmengine.model import is_model_wrapper
from mmengine.runner.loops import BaseLoop
from mmdet.registry import HOOKS

from .components import COMPONENTS, component_of, runs_on_proposals, stage_of
from .calibration import SPLITS, build_calib_loader, run_calibration
from .model_pass import (QUANTIZABLE, QuantResult, QuantSettings, StatsCollector, plan_layers,
                         quantize_model, quantize_model_sequential, summarize)
from .qstate import apply_quantized_state, quantized_state
from .quant import BUDGET_ON, DEFAULT_FORM, FORMS, check_bits
from .quant.allocation import BY
from .quant.multipoint import FB_MODES, POINT_SCALES
from .report import format_report, plot_report



def _register_mmcv_wrappers() -> None:
    """mmcv.cnn's Conv2d/Linear only add empty-batch handling (DETR-family heads use
    them), so they are quantized like torch's own."""
    from mmcv.cnn.bricks.wrappers import Conv2d, Linear
    QUANTIZABLE.update({Conv2d, Linear})


_register_mmcv_wrappers()
SETTING_KEYS = ('bits', 'method', 'budget', 'allocation', 'max_points')
CALIB_DEFAULTS = dict(split='train', num_images=32, batch_size=4, seed=0)
# error feedback wins on the committed detectors (README, "Accuracy levers")
DEFAULT_ERROR_FEEDBACK = True
# sequential statistics: False, True (stages: the backbone's blocks, the neck, each
# head) or 'components' (the backbone, the neck, each head: fewer passes)
SEQUENTIAL = (False, True, 'components')


def _choice(value: Any, name: str, allowed: tuple) -> Any:
    if value not in allowed:
        raise ValueError(f'{name}={value!r} is not allowed; choose one of {allowed}')
    return value


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f'{name}={value!r} must be True or False')
    return value


def _check_keys(where: str, given: dict, allowed: tuple) -> None:
    bad = set(given) - set(allowed)
    if bad:
        raise ValueError(f'{where}: unknown key(s) {sorted(bad)}; allowed: {allowed}')


@HOOKS.register_module()
class MultipointQuantHook(Hook):
    """Post-training multipoint quantization of the detector under test.

    Arguments are DESIGN.md's: ``bits``, ``method``, ``budget``, ``allocation``,
    ``max_points``, ``components``, ``skip``, ``act_bits``, ``calib``, ``export``,
    ``report``; plus ``h_form`` (the form of the calibration statistic H) and
    ``layer_bits`` ({glob: bits}, e.g. ``{'backbone.conv1': 8, '*.retina_reg': 8}``:
    the usual detection-PTQ choice of 8-bit first and last layers); the accuracy
    levers ``error_feedback`` (round each multipoint layer's codes column by column,
    feeding every column's error forward through the calibration H, GPTQ-style),
    ``feedback_points`` (for 1..feedback_points points per channel) and
    ``feedback_mode`` ('joint': a channel may swap its greedy points for the same
    scales with all codes re-rounded together with feedback, where that lowers the
    error; 'first': the first points themselves are re-rounded, later greedy points
    approximate what is left), ``feedback_order`` (columns by decreasing input
    energy, GPTQ's act-order), ``bias_correction`` (the mean output shift on the
    calibration images folded into the bias of layers that have one), ``budget_on`` ('memory', 'compute' or
    'both': which overheads the extra points keep within ``budget``) and
    ``sequential`` (calibrate stage by stage on the inputs that the quantized stages
    before give, against the floating-point outputs; True: the backbone's blocks,
    the neck and each head are stages, 'components': the backbone, the neck, each
    head; see ``quantize_model_sequential``) and ``point_scales`` ('free', or
    'pow2': a channel's further points at power-of-two fractions of its first
    point's scale, so that on int8 hardware they merge into one int8 row and cost no
    extra compute; see ``tools/deploy.py``).

    It quantizes in ``before_test`` (and ``before_val`` of a standalone
    ``runner.val()``), i.e. after the checkpoint is loaded. Validation during training
    is left alone (logged): quantizing there would overwrite the weights being trained.
    Given a checkpoint written by ``export``, it rebuilds the quantized layers in
    ``after_load_checkpoint`` instead of calibrating again.
    """

    priority = 'VERY_HIGH'  # before other before_test hooks see the model

    def __init__(self, bits: int = 4, method: str = 'multipoint', budget: float = 0.05,
                 allocation: str = 'global', max_points: int = 4,
                 components: dict | None = None, skip: Sequence[str] = (),
                 act_bits: int | None = None, calib: dict | None = None,
                 export: str | None = None, report: bool = True,
                 h_form: str = DEFAULT_FORM, layer_bits: dict | None = None,
                 error_feedback: bool = DEFAULT_ERROR_FEEDBACK, feedback_points: int = 4,
                 feedback_mode: str = 'joint', feedback_order: bool = True,
                 budget_on: str = 'both', bias_correction: bool = False,
                 rank_points_by: str = 'output', sequential: bool | str = False,
                 point_scales: str = 'free', **unknown: Any) -> None:
        if unknown:
            raise ValueError(
                f'MultipointQuantHook got unknown argument(s) {sorted(unknown)}; allowed: '
                f'bits, method, budget, allocation, max_points, components, skip, '
                f'act_bits, calib, export, report, h_form, layer_bits, error_feedback, '
                f'feedback_points, feedback_mode, feedback_order, budget_on, '
                f'bias_correction, rank_points_by, sequential, point_scales')
        self.error_feedback = _flag(error_feedback, 'error_feedback')
        if isinstance(feedback_points, bool) or not isinstance(feedback_points, int) \
                or feedback_points < 1:
            raise ValueError(f'feedback_points={feedback_points!r} must be an int >= 1 '
                             '(points of each channel rounded with error feedback)')
        self.feedback_points = feedback_points
        self.feedback_mode = _choice(feedback_mode, 'feedback_mode', FB_MODES)
        self.feedback_order = _flag(feedback_order, 'feedback_order')
        self.bias_correction = _flag(bias_correction, 'bias_correction')
        self.budget_on = _choice(budget_on, 'budget_on', BUDGET_ON)
        self.base = QuantSettings(bits, method, budget, allocation, max_points)
        self.components = self._parse_components(components)
        if isinstance(skip, str) or not all(isinstance(g, str) for g in skip):
            raise ValueError(f'skip={skip!r} must be a list of fnmatch globs (strings)')
        self.skip = list(skip)
        if act_bits is not None and (not isinstance(act_bits, int) or not 2 <= act_bits <= 8):
            raise ValueError(f'act_bits={act_bits!r} is not allowed; use None or an int in 2..8')
        self.act_bits = act_bits
        if layer_bits is not None and not isinstance(layer_bits, dict):
            raise ValueError(f'layer_bits={layer_bits!r} must be a dict {{glob: bits}}')
        self.layer_bits = {str(g): check_bits(b, f'layer_bits[{g!r}]')
                           for g, b in (layer_bits or {}).items()}
        self.calib = self._parse_calib(calib)
        self.h_form = _choice(h_form, 'h_form', tuple(FORMS))
        self.rank_points_by = _choice(rank_points_by, 'rank_points_by', BY)
        self.point_scales = _choice(point_scales, 'point_scales', POINT_SCALES)
        if not (isinstance(sequential, bool) or sequential == 'components'):
            raise ValueError(f'sequential={sequential!r} is not allowed; choose one of '
                             f'{SEQUENTIAL}')
        self.sequential = sequential
        if export is not None and not isinstance(export, str):
            raise ValueError(f'export={export!r} must be a file path or None')
        self.export = export
        self.report = bool(report)
        from .export import allow_exports
        allow_exports()  # exports (quantized checkpoints) load only with this hook
        self.loaded_export: dict | None = None   # meta['mpq'] of a reloaded export
        self.result: QuantResult | None = None
        self._done = False

    # ---- argument parsing ---------------------------------------------------------
    def _parse_components(self, components: dict | None) -> dict[str, QuantSettings | None]:
        out = {c: self.base for c in COMPONENTS}
        self.pools = {}
        self.explicit = set(components or ())
        if components is None:
            return out
        if not isinstance(components, dict):
            raise ValueError(f'components={components!r} must be a dict with keys among '
                             f'{COMPONENTS}')
        for comp, over in components.items():
            if comp not in COMPONENTS:
                raise ValueError(f'components: unknown component {comp!r}; allowed: '
                                 f'{COMPONENTS}')
            if over is None:
                out[comp] = None
                continue
            if not isinstance(over, dict):
                raise ValueError(f'components[{comp!r}] must be a dict of overrides or None')
            _check_keys(f'components[{comp!r}]', over, SETTING_KEYS)
            out[comp] = replace(self.base, **over)  # validated again by __post_init__
            if 'budget' in over:  # a component with its own budget pools its own
                self.pools[comp] = comp
        return out

    @staticmethod
    def _parse_calib(calib: dict | None) -> dict:
        out = dict(CALIB_DEFAULTS)
        if calib is None:
            return out
        if not isinstance(calib, dict):
            raise ValueError(f'calib={calib!r} must be a dict with keys {tuple(CALIB_DEFAULTS)}')
        _check_keys('calib', calib, tuple(CALIB_DEFAULTS))
        out.update(calib)
        if out['split'] not in SPLITS:
            raise ValueError(f"calib.split={out['split']!r} is not allowed; choose one of {SPLITS}")
        for k in ('num_images', 'batch_size'):
            if not isinstance(out[k], int) or out[k] <= 0:
                raise ValueError(f'calib.{k}={out[k]!r} is not allowed; use an int >= 1')
        return out

    def settings(self) -> dict:
        """Everything that decides the quantized weights (stored in exports)."""
        return dict(base=asdict(self.base),
                    components={c: None if s is None else asdict(s)
                                for c, s in self.components.items()},
                    pools=self.pools, skip=self.skip, layer_bits=self.layer_bits,
                    act_bits=self.act_bits,
                    calib=self.calib, h_form=self.h_form,
                    error_feedback=self.error_feedback,
                    feedback_points=self.feedback_points,
                    feedback_mode=self.feedback_mode, feedback_order=self.feedback_order,
                    budget_on=self.budget_on, bias_correction=self.bias_correction,
                    rank_points_by=self.rank_points_by, sequential=self.sequential,
                    point_scales=self.point_scales)

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

    def _plot(self, work_dir: str, logger) -> None:
        """mpq_report.png next to the JSON; a plotting failure only warns, since the
        quantized model is what the user came for."""
        path = osp.join(work_dir, 'mpq_report.png')
        s = self.result.summary
        title = (f'{len(self.result.layers)} layers, {s.get("bits_per_weight", 0):.3f} bits/weight, '
                 f'memory +{s.get("memory_overhead", 0):.1%}, compute '
                 f'+{s.get("compute_overhead", 0):.1%}')
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

    def check_model(self, model: torch.nn.Module) -> None:
        present = {component_of(n) for n, _ in model.named_children()} - {None}
        for comp in self.explicit:
            if comp not in present:
                raise ValueError(f'components: the model has no {comp!r} (it has '
                                 f'{sorted(present)}); remove it or set it to None')

    def quantize(self, model: torch.nn.Module,
                 calibrate: Callable[[torch.nn.Module, torch.nn.Module | None], None],
                 what: str = 'the calibration inputs') -> tuple[QuantResult, list, list]:
        """Plans ``model``'s layers with this hook's settings, calibrates and quantizes
        in place. ``calibrate(m, reference)`` runs every calibration batch through
        ``m`` (through ``reference`` first when it is not None: the passes of
        sequential statistics). Returns (result, plans, skipped). Also what code
        outside a runner (e.g. the deploy benchmark) calls, so that it quantizes with
        the hook's defaults."""
        logger = MMLogger.get_current_instance()
        plans, skipped, unmatched = plan_layers(model, component_of, self.components,
                                                self.skip, self.pools, self.layer_bits)
        for g in unmatched:
            logger.warning(f'MultipointQuantHook: skip/layer_bits glob {g!r} matches no layer')
        logger.info(f'MultipointQuantHook: calibrating {len(plans)} layers on {what}'
                    + (' (sequential statistics)' if self.sequential else ''))
        levers = dict(seed=self.calib['seed'], error_feedback=self.error_feedback,
                      feedback_points=self.feedback_points, feedback_mode=self.feedback_mode,
                      feedback_order=self.feedback_order, budget_on=self.budget_on,
                      bias_correction=self.bias_correction,
                      rank_points_by=self.rank_points_by, point_scales=self.point_scales)
        if self.sequential:
            split = self.sequential is True
            result = quantize_model_sequential(
                model, plans, calibrate, lambda n: stage_of(n, split_backbone=split),
                dict(form=self.h_form, seed=self.calib['seed']), self.act_bits,
                unpaired=runs_on_proposals, **levers)
            return result, plans, skipped
        collector = StatsCollector(plans, form=self.h_form, seed=self.calib['seed'],
                                   feedback=self.error_feedback)
        try:
            calibrate(model, None)
        finally:
            collector.remove()
        result = quantize_model(model, plans, collector.stats, self.act_bits, **levers)
        return result, plans, skipped

    def _quantize(self, runner) -> None:
        if self._done:
            return
        logger = MMLogger.get_current_instance()
        model = self._model(runner)
        self.check_model(model)
        t0 = time.perf_counter()
        payload = [None]
        if is_main_process():
            loader = build_calib_loader(runner.cfg, **self.calib)
            result, plans, skipped = self.quantize(
                model, lambda m, ref: run_calibration(m, loader, reference=ref),
                f'{len(loader.dataset)} {self.calib["split"]} images')
            result.skipped = skipped
            result.summary['notes'] = self._notes(plans)
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
