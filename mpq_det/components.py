"""Which part of an mmdet detector a module belongs to: backbone, neck or head."""
from __future__ import annotations

COMPONENTS = ('backbone', 'neck', 'head')


def component_of(name: str) -> str | None:
    """mmdet detectors: backbone, neck, and every ``*head`` child (rpn_head, roi_head ...)."""
    top = name.split('.', 1)[0]
    if top in ('backbone', 'neck'):
        return top
    if top.endswith('head'):
        return 'head'
    return None


def stage_of(name: str, split_backbone: bool = True) -> str:
    """Stage of a layer for sequential calibration, in forward order: the
    backbone's top-level children (stem, ResNet's layer1..layer4, ...) when
    ``split_backbone``, else the backbone; the neck; each head (rpn_head, roi_head
    ...) on its own."""
    parts = name.split('.')
    if parts[0] == 'backbone' and split_backbone and len(parts) > 1:
        return '.'.join(parts[:2])
    return parts[0]


def runs_on_proposals(stage: str) -> bool:
    """A two-stage detector's RoI head: its inputs are features of the proposals
    of the model's own RPN, so a quantized model and its floating-point reference
    do not see the same rows."""
    return stage.startswith('roi_head')
