"""Quantized plain ViT of any size and family (torchvision, timm ViT / DeiT; spec/quantized-vit.md).

The float model's parameters are copied into a module tree whose units are
the reconstruction units of AdaRound::

    QuantViT
      embed   QPatchEmbed   input quantizer -> patchify linear -> + cls, + pos -> residual (A16)
      blocks  [QBlock]      attn: QAttention (LN1 .. out proj, + residual add)
                            mlp:  QMLP       (LN2 .. fc2, + residual add)
      head    QHead         final LN (A8) on the class token -> head linear -> float logits

Every tensor between two integer operations is a :class:`QTensor`. Integer
accumulators are computed exactly (float32 matmuls of integers split so
that every partial sum stays below 2**24, summed in float64) and joined to
the next layer by dyadic requantization.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptq.models.families import BlockParts, ViTParts, describe
from ptq.quant import audit
from ptq.quant.matmul import _magnitude, exact_matmul, int_matmul
from ptq.quant.nonlinear import Backend
from ptq.quant.qtensor import FLOAT32_EXACT, INT32_MAX, QTensor, round_ste
from ptq.quant.quantizers import ActQuantizer, WeightQuantizer
from ptq.quant.symbolic import graph_of


@dataclass(frozen=True)
class QuantSettings:
    """What a QuantViT quantizes: widths (None = float), moving-average momentum, I/O quantizers, backend."""

    wbits: int | None = 8
    abits: int | None = 8
    idadd_bits: int = 16
    momentum: float = 0.95
    quant_io: bool = True
    backend: Backend = field(default_factory=Backend)
    act_method: str = "movavg"  # how an A``abits`` step is chosen: movavg, mse or percentile
    act_percentile: float = 99.99
    act_grid: int = 100
    kernel_in_bits: int | None = None  # width of the Softmax / GELU inputs (None: abits)
    image_bits: int | None = None  # width of the input image quantizer (None: abits)
    gelu_out: str = "uniform"  # the GELU output's codes: uniform or twin (ptq.quant.actcodes)
    scores: str = "uniform"  # the Softmax input's codes: uniform or twin

    def kernel_input(self, codes: str = "uniform") -> ActQuantizer:
        """The quantizer in front of Shiftmax / ShiftGELU: A``kernel_in_bits`` (the spec's INT8) or A``abits``.

        These tensors feed an integer kernel, not a matmul, so a W4A4 model whose every matmul
        operand is 4-bit can keep them at the width integer-ops.md specifies for the kernels.
        """
        q = self.act(self.kernel_in_bits, codes=codes)
        q.feeds_kernel = self.backend.integer
        return q

    def image_input(self) -> ActQuantizer:
        """The input image's quantizer: A``image_bits`` or A``abits``; off with ``quant_io=False``."""
        return self.act(self.image_bits, enabled=self.quant_io)

    def residual(self) -> ActQuantizer:
        """The residual stream's quantizer (IdAdd, ``idadd_bits``), always moving-average absmax.

        Its 16 bits have room for every outlier, and clipping it would clip the stream itself.
        """
        q = self.act(self.idadd_bits, method="movavg")
        q.feeds_kernel = self.backend.integer  # the next I-LayerNorm reads it
        return q

    def act(self, bits: int | None = None, signed: bool = True, enabled: bool = True,
            method: str | None = None, codes: str = "uniform") -> ActQuantizer:
        """A new activation quantizer: A``bits`` (default ``abits``), step by ``method`` (default ``act_method``)."""
        width = bits if bits is not None else (self.abits or 8)
        return ActQuantizer(width, signed, self.momentum, enabled=enabled and self.abits is not None,
                            method=method or self.act_method, percentile=self.act_percentile, grid=self.act_grid,
                            codes=codes)

    def probs(self) -> ActQuantizer:
        """The attention probabilities' quantizer: UINT``abits``, twin codes with ``aquant.probs=twin``."""
        return self.act(signed=False, codes="twin" if self.backend.probs_codes == "twin" else "uniform")


class QLinear(nn.Module):
    """Linear layer with a per-channel weight quantizer and an INT32 bias.

    Returns the accumulator ``x @ W_int^T + b_int`` at per-channel scale
    ``s_x * s_w``; the caller requantizes it (or adds it to the residual).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, wbits: int | None, kind: str = "linear") -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.wq: WeightQuantizer | None = None if wbits is None else WeightQuantizer(self.weight, wbits)
        self.name = ""
        self.kind = kind
        self.qdq = False  # the QDQ export's view (ptq.intexec.qdq): x @ DQ(W_int)^T + b in float

    def quantized_weight(self) -> tuple[Tensor, Tensor, bool]:
        """(integer weight, per-channel scale, whether it holds exact integers)."""
        if self.wq is None:
            return self.weight, torch.ones((), device=self.weight.device), False
        return self.wq(self.weight), self.wq.scale, self.wq.integer

    def int_bias(self, s_acc: Tensor) -> Tensor | None:
        """The bias as INT32 integers at the accumulator's scale ``s_acc`` (float64 rounding), or None."""
        if self.bias is None:
            return None
        return torch.round(self.bias.double() / s_acc.double()).clamp(-INT32_MAX, INT32_MAX)

    def qdq_forward(self, x: Tensor) -> Tensor:
        """``x @ DQ(W_int^T) + b`` from the buffers ``ptq.intexec.qdq.qdq_view`` gives the layer (its codes
        transposed, so that the DequantizeLinear feeds the MatMul directly: the pattern onnxruntime fuses)."""
        y = x @ torch.fake_quantize_per_channel_affine(self.qdq_w, self.qdq_s, self.qdq_zp, 1, -128, 127)
        return y if self.bias is None else y + self.bias.detach()

    def forward(self, x: QTensor) -> QTensor:
        if self.qdq:
            return QTensor.from_float(self.qdq_forward(x.plain()))
        if x.per_channel:
            x = x.dequant()
        w, s_w, w_int = self.quantized_weight()
        integer = x.integer and w_int
        s_acc = x.s * s_w
        g = graph_of(x.v)
        if g is not None:  # exporting: the integer weights and bias the simulation uses
            if not integer:
                raise ValueError(f"{self.name}: not an integer layer (weights or input not quantized)")
            qb = self.int_bias(s_acc)
            return QTensor(g.linear(x.v, w, qb, self.name + ".acc", self.kind), s_acc, 32)
        if integer and not torch.is_grad_enabled():
            a_max, w_max = _magnitude(x.bits, x.signed), _magnitude(self.wq.bits, True)
            k = x.v.shape[-1]
            qb = self.int_bias(s_acc)
            if qb is not None:
                audit.record(self.name + ".bias", qb, 32)
            b_max = int(qb.abs().max()) if qb is not None else 0
            if k * a_max * w_max + b_max < FLOAT32_EXACT:  # bias folded into one float32 GEMM, still exact
                xv = x.v.float()
                acc = xv @ w.t() if qb is None else torch.addmm(qb.float(), xv.reshape(-1, k), w.t())
                acc = acc.view(*xv.shape[:-1], -1)
            else:
                acc = exact_matmul(x.v, w.t(), a_max, w_max)
                acc = acc if qb is None else acc + qb
            audit.record(self.name + ".acc", acc, 32)
            return QTensor(acc, s_acc, 32)
        acc = x.v.float() @ w.t()
        if self.bias is not None:
            b = self.bias / s_acc
            acc = acc + (round_ste(b) if integer else b)
        return QTensor(acc, s_acc, 32 if integer else None)


def _copy_ln(ln: nn.LayerNorm) -> nn.LayerNorm:
    out = nn.LayerNorm(ln.normalized_shape, eps=ln.eps)
    out.load_state_dict(ln.state_dict())
    out.requires_grad_(False)
    return out


class QPatchEmbed(nn.Module):
    """Input quantizer, patchify conv as a linear over patches, prefix tokens and position embedding."""

    def __init__(self, parts: ViTParts, st: QuantSettings) -> None:
        super().__init__()
        self.patch = parts.patch
        self.in_q = st.image_input()
        self.proj = QLinear(parts.conv_w.flatten(1), parts.conv_b, st.wbits, "patch_embed")
        self.prefix = parts.prefix.shape[1]
        self.const = nn.Parameter(torch.cat([parts.prefix, parts.pos], dim=1).clone(), requires_grad=False)
        self.res_q = st.residual()

    def forward(self, img: Tensor) -> QTensor:
        x = self.in_q(QTensor.from_float(img))
        b, c, h, w = x.v.shape
        p = self.patch
        patches = x.v.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        acc = self.proj(QTensor(patches, x.s, x.bits, x.signed))
        acc = QTensor(F.pad(acc.v, (0, 0, self.prefix, 0)), acc.s, acc.bits)  # zero rows where the prefix tokens go
        return self.res_q.add(acc, QTensor.from_float(self.const))


class _PreNorm(nn.Module):
    """A sub-block that starts with a LayerNorm (``ln``) and its output quantizer (``ln_q``)."""

    backend: Backend
    ln: nn.LayerNorm
    ln_q: ActQuantizer

    def norm(self, x: QTensor) -> QTensor:
        """The LayerNorm of the sub-block input, before its quantizer: what ``forward``'s ``normed``
        stands in for (AdaRound's precomputed LN, ``ptq.recon.unitcache.precompute_norm``)."""
        return self.backend.norm(x, self.ln, self.ln_q.name + ".int")


class QAttention(_PreNorm):
    """LN1 -> qkv -> softmax(q k^T / sqrt(d)) v -> out proj, plus the residual add (IdAdd)."""

    def __init__(self, bp: BlockParts, st: QuantSettings) -> None:
        super().__init__()
        self.heads = bp.heads
        self.backend = st.backend
        self.ln = _copy_ln(bp.ln1)
        self.register_buffer("ln_r", torch.ones(self.ln.normalized_shape))  # folded LN factors (quant.reparam)
        self.ln_q = st.act()
        self.qkv = QLinear(bp.qkv_w, bp.qkv_b, st.wbits, "qkv")
        self.q_q, self.k_q, self.v_q = st.act(), st.act(), st.act()
        self.scores_q = st.kernel_input(st.scores)
        self.probs_q = st.probs()
        self.ctx_q = st.act()
        self.proj = QLinear(bp.proj_w, bp.proj_b, st.wbits, "attn_out")
        self.res_q = st.residual()

    def forward(self, x: QTensor, normed: QTensor | None = None) -> QTensor:
        """``normed``: ``self.norm(x)`` when the caller has it already."""
        h = self.ln_q(self.norm(x) if normed is None else normed)
        return self.res_q.add(x, self.attend(h))

    def biased(self, acc: QTensor) -> QTensor:
        """The scores' accumulator before its quantizer (Swin adds its relative position bias here)."""
        return acc

    def attend(self, h: QTensor, keep: Tensor | None = None) -> QTensor:
        """qkv -> softmax(q k^T / sqrt(d)) v -> out proj on tokens ``h`` ``[..., T, C]``: the proj accumulator.

        The leading dims are kept (batch, and Swin's windows); ``keep`` masks the softmax."""
        acc = self.qkv(h)
        *lead, t, e3 = acc.v.shape
        e, d = e3 // 3, e3 // 3 // self.heads
        s_parts = acc.s.chunk(3) if acc.per_channel else (acc.s,) * 3
        qkv = [
            quant(QTensor(v, s, acc.bits))
            for quant, v, s in zip((self.q_q, self.k_q, self.v_q), acc.v.split(e, dim=-1), s_parts, strict=True)
        ]
        q, k, v = (QTensor(z.v.reshape(*lead, t, self.heads, d).transpose(-3, -2), z.s, z.bits, z.signed)
                   for z in qkv)
        kt = QTensor(k.v.transpose(-2, -1), k.s, k.bits, k.signed)
        scores = int_matmul(q, kt, 1.0 / math.sqrt(d), self.scores_q.name + ".acc", "scores")
        probs = self.backend.softmax(self.scores_q(self.biased(scores)), self.probs_q, self.probs_q.name + ".int", keep)
        ctx = int_matmul(probs, v, 1.0, self.ctx_q.name + ".acc", "context")
        ctx = self.ctx_q(QTensor(ctx.v.transpose(-3, -2).reshape(*lead, t, e), ctx.s, ctx.bits))
        return self.proj(ctx)


class QMLP(_PreNorm):
    """LN2 -> fc1 -> GELU -> fc2, plus the residual add (IdAdd)."""

    def __init__(self, bp: BlockParts, st: QuantSettings) -> None:
        super().__init__()
        self.backend = st.backend
        self.ln = _copy_ln(bp.ln2)
        self.register_buffer("ln_r", torch.ones(self.ln.normalized_shape))
        self.ln_q = st.act()
        self.fc1 = QLinear(bp.fc1_w, bp.fc1_b, st.wbits, "fc1")
        self.fc1_q = st.kernel_input()
        self.gelu_q = st.act(codes=st.gelu_out)
        self.fc2 = QLinear(bp.fc2_w, bp.fc2_b, st.wbits, "fc2")
        self.res_q = st.residual()

    def forward(self, x: QTensor, normed: QTensor | None = None) -> QTensor:
        h = self.ln_q(self.norm(x) if normed is None else normed)
        g = self.backend.gelu(self.fc1_q(self.fc1(h)), self.gelu_q, self.gelu_q.name + ".int")
        return self.res_q.add(x, self.fc2(g))


class QBlock(nn.Module):
    """One encoder block: the attention sub-block then the MLP sub-block."""

    def __init__(self, bp: BlockParts, st: QuantSettings) -> None:
        super().__init__()
        self.attn = QAttention(bp, st)
        self.mlp = QMLP(bp, st)

    def norm(self, x: QTensor) -> QTensor:
        """LN1 of the block input (the only part of the block that depends on its input alone)."""
        return self.attn.norm(x)

    def forward(self, x: QTensor, normed: QTensor | None = None) -> QTensor:
        return self.mlp(self.attn(x, normed))


class QHead(nn.Module):
    """Final LayerNorm (A8 output quantizer) on the head's tokens and the classifier; logits stay float.

    ``tokens``: how many leading tokens the head reads side by side (2 for a distilled DeiT's
    class and distillation tokens, ``ptq.models.families``).
    """

    def __init__(self, parts: ViTParts, st: QuantSettings) -> None:
        super().__init__()
        self.backend = st.backend
        self.tokens = parts.head_tokens
        self.ln = _copy_ln(parts.norm)
        self.register_buffer("ln_r", torch.ones(self.ln.normalized_shape))
        self.ln_q = st.act(enabled=st.quant_io)
        self.fc = QLinear(parts.head_w, parts.head_b, st.wbits, "head")

    def forward(self, x: QTensor) -> Tensor:
        t = x.v[:, 0] if self.tokens == 1 else x.v[:, : self.tokens]
        h = self.backend.layernorm(QTensor(t, x.s, x.bits, x.signed), self.ln, self.ln_q, self.ln_q.name + ".int")
        if self.tokens > 1:
            h = QTensor(h.v.reshape(h.v.shape[0], -1), h.s, h.bits, h.signed)
        return self.fc(h).real()


class QuantModel(nn.Module):
    """What every quantized model shares (QuantViT here, QuantSwin in ``ptq.quant.swin``).

    Subclasses build ``embed``, ``blocks`` (the reconstruction units between them, in network
    order) and ``head``, then call :meth:`_finish`. ``image_size`` is the side of the square
    input; ``family`` the adapter's family name (``ptq.models.families``).
    """

    family: str
    settings: QuantSettings
    image_size: int
    embed: nn.Module
    blocks: nn.ModuleList
    head: nn.Module

    def _finish(self) -> None:
        for name, mod in self.named_modules():
            if isinstance(mod, (ActQuantizer, QLinear)):
                mod.name = name
        self.eval()

    def forward(self, img: Tensor) -> Tensor:
        x = self.embed(img)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)

    def act_quantizers(self) -> Iterator[ActQuantizer]:
        return (m for m in self.modules() if isinstance(m, ActQuantizer))

    def linears(self) -> Iterator[QLinear]:
        return (m for m in self.modules() if isinstance(m, QLinear))

    def set_mode(self, mode: str) -> None:
        """Put every activation quantizer in ``off``, ``observe`` or ``quant`` mode."""
        for q in self.act_quantizers():
            q.set_mode(mode)

    def freeze(self) -> None:
        """End calibration: fix every scale from its moving average and start quantizing."""
        for q in self.act_quantizers():
            q.freeze()
        self.set_mode("quant")

    def stages(self) -> list[int]:
        """The stage of each of ``blocks`` (a plain ViT is one stage)."""
        return [0] * len(self.blocks)


class QuantViT(QuantModel):
    """A plain ViT (torchvision, timm ViT / DeiT) with every quantization point of spec/quantized-vit.md.

    ``model``: the float model, read through its family's adapter (``ptq.models.families.describe``).
    """

    def __init__(self, model: nn.Module, st: QuantSettings) -> None:
        super().__init__()
        parts = describe(model)
        if not isinstance(parts, ViTParts):
            raise TypeError(f"{parts.family} is not a plain ViT: quantize it with ptq.quant.models.quantize_model")
        self.family = parts.family
        self.settings = st
        self.image_size = parts.image_size
        self.embed = QPatchEmbed(parts, st)
        self.blocks = nn.ModuleList(QBlock(bp, st) for bp in parts.blocks)
        self.head = QHead(parts, st)
        self._finish()
