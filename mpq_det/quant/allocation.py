"""Allocation of extra points under a storage budget, and the full multipoint pass.

``budget`` is the extra weight storage as a fraction of the quantized weights.
One extra point on a channel of a layer with d weights per channel costs d weights
(d * bits bits when layers of different bit widths share a budget).

* ``layer``: each layer adds floor(budget * C_out) extra points, each to the channel
  whose next point lowers the output error most, up to ``max_points`` per channel.
* ``global``: the budget floor(budget * sum_l C_l d_l) (in weights, or in bits when
  ``bits`` differ) is pooled; each next point goes where
  (error drop) / (layer output energy sum_j err[j, 0]) / (cost of the point) is
  largest. A point that no longer fits is skipped (its layer is closed) and the
  next best one that fits is taken, so the budget is never exceeded and is used up
  while points with a positive gain remain.

``by`` picks what ranks points: 'output' (the error in the H metric), 'weight'
(weight-space error, for the ablation) or 'random' (seeded random priorities).

Implementation: a channel's points must be taken in order, so priorities are made
non-increasing along a channel (running minimum); then the greedy that always takes
the best available next point equals taking items in sorted order (stable sort,
ties keep the earlier point first). No heap or Python loop over points is needed.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .grid import (check_bits, check_budget, check_choice, check_max_points,
                   check_positive_int)
from .multipoint import (DEFAULT_LLOYD, DEFAULT_N_CANDIDATES, DEFAULT_N_REFINE,
                         PointSet, QuantizedWeight,
                         extend_points, greedy_multipoint, select_points)
from .stats import HForm

MODES = ('global', 'layer')
BY = ('output', 'weight', 'random')
_EPS = 1e-9


def _keys(ps: PointSet, P: int, by: str, normalize: bool, cost: int,
          gen: torch.Generator) -> Tensor:
    """(C, P-1) priorities of extra points 2..P, non-increasing along each row.

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


def _setup(point_sets, sizes, budget, mode, by, max_points, seed, bits):
    budget = check_budget(budget)
    check_choice(mode, 'mode', MODES)
    check_choice(by, 'by', BY)
    if sizes is None:
        sizes = [ps.d for ps in point_sets]
    if len(sizes) != len(point_sets):
        raise ValueError(f'sizes has {len(sizes)} entries for {len(point_sets)} layers')
    if bits is None:
        wbits = [1] * len(point_sets)
    else:
        if len(bits) != len(point_sets):
            raise ValueError(f'bits has {len(bits)} entries for {len(point_sets)} '
                             'layers')
        wbits = [check_bits(b) for b in bits]
    gen = torch.Generator().manual_seed(int(seed))
    Ps, keys, costs = [], [], []
    for ps, d, wb in zip(point_sets, sizes, wbits):
        P = ps.max_points if max_points is None else \
            min(check_max_points(max_points), ps.max_points)
        cost = int(d) * wb
        keys.append(_keys(ps, P, by, normalize=(mode == 'global'), cost=cost,
                          gen=gen))
        Ps.append(P)
        costs.append(cost)
    return budget, sizes, wbits, Ps, keys, costs


def _allocate(point_sets, budget, mode, sizes, wbits, Ps, keys, costs):
    """Returns npoints per layer, and per layer (tau, room, unit cost): the smallest
    key taken in the layer's pool (inf if none) and the pool's unspent budget."""
    out = [torch.ones(ps.channels, dtype=torch.int64) for ps in point_sets]
    info = []
    if mode == 'layer':
        for li, (ps, key, P) in enumerate(zip(point_sets, keys, Ps)):
            m = math.floor(budget * ps.channels + _EPS)
            flat = torch.where(_available(ps, P), key, torch.zeros((), dtype=key.dtype))
            flat = flat.reshape(-1)
            tau = float('inf')
            if m and flat.numel():
                order = torch.sort(flat, descending=True, stable=True).indices
                order = order[flat[order] > 0][:m]
                if order.numel():
                    tau = float(flat[order[-1]])
                    out[li] += torch.bincount(order // key.shape[1],
                                              minlength=ps.channels)
                m -= order.numel()
            info.append((tau, m, 1))
        return out, info

    total = sum(ps.channels * d * wb for ps, d, wb in zip(point_sets, sizes, wbits))
    remaining = math.floor(budget * total + _EPS)
    flat_key = torch.cat([torch.where(_available(ps, P), k,
                                      torch.zeros((), dtype=k.dtype)).reshape(-1)
                          for ps, k, P in zip(point_sets, keys, Ps)])
    layer_of = torch.cat([torch.full((k.numel(),), i, dtype=torch.int64)
                          for i, k in enumerate(keys)])
    chan_of = torch.cat([torch.arange(k.numel(), dtype=torch.int64) //
                         max(k.shape[1], 1) for k in keys])
    cost_of = torch.tensor(costs, dtype=torch.int64)[layer_of]
    order = torch.sort(flat_key, descending=True, stable=True).indices
    order = order[flat_key[order] > 0]
    order = order[cost_of[order] <= remaining]
    taken = []
    while order.numel():
        cs = torch.cumsum(cost_of[order], 0)
        n = int(torch.searchsorted(cs, torch.tensor([remaining]), right=True))
        if n:
            taken.append(order[:n])
            remaining -= int(cs[n - 1])
        rest = order[n:]
        order = rest[cost_of[rest] <= remaining]
    tau = float('inf')
    if taken:
        t = torch.cat(taken)
        tau = float(flat_key[t].min())
        for li in range(len(point_sets)):
            sel = t[layer_of[t] == li]
            if sel.numel():
                out[li] += torch.bincount(chan_of[sel], minlength=point_sets[li].channels)
    info = [(tau, remaining, c) for c in costs]
    return out, info


def allocate(point_sets: list[PointSet], sizes: list[int] | None = None,
             budget: float = 0.05, mode: str = 'global', by: str = 'output',
             max_points: int | None = None, seed: int = 0,
             bits: list[int] | None = None) -> list[Tensor]:
    """Number of points per channel (C,) int64 (>= 1) for every layer.

    Only computed points (``PointSet.computed``) are allocated. ``sizes``: d per
    layer (default: from the point sets). ``bits``: per-layer bit widths; when
    given, costs and the budget are counted in bits instead of weights.
    """
    if not point_sets:
        check_budget(budget)
        return []
    budget, sizes, wbits, Ps, keys, costs = _setup(point_sets, sizes, budget, mode,
                                                   by, max_points, seed, bits)
    return _allocate(point_sets, budget, mode, sizes, wbits, Ps, keys, costs)[0]


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
                        n_refine: int = DEFAULT_N_REFINE, lloyd: int = DEFAULT_LLOYD
                        ) -> tuple[list[QuantizedWeight], list[PointSet]]:
    """Greedy points + allocation for layers sharing one budget.

    ``weights``: (C, d) per layer; ``hforms``: an HForm per layer (None: weight
    space). With ``lazy`` only two points per channel are searched first; channels
    the allocation fills up to their computed points get the rest, and the
    allocation is run again: the result equals the non-lazy one.

    ``num_threads``: torch intra-op threads during the pass (restored after);
    None keeps the current setting. The default 1 is deliberate: the work is many
    mid-sized memory-bound ops, and on a busy machine (dataloader workers, other
    jobs) two threads made the RetinaNet pass up to ~45x slower than one
    (see tools/bench_quant.py).
    """
    if num_threads is None:
        return _multipoint_quantize(weights, hforms, bits, budget, allocation,
                                    max_points, by, n_candidates, refit, seed, lazy,
                                    min_ratio, n_refine, lloyd)
    old = torch.get_num_threads()
    torch.set_num_threads(check_positive_int(num_threads, 'num_threads'))
    try:
        return _multipoint_quantize(weights, hforms, bits, budget, allocation,
                                    max_points, by, n_candidates, refit, seed, lazy,
                                    min_ratio, n_refine, lloyd)
    finally:
        torch.set_num_threads(old)


def _multipoint_quantize(weights, hforms, bits, budget, allocation, max_points, by,
                         n_candidates, refit, seed, lazy, min_ratio, n_refine,
                         lloyd):
    budget = check_budget(budget)
    max_points = check_max_points(max_points)
    check_choice(allocation, 'allocation', MODES)
    if len(weights) != len(hforms):
        raise ValueError(f'weights has {len(weights)} entries but hforms has '
                         f'{len(hforms)}')
    L = len(weights)
    bl = [bits] * L if not isinstance(bits, (list, tuple)) else list(bits)
    if len(bl) != L:
        raise ValueError(f'bits has {len(bl)} entries for {L} layers')
    bl = [check_bits(b) for b in bl]
    mixed = len(set(bl)) > 1
    first = 1 if (budget == 0 or lazy) else max_points
    pss = [greedy_multipoint(W, H, b, max_points, n_candidates, refit, first,
                             min_ratio, n_refine, lloyd)
           for W, H, b in zip(weights, hforms, bl)]
    bits_arg = bl if mixed else None
    if budget == 0 or max_points == 1:
        npoints = [torch.ones(ps.channels, dtype=torch.int64) for ps in pss]
    elif not lazy:
        npoints = allocate(pss, None, budget, allocation, by, max_points, seed,
                           bits_arg)
    else:
        npoints = _lazy_allocate(pss, weights, hforms, budget, allocation, by,
                                 max_points, seed, bits_arg)
    return [select_points(ps, n) for ps, n in zip(pss, npoints)], pss


def _lazy_allocate(pss, weights, hforms, budget, mode, by, max_points, seed, bits):
    """Allocation that computes further points only where they may be taken.

    Invariant: a channel whose next point is not computed has an upper bound UB of
    that point's priority. With tau the smallest priority taken and ``room`` the
    unspent budget of its pool, a point with UB < tau that does not fit in ``room``
    cannot change the greedy result. Pending points that may matter are computed
    (those with UB >= tau, plus the best by UB whose cost adds up to twice the
    room), and the allocation is redone, until none are left: the result equals
    the allocation over all points computed for all channels.
    """
    while True:
        budget_, sizes, wbits, Ps, keys, costs = _setup(pss, None, budget, mode, by,
                                                        max_points, seed, bits)
        npoints, info = _allocate(pss, budget_, mode, sizes, wbits, Ps, keys, costs)
        # pending points: channels that got every computed point, and may get more
        cand = []   # (layer, channels, ub)
        for li, (ps, n, key, P) in enumerate(zip(pss, npoints, keys, Ps)):
            pend = torch.nonzero((n >= ps.computed) & (ps.computed < P)).reshape(-1)
            if not pend.numel():
                continue
            ub = key[pend, ps.computed[pend] - 1]
            tau, room, cost = info[li]
            ok = (ub > 0) & ((ub >= tau) | (cost <= room))
            if bool(ok.any()):
                cand.append((li, pend[ok], ub[ok]))
        if not cand:
            return npoints
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
            tau, room, _ = info[items[0][0]]
            cost = torch.tensor([info[li][2] for li in range(len(pss))])[lay]
            order = torch.sort(ub, descending=True, stable=True).indices
            must = ub[order] >= tau
            extra = torch.cumsum(torch.where(must, 0, cost[order]), 0) <= 2 * room
            pick = must | extra
            pick[0] = True
            sel = order[pick]
            for li in lay[sel].unique().tolist():
                todo.setdefault(li, []).append(ch[sel][lay[sel] == li])
        for li, chs in todo.items():
            ch = torch.cat(chs)
            ps = pss[li]
            # one more point for each picked channel
            for k in sorted(set(ps.computed[ch].tolist())):
                sub = ch[ps.computed[ch] == k]
                extend_points(ps, weights[li], hforms[li], sub, k + 1)
