"""Quantizer math: scales, clamping, per-channel shapes, round-trip error, the moving average, LSQ."""

from __future__ import annotations

import math

import pytest
import torch

from ptq.quant.qtensor import QTensor, qrange
from ptq.quant.quantizers import ActQuantizer, WeightQuantizer, absmax_scale


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_quantizer_per_channel_scale_and_roundtrip(bits: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 3, 4, 4) * torch.linspace(0.01, 2.0, 16)[:, None, None, None]
    wq = WeightQuantizer(w, bits)
    q = wq(w)
    lo, hi = qrange(bits)
    assert wq.scale.shape == (16,)
    torch.testing.assert_close(wq.scale, w.abs().flatten(1).amax(1) / hi)
    assert torch.equal(q, q.round()) and q.min() >= lo and q.max() <= hi
    # each channel's absmax lands exactly on +-qmax, and the error is at most half a step
    assert torch.equal(q.abs().flatten(1).amax(1), torch.full((16,), float(hi)))
    err = (q * wq.scale[:, None, None, None] - w).abs()
    assert (err <= wq.scale[:, None, None, None] / 2 + 1e-7).all()


def test_weight_quantizer_zero_channel_is_safe() -> None:
    w = torch.zeros(3, 5)
    w[1] = torch.arange(5.0)
    wq = WeightQuantizer(w, 4)
    q = wq(w)
    assert torch.isfinite(q).all() and torch.equal(q[0], torch.zeros(5))


def test_absmax_scale_signed_and_unsigned() -> None:
    assert absmax_scale(torch.tensor(127.0), 8).item() == pytest.approx(1.0)
    assert absmax_scale(torch.tensor(255.0), 8, signed=False).item() == pytest.approx(1.0)
    assert absmax_scale(torch.tensor(0.0), 8).item() > 0


def test_moving_average_absmax_matches_formula() -> None:
    aq = ActQuantizer(8, momentum=0.9)
    aq.set_mode("observe")
    maxima = [2.0, 4.0, 1.0, 3.0]
    for m in maxima:
        x = torch.randn(5, 7).clamp(-0.5, 0.5)
        x[0, 0] = -m
        out = aq(QTensor.from_float(x))
        assert torch.equal(out.v, x)  # observing passes the value through
    expected = maxima[0]
    for m in maxima[1:]:
        expected = 0.9 * expected + 0.1 * m
    assert aq.running_absmax.item() == pytest.approx(expected)
    aq.freeze()
    assert aq.scale.item() == pytest.approx(expected / 127)


def test_act_quantizer_clamps_and_rounds_float_input() -> None:
    aq = ActQuantizer(4)
    aq.set_mode("observe")
    aq(QTensor.from_float(torch.tensor([-1.0, 1.0])))
    aq.freeze()
    aq.set_mode("quant")
    x = torch.tensor([-3.0, -1.0, -0.05, 0.0, 0.3, 1.0, 5.0])
    out = aq(QTensor.from_float(x))
    s = 1.0 / 7
    assert out.bits == 4 and out.s.item() == pytest.approx(s)
    assert out.v.tolist() == torch.clamp(torch.round(x / s), -8, 7).tolist()


def test_act_quantizer_requantizes_integer_accumulators_like_rounding() -> None:
    """An integer accumulator at per-channel scale lands where round(real / s) does (dyadic error < 1 step)."""
    torch.manual_seed(1)
    aq = ActQuantizer(8)
    aq.set_mode("observe")
    acc = torch.randint(-5000, 5000, (64, 6)).float()
    s_in = torch.rand(6) * 1e-3 + 1e-4
    aq(QTensor(acc, s_in, 32))
    aq.freeze()
    aq.set_mode("quant")
    out = aq(QTensor(acc, s_in, 32))
    ref = torch.clamp(torch.round(acc * s_in / aq.scale), -128, 127)
    assert (out.v - ref).abs().max() <= 1
    assert (out.v == ref).float().mean() > 0.99


def test_disabled_quantizer_stays_off() -> None:
    aq = ActQuantizer(8, enabled=False)
    aq.set_mode("quant")
    assert aq.mode == "off"
    x = torch.randn(4)
    assert torch.equal(aq(QTensor.from_float(x)).v, x)
    aq.freeze()  # nothing observed, but disabled: no error


def test_freeze_without_data_is_an_error() -> None:
    aq = ActQuantizer(8)
    aq.name = "blocks.0.attn.q_q"
    with pytest.raises(RuntimeError, match="blocks.0.attn.q_q"):
        aq.freeze()


def lsq_step_gradient(x: torch.Tensor, upstream: torch.Tensor, s: float, bits: int, per_sample: int) -> float:
    """LSQ (Esser et al. 2020, eq. 3 and the gradient scale g): dL/ds of x_hat = s * clamp(round(x/s), Qn, Qp)
    is sum(dL/dx_hat * (round(x/s) - x/s)) inside the range, Qn or Qp outside, times 1/sqrt(N * Qp)."""
    qn, qp = qrange(bits)
    v = x.double() / s
    term = torch.where(v <= qn, float(qn), torch.where(v >= qp, float(qp), torch.round(v) - v))
    return float((upstream.double() * term).sum()) / math.sqrt(per_sample * qp)


def test_lsq_step_gradient_is_the_lsq_formula() -> None:
    aq = ActQuantizer(4)
    aq.set_mode("observe")
    aq(QTensor.from_float(torch.tensor([-1.0, 1.0])))
    aq.freeze()  # step 1/7
    aq.set_mode("quant")
    aq.scale.requires_grad_(True)
    x = torch.tensor([[0.33, -0.71, 1.6, -2.2, 0.05], [0.9, -0.02, 0.49, -1.3, 3.0]])  # four clip, six do not
    upstream = torch.tensor([[0.5, -1.0, 2.0, 0.25, -0.75], [1.5, 0.1, -0.3, 1.0, -2.0]])
    out = aq(QTensor.from_float(x))
    (out.real() * upstream).sum().backward()
    s = float(aq.scale.detach())
    assert ((x / s).abs() > 7).sum() == 4
    expected = lsq_step_gradient(x, upstream, s, 4, per_sample=5)
    assert aq.scale.grad.item() == pytest.approx(expected, rel=1e-5)
    assert abs(expected) > 0.1
