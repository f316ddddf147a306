"""Accuracy regression guards of the committed Faster R-CNN (W4 near FP, W3 above
rtn, the pinned bits and budget), with the machinery of test_accuracy_guards.py: a
file of its own, so that the suite's two workers run it beside RetinaNet's guards."""
import test_accuracy_guards as guards
from test_accuracy_guards import S  # noqa: F401  (the fixture: runs cached per module)

DET = 'faster_rcnn_r18q'


def test_runs_use_the_pinned_bits_and_budget(S):  # noqa: F811
    guards.check_runs_use_the_pinned_bits_and_budget(S, DET)


def test_w4_stays_near_fp(S):  # noqa: F811
    guards.check_w4_stays_near_fp(S, DET)


def test_w3_beats_rtn(S):  # noqa: F811
    guards.check_w3_beats_rtn(S, DET)
