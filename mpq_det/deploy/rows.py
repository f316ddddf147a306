"""Steps 5 and 6 of the int8 graph (``qdq``): multipoint layers as rows of integer
convs.

- Power-of-two points (exports made with ``points=dict(scales='pow2')``): a channel's
  leading chain of points with scales s, s/2^j1, s/2^(j1+j2), ... is one int8 row,
  exact as long as its codes fit in int8 (``merged_points``, ``quant.merge_pow2``).
  That is done before anything else: on int8 hardware those points cost nothing.
- Dense convs with few extra rows (``row_layout``, ``sum_rows``): one Conv with the
  main rows first and the extra rows after them, level by level. Its output is
  requantized per tensor, which would crush the small extra rows, so the weight
  scales of the i-th extra points are multiplied by 2^k_i (k_i = the smallest
  floor(log2(main scale / point scale)) of that level): they are rounded 2^k_i finer.
  A 1x1 integer conv over the E extra rows only (E*C multiply-adds per pixel, weights
  2^(k_max - k_i) at (channel, its row), a power-of-two scale) divides the 2^k_i back
  and puts each row on its channel; an integer Add adds that to the main rows. Cost:
  the layer's output rounded once more than in PyTorch (calibrated range), the E*C
  1x1 conv and its own rounding. When the powers of two differ by more than
  ``MAX_SEGMENT_SHIFT``, a float sum of Slices, Adds and a Concat does it instead.
- Grouped and depthwise convs, and dense convs where most channels have an extra
  point (``levels_cheaper`` decides for dense convs): one conv of the same shape per
  point level (zero rows for the channels without that point), each with its own
  output scale, summed by integer Adds (``point_level_convs``). No 2^k and no segment
  sum; the zero rows cost their multiply-adds. Extra rows inside the groups would take
  onnxruntime off its depthwise kernel (SSDLite ran 15x slower); under the
  compute-aware budget, cheap early layers of RetinaNet-R50 got an extra point on
  nearly every channel, where the E*C segment sum cost more than the layer itself.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import torch

from ..modules import QConv2d
from ..quant.multipoint import merge_pow2
from .graph import Graph
from .records import ConvUnit

MAX_SEGMENT_SHIFT = 6  # int8 weights 2^(k_max - k) of the segment-sum conv: up to 64
# multiply-adds that one element read or written by an Add/Slice costs (memory-bound
# ops against int8 GEMMs, roughly, on this machine's CPU provider)
ELEMENT_COST = 8

# (codes, scales, channel of each row, BN factor, bias, kernel) -> (weight DQ output,
# bias initializer, weight scales): ``storage.WeightStore.add``
WeightsFn = Callable[..., tuple[str, str, np.ndarray]]


def merged_points(q: QConv2d) -> tuple[QConv2d, int]:
    """(``q`` with each channel's leading power-of-two chain of points merged into
    one int8 row (``quant.merge_pow2``: exact), the number of extra points merged).
    Such points cost nothing on int8 hardware: the row is one int8 weight row. ``q``
    itself when none merges (exports with free point scales, the default, almost never do)."""
    npts = q.npoints.cpu()
    if int(npts.max()) == 1:
        return q, 0
    codes, scales = q.codes.cpu(), q.scales.cpu()
    start = (torch.cumsum(npts, 0) - npts).tolist()
    out_c, out_s, out_n, merged = [], [], [], 0
    for j, n in enumerate(npts.tolist()):
        s, c = scales[start[j]:start[j] + n], codes[start[j]:start[j] + n]
        if n > 1:
            s, c, m = merge_pow2(s, c)
            merged += m - 1
        out_c.append(c)
        out_s.append(s)
        out_n.append(s.numel())
    if not merged:
        return q, 0
    view = copy.copy(q)
    view._buffers = dict(q._buffers)
    view.codes = torch.cat(out_c).to(torch.int8)
    view.scales = torch.cat(out_s).float()
    view.npoints = torch.tensor(out_n, dtype=torch.int64)
    return view, merged


def row_layout(q: QConv2d, first_point_only: bool = False) -> dict:
    """Rows of the deployed conv: per group, the group's main rows (one per channel,
    the channel's first point), then its extra rows, then zero rows up to the largest
    group (plus one zero row when a channel lacks an extra point that another has).

    Returns codes (rows, d) int8, scales, the channel of each row (-1: zero row), its
    power-of-two factor 2^-k (1 for main rows), ``main`` (C,) the main row of each
    channel, ``extra`` the extra rows, and ``levels``: for the i-th extra point, the
    row of each channel's i-th extra point or a zero row."""
    codes = q.codes.cpu().numpy().astype(np.int8)
    scales = q.scales.cpu().numpy().astype(np.float64)
    npts = q.npoints.cpu().numpy().astype(np.int64)
    C, G = npts.size, q.groups
    start = np.concatenate([[0], np.cumsum(npts)[:-1]])
    if first_point_only:  # what the graph costs without extra points (not the same weights)
        codes, scales, npts = codes[start], scales[start], np.ones_like(npts)
        start = np.arange(C)
    cpg = C // G
    per_group = []
    for g in range(G):
        chans = range(g * cpg, (g + 1) * cpg)
        main = [(j, start[j]) for j in chans]
        # level-major: a dense conv's i-th extra points are one contiguous block
        extra = [(j, start[j] + i) for i in range(1, int(npts.max())) for j in chans
                 if i < npts[j]]
        per_group.append(main + extra)
    Rg = max(len(r) for r in per_group)
    n_levels = int(npts.max()) - 1
    if n_levels and (npts <= n_levels).any() and all(len(r) == Rg for r in per_group):
        Rg += 1  # a zero row for the channels without an i-th extra point
    R, d = G * Rg, codes.shape[1]
    out = dict(codes=np.zeros((R, d), np.int8), scales=np.ones(R), chan=np.full(R, -1),
               fac=np.ones(R), main=np.zeros(C, np.int64), extra=[])
    zero_row = next((g * Rg + len(r) for g, r in enumerate(per_group) if len(r) < Rg), -1)
    out['levels'] = [np.full(C, zero_row, np.int64) for _ in range(n_levels)]
    extra = []  # (row, src, channel, level, largest k for this row)
    for g, rows in enumerate(per_group):
        for i, (j, src) in enumerate(rows):
            r = g * Rg + i
            out['codes'][r] = codes[src]
            out['chan'][r] = j
            if src == start[j]:
                out['main'][j] = r
                out['scales'][r] = scales[src]
                continue
            main_s, s = abs(scales[start[j]]), abs(scales[src])
            k = int(math.floor(math.log2(main_s / s))) if s > 0 and main_s > 0 else 0
            level = src - start[j] - 1
            extra.append((r, src, level, k))
            out['levels'][level][j] = r
    # one 2^k per level (the smallest the level's rows allow), so that a per-tensor
    # DequantizeLinear of the gathered level divides it back
    out['level_k'] = [min([k for _, _, lv, k in extra if lv == i] or [0]) for i in
                      range(n_levels)]
    out['level_k'] = [min(max(k, 0), 24) for k in out['level_k']]
    for r, src, level, _ in extra:
        k = out['level_k'][level]
        out['scales'][r] = scales[src] * 2.0 ** k
        out['fac'][r] = 2.0 ** -k
    out['extra'] = np.asarray([e[0] for e in extra], np.int64)
    return out


def levels_cheaper(q: QConv2d) -> bool:
    """Whether a dense multipoint conv costs less as one conv per point level (C rows
    each, zero rows for the channels without that point, summed by integer Adds)
    than as one conv with the E extra rows plus the E x C segment-sum conv.
    Per output pixel: conv and segment-sum multiply-adds, plus the elements the Adds
    and Slices read or write at ELEMENT_COST each. When most channels have an extra
    point (cheap early layers under a compute budget), the E x C sum costs more than
    the layer itself."""
    npts = q.npoints.cpu().numpy().astype(np.int64)
    C, L, E = npts.size, int(npts.max()) - 1, int(npts.sum()) - npts.size
    K = q.in_channels // q.groups * int(np.prod(q.kernel_size))
    levels = L * C * K + ELEMENT_COST * 3 * L * C
    rows = E * K + E * C + ELEMENT_COST * (2 * (C + E) + 3 * C)
    return levels < rows


def runs_as_point_levels(q: QConv2d) -> bool:
    """Whether a multipoint conv runs as one conv per point level (grouped convs
    always; dense ones where that is cheaper) rather than as rows of one conv."""
    return int(q.npoints.max()) > 1 and (q.groups > 1 or levels_cheaper(q))


def point_level_convs(G: Graph, conv, q: QConv2d, mult: np.ndarray, bias: np.ndarray,
                      xdq: str, x_scale: float, y: str, weights: WeightsFn,
                      layer: str) -> list[ConvUnit]:
    """A multipoint conv as one conv of the same shape per point level (zero rows for
    the channels without that point), each with its own output, summed by Adds into
    ``y``. ``conv`` becomes the first level. Returns the levels' units, in order. Extra
    rows inside the groups would make onnxruntime leave its depthwise kernel for a
    per-group GEMM, and make the rows' sum a Gather."""
    C = q.out_channels
    codes = q.codes.cpu().numpy()
    scales = q.scales.cpu().numpy().astype(np.float64)
    npts = q.npoints.cpu().numpy().astype(np.int64)
    start = np.concatenate([[0], np.cumsum(npts)[:-1]])
    attrs = {a.name: a for a in conv.attribute}
    units = []
    for lvl in range(int(npts.max())):
        has = npts > lvl
        lc = np.zeros((C, codes.shape[1]), np.int8)
        ls = np.zeros(C)
        lc[has] = codes[start[has] + lvl]
        ls[has] = scales[start[has] + lvl]
        lb = bias if lvl == 0 else np.zeros(C)
        wdq, bname, w_scales = weights(lc, ls, np.arange(C), mult, lb, q.kernel_size)
        raw = G.uniq(f'{y}_point{lvl}')
        if lvl == 0:
            nd = conv
            del nd.input[:]
            nd.input.extend([xdq, wdq, bname])
            nd.output[0] = raw
        else:
            nd = G.node('Conv', [xdq, wdq, bname], [raw])
            nd.attribute.extend(copy.deepcopy(list(attrs.values())))
        units.append(ConvUnit(f'{layer}[point {lvl}]', nd.name, xdq, x_scale, w_scales, lb,
                              bname, raw, None, routed=True))
    acc = units[0].raw
    for u in units[1:]:
        acc = G.node('Add', [acc, u.raw]).output[0]
    G.node('Identity', [acc], [y])
    return units


# requantization of the rows before their sum: (scale initializer, scale, zero point
# initializer), or None for the float sum of the calibration graph
RowsQ = tuple[str, float, str] | None


def sum_rows(G: Graph, raw: str, y: str, lay: dict, C: int, q: RowsQ = None) -> list[str]:
    """y = main rows + each channel's extra rows times 2^-k of their level. With ``q``,
    ``raw`` is requantized per tensor and its slices dequantized; else float
    (calibration graph). Returns the nodes made.

    The extra rows (E of them, after the C main rows) go through a 1x1 integer conv
    E -> C whose weights are 2^(k_max - k) at (channel, its extra row) and 0
    elsewhere (E*C multiply-adds per pixel, the E extra rows only, not the C main
    rows), then an integer Add: onnxruntime runs both as integer kernels. When
    the levels' powers of two differ by more than 6 (weights beyond int8), the sum
    is Slices, Adds and a Concat in float."""
    ex = lay['extra']
    k_row = np.round(-np.log2(lay['fac'][ex])).astype(np.int64)
    chan = lay['chan'][ex]
    k_max = np.zeros(C, np.int64)
    np.maximum.at(k_max, chan, k_row)
    if (k_max[chan] - k_row).max(initial=0) > MAX_SEGMENT_SHIFT:
        return _sum_rows_slices(G, raw, y, lay, C, q)
    made: list[str] = []
    node = _recorder(G, made)
    sl = _slicer(G, node)
    E = ex.size
    w = np.zeros((C, E, 1, 1), np.int8)
    w[chan, np.arange(E), 0, 0] = 2 ** (k_max[chan] - k_row)
    w_scale = (2.0 ** -k_max).astype(np.float32)
    seg_w = node('DequantizeLinear', [G.init('seg_w', w), G.init('seg_scale', w_scale)],
                 axis=0)
    seg = lay.setdefault('seg_out', G.uniq(y + '_extra_sum'))
    if q is None:
        main, extra = sl(raw, 0, C), sl(raw, C, C + E)
    else:
        src = node('QuantizeLinear', [raw, q[0], q[2]])
        main = node('DequantizeLinear', [sl(src, 0, C), q[0], q[2]])
        extra = node('DequantizeLinear', [sl(src, C, C + E), q[0], q[2]])
    node('Conv', [extra, seg_w], [seg], kernel_shape=[1, 1])
    node('Add', [main, seg], [y])
    return made


def _recorder(G: Graph, made: list[str]) -> Callable[..., str]:
    """``G.node`` that also records each new node's name in ``made`` and returns its
    first output (the row-sum builders report the nodes they added)."""
    def node(*a, **kw) -> str:
        nd = G.node(*a, **kw)
        made.append(nd.name)
        return nd.output[0]
    return node


def _slicer(G: Graph, node: Callable[..., str]) -> Callable[[str, int, int], str]:
    """``sl(t, a, b)``: channels [a, b) of ``t`` (a Slice made by ``node``)."""
    def sl(t: str, a: int, b: int) -> str:
        return node('Slice', [t, G.init('i', np.array([a])), G.init('i', np.array([b])),
                              G.init('i', np.array([1]))])
    return sl


def _sum_rows_slices(G: Graph, raw: str, y: str, lay: dict, C: int,
                     q: RowsQ = None) -> list[str]:
    """The float sum of ``sum_rows``: main rows plus, per level, the slices of that
    level's rows, joined by a Concat."""
    made: list[str] = []
    node = _recorder(G, made)
    src = raw if q is None else node('QuantizeLinear', [raw, q[0], q[2]])

    def deq(t: str, k: int) -> str:
        if q is None:
            return t if k == 0 else node('Mul', [t, G.init('fac', np.array(2.0 ** -k,
                                                                      np.float32))])
        return node('DequantizeLinear', [t, G.init('y_scale', np.array(
            q[1] * 2.0 ** -k, np.float32)), q[2]])
    sl = _slicer(G, node)
    if not np.array_equal(lay['main'], np.arange(C)):
        raise ValueError('grouped multipoint convs are deployed as one conv per point '
                         'level (point_level_convs)')
    # dense conv: Slice/Add/Concat only, which onnxruntime's layout optimizer moves
    # its NHWC transposes through (a Gather stops them: a transpose pair per layer)
    main = deq(sl(src, 0, C), 0)
    levels, start = [], C
    for i, idx in enumerate(lay['levels']):
        n = int((lay['chan'][idx] >= 0).sum())
        levels.append(deq(sl(src, start, start + n), lay['level_k'][i]))
        start += n
    npts = 1 + sum((lay['chan'][idx] >= 0).astype(np.int64) for idx in lay['levels'])
    pos = [0] * len(levels)  # next channel of each level block
    parts, a = [], 0
    while a < C:  # runs of channels with the same number of points
        b = a
        while b < C and npts[b] == npts[a]:
            b += 1
        piece = sl(main, a, b)
        for i in range(int(npts[a]) - 1):
            piece = node('Add', [piece, sl(levels[i], pos[i], pos[i] + b - a)])
            pos[i] += b - a
        parts.append(piece)
        a = b
    node('Concat', parts, [y], axis=1) if len(parts) > 1 else node('Identity', parts, [y])
    return made
