"""The outputs of an mmdet detector whose error the activation ranges minimize.

``activations.range='fisher'`` weights each layer's input quantization error by how
much it moves these outputs (``quant.act_ranges``). Raw head outputs would be the
wrong measure: their error is dominated by the background logits, which never
become detections. So the outputs are taken in score space:

* classification logits z, weighted by the slope of their score, s (1 - s) with
  s = sigmoid(z) (or the softmax probability, for softmax heads): a change of the
  logit counts by the change of the score it causes, and a confident background
  (s near 0) counts for little;
* every other output of a prior (box deltas, centerness), weighted by the prior's
  highest foreground score: the boxes of the priors the detector keeps.

Dense heads (RetinaNet, FCOS, SSD, an RPN) give one pair per output and level;
a two-stage detector adds its RoI head's scores and boxes on the RPN's proposals.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .quant.act_ranges import random_projection


def _softmax_head(head: nn.Module) -> bool:
    return not getattr(head, 'use_sigmoid_cls', True)


def dense_head_pairs(head: nn.Module, outs: tuple) -> list[tuple[Tensor, Tensor]]:
    """(output, weight) pairs of a dense head's ``forward`` outputs, ``outs`` =
    (cls_scores, bbox_preds, ...), each a list over feature levels of (B, A * k, H,
    W) maps, anchor-major as mmdet lays them out."""
    C = head.cls_out_channels
    pairs = []
    for lvl, cls in enumerate(outs[0]):
        B, ch, H, W = cls.shape
        A = ch // C
        z = cls.detach().reshape(B, A, C, H, W)
        if _softmax_head(head):
            s = z.softmax(2)
            fg = s[:, :, :-1]               # mmdet's softmax heads: background last
        else:
            s = fg = z.sigmoid()
        pairs.append((cls, (s * (1 - s)).reshape(cls.shape)))
        score = fg.amax(2)                  # (B, A, H, W)
        for other in outs[1:]:
            o = other[lvl]
            pairs.append((o, score.repeat_interleave(o.shape[1] // A, 1)))
    return pairs


def roi_head_pairs(head: nn.Module, outs: tuple) -> list[tuple[Tensor, Tensor]]:
    """(output, weight) pairs of a bbox RoI head's (cls_score (N, C + 1),
    bbox_pred (N, ...)) on the proposals."""
    cls, box = outs[0], outs[1]
    s = cls.detach().softmax(-1)
    score = s[:, :-1].amax(-1, keepdim=True)
    return [(cls, s * (1 - s)), (box, score.expand_as(box))]


def score_pairs(model: nn.Module, inputs: Tensor, data_samples) -> list[tuple[Tensor, Tensor]]:
    """The score-space (output, weight) pairs of a single- or two-stage detector."""
    x = model.extract_feat(inputs)
    pairs = []
    if getattr(model, 'bbox_head', None) is not None:
        pairs += dense_head_pairs(model.bbox_head, model.bbox_head(x))
    if getattr(model, 'rpn_head', None) is not None:
        pairs += dense_head_pairs(model.rpn_head, model.rpn_head(x))
        with torch.no_grad():
            proposals = model.rpn_head.predict(tuple(f.detach() for f in x), data_samples,
                                               rescale=False)
        roi = model.roi_head.forward(x, proposals, data_samples)
        pairs += roi_head_pairs(model.roi_head, roi)
    if not pairs:
        raise ValueError(f'{type(model).__name__}: no bbox_head or rpn_head/roi_head '
                         f'whose scores the activation ranges could be fitted to')
    return pairs


def score_backward(loader, seed: int = 0) -> Callable[[nn.Module], None]:
    """``backward(model)`` for ``MultipointQuantizer.quantize``: every batch of
    ``loader`` through the detector with its images requiring grad, and one
    backward pass of a random projection of the score-space outputs
    (``random_projection``), seeded by ``seed``."""
    def run(model: nn.Module) -> None:
        gen = torch.Generator().manual_seed(seed)
        for batch in loader:
            data = model.data_preprocessor(batch, False)
            inputs = data['inputs'].float().requires_grad_()
            pairs = score_pairs(model, inputs, data['data_samples'])
            random_projection(pairs, gen).backward()
    return run
