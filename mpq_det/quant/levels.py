"""Point levels: how ``QConv2d``'s expanded forward runs a grouped conv's points,
and what they cost.

Level 0 holds every channel's first point; level k >= 1 the (k+1)-th points of the
channels that have one. A grouped conv (G groups of C/G channels) runs level 0 as
its own grouped conv (C rows) and each level k >= 1 as a grouped conv over only its
*active* groups (those with a channel of >= k+1 points), A_k of them, each padded
with zero rows to R_k = the most such channels in one group. Its rows are

    C + sum_k A_k * R_k          (d MACs per output position each),

so a depthwise conv (C/G == 1: R_k == 1, A_k == its channels with >= k+1 points)
runs exactly sum_j n_j rows, like a dense conv (one conv of all rows; the same
formula with G == 1 gives sum_j n_j too). Point rows are channel-major, as
``QuantizedWeight`` stores them.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _group_shape(npoints: Tensor, groups: int) -> Tensor:
    """npoints (C,) as (G, C/G)."""
    C = npoints.numel()
    if groups < 1 or C % groups:
        raise ValueError(f'groups={groups} must divide the {C} channels')
    return npoints.reshape(groups, C // groups)


def expanded_rows(npoints: Tensor, groups: int = 1) -> int:
    """Rows (of d MACs per output position) that the expanded forward runs:
    C + sum_k A_k * R_k (see the module doc); sum_j n_j for dense and depthwise."""
    n = _group_shape(npoints, groups)
    levels = torch.arange(1, int(n.max()), device=n.device)
    cnt = (n[:, :, None] > levels).sum(1)               # (G, K): rows per group, level
    return npoints.numel() + int(((cnt > 0).sum(0) * cnt.max(0).values).sum())


def point_levels(npoints: Tensor, groups: int) -> list[tuple[Tensor, Tensor]]:
    """The grouped convs of the expanded forward, one per level (level 0 first):
    (active groups (A,), rows (A * R,)), where rows[a * R + i] is the point row
    (index into codes / scales) of the i-th row of active group a, -1 for a zero
    padding row. Level 0 is all G groups with one row per channel, in order."""
    n = _group_shape(npoints, groups)
    G, cpg = n.shape
    start = (torch.cumsum(npoints, 0) - npoints).reshape(G, cpg)
    out = []
    for k in range(int(n.max())):
        has = n > k                                       # (G, cpg)
        cnt = has.sum(1)
        act = torch.nonzero(cnt).reshape(-1)
        R = int(cnt.max())
        rank = torch.cumsum(has[act], 1) - 1              # row of a channel in its group
        a, c = torch.nonzero(has[act], as_tuple=True)
        rows = torch.full((act.numel() * R,), -1, dtype=torch.int64, device=n.device)
        rows[a * R + rank[a, c]] = start[act][a, c] + k
        out.append((act, rows))
    return out


class LevelRows:
    """``expanded_rows`` of one grouped conv kept point by point (for the allocation):
    ``cost(c)`` is the number of rows one more point of channel c adds, ``add(c)``
    takes it."""

    def __init__(self, channels: int, groups: int):
        self.cpg = channels // groups
        self.groups = groups
        self.n = [1] * channels          # points per channel
        self.count: list[list[int]] = []  # [level - 1][group]: rows of the group
        self.active: list[int] = []       # A_k
        self.top: list[int] = []          # R_k

    def cost(self, c: int) -> int:
        k = self.n[c] - 1
        if k == len(self.count):         # a new level: one group of one row
            return 1
        m = self.count[k][c // self.cpg]
        a, r = self.active[k], self.top[k]
        return (a + (m == 0)) * max(r, m + 1) - a * r

    def add(self, c: int) -> None:
        k = self.n[c] - 1
        if k == len(self.count):
            self.count.append([0] * self.groups)
            self.active.append(0)
            self.top.append(0)
        g = c // self.cpg
        m = self.count[k][g]
        self.count[k][g] = m + 1
        self.active[k] += m == 0
        self.top[k] = max(self.top[k], m + 1)
        self.n[c] += 1
