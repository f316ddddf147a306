"""A tiny plain-torch model with mmdet's child names (backbone, neck, bbox_head), for
the tests of the model pass that must run without mmdet."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU())
        self.neck = nn.Sequential(nn.Conv2d(32, 24, 1), nn.ReLU())
        self.bbox_head = nn.Sequential(nn.Flatten(), nn.Linear(24 * 8 * 8, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.bbox_head(self.neck(self.backbone(x)))


def calibrate_on(batches: list[Tensor]) -> Callable[[nn.Module, nn.Module | None], None]:
    """The ``calibrate(m, reference)`` that ``MultipointQuantizer.quantize`` takes."""
    @torch.no_grad()
    def calibrate(m: nn.Module, reference: nn.Module | None) -> None:
        for x in batches:
            if reference is not None:
                reference(x)
            m(x)
    return calibrate
