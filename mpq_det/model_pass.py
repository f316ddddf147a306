"""The model pass: find layers, collect calibration statistics, quantize, swap modules.

Plain torch on any ``nn.Module`` (no FX tracing, no mmdet import): layers are found by
name and type, statistics come from forward pre-hooks, and quantized layers replace
``nn.Conv2d``/``nn.Linear`` in place. mmdet specifics (which child is the backbone,
how calibration batches are run) are passed in by the hook.
"""
from __future__ import annotations

import copy
import fnmatch
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from .modules import QConv2d, QLinear
from .qstate import swap_module
from .quant import (BUDGET_ON, DEFAULT_FORM, InputStats, QuantizedWeight, check_bits,
                    check_budget, check_max_points, conv_patches, linear_rows,
                    multipoint_quantize, mse_qw, ocs, quantize_points, rtn_qw)
from .quant.allocation import TARGETS
from .quant.act_ranges import (RANGES, check_factor, quantize_to_range, search_range,
                                shrink_range)
from .quant.grid import GRIDS, check_choice, torch_threads
from .quant.multipoint import POINT_SCALES, int8_rows
from .quant.levels import expanded_rows

METHODS = ('multipoint', 'rtn', 'mse', 'ocs')
ALLOCATIONS = ('global', 'layer')
# rows of input patches kept per layer per calibration batch; bounds time and memory
ROWS_PER_BATCH = 1024
# ridge on H relative to its mean diagonal: layers with fewer rows than d (small
# feature maps) otherwise get a singular H that prices some weight errors at zero
DAMP = 0.01


# Exact types: a subclass with its own forward (e.g. weight standardization) would
# not compute what QConv2d/QLinear compute. Callers may register thin wrappers that
# only change empty-input handling (the hook adds mmcv.cnn's Conv2d/Linear).
QUANTIZABLE: set[type] = {nn.Conv2d, nn.Linear}


@dataclass
class QuantSettings:
    """Per-component settings (DESIGN.md's hook arguments)."""
    bits: int = 4
    method: str = 'multipoint'
    budget: float = 0.05
    allocation: str = 'global'
    max_points: int = 4

    def __post_init__(self):
        check_bits(self.bits)
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not allowed; choose one of {METHODS}")
        check_budget(self.budget)
        if self.allocation not in ALLOCATIONS:
            raise ValueError(
                f'allocation={self.allocation!r} is not allowed; choose one of {ALLOCATIONS}')
        check_max_points(self.max_points)


@dataclass
class LayerPlan:
    name: str
    module: nn.Module
    component: str
    settings: QuantSettings
    pool: str                  # layers with the same pool share one global budget


# what a layer's H comes from when its input is quantized: the 'float' inputs, the
# 'quantized' inputs (target W), or the quantized inputs with the float ones as the
# cross term's reference ('target': W* = H_q^-1 A W, see InputStats.target_weight)
ACT_FITS = ('float', 'quantized', 'target')
# input values of a layer kept per call for the range search, and at most in all
ACT_VALUES_PER_CALL = 8192
ACT_VALUES_MAX = 2 ** 18


@dataclass
class ActSettings:
    """Fake quantization of the quantized layers' inputs (the ``activations`` group).

    ``bits`` for every layer, except the layers a ``layer_bits`` glob matches (the
    first match wins) and the layer that reads the image (the first to run), which
    gets ``image_bits`` (None: as any other). ``range``: how the range of each input
    below 8 bits is chosen (``quant.act_ranges``; 8-bit inputs keep min/max);
    ``shrink`` scales min/max uniformly (with range='minmax' only). ``fit``: see
    ``ACT_FITS``."""
    bits: int = 8
    range: str = 'fisher'
    shrink: float = 1.0
    layer_bits: dict[str, int] = field(default_factory=dict)
    image_bits: int | None = 8
    fit: str = 'float'

    def __post_init__(self):
        check_bits(self.bits, 'activations.bits')
        check_choice(self.range, 'activations.range', RANGES)
        check_factor(self.shrink, 'activations.shrink')
        if self.shrink != 1.0 and self.range != 'minmax':
            raise ValueError(f'activations.shrink={self.shrink} scales min/max: it needs '
                             f"range='minmax', got range={self.range!r}")
        for g, b in self.layer_bits.items():
            check_bits(b, f'activations.layer_bits[{g!r}]')
        if self.image_bits is not None:
            check_bits(self.image_bits, 'activations.image_bits')
        check_choice(self.fit, 'activations.fit', ACT_FITS)

    def bits_of(self, name: str, image: bool) -> int:
        """The input bits of layer ``name`` (``image``: it reads the image)."""
        for g, b in self.layer_bits.items():
            if fnmatch.fnmatchcase(name, g):
                return b
        if image and self.image_bits is not None:
            return self.image_bits
        return self.bits


@dataclass(frozen=True)
class ActRange:
    """A layer's input quantization: bits, the range [lo, hi], how it was chosen."""
    bits: int
    lo: float
    hi: float
    method: str


@dataclass
class LayerStats:
    stats: InputStats
    act_min: float = float('inf')
    act_max: float = float('-inf')
    # a seeded sample of the input values (StatsCollector(act_values=...))
    values: list[Tensor] = field(default_factory=list)
    out_positions: int = 0     # output positions summed over calls (conv H*W; Linear rows)
    images: int = 0            # conv: images seen, summed over calls; Linear: calls
    calls: int = 0
    conv: bool = False


@dataclass
class Skipped:
    name: str
    component: str | None
    reason: str


@dataclass
class QuantResult:
    layers: list[dict] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def weight_2d(m: nn.Module) -> Tensor:
    """(C_out, d) view of a Conv2d/Linear weight, rows in the order of conv_patches."""
    return m.weight.detach().reshape(m.weight.shape[0], -1).float()


def plan_layers(model: nn.Module, component_of: Callable[[str], str | None],
                components: dict[str, QuantSettings | None], skip: Iterable[str] = (),
                pools: dict[str, str] | None = None, layer_bits: dict[str, int] | None = None
                ) -> tuple[list[LayerPlan], list[Skipped], list[str]]:
    """Chooses the layers to quantize.

    ``component_of(name)`` maps a module name to its component (or None: not part of
    any). ``components[c]`` is the settings of component c, or None for floating
    point. ``layer_bits`` maps fnmatch globs to the bits of the layers they match (the
    first match wins), e.g. the stem and the last head convs at 8 bits. Returns (plans,
    skipped layers with reasons, skip/layer_bits globs that matched nothing).
    """
    pools = pools or {}
    skip = list(skip)
    layer_bits = dict(layer_bits or {})
    matched = {g: False for g in [*skip, *layer_bits]}
    plans, skipped = [], []
    for name, m in model.named_modules():
        comp = component_of(name)
        if comp is None or not name:
            continue
        is_target = type(m) in QUANTIZABLE
        has_weight = isinstance(getattr(m, 'weight', None), nn.Parameter) and not any(
            True for _ in m.children())
        if not is_target:
            if has_weight and m.weight.dim() > 1 and not isinstance(m, (QConv2d, QLinear)):
                skipped.append(Skipped(name, comp, f'unsupported layer type {type(m).__name__}'))
            continue
        hits = [g for g in skip if fnmatch.fnmatchcase(name, g)]
        for g in hits:
            matched[g] = True
        if hits:
            skipped.append(Skipped(name, comp, f'skip glob {hits[0]!r}'))
            continue
        settings = components.get(comp)
        if settings is None:
            skipped.append(Skipped(name, comp, f'component {comp!r} is kept in floating point'))
            continue
        for g, bits in layer_bits.items():
            if fnmatch.fnmatchcase(name, g):
                matched[g] = True
                settings = replace(settings, bits=bits)
                break
        plans.append(LayerPlan(name, m, comp, settings, pools.get(comp, 'model')))
    return plans, skipped, [g for g, hit in matched.items() if not hit]


class StatsCollector:
    """Forward hooks that accumulate H, activation ranges and output sizes."""

    def __init__(self, plans: list[LayerPlan], form: str = DEFAULT_FORM,
                 rows_per_batch: int = ROWS_PER_BATCH, seed: int = 0, damp: float = DAMP,
                 feedback: bool = False, reference: nn.Module | None = None,
                 act_values: int = 0, act_ranges: dict[str, ActRange] | None = None,
                 act_cross: bool = False, **form_opts):
        """``feedback``: also keep the exact (or block-diagonal) H that error feedback
        needs, for the multipoint layers (see ``InputStats``).

        ``act_values``: keep a seeded sample of this many input values per call of
        each layer (``LayerStats.values``, for the activation range search).
        ``act_ranges``: H comes from each listed layer's input fake-quantized to its
        range, the input the quantized layer will see; ``act_cross`` (without
        ``reference``): with the float input at the same positions as the cross
        term's reference (``InputStats.target_weight``). ``order``: the layers in the
        order of their first call (the first reads the model's input).

        ``reference``: a floating-point copy of the model (sequential statistics).
        Every batch must then run through ``reference`` first and the model second:
        the reference's layers record their input rows, and each layer of the model
        takes the same positions of its own input, so that ``InputStats`` gets the
        cross term of the pair (``InputStats(cross=True)``).
        """
        self.rows = rows_per_batch
        self.gen = torch.Generator().manual_seed(seed)
        # its own generator: sampling values leaves the rows (and H) as they were
        self.act_values = act_values
        self.value_gen = torch.Generator().manual_seed(seed + 1)
        self.act_ranges = act_ranges or {}
        self.act_cross = act_cross and reference is None
        self.order: list[str] = []
        self.stats: dict[str, LayerStats] = {}
        self._handles = []
        # per layer, (positions, rows) of the reference's calls not yet matched
        self._pending: dict[str, list[tuple[Tensor, Tensor]]] = {}
        for p in plans:
            m = p.module
            groups = getattr(m, 'groups', 1)
            d = m.weight[0].numel()
            need_h = p.settings.method in ('multipoint',)
            taps = m.weight[0, 0].numel() if isinstance(m, nn.Conv2d) else 1
            opts = dict(form_opts, damp=damp) if need_h and form != 'diag' else {}
            if need_h and feedback:
                # the feedback H gets the same ridge (diag keeps none for its search)
                opts.update(feedback=True, taps=taps, damp=damp)
            if need_h and self.act_cross and p.name in self.act_ranges:
                opts['cross'] = True
            if reference is not None and need_h:
                opts['cross'] = True
                self._pending[p.name] = []
                ref = reference.get_submodule(p.name)
                self._handles.append(ref.register_forward_hook(self._ref_hook(p.name)))
            st = InputStats(d, groups, form=form if need_h else 'identity', **opts)
            self.stats[p.name] = LayerStats(st)
            self._handles.append(m.register_forward_hook(self._hook(p.name)))

    def _rows(self, m: nn.Module, x: Tensor, index: Tensor | None = None
              ) -> tuple[Tensor, Tensor]:
        if isinstance(m, nn.Conv2d):
            return conv_patches(x, m.kernel_size, m.stride, m.padding, m.dilation,
                                m.groups, self.rows, self.gen, index=index,
                                return_index=True)
        return linear_rows(x, self.rows, self.gen, index=index, return_index=True)

    def _ref_hook(self, name: str):
        def fn(m: nn.Module, inputs, output) -> None:
            rows, idx = self._rows(m, inputs[0].detach().float())
            self._pending[name].append((idx, rows))
        return fn

    def _hook(self, name: str):
        def fn(m: nn.Module, inputs, output) -> None:
            x = inputs[0].detach().float()
            ls = self.stats[name]
            if not ls.calls:
                self.order.append(name)
            ls.calls += 1
            ls.act_min = min(ls.act_min, float(x.min()))
            ls.act_max = max(ls.act_max, float(x.max()))
            if self.act_values:
                idx = torch.randint(x.numel(), (self.act_values,), generator=self.value_gen)
                ls.values.append(x.reshape(-1)[idx.to(x.device)].cpu())
            ref_rows = None
            r = self.act_ranges.get(name)
            xf = x
            if r is not None:
                x = quantize_to_range(x, r.lo, r.hi, r.bits)
            if name in self._pending:
                if not self._pending[name]:
                    raise RuntimeError(f'sequential statistics: layer {name!r} ran in the '
                                       f'model without a matching call in the reference '
                                       f'(run each batch through the reference first)')
                idx, ref_rows = self._pending[name].pop(0)
                rows, _ = self._rows(m, x, idx)
            else:
                rows, idx = self._rows(m, x)
                if ls.stats.cross:       # act_cross: the float input is the reference
                    ref_rows, _ = self._rows(m, xf, idx)
            if isinstance(m, nn.Conv2d):
                ls.conv = True
                ls.out_positions += output.shape[-1] * output.shape[-2] * output.shape[0]
                ls.images += output.shape[0]
            else:
                ls.out_positions += x.reshape(-1, x.shape[-1]).shape[0]
                ls.images += 1
            try:
                ls.stats.update(rows, ref_rows)
            except ValueError as e:
                raise ValueError(f'calibration input of layer {name!r}: {e}') from None
        return fn

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        left = [n for n, q in self._pending.items() if q]
        self._pending = {n: [] for n in self._pending}
        if left:
            raise RuntimeError(f'sequential statistics: the reference ran layers the model '
                               f'did not ({left[:3]} ...)')

    def num_images(self) -> int:
        """Calibration images seen: a conv that runs once per image sees each one once
        (shared heads run once per feature level, so the smallest count is taken)."""
        return num_images(self.stats)


class SensitivityCollector:
    """Forward pre-hooks that sample each layer's input values together with the
    squared gradient that a backward pass brings to them: the weights of
    ``activations.range='fisher'`` (``quant.act_ranges``).

    Each layer gets a view of its input, so the gradient it records flows through
    this layer only: an input that two layers read is quantized by each of them on
    its own, and each quantization error moves the outputs through that layer.
    """

    def __init__(self, plans: list[LayerPlan], per_call: int = ACT_VALUES_PER_CALL,
                 seed: int = 0):
        self.per_call = per_call
        self.gen = torch.Generator().manual_seed(seed + 2)
        self.samples: dict[str, list[tuple[Tensor, Tensor]]] = {p.name: [] for p in plans}
        self._handles = [p.module.register_forward_pre_hook(self._hook(p.name))
                         for p in plans]

    def _hook(self, name: str):
        def fn(m: nn.Module, inputs):
            x = inputs[0]
            if not (isinstance(x, Tensor) and x.requires_grad):
                return None
            x = x.view_as(x)
            x.register_hook(self._take(name, x.detach()))
            return (x, *inputs[1:])
        return fn

    def _take(self, name: str, x: Tensor):
        def fn(g: Tensor) -> None:
            idx = torch.randint(x.numel(), (self.per_call,), generator=self.gen).to(x.device)
            self.samples[name].append((x.reshape(-1)[idx].float().cpu(),
                                       g.detach().reshape(-1)[idx].float().pow(2).cpu()))
        return fn

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _capped(parts: list[Tensor], gen: torch.Generator) -> Tensor:
    """The concatenated sample, cut to ACT_VALUES_MAX values by a seeded choice."""
    x = torch.cat(parts) if parts else torch.zeros(0)
    if x.numel() > ACT_VALUES_MAX:
        x = x[torch.randperm(x.numel(), generator=gen)[:ACT_VALUES_MAX]]
    return x


def sensitivity_samples(model: nn.Module, plans: list[LayerPlan],
                        backward: Callable[[nn.Module], None], seed: int = 0
                        ) -> dict[str, tuple[Tensor, Tensor]]:
    """{layer: (input values, squared gradients at them)} from ``backward(model)``.

    ``backward(model)`` runs the calibration batches with inputs that require grad
    and calls ``backward()`` on a random projection of the outputs whose error
    matters (``quant.act_ranges.random_projection``). The parameters' own
    gradients are switched off meanwhile, and the model is in eval mode. A layer
    that no gradient reached (it does not lead to those outputs) is left out.
    """
    col = SensitivityCollector(plans, seed=seed)
    params = [q for q in model.parameters() if q.requires_grad]
    was_training = model.training
    for q in params:
        q.requires_grad_(False)
    model.eval()
    try:
        with torch.enable_grad():
            backward(model)
    finally:
        col.remove()
        for q in params:
            q.requires_grad_(True)
        model.train(was_training)
    out = {}
    for name, parts in col.samples.items():
        if parts:
            n = sum(v.numel() for v, _ in parts)
            keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            keep = keep[:ACT_VALUES_MAX]
            out[name] = (torch.cat([v for v, _ in parts])[keep],
                         torch.cat([g for _, g in parts])[keep])
    return out


def choose_act_ranges(plans: list[LayerPlan], stats: dict[str, LayerStats],
                      acts: ActSettings, image_layer: str | None = None,
                      weighted: dict[str, tuple[Tensor, Tensor]] | None = None
                      ) -> dict[str, ActRange]:
    """Each layer's input bits and range, by ``acts.range`` on the calibration
    statistics (``StatsCollector(act_values=...)``; ``'fisher'`` also needs
    ``weighted``, from ``sensitivity_samples``).

    Inputs at 8 bits keep their min/max range: there the range method made no
    difference on our detectors (W4A8 within 0.1 mAP), min/max is what the int8
    graph was validated with, and an 8-bit grid holds the normalized 8-bit image
    that the first layer (``image_layer``) reads. A layer that no gradient
    reached (or every layer, without ``weighted``) gets the ``'mse'`` range under
    ``'fisher'``.
    """
    gen = torch.Generator().manual_seed(0)
    out = {}
    for p in plans:
        ls = stats.get(p.name)
        if ls is None or not ls.calls or not ls.act_max >= ls.act_min:
            continue
        image = p.name == image_layer
        bits = acts.bits_of(p.name, image)
        lo, hi = ls.act_min, ls.act_max
        method = acts.range
        if bits >= 8:
            method = 'minmax'
        elif method == 'minmax' and acts.shrink != 1.0:
            lo, hi = shrink_range(lo, hi, acts.shrink)
            method = f'shrink {acts.shrink:g}'
        elif method == 'fisher' and p.name in (weighted or {}):
            x, g2 = weighted[p.name]
            lo, hi = search_range(x, lo, hi, bits, weight=g2)
        elif method in ('mse', 'fisher'):
            lo, hi = search_range(_capped(ls.values, gen), lo, hi, bits)
            method = 'mse' if method == 'mse' else \
                'mse (no gradient)' if weighted is not None else 'mse (no backward)'
        out[p.name] = ActRange(bits, float(lo), float(hi), method)
    return out


def calibrate_layers(model: nn.Module, plans: list[LayerPlan],
                     calibrate: Callable[[nn.Module, nn.Module | None], None],
                     acts: ActSettings | None = None,
                     backward: Callable[[nn.Module], None] | None = None,
                     **collector) -> tuple[dict[str, LayerStats], dict[str, ActRange],
                                           str | None]:
    """Calibration statistics of ``plans`` and, with ``acts``, every layer's input
    bits and range. Returns (stats, ranges, the layer that reads the image).

    ``calibrate(model, None)`` runs the calibration batches; ``collector``: keyword
    arguments of ``StatsCollector``. With ``acts``: ``acts.range='fisher'`` runs
    ``backward`` once (``sensitivity_samples``; without it every layer gets the
    'mse' range, and the report says so); ``acts.fit`` other than 'float'
    runs the batches once more, for H on the inputs through the chosen ranges.
    """
    col = StatsCollector(plans, act_values=ACT_VALUES_PER_CALL if acts else 0,
                         **collector)
    try:
        calibrate(model, None)
    finally:
        col.remove()
    image = col.order[0] if col.order else None
    if acts is None:
        return col.stats, {}, image
    weighted = None
    low = any(acts.bits_of(p.name, p.name == image) < 8 for p in plans)
    if acts.range == 'fisher' and low and backward is not None:
        weighted = sensitivity_samples(model, plans, backward, collector.get('seed', 0))
    ranges = choose_act_ranges(plans, col.stats, acts, image, weighted)
    for ls in col.stats.values():
        ls.values = []
    if acts.fit == 'float':
        return col.stats, ranges, image
    col2 = StatsCollector(plans, act_ranges=ranges, act_cross=acts.fit == 'target',
                          **collector)
    try:
        calibrate(model, None)
    finally:
        col2.remove()
    return col2.stats, ranges, image


def num_images(stats: dict[str, LayerStats]) -> int:
    conv = [ls.images for ls in stats.values() if ls.conv and ls.images]
    if conv:
        return min(conv)
    return max([ls.calls for ls in stats.values()] + [1])


def positions_per_image(ls: LayerStats | None, n_images: int) -> float:
    """Output positions per image of a layer, summed over its calls (feature levels)."""
    if ls is None or not ls.calls:
        return 1.0
    return ls.out_positions / max(n_images, 1)


def _quantize_one(p: LayerPlan, grid: str = 'symmetric'
                  ) -> tuple[QuantizedWeight, Tensor | None]:
    """rtn / mse / ocs: one layer on its own, codes on ``grid``. Returns (weight, OCS
    input index)."""
    s, m = p.settings, p.module
    W = weight_2d(m)
    if s.method == 'rtn':
        return rtn_qw(W, s.bits, grid), None
    if s.method == 'mse':
        return mse_qw(W, s.bits, grid=grid), None
    if getattr(m, 'groups', 1) != 1:
        # splitting an input channel of a grouped conv would change its group sizes
        return rtn_qw(W, s.bits, grid), None
    # OCS splits input channels, so it works on the (C_out, C_in, *k) weight.
    qw, in_index = ocs(m.weight.detach().float(), s.bits, s.budget, grid)
    return qw, in_index


def quantize_model(model: nn.Module, plans: list[LayerPlan],
                   stats: dict[str, LayerStats] | None,
                   act_ranges: dict[str, ActRange] | None = None,
                   seed: int = 0, error_feedback: bool = False, feedback_points: int = 4,
                   budget_on: str = 'both', feedback_mode: str = 'joint',
                   feedback_order: bool = True, bias_correction: bool = False,
                   rank_points_by: str = 'output', point_scales: str = 'free',
                   grid: str = 'symmetric', target: str = 'lowbit') -> QuantResult:
    """Quantizes the planned layers in place and returns the per-layer report rows.

    ``act_ranges``: the input bits and range of each layer whose input is
    fake-quantized (``calibrate_layers``); the others keep float inputs.
    ``error_feedback``: error feedback on 1..``feedback_points`` points of every
    channel of the multipoint layers, in ``feedback_mode`` ('joint' or 'first', see
    ``mpq_det.quant.greedy_multipoint``; needs ``stats`` collected with
    ``StatsCollector(..., feedback=True)``); ``feedback_order``: columns in order of
    decreasing input energy (see ``mpq_det.quant.Feedback``). ``bias_correction``:
    fold each layer's mean output shift on the calibration inputs, (W - W_q) mean(x),
    into its bias (layers that have a bias; OCS layers excluded). ``budget_on``: which bounds the extra
    points keep ('memory', 'compute' or 'both', see ``mpq_det.quant.allocate``).
    ``rank_points_by`` decides where extra points go: 'output' (the method: largest
    drop of output error), or, for the ablation, 'weight' (weight error) or 'random'.
    ``point_scales`` 'pow2': a channel's further points have power-of-two scale
    ratios to its first, so that on int8 hardware they merge into one int8 row
    (``mpq_det.quant.greedy_multipoint``); 'free' (the default): any scale.
    ``grid``: the code grid of every method, 'symmetric' (2^b - 1 levels) or 'full'
    (all 2^b codes, ``mpq_det.quant.grid``). ``target``: how the allocation counts
    compute, and what the report rows call deployed: 'lowbit' (each point a row) or
    'int8' (points merged into one int8 row cost nothing, ``mpq_det.quant.allocate``).
    """
    t0 = time.perf_counter()
    opts = _PassOptions(seed, error_feedback, feedback_points, budget_on, feedback_mode,
                        feedback_order, rank_points_by, point_scales, grid, target)
    n_images = num_images(stats) if stats else 1
    qws, errs = _quantize_layers(plans, stats, n_images, opts)
    res = QuantResult()
    for p in plans:
        _apply(model, p, qws[p.name], stats, act_ranges, bias_correction, errs.get(p.name),
               n_images, res, target)
    res.summary.update(quant_time_s=time.perf_counter() - t0, target=target)
    return res


@dataclass
class _PassOptions:
    seed: int = 0
    error_feedback: bool = False
    feedback_points: int = 4
    budget_on: str = 'both'
    feedback_mode: str = 'joint'
    feedback_order: bool = True
    rank_points_by: str = 'output'
    point_scales: str = 'free'
    grid: str = 'symmetric'
    target: str = 'lowbit'

    def __post_init__(self):
        check_choice(self.budget_on, 'budget_on', BUDGET_ON)
        check_choice(self.point_scales, 'point_scales', POINT_SCALES)
        check_choice(self.grid, 'grid', GRIDS)
        check_choice(self.target, 'target', TARGETS)


def _quantize_layers(plans: list[LayerPlan], stats: dict[str, LayerStats] | None,
                     n_images: int, o: _PassOptions,
                     npoints: dict[str, Tensor] | None = None, sequential: bool = False
                     ) -> tuple[dict, dict]:
    """(name -> (QuantizedWeight, OCS input index), name -> relative errors) of
    ``plans``, not yet applied. Multipoint layers are quantized together per budget
    pool (global) or alone (layer); with ``npoints`` (name -> points per channel)
    each keeps the given point counts instead. ``sequential``: the stats hold the
    cross term, and each layer quantizes its ``target_weight``."""
    qws: dict[str, tuple[QuantizedWeight, Tensor | None]] = {}
    groups: dict[tuple, list[LayerPlan]] = {}
    for p in plans:
        if p.settings.method == 'multipoint':
            key = (p.pool, p.settings.allocation, p.settings.budget, p.settings.max_points) \
                if p.settings.allocation == 'global' else ('layer', p.name)
            groups.setdefault(key, []).append(p)
        else:
            qws[p.name] = _quantize_one(p, o.grid)
    errs: dict[str, tuple[float, float, float]] = {}
    for members in groups.values():
        s = members[0].settings
        # the cross term (sequential, or activations.fit='target') gives the target
        Ws = [stats[p.name].stats.target_weight(weight_2d(p.module))
              if sequential or stats[p.name].stats.cross else weight_2d(p.module)
              for p in members]
        Hs = [stats[p.name].stats.finalize() for p in members]
        fbs = [stats[p.name].stats.finalize_feedback(order=o.feedback_order)
               for p in members] if o.error_feedback else [None] * len(members)
        if npoints is None:
            pos = [positions_per_image(stats[p.name], n_images) for p in members]
            out, pss = multipoint_quantize(
                Ws, Hs, [p.settings.bits for p in members], s.budget, s.allocation,
                s.max_points, by=o.rank_points_by, seed=o.seed, positions=pos,
                budget_on=o.budget_on, feedbacks=fbs, fb_points=o.feedback_points,
                fb_mode=o.feedback_mode, pow2=o.point_scales == 'pow2', grid=o.grid,
                target=o.target,
                # layers side by side on as many threads as torch has (the result is
                # the same; OMP_NUM_THREADS=1 keeps the pass on one core)
                num_threads=torch.get_num_threads())
        else:
            with torch_threads(1):   # as multipoint_quantize: one thread is fastest here
                out, pss = zip(*[quantize_points(
                    W, H, p.settings.bits, npoints[p.name], s.max_points, fb,
                    o.feedback_points, o.feedback_mode, pow2=o.point_scales == 'pow2',
                    grid=o.grid)
                    for p, W, H, fb in
                    zip(members, Ws, Hs, fbs)])
        for p, qw, ps in zip(members, out, pss):
            qws[p.name] = (qw, None)
            e0 = ps.err[:, 0].sum().clamp_min(1e-30)
            final = ps.err.gather(1, qw.npoints[:, None]).sum()
            errs[p.name] = (float(e0), float(ps.err[:, 1].sum() / e0), float(final / e0))
    return qws, errs


def _apply(model: nn.Module, p: LayerPlan, qw_index: tuple[QuantizedWeight, Tensor | None],
           stats: dict[str, LayerStats] | None, act_ranges: dict[str, ActRange] | None,
           bias_correction: bool, err, n_images: int, res: QuantResult,
           target: str = 'lowbit') -> None:
    """Swaps layer ``p`` for its quantized module and adds its report row."""
    qw, in_index = qw_index
    m = p.module
    cls = QConv2d if isinstance(m, nn.Conv2d) else QLinear
    q = cls.from_float(m, qw, in_index=in_index)
    ls = stats.get(p.name) if stats else None
    if bias_correction and q.bias is not None and in_index is None and ls is not None \
            and ls.stats.n:
        q.bias.data += _mean_shift(m, qw, ls.stats).to(q.bias)
    act = (act_ranges or {}).get(p.name)
    if act is not None:
        q.set_act_range(act.lo, act.hi, act_bits=act.bits)
    swap_module(model, p.name, q)
    res.layers.append(_layer_row(p, qw, in_index, ls, err, n_images, target))
    res.layers[-1].update(act_bits=None if act is None else act.bits,
                          act_range=None if act is None else [act.lo, act.hi],
                          act_method=None if act is None else act.method)


def quantize_model_sequential(model: nn.Module, plans: list[LayerPlan],
                              calibrate: Callable[[nn.Module, nn.Module | None], None],
                              stage_of: Callable[[str], str],
                              collector: dict | None = None,
                              acts: ActSettings | None = None,
                              backward: Callable[[nn.Module], None] | None = None,
                              seed: int = 0, error_feedback: bool = False,
                              feedback_points: int = 4, budget_on: str = 'both',
                              feedback_mode: str = 'joint', feedback_order: bool = True,
                              bias_correction: bool = False, rank_points_by: str = 'output',
                              point_scales: str = 'free', grid: str = 'symmetric',
                              target: str = 'lowbit',
                              unpaired: Callable[[str], bool] = lambda stage: False
                              ) -> QuantResult:
    """Sequential statistics: quantizes ``plans`` stage by stage in forward order,
    each stage calibrated on the inputs that the already quantized stages give it,
    with the floating-point model's outputs as the target (the cross term, see
    ``InputStats.target_weight``).

    1. One calibration pass on the floating-point model: the statistics of every
       layer, and the allocation of extra points over all layers (one budget pool,
       as ``quantize_model``); the first stage is quantized from these (its inputs
       are the images).
    2. For each later stage (``stage_of(layer name)``, in the order of ``plans``):
       one pass in which every batch runs through a floating-point copy and then
       through the partly quantized model; its layers are quantized again on those
       statistics with the point counts of step 1, so both overheads stay as
       allocated.

    ``unpaired(stage)``: True for a stage whose inputs do not correspond row by
    row between the two models (a two-stage detector's RoI head runs on the
    proposals of each model's own RPN): it is quantized from the floating-point
    statistics of step 1.

    ``calibrate(model, reference)`` runs every calibration batch (through
    ``reference`` first when it is given). ``collector``: keyword arguments of
    ``StatsCollector`` (form, seed, damp, rows_per_batch). ``acts``/``backward``:
    the input quantization, its ranges chosen in step 1 (``calibrate_layers``);
    the later stages run through the quantized stages' inputs, and with
    ``acts.fit`` other than 'float' each layer's rows are its quantized input.
    Other arguments: see ``quantize_model``. ``quant_time_s`` in the summary excludes the calibration
    forwards; ``calib_passes`` counts them.
    """
    o = _PassOptions(seed, error_feedback, feedback_points, budget_on, feedback_mode,
                     feedback_order, rank_points_by, point_scales, grid, target)
    copts = dict(collector or {}, feedback=error_feedback)
    stages: list[str] = []
    for p in plans:
        if stage_of(p.name) not in stages:
            stages.append(stage_of(p.name))
    reference = copy.deepcopy(model) if len(stages) > 1 else None
    stats0, ranges, image = calibrate_layers(model, plans, calibrate, acts, backward,
                                             **copts)
    fit_ranges = ranges if acts is not None and acts.fit != 'float' else None
    t0 = time.perf_counter()
    n_images = num_images(stats0)
    qws0, errs0 = _quantize_layers(plans, stats0, n_images, o)
    npoints = {name: qw.npoints for name, (qw, _) in qws0.items()}
    quant_time = time.perf_counter() - t0
    res = QuantResult()
    for i, st in enumerate(stages):
        members = [p for p in plans if stage_of(p.name) == st]
        stats, qws, errs = stats0, qws0, errs0
        if i and not unpaired(st):
            c = StatsCollector(members, reference=reference, act_ranges=fit_ranges,
                               **copts)
            try:
                calibrate(model, reference)
            finally:
                c.remove()
            stats = c.stats
            t0 = time.perf_counter()
            qws, errs = _quantize_layers(members, stats, n_images, o, npoints, True)
            quant_time += time.perf_counter() - t0
        for p in members:
            _apply(model, p, qws[p.name], stats, ranges, bias_correction,
                   errs.get(p.name), n_images, res, target)
    order = {p.name: i for i, p in enumerate(plans)}
    res.layers.sort(key=lambda r: order[r['name']])
    res.summary.update(quant_time_s=quant_time, stages=stages, target=target,
                       image_layer=image,
                       sequential_stages=[st for st in stages[1:] if not unpaired(st)])
    res.summary['calib_passes'] = 1 + len(res.summary['sequential_stages'])
    return res


def _mean_shift(m: nn.Module, qw: QuantizedWeight, st: InputStats) -> Tensor:
    """(C_out,) mean output change that quantization caused on the calibration
    inputs: W_j . mean_ref - (W_q)_j . mean per conv group, where mean_ref is the
    reference (floating-point model's) mean input under sequential statistics and
    the same mean otherwise, i.e. (W - W_q)_j . mean."""
    mean = st.mean()
    ref = st.mean(ref=True) if st.cross else mean
    W, Wq = weight_2d(m).cpu(), qw.dequantize()
    G, C = mean.shape[0], W.shape[0]

    def out(A, x):
        return torch.einsum('gcd,gd->gc', A.reshape(G, C // G, -1), x).reshape(C)
    return out(W, ref) - out(Wq, mean)


def _layer_row(p: LayerPlan, qw: QuantizedWeight, in_index: Tensor | None,
               ls: LayerStats | None, err: tuple[float, float, float] | None,
               n_images: int = 1, target: str = 'lowbit') -> dict:
    m, s = p.module, p.settings
    C, d = m.weight.shape[0], m.weight[0].numel()
    G = getattr(m, 'groups', 1)
    rows = int(qw.npoints.sum())
    d_stored = qw.codes.shape[1]
    # memory: extra b-bit weights over C*d. Compute: the expanded forward runs
    # expanded_rows rows of d_stored MACs per output position (sum_j n_j for dense
    # and depthwise convs; grouped ones pad each point level within its groups).
    mem_over = (rows * d_stored - C * d) / (C * d)
    rows_run = expanded_rows(qw.npoints, G)
    comp_over = (rows_run * d_stored - C * d) / (C * d)
    macs = C * d * positions_per_image(ls, n_images)
    # as deployed on the target. lowbit: the rows above, b bits per code. int8: a
    # channel's merged points are one row (no extra compute); the graph stores a
    # layer's codes as INT4 if they all fit in [-8, 7] (merged rows included), else
    # as int8; compared with one point per channel (INT4 up to 4 bits)
    if target == 'int8':
        dep_rows, lo, hi = int8_rows(qw)
        width, base_width = (4 if lo >= -8 and hi <= 7 else 8), (4 if qw.bits <= 4 else 8)
    else:
        dep_rows, width, base_width = qw.npoints, qw.bits, qw.bits
    dep_bits = d_stored * int(dep_rows.sum()) * width
    row = dict(name=p.name, component=p.component, type=type(m).__name__,
               shape=list(m.weight.shape), bits=qw.bits, method=s.method,
               points_mean=rows / C, points_max=int(qw.npoints.max()),
               mem_overhead=mem_over, compute_overhead=comp_over,
               mem_overhead_deployed=(dep_bits - base_width * C * d) / (base_width * C * d),
               compute_overhead_deployed=(expanded_rows(dep_rows, G) * d_stored - C * d)
               / (C * d),
               macs_per_image=macs, weights=C * d, stored_weights=rows * d_stored,
               stored_bits_deployed=dep_bits, base_bits_deployed=base_width * C * d,
               scales=int(qw.scales.numel()))
    if err is not None:
        row.update(rel_err_1pt=err[1], rel_err_final=err[2])
    else:
        row.update(rel_err_1pt=None, rel_err_final=None)
    return row


def summarize(res: QuantResult, model: nn.Module, plans: list[LayerPlan]) -> dict:
    """Bits per weight over every Conv2d/Linear weight of the model (FP layers at 32)."""
    quantized = {r['name'] for r in res.layers}
    q_bits = sum(r['bits'] * r['stored_weights'] + 32 * r['scales'] for r in res.layers)
    q_weights = sum(r['weights'] for r in res.layers)
    fp_weights = 0
    for name, m in model.named_modules():
        if name in quantized or isinstance(m, (QConv2d, QLinear)):
            continue
        if type(m) in QUANTIZABLE or (
                isinstance(getattr(m, 'weight', None), nn.Parameter) and m.weight.dim() > 1):
            fp_weights += m.weight.numel()
    total = q_weights + fp_weights
    # storage in bits, so that layers of different bits weigh what they cost
    extra = sum(r['bits'] * (r['stored_weights'] - r['weights']) for r in res.layers)
    q_storage = sum(r['bits'] * r['weights'] for r in res.layers)
    macs = sum(r['macs_per_image'] for r in res.layers)
    extra_macs = sum(r['macs_per_image'] * r['compute_overhead'] for r in res.layers)
    dep_bits = sum(r.get('stored_bits_deployed', r['bits'] * r['stored_weights'])
                   for r in res.layers)
    dep_base = sum(r.get('base_bits_deployed', r['bits'] * r['weights']) for r in res.layers)
    dep_macs = sum(r['macs_per_image'] * r.get('compute_overhead_deployed',
                                               r['compute_overhead'])
                   for r in res.layers)
    return dict(
        quantized_layers=len(res.layers), fp_layers=len(res.skipped),
        quantized_weights=q_weights, fp_weights=fp_weights,
        bits_per_weight=(q_bits + 32 * fp_weights) / max(total, 1),
        bits_per_quantized_weight=q_bits / max(q_weights, 1),
        memory_overhead=extra / max(q_storage, 1),
        compute_overhead=extra_macs / max(macs, 1),
        memory_overhead_deployed=(dep_bits - dep_base) / max(dep_base, 1),
        compute_overhead_deployed=dep_macs / max(macs, 1),
    )
