"""The int8 graph of full-grid models (signed scales, codes -2^(b-1)..2^(b-1)-1):
exact in int8 with positive scales, BatchNorm factors of either sign folded, W2-W4
codes still stored as INT4."""
import numpy as np
import pytest

from mpq_det.deploy.ort import integer_kernel_counts
from mpq_det.modules import QConv2d

from test_deploy import TOL, compare, conv_nodes, deploy, toy, weight_codes

pytest.importorskip('onnxruntime')


def weight_scales(g, conv) -> np.ndarray:
    from onnx import numpy_helper
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    return numpy_helper.to_array(inits[producers[conv.input[1]].input[1]])


@pytest.mark.parametrize('bits,max_points,pow2', [(4, 1, False), (4, 3, False),
                                                  (3, 3, True), (2, 2, False)])
def test_full_grid_int8_graph_matches_pytorch(bits, max_points, pow2, tmp_path):
    """Negative scales (the extra level on the positive side) and negative BatchNorm
    factors both flip codes: the graph matches PyTorch, runs integer kernels, has
    positive weight scales, and keeps W2-W4 codes in INT4 (a W4 row flipped to
    [-7, 8] is stored unflipped and negated by a folded Mul)."""
    import onnx
    model = toy(max_points, bits=bits, grid='full', pow2=pow2)
    qs = [m for m in model.modules() if isinstance(m, QConv2d)]
    assert all(m.grid == 'full' for m in qs)
    assert any(bool((m.scales < 0).any()) for m in qs)
    assert any(int(m.codes.min()) == -2 ** (bits - 1) for m in qs)
    path, report = deploy(model, tmp_path)
    assert compare(model, path) <= TOL
    counts = integer_kernel_counts(path)
    if not pow2:   # merged points: one conv per layer instead
        assert counts['integer_convs'] == conv_nodes(model, exclude=('cls', 'reg'))
    assert counts['conv_integer'] == 0
    g = onnx.load(path).graph
    convs = [n for n in g.node if n.op_type == 'Conv' and len(n.input) > 1
             and n.input[1] in {o for m in g.node if m.op_type == 'DequantizeLinear'
                                for o in m.output}]
    assert convs
    for c in convs:
        assert (weight_scales(g, c) > 0).all()
    flipped = 0
    for c in convs:
        codes = weight_codes(g, c)
        # unmerged b-bit rows are stored as INT4 (the segment-sum convs' weights, powers
        # of two >= 0, are int8)
        if np.abs(codes).max() <= 8 and codes.min() < 0:
            assert weight_codes(g, c, stored=True) == 'INT4', c.name
            flipped += int(codes.max()) == 8
    if bits == 4 and not pow2:
        assert flipped      # some row needed the sign's Mul
