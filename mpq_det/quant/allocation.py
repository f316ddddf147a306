"""Allocation of extra points under a memory and a compute budget, and the full
multipoint pass.

``budget`` is a fraction. One extra point on a channel of a layer with d weights
per channel costs
* memory: d weights (d * bits bits when layers of different bit widths share a
  budget), counted against budget * (the layers' quantized weights);
* compute: d * (output positions per image) MACs, counted against budget * (the
  layers' MACs per image). A grouped conv runs its points by level, each level
  padded only within the groups that have points at that level (``QConv2d``'s
  expanded forward, ``levels``): a point costs (the rows it adds to its level) *
  d * positions, exactly d * positions in a depthwise conv (one channel per
  group), which is so costed like a dense layer's point; with several channels per
  group, 0 to (groups of the level) rows, so their cost depends on the points taken
  before. ``positions`` default to 1 per layer.

``budget_on`` ('memory' | 'compute' | 'both', default 'both') says which of the two
bounds the allocation keeps; 'memory' is the allocation of earlier versions.

``target`` ('lowbit' | 'int8', default 'lowbit') says how compute is counted: as the
rows of b-bit MACs the expanded forward runs ('lowbit', above), or as the int8 graph
pays it ('int8'): a point that merges with its channel's earlier points into one
int8 row (power-of-two scales, ``PointSet.merges``) costs no compute, any other point
its rows as above. Non-merging points are charged, not forbidden: a chain that
would leave int8 (8-bit layers never merge) may still buy a point with compute.

* ``layer``: each layer adds at most floor(budget * C_out) extra points (and, with
  compute, at most budget of its own MACs), each to the channel whose next point
  lowers the output error most, up to ``max_points`` per channel.
* ``global``: the budgets are pooled; each next point goes where
  (error drop) / (layer output energy sum_j err[j, 0]) / (cost of the point) is
  largest. The cost is the memory cost ('memory'), the dense compute cost
  d * positions ('compute'), or for 'both' the sum of the two as fractions of their
  totals. A point that no longer fits (in either bound) is skipped and the next
  best one that fits is taken, so no bound is ever exceeded and the budget is used
  up while points with a positive gain remain.

``by`` picks what ranks points: 'output' (the error in the H metric), 'weight'
(weight-space error, for the ablation) or 'random' (seeded random priorities).

Implementation: a channel's points must be taken in order, so priorities are made
non-increasing along a channel (running minimum); then the greedy that always takes
the best available next point equals taking items in sorted order (stable sort,
ties keep the earlier point first). Without grouped convs of several channels per
group under a compute bound, costs are constant and the items are taken in
vectorized chunks; otherwise one Python loop over the sorted items tracks each such
layer's level rows (``levels.LevelRows``).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch
from torch import Tensor

from .feedback import Feedback
from .grid import (check_bits, check_budget, check_choice, check_max_points,
                   check_positive_int, torch_threads)
from .levels import LevelRows, expanded_rows
from .multipoint import (DEFAULT_LLOYD, DEFAULT_N_CANDIDATES, DEFAULT_N_REFINE,
                         PointSet, QuantizedWeight,
                         extend_points, greedy_multipoint, joint_levels, select_points)
from .hforms import HForm

MODES = ('global', 'layer')
BY = ('output', 'weight', 'random')
BUDGET_ON = ('memory', 'compute', 'both')
TARGETS = ('int8', 'lowbit')
ALPHAS = (0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9)
_EPS = 1e-9
_INF = float('inf')


def _keys(ps: PointSet, P: int, by: str, normalize: bool, cost: float | Tensor,
          gen: torch.Generator) -> Tensor:
    """(C, P-1) priorities of extra points 2..P, non-increasing along each row;
    ``cost``: one per layer, or (C, P-1) per point.

    Where a point is not computed yet, its entry is an upper bound of its priority
    (the error left after the last computed point), so ``key[j, computed_j - 1]``
    bounds every point that channel j may still get.
    """
    C = ps.channels
    if P <= 1:
        return torch.zeros(C, 0, dtype=torch.float64)
    if by == 'random':
        key = torch.rand(C, ps.max_points, generator=gen)[:, 1:P].double() + 1e-6
    else:
        e = (ps.err if by == 'output' else ps.werr)[:, :P + 1].double()
        last = e.gather(1, (ps.computed.clamp(max=P))[:, None])        # (C, 1)
        lvl = torch.arange(1, P)[None, :]
        known = (lvl + 1) <= ps.computed[:, None]
        drop = torch.where(known, e[:, 1:P] - e[:, 2:P + 1], last.expand(C, P - 1))
        key = torch.nan_to_num(drop, nan=0.0).clamp_min(0)
        if normalize:
            energy = float(e[:, 0].sum())
            key = key / (energy * cost) if energy > 0 else torch.zeros_like(key)
    return torch.cummin(key, dim=1).values


def _available(ps: PointSet, P: int) -> Tensor:
    return (torch.arange(1, P)[None, :] + 1) <= ps.computed[:, None]


def _free_points(ps: PointSet, P: int, target: str) -> Tensor | None:
    """(C, P-1) whether extra points 2..P cost no compute on ``target`` (None: all
    cost): on 'int8' the points that merge into their channel's int8 row. A point not
    computed yet counts as free, so that priorities stay upper bounds."""
    if target != 'int8' or ps.merges is None or P <= 1:
        return None
    known = (torch.arange(1, P)[None, :] + 1) <= ps.computed[:, None]
    return torch.where(known, ps.merges[:, 1:P], torch.ones_like(known))


class _Costs:
    """Per-layer costs and pool sizes of one allocation (see the module doc)."""

    def __init__(self, point_sets, sizes, wbits, positions, groups, budget, budget_on,
                 target='lowbit'):
        self.mem = [int(d) * wb for d, wb in zip(sizes, wbits)]
        # MACs per image of one extra row, integers so that the bounds are exact
        self.comp = [int(round(int(d) * float(p))) for d, p in zip(sizes, positions)]
        self.groups = [int(g) for g in groups]
        self.C = [ps.channels for ps in point_sets]
        self.on_mem = budget_on in ('memory', 'both')
        self.on_comp = budget_on in ('compute', 'both')
        self.mem_total = sum(c * m for c, m in zip(self.C, self.mem))
        self.comp_total = sum(c * m for c, m in zip(self.C, self.comp))
        self.budget = budget
        self.budget_on = budget_on
        # grouped layers of several channels per group have state-dependent compute
        # costs; depthwise ones cost d * positions per point, as dense ones
        self.varies = [g > 1 and c // g > 1 for g, c in zip(self.groups, self.C)]
        self.stateful = self.on_comp and any(self.varies)
        self.target = target
        # on target 'int8': (C, P-1) points that cost no compute, per layer (or None)
        self.free: list[Tensor | None] = [None] * len(self.C)

    def key_cost(self, li: int, alpha: float = 0.5) -> float | Tensor:
        """The cost a point of layer li is ranked by in the global pool; for 'both',
        alpha * (its share of the memory pool) + (1 - alpha) * (its compute share).
        Per point (C, P-1) where some of the layer's points cost no compute."""
        comp = self.comp[li] if self.free[li] is None else \
            torch.where(self.free[li], 0.0, float(self.comp[li]))
        if self.budget_on == 'memory':
            return self.mem[li]
        if self.budget_on == 'compute':
            # a free point uses none of this budget: the smallest cost
            return comp.clamp_min(1) if isinstance(comp, Tensor) else max(comp, 1)
        key = alpha * self.mem[li] / max(self.mem_total, 1) + \
            (1 - alpha) * comp / max(self.comp_total, 1)
        return key.clamp_min(1e-30) if isinstance(key, Tensor) else (key or 1e-30)

    def rooms(self, layers=None) -> tuple[float, float]:
        """(memory room, compute room) of the pool made of ``layers`` (all: None)."""
        idx = range(len(self.C)) if layers is None else layers
        m = sum(self.C[i] * self.mem[i] for i in idx)
        c = sum(self.C[i] * self.comp[i] for i in idx)
        mr = math.floor(self.budget * m + _EPS) if self.on_mem else _INF
        cr = math.floor(self.budget * c + _EPS) if self.on_comp else _INF
        return mr, cr


def _alphas(mode: str, budget_on: str) -> list[float]:
    """Mixes of the two costs tried for 'both' (global): the one whose allocation
    removes the most relative output error wins (a 1-D search for the ratio of the
    Lagrange multipliers of the two bounds)."""
    return list(ALPHAS) if (mode == 'global' and budget_on == 'both') else [0.5]


def _gain(point_sets, npoints) -> float:
    """Relative output error removed by the extra points, summed over layers."""
    g = 0.0
    for ps, n in zip(point_sets, npoints):
        e = ps.err.double()
        energy = float(e[:, 0].sum())
        if energy > 0:
            g += float((e[:, 1] - e.gather(1, n[:, None])[:, 0]).sum()) / energy
    return g


def _setup(point_sets, sizes, budget, mode, by, max_points, seed, bits,
           positions=None, groups=None, budget_on='both', alpha=0.5, target='lowbit'):
    budget = check_budget(budget)
    check_choice(mode, 'mode', MODES)
    check_choice(by, 'by', BY)
    check_choice(budget_on, 'budget_on', BUDGET_ON)
    check_choice(target, 'target', TARGETS)
    L = len(point_sets)
    if sizes is None:
        sizes = [ps.d for ps in point_sets]
    if len(sizes) != L:
        raise ValueError(f'sizes has {len(sizes)} entries for {L} layers')
    if bits is None:
        wbits = [1] * L
    else:
        if len(bits) != L:
            raise ValueError(f'bits has {len(bits)} entries for {L} layers')
        wbits = [check_bits(b) for b in bits]
    positions = [1.0] * L if positions is None else [float(p) for p in positions]
    groups = [1] * L if groups is None else [int(g) for g in groups]
    if len(positions) != L or len(groups) != L:
        raise ValueError(f'positions and groups need one entry for each of {L} layers')
    for p, g, ps in zip(positions, groups, point_sets):
        if not (p >= 0 and math.isfinite(p)):
            raise ValueError(f'positions must be finite numbers >= 0, got {p}')
        if g < 1 or ps.channels % g:
            raise ValueError(f'groups={g} must divide the {ps.channels} channels')
    costs = _Costs(point_sets, sizes, wbits, positions, groups, budget, budget_on,
                   target)
    gen = torch.Generator().manual_seed(int(seed))
    Ps, keys = [], []
    for li, ps in enumerate(point_sets):
        P = ps.max_points if max_points is None else \
            min(check_max_points(max_points), ps.max_points)
        costs.free[li] = _free_points(ps, P, target)
        keys.append(_keys(ps, P, by, normalize=(mode == 'global'),
                          cost=costs.key_cost(li, alpha), gen=gen))
        Ps.append(P)
    return budget, Ps, keys, costs


def _fill(order: Tensor, layer_of: Tensor, chan_of: Tensor, costs: _Costs,
          mem_room: float, comp_room: float, layers: list[int],
          free_of: Tensor | None = None):
    """Takes items in ``order`` while they fit in both rooms, skipping those that do
    not. ``free_of``: items that cost no compute (target 'int8'). Returns (taken
    item indices, rooms left, the ``LevelRows`` of the layers whose point costs
    vary; a free point adds no row to them)."""
    mem_of = torch.tensor([costs.mem[i] if i in layers else 0
                           for i in range(len(costs.C))], dtype=torch.int64)[layer_of]
    state = {li: LevelRows(costs.C[li], costs.groups[li])
             for li in layers if costs.varies[li]}
    if not costs.stateful:
        comp_of = torch.tensor(costs.comp, dtype=torch.int64)[layer_of]
        if free_of is not None:
            comp_of = torch.where(free_of, 0, comp_of)
        cm_room = comp_room if costs.on_comp else None
        ok = mem_of[order] <= mem_room
        if cm_room is not None:
            ok &= comp_of[order] <= cm_room
        order = order[ok]
        taken = []
        while order.numel():
            cs = torch.cumsum(mem_of[order], 0)
            n = int(torch.searchsorted(cs, torch.tensor([mem_room]), right=True)) \
                if mem_room != _INF else order.numel()
            if cm_room is not None:
                cc = torch.cumsum(comp_of[order], 0)
                n = min(n, int(torch.searchsorted(cc, torch.tensor([cm_room]),
                                                  right=True)))
            if n:
                taken.append(order[:n])
                if mem_room != _INF:
                    mem_room -= int(cs[n - 1])
                if cm_room is not None:
                    cm_room -= int(cc[n - 1])
            rest = order[n:]
            ok = mem_of[rest] <= mem_room
            if cm_room is not None:
                ok &= comp_of[rest] <= cm_room
            order = rest[ok]
        t = torch.cat(taken) if taken else order.new_zeros(0)
        return t, mem_room, (comp_room if cm_room is None else cm_room), state
    # grouped convs under a compute bound: costs depend on the points taken so far
    mem = costs.mem
    lay, ch = layer_of[order].tolist(), chan_of[order].tolist()
    free = [False] * len(lay) if free_of is None else free_of[order].tolist()
    taken = []
    min_mem = min((mem[i] for i in layers), default=0)
    for pos, (li, c, fr) in enumerate(zip(lay, ch, free)):
        if mem_room < min_mem:
            break
        m = mem[li]
        if m > mem_room:
            continue
        lr = None if fr else state.get(li)
        cc = 0 if fr else costs.comp[li] if lr is None else lr.cost(c) * costs.comp[li]
        if cc > comp_room:
            continue
        mem_room -= m
        comp_room -= cc
        if lr is not None:
            lr.add(c)
        taken.append(pos)
    t = order[torch.tensor(taken, dtype=torch.int64)] if taken else order.new_zeros(0)
    return t, mem_room, comp_room, state


def _allocate(point_sets, budget, mode, Ps, keys, costs: _Costs):
    """Returns npoints per layer, and per layer a dict: tau (the smallest key taken in
    the layer's pool, inf if none), the pool's unspent memory and compute rooms, and
    the ``LevelRows`` of grouped layers of several channels per group."""
    L = len(point_sets)
    out = [torch.ones(ps.channels, dtype=torch.int64) for ps in point_sets]
    pools = [[li] for li in range(L)] if mode == 'layer' else [list(range(L))]
    info = [None] * L
    for layers in pools:
        sub_keys = [torch.where(_available(point_sets[i], Ps[i]), keys[i],
                                torch.zeros((), dtype=keys[i].dtype)) for i in layers]
        flat_key = torch.cat([k.reshape(-1) for k in sub_keys])
        layer_of = torch.cat([torch.full((keys[i].numel(),), i, dtype=torch.int64)
                              for i in layers])
        chan_of = torch.cat([torch.arange(keys[i].numel(), dtype=torch.int64) //
                             max(keys[i].shape[1], 1) for i in layers])
        if mode == 'layer':
            # the paper's rule: floor(budget * C_out) points, i.e. that many rows of d
            li = layers[0]
            mem_room = math.floor(budget * costs.C[li] + _EPS) * costs.mem[li]
            comp_room = costs.rooms(layers)[1]
        else:
            mem_room, comp_room = costs.rooms()
        free_of = None
        if any(costs.free[i] is not None for i in layers):
            free_of = torch.cat([torch.zeros(keys[i].numel(), dtype=torch.bool)
                                 if costs.free[i] is None else costs.free[i].reshape(-1)
                                 for i in layers])
        order = torch.sort(flat_key, descending=True, stable=True).indices
        order = order[flat_key[order] > 0]
        t, mem_room, comp_room, state = _fill(order, layer_of, chan_of, costs,
                                              mem_room, comp_room, layers, free_of)
        tau = float(flat_key[t].min()) if t.numel() else _INF
        for li in layers:
            sel = t[layer_of[t] == li]
            if sel.numel():
                out[li] += torch.bincount(chan_of[sel], minlength=point_sets[li].channels)
            info[li] = dict(tau=tau, mem_room=mem_room, comp_room=comp_room,
                            state=state.get(li))
    return out, info


def allocate(point_sets: list[PointSet], sizes: list[int] | None = None,
             budget: float = 0.05, mode: str = 'global', by: str = 'output',
             max_points: int | None = None, seed: int = 0,
             bits: list[int] | None = None, positions: list[float] | None = None,
             groups: list[int] | None = None, budget_on: str = 'both',
             target: str = 'lowbit') -> list[Tensor]:
    """Number of points per channel (C,) int64 (>= 1) for every layer.

    Only computed points (``PointSet.computed``) are allocated. ``sizes``: d per
    layer (default: from the point sets). ``bits``: per-layer bit widths; when
    given, memory costs and the budget are counted in bits instead of weights.
    ``positions``: output positions per image of each layer (default 1);
    ``groups``: conv groups of each layer (default 1); ``budget_on``: which of the
    memory and compute bounds to keep ('memory', 'compute', 'both'); ``target``:
    how compute is counted ('lowbit' or 'int8', see the module doc).
    """
    if not point_sets:
        check_budget(budget)
        check_choice(budget_on, 'budget_on', BUDGET_ON)
        check_choice(target, 'target', TARGETS)
        return []
    best, best_gain = None, -1.0
    for alpha in _alphas(mode, budget_on):
        budget_, Ps, keys, costs = _setup(point_sets, sizes, budget, mode, by,
                                          max_points, seed, bits, positions, groups,
                                          budget_on, alpha, target)
        n = _allocate(point_sets, budget_, mode, Ps, keys, costs)[0]
        gain = _gain(point_sets, n)
        if gain > best_gain:
            best, best_gain = n, gain
    return best


def compute_used(npoints: list[Tensor], sizes: list[int], positions: list[float],
                 groups: list[int] | None = None) -> tuple[float, float]:
    """(extra MACs per image, MACs per image) of the layers' expanded forwards:
    ``levels.expanded_rows`` * d * positions per layer (sum_j n_j rows for dense
    and depthwise layers).
    """
    groups = groups or [1] * len(sizes)
    used = total = 0.0
    for n, d, p, g in zip(npoints, sizes, positions, groups):
        C = n.numel()
        used += (expanded_rows(n, g) - C) * d * float(p)
        total += C * d * float(p)
    return used, total


def budget_used(npoints: list[Tensor], sizes: list[int],
                bits: list[int] | None = None) -> tuple[int, int]:
    """(extra storage used, total quantized storage) in weights (bits if given)."""
    wb = bits or [1] * len(sizes)
    used = sum(int(n.sum() - n.numel()) * d * b for n, d, b in zip(npoints, sizes, wb))
    total = sum(n.numel() * d * b for n, d, b in zip(npoints, sizes, wb))
    return used, total


def multipoint_quantize(weights: list[Tensor], hforms: list[HForm | None],
                        bits: int | list[int] = 4, budget: float = 0.05,
                        allocation: str = 'global', max_points: int = 4,
                        by: str = 'output', n_candidates: int = DEFAULT_N_CANDIDATES,
                        refit: bool = True, seed: int = 0, lazy: bool = True,
                        min_ratio: float | None = None,
                        num_threads: int | None = 1,
                        n_refine: int = DEFAULT_N_REFINE, lloyd: int = DEFAULT_LLOYD,
                        positions: list[float] | None = None, budget_on: str = 'both',
                        feedbacks: list[Feedback | None] | None = None,
                        fb_points: int = 4, fb_mode: str = 'joint', pow2: bool = False,
                        grid: str = 'symmetric', target: str = 'lowbit'
                        ) -> tuple[list[QuantizedWeight], list[PointSet]]:
    """Greedy points + allocation for layers sharing one budget.

    ``weights``: (C, d) per layer; ``hforms``: an HForm per layer (None: weight
    space). With ``lazy`` only two points per channel are searched first; channels
    the allocation fills up to their computed points get the rest, and the
    allocation is run again: the result equals the non-lazy one.

    ``positions`` (output positions per image per layer) and ``budget_on``: see
    ``allocate``; the groups of each layer come from its HForm. ``feedbacks``: a
    ``Feedback`` per layer (or None) for error feedback on 1..``fb_points`` points
    per channel, in mode ``fb_mode`` (see ``greedy_multipoint``). ``pow2``:
    power-of-two scale ratios within a channel (``greedy_multipoint``). ``grid``:
    the code grid, 'symmetric' or 'full' (``greedy_multipoint``). ``target``: how
    compute is counted, 'lowbit' or 'int8' (``allocate``).

    ``num_threads``: how many layers are searched at a time, each in a worker
    thread whose torch ops run on one intra-op thread (restored after); None keeps
    torch's setting and searches one layer at a time. The work is many small ops
    in Python loops (a layer's feedback rounding steps through its columns), so
    intra-op threads hardly help and on a busy machine made the RetinaNet pass up
    to ~45x slower; layers side by side scale instead (see tools/bench_quant.py).
    The result does not depend on ``num_threads``.
    """
    args = (weights, hforms, bits, budget, allocation, max_points, by, n_candidates,
            refit, seed, lazy, min_ratio, n_refine, lloyd, positions, budget_on,
            feedbacks, fb_points, fb_mode, pow2, grid, target)
    if num_threads is not None:
        num_threads = check_positive_int(num_threads, 'num_threads')
    with torch_threads(None if num_threads is None else 1):
        return _multipoint_quantize(*args, workers=num_threads or 1)


def _each_layer(fn: Callable[[int], Any], layers: list[int],
                costs: list[int] | dict[int, int] | None, workers: int) -> dict[int, Any]:
    """{layer: fn(layer)} over ``layers``, ``workers`` at a time (threads; torch
    releases the GIL inside its ops), the costliest first so that the last one to
    finish is a small one."""
    if workers <= 1 or len(layers) <= 1:
        return {li: fn(li) for li in layers}
    order = layers if costs is None else sorted(layers, key=lambda li: -costs[li])
    with ThreadPoolExecutor(min(workers, len(layers))) as ex:
        futures = {li: ex.submit(fn, li) for li in order}
        return {li: futures[li].result() for li in layers}


def _multipoint_quantize(weights, hforms, bits, budget, allocation, max_points, by,
                         n_candidates, refit, seed, lazy, min_ratio, n_refine,
                         lloyd, positions, budget_on, feedbacks, fb_points, fb_mode,
                         pow2=False, grid='symmetric', target='lowbit', workers=1):
    budget = check_budget(budget)
    max_points = check_max_points(max_points)
    check_choice(allocation, 'allocation', MODES)
    check_choice(budget_on, 'budget_on', BUDGET_ON)
    check_choice(target, 'target', TARGETS)
    if len(weights) != len(hforms):
        raise ValueError(f'weights has {len(weights)} entries but hforms has '
                         f'{len(hforms)}')
    L = len(weights)
    feedbacks = [None] * L if feedbacks is None else list(feedbacks)
    if len(feedbacks) != L:
        raise ValueError(f'feedbacks has {len(feedbacks)} entries for {L} layers')
    bl = [bits] * L if not isinstance(bits, (list, tuple)) else list(bits)
    if len(bl) != L:
        raise ValueError(f'bits has {len(bl)} entries for {L} layers')
    bl = [check_bits(b) for b in bl]
    mixed = len(set(bl)) > 1
    first = 1 if (budget == 0 or lazy) else max_points
    costs = [W.numel() for W in weights]
    # the greedy search layer by layer (side by side on ``workers`` threads), then
    # the feedback roundings of all layers batched (``joint_levels``)
    deferred: dict[int, list] = {li: [] for li in range(L)}
    pss = _each_layer(lambda li: greedy_multipoint(
        weights[li], hforms[li], bl[li], max_points, n_candidates, refit, first,
        min_ratio, n_refine, lloyd, feedbacks[li], fb_points, fb_mode, pow2, grid,
        defer=deferred[li]), list(range(L)), costs, workers)
    pss = [pss[li] for li in range(L)]
    joint_levels([jb for li in range(L) for jb in deferred[li]],
                 lambda fn, keys: _each_layer(fn, keys, None, workers))
    groups = [1 if H is None else H.groups for H in hforms]
    extra = dict(bits=bl if mixed else None, positions=positions, groups=groups,
                 budget_on=budget_on, target=target)
    if budget == 0 or max_points == 1:
        npoints = [torch.ones(ps.channels, dtype=torch.int64) for ps in pss]
    elif not lazy:
        npoints = allocate(pss, None, budget, allocation, by, max_points, seed, **extra)
    else:
        npoints = _lazy_allocate(pss, weights, hforms, feedbacks, budget, allocation,
                                 by, max_points, seed, extra, workers)
    return [select_points(ps, n) for ps, n in zip(pss, npoints)], pss


def _pending(pss, npoints, keys, Ps, info, costs: _Costs, mode: str
             ) -> dict[int, list[Tensor]]:
    """Channels, per layer, whose next (not yet computed) point may change the
    allocation ``npoints`` (see ``_lazy_allocate``)."""
    cand = []   # (layer, channels, ub)
    for li, (ps, n, key, P) in enumerate(zip(pss, npoints, keys, Ps)):
        pend = torch.nonzero((n >= ps.computed) & (ps.computed < P)).reshape(-1)
        if not pend.numel():
            continue
        ub = key[pend, ps.computed[pend] - 1]
        inf = info[li]
        # a grouped layer's point (several channels per group) may cost no compute
        # (its level has room in its group), and so may a point that merges (target
        # 'int8'): judged by memory alone, which only computes more points
        comp = 0 if costs.varies[li] or costs.free[li] is not None else costs.comp[li]
        fits = costs.mem[li] <= inf['mem_room'] and \
            (not costs.on_comp or comp <= inf['comp_room'])
        ok = (ub > 0) & ((ub >= inf['tau']) | fits)
        if bool(ok.any()):
            cand.append((li, pend[ok], ub[ok]))
    pools = {}
    for li, ch, ub in cand:
        pool = 0 if mode == 'global' else li
        pools.setdefault(pool, []).append((li, ch, ub))
    todo = {}
    for pool, items in pools.items():
        ub = torch.cat([u for _, _, u in items])
        lay = torch.cat([torch.full((c.numel(),), li, dtype=torch.int64)
                         for li, c, _ in items])
        ch = torch.cat([c for _, c, _ in items])
        inf = info[items[0][0]]
        mem = torch.tensor(costs.mem, dtype=torch.int64)[lay]
        # as for ``fits``: a grouped layer's point may cost no compute, so that all
        # of them that fit in memory are computed in one round (not one per round)
        comp = torch.tensor([0 if v or f is not None else c for v, c, f in
                             zip(costs.varies, costs.comp, costs.free)],
                            dtype=torch.int64)[lay]
        order = torch.sort(ub, descending=True, stable=True).indices
        must = ub[order] >= inf['tau']
        extra_pick = torch.cumsum(torch.where(must, 0, mem[order]), 0) <= \
            2 * inf['mem_room']
        if costs.on_comp:
            extra_pick &= torch.cumsum(torch.where(must, 0, comp[order]), 0) <= \
                2 * inf['comp_room']
        pick = must | extra_pick
        pick[0] = True
        sel = order[pick]
        for li in lay[sel].unique().tolist():
            todo.setdefault(li, []).append(ch[sel][lay[sel] == li])
    return todo


def _lazy_allocate(pss, weights, hforms, feedbacks, budget, mode, by, max_points,
                   seed, extra, workers=1):
    """Allocation that computes further points only where they may be taken.

    Invariant: a channel whose next point is not computed has an upper bound UB of
    that point's priority. With tau the smallest priority taken and the rooms the
    unspent budgets of its pool, a point with UB < tau comes after every point
    taken, so it would be judged against the final rooms: if it fits in neither, it
    cannot change the greedy result. Pending points that may matter are computed
    (those with UB >= tau or that fit, plus the best by UB whose costs add up to
    twice the rooms), and the allocation is redone, until none are left: the
    result equals the allocation over all points computed for all channels.
    """
    while True:
        todo = {}
        best, best_gain = None, -1.0
        for alpha in _alphas(mode, extra['budget_on']):
            budget_, Ps, keys, costs = _setup(pss, None, budget, mode, by, max_points,
                                              seed, extra['bits'], extra['positions'],
                                              extra['groups'], extra['budget_on'], alpha,
                                              extra['target'])
            npoints, info = _allocate(pss, budget_, mode, Ps, keys, costs)
            gain = _gain(pss, npoints)
            if gain > best_gain:
                best, best_gain = npoints, gain
            for li, chs in _pending(pss, npoints, keys, Ps, info, costs, mode).items():
                todo.setdefault(li, []).extend(chs)
        if not todo:
            # with several cost mixes, no pending point can change any of them: the
            # best one is the best over all points
            return best
        deferred: dict[int, list] = {li: [] for li in todo}

        def extend(li):
            chs = todo[li]
            ch = torch.cat(chs)
            if len(chs) > 1:
                ch = ch.unique()
            ps = pss[li]
            # one more point for each picked channel
            for k in sorted(set(ps.computed[ch].tolist())):
                sub = ch[ps.computed[ch] == k]
                extend_points(ps, weights[li], hforms[li], sub, k + 1,
                              feedback=feedbacks[li], defer=deferred[li])

        _each_layer(extend, list(todo), {li: sum(c.numel() for c in chs) *
                                         weights[li].shape[1] for li, chs in todo.items()},
                    workers)
        joint_levels([jb for li in todo for jb in deferred[li]],
                     lambda fn, keys: _each_layer(fn, keys, None, workers))
