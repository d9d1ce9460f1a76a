"""Per-channel post-LayerNorm scales folded into the model (RepQ-ViT's idea, kept per-tensor and integer).

A LayerNorm output feeding a linear layer (LN1 -> qkv, LN2 -> fc1, final LN -> head; in Swin also
a patch merging's LN -> reduction, and the head's mean over tokens, which commutes with ``r``) has
channels of very different ranges, so one per-tensor step at A4 wastes most levels on a
few wide channels. With per-channel factors ``r`` the LayerNorm's affine is divided by
``r`` and the linear's input columns multiplied by it: ``W' (y / r) = W y``, the float
function is unchanged, and the tensor between them has similar channel ranges, so the
runtime tensor stays per-tensor (and the I-LayerNorm kernel runs on the new affine as on
any other). The weight quantizer is rebuilt on the folded weights.

Each folded module keeps its factors as the buffer ``ln_r`` (ones when nothing is folded),
so a saved state says what was folded and :func:`apply_saved` redoes it on a fresh model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from ptq.quant.quantizers import WeightQuantizer
from ptq.quant.vit import QLinear, QuantModel

R_MIN = 1e-2  # factors are clamped to [R_MIN, 1 / R_MIN]: a dead channel is not blown up


def ln_pairs(qmodel: QuantModel) -> Iterator[tuple[str, nn.Module, nn.LayerNorm, QLinear]]:
    """(name, owner module, LayerNorm, the linear it feeds) for every LN -> linear pair, in network order."""
    for i, blk in enumerate(qmodel.blocks):
        if not hasattr(blk, "attn"):  # a Swin patch merging: LN over 4C -> reduction
            yield f"blocks.{i}", blk, blk.ln, blk.reduction
            continue
        yield f"blocks.{i}.attn", blk.attn, blk.attn.ln, blk.attn.qkv
        yield f"blocks.{i}.mlp", blk.mlp, blk.mlp.ln, blk.mlp.fc1
    yield "head", qmodel.head, qmodel.head.ln, qmodel.head.fc


def factors(absmax: Tensor, alpha: float = 1.0) -> Tensor:
    """``r_c = (absmax_c / mean(absmax)) ** alpha``: after folding, channel c spans about the mean range."""
    a = absmax.double().clamp_min(1e-12)
    return (a / a.mean()).pow(alpha).clamp(R_MIN, 1.0 / R_MIN).float()


@torch.no_grad()
def fold(owner: nn.Module, ln: nn.LayerNorm, lin: QLinear, r: Tensor) -> None:
    """Divide the LN affine by ``r``, multiply the linear's input columns by it, rebuild its weight quantizer."""
    r = r.to(ln.weight.device, torch.float32)
    if not bool((owner.ln_r == 1).all()):
        raise RuntimeError(f"{lin.name}: LayerNorm factors already folded")
    ln.weight.div_(r)
    ln.bias.div_(r)
    lin.weight.mul_(r.repeat(lin.weight.shape[1] // r.numel())[None, :])  # a head over 2 tokens: r per token
    if lin.wq is not None:
        if type(lin.wq) is not WeightQuantizer:
            raise RuntimeError(f"{lin.name}: fold LayerNorm factors before installing AdaRound")
        lin.wq = WeightQuantizer(lin.weight, lin.wq.bits).to(lin.weight.device)
    owner.ln_r.copy_(r)


def apply_saved(qmodel: QuantModel, state: Mapping[str, Tensor]) -> bool:
    """Fold the ``<owner>.ln_r`` factors found in ``state`` (a saved state) into ``qmodel``; whether any were."""
    any_folded = False
    for name, owner, ln, lin in ln_pairs(qmodel):
        r = state.get(f"{name}.ln_r")
        if r is not None and not bool((r == 1).all()):
            fold(owner, ln, lin, r)
            any_folded = True
    return any_folded
