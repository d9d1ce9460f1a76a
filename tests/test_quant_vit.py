"""The quantized ViT graph: coverage, float pass-through, exact integer accumulation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import small_vit
from ptq.quant import vit as qvit
from ptq.quant.nonlinear import Backend
from ptq.quant.qtensor import QTensor
from ptq.quant.quantizers import ActQuantizer
from ptq.quant.vit import QLinear, QuantSettings, QuantViT, exact_matmul


def calibrated(model: nn.Module, st: QuantSettings, images: torch.Tensor) -> QuantViT:
    q = QuantViT(model, st)
    q.set_mode("observe")
    with torch.no_grad():
        q(images)
    q.freeze()
    return q


def test_every_linear_conv_and_attention_matmul_is_quantized(monkeypatch: pytest.MonkeyPatch) -> None:
    model = small_vit(layers=3)
    n_linear = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())
    n_mha = sum(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    q = calibrated(model, QuantSettings(wbits=4, abits=8), torch.randn(8, 3, 16, 16))
    qlinears = list(q.linears())
    # every nn.Linear / Conv2d, plus each attention's packed qkv projection (a parameter, not a module)
    assert len(qlinears) == n_linear + n_mha == 1 + 4 * 3 + 1
    assert all(lin.wq is not None and lin.wq.bits == 4 for lin in qlinears)
    calls: list[tuple[bool, bool]] = []
    real = qvit.int_matmul

    def spy(a: QTensor, b: QTensor, scale: float = 1.0, *label: str) -> QTensor:
        calls.append((a.integer, b.integer))
        return real(a, b, scale, *label)

    monkeypatch.setattr(qvit, "int_matmul", spy)
    with torch.no_grad():
        q(torch.randn(2, 3, 16, 16))
    assert calls == [(True, True)] * (2 * 3)  # q@k^T and probs@v of each block, both integer


def test_quantizer_inventory_and_widths() -> None:
    q = QuantViT(small_vit(layers=2), QuantSettings(wbits=8, abits=8, idadd_bits=16))
    aqs = list(q.act_quantizers())
    # embed: input + residual; per block: ln1, q, k, v, scores, probs, ctx, res, ln2, fc1, gelu, res; head: ln
    assert len(aqs) == 2 + 12 * 2 + 1
    res = [a for a in aqs if a.name.split(".")[-1] == "res_q"]
    assert len(res) == 1 + 2 * 2 and all(a.bits == 16 for a in res)
    assert not q.blocks[0].attn.probs_q.signed
    assert all(a.name for a in aqs)


def test_all_quantizers_off_matches_torchvision() -> None:
    model = small_vit()
    x = torch.randn(4, 3, 16, 16)
    q = QuantViT(model, QuantSettings(wbits=None, abits=None))
    q.set_mode("quant")  # disabled quantizers stay off
    with torch.no_grad():
        torch.testing.assert_close(q(x), model(x), rtol=1e-5, atol=1e-5)


def test_w8a8_is_close_to_float_and_w4a4_is_further() -> None:
    model = small_vit()
    x = torch.randn(32, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        err8 = (calibrated(model, QuantSettings(8, 8), x)(x) - ref).abs().mean()
        err4 = (calibrated(model, QuantSettings(4, 4), x)(x) - ref).abs().mean()
    assert err8 < 0.1 * ref.abs().mean()
    assert err4 > 2 * err8


def test_input_and_final_ln_quantizers_can_be_switched_off() -> None:
    q = QuantViT(small_vit(), QuantSettings(quant_io=False))
    q.set_mode("quant")
    assert q.embed.in_q.mode == "off" and q.head.ln_q.mode == "off"
    assert q.blocks[0].attn.ln_q.mode == "quant"


@pytest.mark.parametrize("backend", ["fp", "ivit"])
def test_forward_is_deterministic_and_integer_valued(backend: str) -> None:
    model = small_vit()
    x = torch.randn(8, 3, 16, 16)
    q = calibrated(model, QuantSettings(8, 8, backend=Backend(backend)), x)
    with torch.no_grad():
        a, b = q(x), q(x)
        r = q.blocks[0].attn(q.embed(x))
    assert torch.equal(a, b)
    # the residual stream after the attention sub-block is INT16
    assert r.bits == 16 and torch.equal(r.v, r.v.round()) and r.v.abs().max() <= 2**15


def test_exact_matmul_equals_int64() -> None:
    torch.manual_seed(0)
    # same-sign operands: partial sums pass 2**24, where float32 starts dropping low bits
    a = torch.randint(90, 128, (3, 5, 3000)).float()
    b = torch.randint(90, 128, (3000, 7)).float()
    ref = a.long() @ b.long()
    out = exact_matmul(a, b, 128, 128)
    assert out.dtype == torch.float64 and torch.equal(out.long(), ref)
    # plain float32 is not exact at this size: the chunking is what makes it so
    assert not torch.equal((a @ b).long(), ref)


def test_qlinear_integer_path_matches_int64_reference() -> None:
    """Weights at step 2**-6 (each row's absmax is 127 steps) and inputs at 2**-2, so the accumulator step is
    2**-8 and the INT32 bias integers are known by hand: round half to even, clamped to INT32."""
    torch.manual_seed(0)
    w_int = torch.randint(-127, 128, (6, 40))
    w_int[:, 0] = 127
    bias = torch.tensor([1.0, -0.5, 0.123, 2.5 / 256, 3.5 / 256, 1e7])
    b_int = torch.tensor([256, -128, 31, 2, 4, 2**31 - 1])  # 0.123 * 256 = 31.488; ties 2.5 -> 2, 3.5 -> 4
    lin = nn.Linear(40, 6)
    with torch.no_grad():
        lin.weight.copy_(w_int / 64)
        lin.bias.copy_(bias)
    ql = QLinear(lin.weight, lin.bias, 8)
    x = QTensor(torch.randint(-128, 128, (2, 9, 40)).float(), torch.tensor(0.25), 8)
    with torch.no_grad():
        acc = ql(x)
    assert torch.equal(ql.wq.scale, torch.full((6,), 2.0**-6)) and torch.equal(ql.wq(ql.weight).long(), w_int)
    ref = x.v.long() @ w_int.t() + b_int
    assert acc.integer and torch.equal(acc.v.long(), ref)
    torch.testing.assert_close(acc.real()[..., :5], lin(x.real())[..., :5], atol=0.01, rtol=0)


def test_lsq_gradient_in_the_model_is_the_lsq_formula() -> None:
    """The step of fc1's output quantizer, inside a whole ivit model (its output feeds ShiftGELU): its gradient
    is LSQ's, from the gradient that reaches the quantized value ``q * s``."""
    from test_quantizers import lsq_step_gradient

    model = small_vit(layers=1)
    x = torch.randn(4, 3, 16, 16)
    q = calibrated(model, QuantSettings(8, 8, backend=Backend("ivit")), x)
    aq: ActQuantizer = q.blocks[0].mlp.fc1_q
    aq.scale.requires_grad_(True)
    seen: dict[str, torch.Tensor] = {}

    def keep(mod: nn.Module, args: tuple, out: QTensor) -> None:
        seen["x"] = args[0].real().detach()
        out.v.register_hook(lambda g: seen.__setitem__("dq", g))  # dL/dq of the output integers q

    aq.register_forward_hook(keep)
    q(x).pow(2).sum().backward()
    s = float(aq.scale.detach())
    upstream = seen["dq"] / s  # dL/dx_hat, as the layers after it read x_hat = q * s
    expected = lsq_step_gradient(seen["x"], upstream, s, 8, per_sample=seen["x"][0].numel())
    assert aq.scale.grad.item() == pytest.approx(expected, rel=1e-4)
    assert abs(expected) > 0
