"""Quantized Swin Transformer (timm ``SwinTransformer``; spec/quantized-swin.md, docs/swin.md).

The module tree mirrors :class:`ptq.quant.vit.QuantViT`, so every stage that walks a quantized
model (calibration, AdaRound's units, LN reparameterization, sensitivity groups, the integer
export) walks this one too::

    QuantSwin
      embed   QSwinEmbed     input quantizer -> patchify linear -> INT16 -> I-LayerNorm -> residual (A16)
      blocks  [QSwinBlock | QPatchMerge]   the stages flattened, network order
              QSwinBlock:  attn: QWindowAttention (LN1, roll, windows, scores + bias, masked softmax,
                                                  out proj, windows merged, roll back, + residual)
                           mlp:  QMLP (as in ViT)
              QPatchMerge: 2 x 2 neighbours concatenated -> LN (A8) -> reduction -> residual (A16)
      head    QSwinHead      final LN (A8) -> integer token sum -> requantized mean (A8) -> head linear

The residual stream is ``[B, H, W, C]`` as in timm. Windows stay batch-first,
``[B, nW, T, C]``, so that the exported graph keeps the batch as its first axis. Roll,
window partition / merge and the 2 x 2 concatenation move integers only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ptq.models.families import MergeParts, SwinBlockParts, SwinParts, describe_swin
from ptq.quant.qtensor import FLOAT32_EXACT, INT32_MAX, QTensor, round_ste
from ptq.quant.symbolic import graph_of
from ptq.quant.vit import (
    QMLP,
    QAttention,
    QBlock,
    QLinear,
    QuantModel,
    QuantSettings,
    _copy_ln,
    _PreNorm,
)


def rel_bias_int(rel_bias: Tensor, s_acc: Tensor) -> Tensor:
    """The relative position bias as integers at the scores' accumulator scale (docs/swin.md).

    ``clamp(round_half_even(bias / s_acc), -(2**31 - 1), 2**31 - 1)`` in float64 from the float32
    values: the same constant the simulation adds and the integer program stores.
    """
    return torch.round(rel_bias.double() / s_acc.double()).clamp(-INT32_MAX, INT32_MAX)


class QSwinEmbed(nn.Module):
    """Input quantizer, patchify conv as a linear, its accumulator as INT16, I-LayerNorm into the stream (A16)."""

    def __init__(self, parts: SwinParts, st: QuantSettings) -> None:
        super().__init__()
        self.patch = parts.patch
        self.backend = st.backend
        self.in_q = st.image_input()
        self.proj = QLinear(parts.conv_w.flatten(1), parts.conv_b, st.wbits, "patch_embed")
        self.proj_q = st.residual()  # per-channel accumulator -> one INT16 scale: what I-LayerNorm reads
        self.ln = _copy_ln(parts.embed_ln)
        self.res_q = st.residual()

    def forward(self, img: Tensor) -> QTensor:
        x = self.in_q(QTensor.from_float(img))
        b, c, h, w = x.v.shape
        p = self.patch
        patches = x.v.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h // p, w // p, c * p * p)
        acc = self.proj(QTensor(patches, x.s, x.bits, x.signed))
        return self.backend.layernorm(self.proj_q(acc), self.ln, self.res_q, self.res_q.name + ".int")


def _partition(v: Tensor, b: int, h: int, w: int, win: int) -> Tensor:
    """``[B, H, W, C]`` -> ``[B, nW, T, C]`` windows (timm's order, batch kept first)."""
    c = v.shape[-1]
    return v.reshape(b, h // win, win, w // win, win, c).permute(0, 1, 3, 2, 4, 5).reshape(
        b, (h // win) * (w // win), win * win, c)


def _merge(v: Tensor, b: int, h: int, w: int, win: int) -> Tensor:
    """``[B, nW, T, C]`` windows -> ``[B, H, W, C]`` (the inverse of :func:`_partition`)."""
    c = v.shape[-1]
    return v.reshape(b, h // win, w // win, win, win, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


class QWindowAttention(QAttention):
    """Swin's (shifted-)window attention sub-block: LN1 .. out proj plus the residual add (IdAdd).

    The scores' int32 accumulator gets the relative position bias as an integer constant
    (:func:`rel_bias_int`) before the A8 requantization; a shifted block's mask goes to the
    softmax as ``keep`` (masked Shiftmax, docs/swin.md): its masked entries get probability 0.
    """

    def __init__(self, bp: SwinBlockParts, st: QuantSettings) -> None:
        super().__init__(bp, st)
        self.window, self.shift, self.resolution = bp.window, bp.shift, tuple(bp.resolution)
        # derived from the float model on every rebuild: not part of a saved state
        self.register_buffer("rel_bias", bp.rel_bias.detach().clone().float(), persistent=False)
        keep = None if bp.keep is None else bp.keep.detach().clone().bool()[:, None]  # [nW, 1, T, T]
        self.register_buffer("keep", keep, persistent=False)

    def biased(self, acc: QTensor) -> QTensor:
        """Scores accumulator plus the relative position bias (an int32 add where the scores are integer)."""
        s = acc.s
        g = graph_of(acc.v)
        if g is not None:
            return QTensor(acc.v + rel_bias_int(self.rel_bias, s).float(), s, 32)
        if acc.integer and not torch.is_grad_enabled():
            b = rel_bias_int(self.rel_bias, s)
            v = acc.v.double() + b
            exact32 = float(v.abs().max()) < FLOAT32_EXACT if v.numel() else True
            return QTensor(v.float() if exact32 else v.to(torch.int64), s, 32)
        bias = self.rel_bias / s
        if acc.integer:  # training: integers through the straight-through rounding (LSQ learns s)
            bias = round_ste(bias).clamp(-INT32_MAX, INT32_MAX)
        return QTensor(acc.v + bias, s, acc.bits)

    def forward(self, x: QTensor, normed: QTensor | None = None) -> QTensor:
        h = self.ln_q(self.norm(x) if normed is None else normed)
        b, hh, ww, c = h.v.shape
        win, sh = self.window, self.shift
        hv = torch.roll(h.v, shifts=(-sh, -sh), dims=(1, 2)) if sh else h.v
        out = self.attend(QTensor(_partition(hv, b, hh, ww, win), h.s, h.bits, h.signed), self.keep)  # [B, nW, T, C]
        ov = _merge(out.v, b, hh, ww, win)
        ov = torch.roll(ov, shifts=(sh, sh), dims=(1, 2)) if sh else ov
        return self.res_q.add(x, QTensor(ov, out.s, out.bits))


class QSwinBlock(QBlock):
    """One Swin block: window attention sub-block, then the MLP sub-block (as ViT's)."""

    def __init__(self, bp: SwinBlockParts, st: QuantSettings) -> None:
        nn.Module.__init__(self)
        self.attn = QWindowAttention(bp, st)
        self.mlp = QMLP(bp, st)


class QPatchMerge(_PreNorm):
    """Patch merging: 2 x 2 neighbours concatenated (timm's order), LN over 4C (A8), reduction, A16 stream."""

    def __init__(self, mp: MergeParts, st: QuantSettings) -> None:
        super().__init__()
        self.backend = st.backend
        self.resolution = tuple(mp.resolution)
        self.ln = _copy_ln(mp.ln)
        self.register_buffer("ln_r", torch.ones(self.ln.normalized_shape))
        self.ln_q = st.act()
        self.reduction = QLinear(mp.weight, None, st.wbits, "merge")
        self.res_q = st.residual()

    def norm(self, x: QTensor) -> QTensor:
        b, h, w, c = x.v.shape
        v = x.v.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        return self.backend.norm(QTensor(v, x.s, x.bits, x.signed), self.ln, self.ln_q.name + ".int")

    def forward(self, x: QTensor, normed: QTensor | None = None) -> QTensor:
        h = self.ln_q(self.norm(x) if normed is None else normed)
        return self.res_q(self.reduction(h))


class QSwinHead(nn.Module):
    """Final LN (A8), the mean over tokens (an exact integer sum, then the requantizer with 1/T folded
    into its input scale: docs/swin.md), the head linear; logits stay float."""

    def __init__(self, parts: SwinParts, st: QuantSettings) -> None:
        super().__init__()
        self.backend = st.backend
        self.ln = _copy_ln(parts.norm)
        self.register_buffer("ln_r", torch.ones(self.ln.normalized_shape))
        self.ln_q = st.act(enabled=st.quant_io)
        self.pool_q = st.act(enabled=st.quant_io)
        self.fc = QLinear(parts.head_w, parts.head_b, st.wbits, "head")

    def forward(self, x: QTensor) -> Tensor:
        h = self.backend.layernorm(x, self.ln, self.ln_q, self.ln_q.name + ".int")
        b, hh, ww, c = h.v.shape
        t = hh * ww
        flat = h.v.reshape(b, t, c)
        if h.integer:
            pooled = QTensor(flat.sum(1), h.s / t, 32)  # |sum| <= T * 2**(bits-1): exact in float32 and int32
        else:
            pooled = QTensor.from_float(h.real().reshape(b, t, c).mean(1))
        return self.fc(self.pool_q(pooled)).real()


class QuantSwin(QuantModel):
    """A timm Swin Transformer with every quantization point of spec/quantized-swin.md."""

    def __init__(self, model: nn.Module, st: QuantSettings) -> None:
        super().__init__()
        parts = describe_swin(model)
        self.family = parts.family
        self.settings = st
        self.image_size = parts.image_size
        self.embed = QSwinEmbed(parts, st)
        self.blocks = nn.ModuleList(QSwinBlock(u, st) if isinstance(u, SwinBlockParts) else QPatchMerge(u, st)
                                    for u in parts.units)
        self._stage_of = list(parts.stage_of)
        self.head = QSwinHead(parts, st)
        self._finish()

    def stages(self) -> list[int]:
        return list(self._stage_of)
