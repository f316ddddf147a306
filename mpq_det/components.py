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
