"""Swin through every stage (ptq.quant.swin, spec/quantized-swin.md, docs/swin.md)."""

from __future__ import annotations

import pytest
import torch
from timm.models.swin_transformer import SwinTransformer

from ptq.data.digits import digits_splits
from ptq.models.families import UnsupportedModel, describe
from ptq.models.tiny import evaluate_top1, load_tiny_digits
from ptq.quant import ivit
from ptq.quant.groups import groups
from ptq.quant.models import quantize_model
from ptq.quant.nonlinear import Backend
from ptq.quant.qtensor import QTensor
from ptq.quant.quantizers import ActQuantizer
from ptq.quant.swin import QPatchMerge, QuantSwin, QWindowAttention, rel_bias_int
from ptq.quant.vit import QuantSettings
from ptq.recon.adaround import units_of

# two stages (8 x 8 then 4 x 4 tokens), shifted windows in stage 1, one patch merging
ARCH = {"img_size": 16, "patch_size": 2, "embed_dim": 16, "depths": (2, 2), "num_heads": (2, 4), "window_size": 4,
        "mlp_ratio": 2.0, "num_classes": 10, "drop_path_rate": 0.0}


def _swin(seed: int = 0, **kw) -> SwinTransformer:
    """A small timm Swin with random non-trivial parameters (the bias tables included)."""
    torch.manual_seed(seed)
    model = SwinTransformer(**{**ARCH, **kw})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.mul_(20)  # biases of a trained model's size, so that the integer bias matters
    return model.eval()


def _calibrated(model: torch.nn.Module, st: QuantSettings, x: torch.Tensor) -> QuantSwin:
    q = quantize_model(model, st)
    q.set_mode("observe")
    with torch.no_grad():
        q(x)
    q.freeze()
    return q


def test_unquantized_graph_is_the_float_model() -> None:
    model = _swin()
    q = quantize_model(model, QuantSettings(wbits=None, abits=None))
    assert isinstance(q, QuantSwin)
    q.set_mode("off")
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_adapter_reads_windows_shift_mask_and_merging() -> None:
    parts = describe(_swin())
    kinds = [type(u).__name__ for u in parts.units]
    assert kinds == ["SwinBlockParts", "SwinBlockParts", "MergeParts", "SwinBlockParts", "SwinBlockParts"]
    assert parts.stage_of == [0, 0, 1, 1, 1]
    b0, b1 = parts.units[0], parts.units[1]
    assert (b0.shift, b1.shift, b0.window) == (0, 2, 4) and b0.keep is None
    assert b1.keep.shape == (4, 16, 16) and not bool(b1.keep.all()) and bool(b1.keep.diagonal(dim1=1, dim2=2).all())
    assert b0.rel_bias.shape == (2, 16, 16)
    # a stage of one window (4 x 4 tokens, window 4): timm sets its shift to 0
    assert parts.units[4].shift == 0


def test_masked_softmax_gives_exact_zeros_in_both_backends() -> None:
    torch.manual_seed(0)
    q = torch.randint(-128, 128, (2, 4, 3, 16, 16)).float()  # [B, nW, heads, T, T]
    keep = torch.rand(4, 1, 16, 16) > 0.5
    keep |= torch.eye(16, dtype=torch.bool)  # every row keeps its own token, as Swin's mask does
    s = torch.tensor(0.05)
    p, _ = ivit.shiftmax(q, s, 15, 8, torch.int64, keep)
    assert bool((p * ~keep).eq(0).all()) and bool((p * keep).gt(0).any())
    # the kept entries are Shiftmax of the kept entries alone: masked ones change neither max nor total
    row, k = q[0, 1, 2, 3], keep[1, 0, 3]
    alone, _ = ivit.shiftmax(row[k][None], s, 15, 8)
    assert torch.equal(p[0, 1, 2, 3][k], alone[0])
    # the int64 path (a wide input) gives the same integers as the 32-bit table path
    p64, _ = ivit.shiftmax(q.long(), s, 15, 8, torch.int64, keep)
    assert torch.equal(p64, p)
    # the float path (calibration, fp backend): masked entries read as -inf, exactly 0 too
    out = Backend("fp").softmax(QTensor(q, s, 8), ActQuantizer(8, signed=False, enabled=False), keep=keep)
    assert bool((out.real() * ~keep).eq(0).all())
    torch.testing.assert_close(out.real().sum(-1), torch.ones(2, 4, 3, 16))


def test_relative_position_bias_integer_and_clipped() -> None:
    bias = torch.tensor([[1.0, -2.5, 3e6]])
    s = torch.tensor(1e-3)
    b = rel_bias_int(bias, s)
    assert b.tolist() == [[1000.0, -2500.0, 2**31 - 1]]


@pytest.mark.parametrize("backend", ["fp", "ivit"])
def test_w8a8_stays_close_to_float(backend: str) -> None:
    model = _swin()
    x = torch.randn(32, 3, 16, 16)
    q = _calibrated(model, QuantSettings(wbits=8, abits=8, backend=Backend(backend)), x)
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.8
    assert (out - ref).abs().mean() < 0.25 * ref.abs().mean()


def test_units_groups_and_reparam_pairs_cover_swin() -> None:
    from ptq.quant.reparam import ln_pairs

    q = quantize_model(_swin(), QuantSettings(wbits=4, abits=8, backend=Backend("ivit")))
    block = [n for n, _ in units_of(q, "block")]
    assert block == ["embed", "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp", "blocks.2",
                     "blocks.3.attn", "blocks.3.mlp", "blocks.4.attn", "blocks.4.mlp", "head"]
    assert isinstance(dict(units_of(q, "block"))["blocks.2"], QPatchMerge)
    assert [n for n, _ in units_of(q, "encoder")][1:-1] == [f"blocks.{i}" for i in range(5)]
    assert "blocks.2.reduction" in [n for n, _ in units_of(q, "layer")]
    names = {g.name: g for g in groups(q)}
    assert {"embed_out", "pooled", "weights.merge", "stage.0", "stage.1"} <= set(names)
    assert names["weights.merge"].members == 1 and names["pooled"].members == 1
    assert names["stage.1"].members > names["blocks.2"].members > 0
    assert "blocks.2" in [n for n, *_ in ln_pairs(q)]
    assert isinstance(q.blocks[1].attn, QWindowAttention) and q.blocks[1].attn.keep is not None


def test_unsupported_swin_features_are_refused_by_name() -> None:
    with pytest.raises(UnsupportedModel, match="not average-pooled"):
        describe(_swin(global_pool=""))
    with pytest.raises(UnsupportedModel, match="do not tile"):
        describe(_swin(img_size=20, patch_size=2, window_size=4))


def test_embedded_swin_checkpoint_reaches_85_percent() -> None:
    model = load_tiny_digits(name="tiny_swin_digits")
    assert evaluate_top1(model, digits_splits(image_size=24)["test"]) >= 85.0


def test_swin_cli_run_exports_bit_exact(run_cli) -> None:
    res = run_cli("model=tiny_swin_digits", "wbits=4", "nonlinear=ivit", "export=true", "debug=quick")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mismatches=0/256" in res.stderr + res.stdout
    assert res.stdout.strip().splitlines()[-1].startswith("tiny_swin_digits-W4A8-absmax-ivit")


def test_swin_adaround_block_with_lsq_qdrop_fisher_exports_bit_exact(run_cli) -> None:
    res = run_cli("model=tiny_swin_digits", "wquant=adaround", "granularity=block", "wbits=4", "nonlinear=ivit",
                  "export=true", "debug=quick", "adaround.qdrop_prob=0.5", "adaround.loss=fisher",
                  "aquant.ln_reparam=true")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mismatches=0/256" in res.stderr + res.stdout
