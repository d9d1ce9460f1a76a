"""The shape and integer ops Swin's integer program adds to ``Sym``: roll, token sum, integer-constant add.

Each is exported through ``OnnxGraph`` and run on onnxruntime against the same torch op on the integers.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ptq.intexec.graph import OnnxGraph


def _run(build, x: torch.Tensor) -> np.ndarray:
    g = OnnxGraph()
    img = g.input("image", tuple(x.shape))
    q = g.quantize(img, torch.tensor(1.0), -128, 127, "q")
    out = build(q)
    model = g.model(img, {"out": out})
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": x.numpy()})[0]


@pytest.mark.parametrize(("shifts", "dims"), [(3, 1), ((-2, 1), (1, 2)), ((5, -3), (1, 2)), (0, 1)])
def test_roll_moves_integers_as_torch_roll(shifts, dims) -> None:
    x = torch.randint(-128, 128, (2, 6, 5, 3)).float()
    got = _run(lambda q: torch.roll(q, shifts, dims), x)
    np.testing.assert_array_equal(got, torch.roll(x, shifts, dims).int().numpy())


def test_token_sum_is_exact_and_its_bound_grows() -> None:
    x = torch.full((3, 40, 4), 127.0)
    x[1] = -128
    seen = {}

    def build(q):
        s = q.sum(1)
        seen["bound"] = (s.lo, s.hi)
        return s

    got = _run(build, x)
    np.testing.assert_array_equal(got, x.sum(1).int().numpy())
    assert seen["bound"] == (-128 * 40, 127 * 40)


def test_integer_constant_add_broadcasts_over_the_batch() -> None:
    x = torch.randint(-128, 128, (4, 2, 3, 3)).float()
    c = torch.randint(-1000, 1000, (2, 3, 3)).float()
    got = _run(lambda q: q + c, x)
    np.testing.assert_array_equal(got, (x + c).int().numpy())


def test_rejected_symbolic_ops_say_why() -> None:
    g = OnnxGraph()
    q = g.quantize(g.input("image", (2, 4, 4)), torch.tensor(1.0), -128, 127, "q")
    with pytest.raises(ValueError, match="batch"):
        q.roll(1, 0)
    with pytest.raises(ValueError, match="not integer"):
        q + torch.full((4, 4), 0.5)
