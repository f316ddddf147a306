"""The quantizer behind the hook: its arguments, grouped by concern, and one call that
plans, calibrates and quantizes a model in place.

Plain torch (no mmdet, mmengine or mmcv import), so that any ``nn.Module`` can be
quantized outside a Runner (a plain-torch script, the GPU machine, the deploy
benchmark) with exactly the defaults ``MultipointQuantHook`` uses::

    q = MultipointQuantizer(bits=4, activations=dict(bits=8))
    result, plans, skipped = q.quantize(model, calibrate)   # calibrate(m, reference)

Arguments, one table per group in docs/hook.md:

* per-component weight settings: ``bits``, ``method``, ``budget``, ``allocation``,
  ``max_points`` (each may be overridden in ``components``);
* ``grid``: the code grid of every layer, 'full' (all 2^b codes) or 'symmetric';
* ``target``: where the model runs, 'int8' or 'lowbit', which sets the defaults of
  ``points.scales`` and how the budget counts compute (``TARGETS``);
* which layers: ``components``, ``skip``, ``layer_bits``;
* ``points``: what the budget bounds, how extra points are ranked, their scales;
* ``feedback``: error feedback (None: off);
* ``stats``: the form of the calibration statistic H, sequential statistics;
* ``bias_correction``; ``activations`` (None: float inputs): bits, per-layer bits,
  how the ranges are chosen; ``calib``: which images;
* ``protocol``: which layers a published comparison quantizes, 'ours' (every layer)
  or 'literature' (heads in floating point, the first conv at 8 bits).
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import asdict, replace
from typing import Any, Callable, Sequence

import torch

from .components import COMPONENTS, component_of, runs_on_proposals, stage_of
from .model_pass import (ACT_FITS, QUANTIZABLE, ActSettings, QuantResult, QuantSettings,
                         calibrate_layers, plan_layers, quantize_model,
                         quantize_model_sequential)
from .quant.act_ranges import RANGES, check_factor
from .quant import BUDGET_ON, DEFAULT_FORM, FORMS, GRIDS, check_bits
from .quant.allocation import BY, TARGETS
from .quant.multipoint import FB_MODES, POINT_SCALES

SETTING_KEYS = ('bits', 'method', 'budget', 'allocation', 'max_points')
SPLITS = ('train', 'val', 'test')
# sequential statistics: False, True (stages: the backbone's blocks, the neck, each
# head) or 'components' (the backbone, the neck, each head: fewer passes)
SEQUENTIAL = (False, True, 'components')


def _choice(allowed: tuple) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        # `value in allowed` would take 1 for True and 0 for False
        if not any(type(value) is type(a) and value == a for a in allowed):
            raise ValueError(f'{name}={value!r} is not allowed; choose one of {allowed}')
        return value
    return check


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f'{name}={value!r} must be True or False')
    return value


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{name}={value!r} is not allowed; use an int >= 1')
    return value


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'{name}={value!r} must be an int')
    return value


def _bits(name: str, value: Any) -> int:
    return check_bits(value, name)


def _bits_or_none(name: str, value: Any) -> int | None:
    return None if value is None else check_bits(value, name)


def _glob_bits(name: str, value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise ValueError(f'{name}={value!r} must be a dict {{glob: bits}}')
    return {str(g): check_bits(b, f'{name}[{g!r}]') for g, b in value.items()}


# protocol -> what it sets unless the arguments say otherwise. 'literature': QDrop,
# BRECQ and most detection PTQ papers keep the heads in floating point and the first
# conv (the one that reads the image) at 8 bits, weights and input; 'ours': every
# layer of backbone, neck and head (the first conv's input at 8 bits all the same:
# activations.image_bits)
PROTOCOLS = ('ours', 'literature')
LITERATURE_FIRST_BITS = 8


# target -> the defaults it gives the points group; the explicit keys win. 'int8': a
# channel's points at power-of-two scale ratios merge into one int8 row, and the
# budget counts compute as the int8 graph pays it (merged points free, any other
# point its rows); 'lowbit': hardware that runs b-bit codes as they are, each point a
# row of MACs (the paper's setting)
TARGET_POINTS = {'int8': dict(scales='pow2'), 'lowbit': dict(scales='free')}


def _or_target(allowed: tuple) -> Callable[[str, Any], Any]:
    """A choice among ``allowed``, or None: the target's default."""
    check = _choice(allowed)
    return lambda name, value: None if value is None else check(name, value)


# group -> {key: (default, validator)}. A group given as a dict is merged into its
# defaults; the groups in NULLABLE may also be None (the lever off).
GROUPS: dict[str, dict[str, tuple[Any, Callable[[str, Any], Any]]]] = {
    'points': dict(budget_on=('both', _choice(BUDGET_ON)),
                   rank_by=('output', _choice(BY)),
                   scales=(None, _or_target(POINT_SCALES))),
    'feedback': dict(points=(4, _positive_int), mode=('joint', _choice(FB_MODES)),
                     order=(True, _flag)),
    'stats': dict(form=(DEFAULT_FORM, _choice(tuple(FORMS))),
                  sequential=(False, _choice(SEQUENTIAL))),
    'activations': dict(bits=(8, _bits), range=('fisher', _choice(RANGES)),
                        shrink=(1.0, lambda n, v: check_factor(v, n)), layer_bits=({}, _glob_bits),
                        image_bits=(8, _bits_or_none), fit=('float', _choice(ACT_FITS))),
    'calib': dict(split=('train', _choice(SPLITS)), num_images=(32, _positive_int),
                  batch_size=(4, _positive_int), seed=(0, _int)),
}
NULLABLE = ('feedback', 'activations')
# the default of each group (None: off): error feedback wins on every committed
# detector (docs/results.md, the levers ablation); activations stay float unless asked
DEFAULTS: dict[str, dict | None] = dict(
    points={}, feedback={}, stats={}, activations=None, calib={})


def parse_group(group: str, value: dict | None) -> dict | None:
    """``value`` merged into ``group``'s defaults and validated key by key; None stays
    None for the groups that may be off."""
    spec = GROUPS[group]
    if value is None:
        if group in NULLABLE:
            return None
        value = {}
    if not isinstance(value, dict):
        off = ' or None (off)' if group in NULLABLE else ''
        raise ValueError(f'{group}={value!r} must be a dict with keys among '
                         f'{tuple(spec)}{off}')
    bad = set(value) - set(spec)
    if bad:
        raise ValueError(f'{group}: unknown key(s) {sorted(bad)}; allowed: {tuple(spec)}')
    out = {k: d for k, (d, _) in spec.items()}
    out.update(value)
    return {k: spec[k][1](f'{group}.{k}', v) for k, v in out.items()}


class MultipointQuantizer:
    """Multipoint quantization of a model's layers with grouped, validated arguments
    (see the module docstring and docs/hook.md). ``MultipointQuantHook`` takes the
    same arguments plus ``export`` and ``report``."""

    def __init__(self, bits: int = 4, method: str = 'multipoint', budget: float = 0.05,
                 allocation: str = 'global', max_points: int = 4,
                 components: dict | None = None, skip: Sequence[str] = (),
                 layer_bits: dict | None = None, points: dict | None = DEFAULTS['points'],
                 feedback: dict | None = DEFAULTS['feedback'],
                 stats: dict | None = DEFAULTS['stats'], bias_correction: bool = False,
                 activations: dict | None = DEFAULTS['activations'],
                 calib: dict | None = DEFAULTS['calib'], grid: str = 'full',
                 target: str = 'int8', protocol: str = 'ours') -> None:
        self.base = QuantSettings(bits, method, budget, allocation, max_points)
        self.grid = _choice(GRIDS)('grid', grid)
        self.target = _choice(TARGETS)('target', target)
        self.protocol = _choice(PROTOCOLS)('protocol', protocol)
        self.explicit = set(components or ())
        if self.protocol == 'literature' and 'head' not in self.explicit:
            components = dict(components or {}, head=None)
        self.components, self.pools = self._parse_components(components)
        if isinstance(skip, str) or not all(isinstance(g, str) for g in skip):
            raise ValueError(f'skip={skip!r} must be a list of fnmatch globs (strings)')
        self.skip = list(skip)
        if layer_bits is not None and not isinstance(layer_bits, dict):
            raise ValueError(f'layer_bits={layer_bits!r} must be a dict {{glob: bits}}')
        self.layer_bits = {str(g): check_bits(b, f'layer_bits[{g!r}]')
                           for g, b in (layer_bits or {}).items()}
        self.points = parse_group('points', points)
        for k, v in TARGET_POINTS[self.target].items():
            if self.points[k] is None:
                self.points[k] = v
        self.feedback = parse_group('feedback', feedback)
        self.stats = parse_group('stats', stats)
        self.bias_correction = _flag('bias_correction', bias_correction)
        self.activations = parse_group('activations', activations)
        # the group's keys together (shrink needs range='minmax')
        self.acts = None if self.activations is None else ActSettings(**self.activations)
        self.calib = parse_group('calib', calib)

    def _parse_components(self, components: dict | None
                          ) -> tuple[dict[str, QuantSettings | None], dict[str, str]]:
        out: dict[str, QuantSettings | None] = {c: self.base for c in COMPONENTS}
        pools: dict[str, str] = {}
        if components is None:
            return out, pools
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
            bad = set(over) - set(SETTING_KEYS)
            if bad:
                raise ValueError(f'components[{comp!r}]: unknown key(s) {sorted(bad)}; '
                                 f'allowed: {SETTING_KEYS}')
            out[comp] = replace(self.base, **over)  # validated again by __post_init__
            if 'budget' in over:  # a component with its own budget pools its own
                pools[comp] = comp
        return out, pools

    @property
    def act_bits(self) -> int | None:
        return None if self.activations is None else self.activations['bits']

    def settings(self) -> dict:
        """Everything that decides the quantized weights (stored in exports)."""
        return dict(base=asdict(self.base), grid=self.grid, target=self.target,
                    protocol=self.protocol,
                    components={c: None if s is None else asdict(s)
                                for c, s in self.components.items()},
                    pools=self.pools, skip=self.skip, layer_bits=self.layer_bits,
                    points=self.points, feedback=self.feedback, stats=self.stats,
                    bias_correction=self.bias_correction, activations=self.activations,
                    calib=self.calib)

    def check_model(self, model: torch.nn.Module) -> None:
        """Every component named in ``components`` must exist in ``model``."""
        present = {component_of(n) for n, _ in model.named_children()} - {None}
        for comp in self.explicit:
            if comp not in present:
                raise ValueError(f'components: the model has no {comp!r} (it has '
                                 f'{sorted(present)}); remove it or set it to None')

    def protocol_layer_bits(self, model: torch.nn.Module) -> dict[str, int]:
        """``layer_bits`` with what the protocol adds: under 'literature', the
        backbone's first quantizable layer (the conv that reads the image) at 8 bits
        unless a ``layer_bits`` glob of the arguments already sets it."""
        if self.protocol != 'literature':
            return dict(self.layer_bits)
        first = next((n for n, m in model.named_modules()
                      if component_of(n) == 'backbone' and type(m) in QUANTIZABLE), None)
        out = dict(self.layer_bits)
        if first is not None and not any(fnmatch.fnmatchcase(first, g) for g in out):
            out[first] = LITERATURE_FIRST_BITS
        return out

    def quantize(self, model: torch.nn.Module,
                 calibrate: Callable[[torch.nn.Module, torch.nn.Module | None], None],
                 what: str = 'the calibration inputs',
                 logger: logging.Logger | None = None,
                 backward: Callable[[torch.nn.Module], None] | None = None
                 ) -> tuple[QuantResult, list, list]:
        """Plans ``model``'s layers, calibrates and quantizes them in place.

        ``calibrate(m, reference)`` runs every calibration batch through ``m``
        (through ``reference`` first when it is not None: the passes of sequential
        statistics). ``backward(m)``, for ``activations.range='fisher'`` (without
        it, the ranges fall back to 'mse' and a warning says so): runs
        the calibration batches with inputs that require grad and backpropagates a
        random projection of the outputs whose error matters
        (``model_pass.sensitivity_samples``). Returns (result, plans, skipped)."""
        logger = logger or logging.getLogger('mpq_det')
        plans, skipped, unmatched = plan_layers(model, component_of, self.components,
                                                self.skip, self.pools,
                                                self.protocol_layer_bits(model))
        for g in unmatched:
            logger.warning(f'MultipointQuantizer: skip/layer_bits glob {g!r} matches no layer')
        if self.acts is not None and self.acts.range == 'fisher' and backward is None \
                and self.acts.bits < 8:
            logger.warning("MultipointQuantizer: activations.range='fisher' needs a backward "
                           "function (quantize(..., backward=...)); the ranges are 'mse'")
        sequential = self.stats['sequential']
        logger.info(f'MultipointQuantizer: calibrating {len(plans)} layers on {what}'
                    + (' (sequential statistics)' if sequential else ''))
        fb = self.feedback
        # with feedback off its other keys are unused: the group's defaults fill them
        fbk = fb or parse_group('feedback', {})
        seed = self.calib['seed']
        levers = dict(seed=seed, error_feedback=fb is not None,
                      feedback_points=fbk['points'], feedback_mode=fbk['mode'],
                      feedback_order=fbk['order'], budget_on=self.points['budget_on'],
                      bias_correction=self.bias_correction,
                      rank_points_by=self.points['rank_by'],
                      point_scales=self.points['scales'], grid=self.grid,
                      target=self.target)
        if sequential:
            result = quantize_model_sequential(
                model, plans, calibrate,
                lambda n: stage_of(n, split_backbone=sequential is True),
                dict(form=self.stats['form'], seed=seed), self.acts, backward,
                unpaired=runs_on_proposals, **levers)
            return result, plans, skipped
        stats, ranges, image = calibrate_layers(
            model, plans, calibrate, self.acts, backward, form=self.stats['form'],
            seed=seed, feedback=fb is not None)
        result = quantize_model(model, plans, stats, ranges, **levers)
        result.summary['image_layer'] = image
        return result, plans, skipped
