"""One model interface: each family's float ViT described by the same parts (the adapters).

:func:`describe` maps a float model of a supported family onto :class:`ViTParts`: the patchify
conv, the prefix tokens with their position embedding, the position embedding of the patches,
per block the two LayerNorms and the four linears, the final LayerNorm and one head. The
quantized ViT (``ptq.quant.vit``) is built from these parts only, so no module outside this
one reads a family's attribute names.

Families (spec/quantized-vit.md, spec/quantized-swin.md):

- ``torchvision``: ``torchvision.models.VisionTransformer`` (vit_b_16, the embedded ``tiny_digits``);
- ``timm``: timm's ``VisionTransformer`` (ViT-S/B, DeiT-T/S/B); ``LayerScale`` is folded into the
  preceding linear (``y = g * (W x + b)`` is ``(g W) x + g b``) before any weight quantization;
- ``timm-distilled``: timm's ``VisionTransformerDistilled`` (distilled DeiT): the class and the
  distillation tokens both go through the final LayerNorm, and the eval logits
  ``(head(t0) + head_dist(t1)) / 2`` are one linear over the two tokens side by side,
  ``[W0 W1] / 2`` with bias ``(b0 + b1) / 2``: the same function, quantized as one head.

- ``timm-swin``: timm's ``SwinTransformer`` (Swin-T/S/B): :func:`describe_swin` gives
  :class:`SwinParts`, the stages as a flat list of blocks and patch mergings in network order,
  each block with its window, shift, relative position bias ``[heads, T, T]`` and shift mask.

A timm feature the quantized graph does not have (``fc_norm`` / global-pool heads, register
tokens, ``qk_norm``, a pre-norm, a non-GELU MLP, ...) raises :class:`UnsupportedModel` naming it,
never a silently different network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

#: torchvision's and timm's eval GELU is the exact (erf) one; tanh approximations are refused.
_GELU = nn.GELU


class UnsupportedModel(ValueError):
    """The float model has a feature the quantized graph does not implement (the message names it)."""


@dataclass
class BlockParts:
    """One encoder block's float parameters (weights as ``[out, in]``)."""

    ln1: nn.LayerNorm
    qkv_w: Tensor
    qkv_b: Tensor | None
    heads: int
    proj_w: Tensor
    proj_b: Tensor | None
    ln2: nn.LayerNorm
    fc1_w: Tensor
    fc1_b: Tensor | None
    fc2_w: Tensor
    fc2_b: Tensor | None


@dataclass
class ViTParts:
    """A plain ViT as the quantized graph sees it (spec/quantized-vit.md)."""

    family: str
    patch: int
    image_size: int
    conv_w: Tensor  # [D, C, p, p]
    conv_b: Tensor | None
    prefix: Tensor  # [1, P, D]: class (and distillation) tokens, their position embedding added
    pos: Tensor  # [1, N, D]: the patches' position embedding
    blocks: list[BlockParts]
    norm: nn.LayerNorm
    head_w: Tensor  # [classes, P_head * D]: reads the first ``head_tokens`` tokens side by side
    head_b: Tensor | None
    head_tokens: int = 1

    def arch(self) -> dict[str, int | str]:
        """The numbers a benchmark or report prints about the model."""
        return {"family": self.family, "image_size": self.image_size, "patch_size": self.patch,
                "num_layers": len(self.blocks), "hidden_dim": int(self.conv_w.shape[0]),
                "mlp_dim": int(self.blocks[0].fc1_w.shape[0]) if self.blocks else 0,
                "num_classes": int(self.head_w.shape[0]), "tokens": int(self.prefix.shape[1] + self.pos.shape[1])}


@dataclass
class SwinBlockParts(BlockParts):
    """A Swin block: a ViT block's parts plus its windows (timm ``SwinTransformerBlock``)."""

    resolution: tuple[int, int] = (0, 0)  # (H, W) tokens of the stage
    window: int = 0
    shift: int = 0
    rel_bias: Tensor | None = None  # [heads, T, T], T = window ** 2: added to the scores
    keep: Tensor | None = None  # [nW, T, T] bool: False where the shifted-window mask forbids attending


@dataclass
class MergeParts:
    """A patch merging: 2 x 2 neighbours concatenated (timm's order), LayerNorm over 4C, reduction (no bias)."""

    resolution: tuple[int, int]  # (H, W) tokens before merging
    ln: nn.LayerNorm
    weight: Tensor  # [2C, 4C]


@dataclass
class SwinParts:
    """A Swin Transformer as the quantized graph sees it (spec/quantized-swin.md)."""

    family: str
    patch: int
    image_size: int
    conv_w: Tensor  # [C, 3, p, p]
    conv_b: Tensor | None
    embed_ln: nn.LayerNorm
    units: list[SwinBlockParts | MergeParts]  # stages flattened, network order
    stage_of: list[int]  # the stage of each unit (a merging belongs to the stage it starts)
    norm: nn.LayerNorm
    head_w: Tensor
    head_b: Tensor | None

    @property
    def blocks(self) -> list[SwinBlockParts]:
        return [u for u in self.units if isinstance(u, SwinBlockParts)]

    def arch(self) -> dict[str, int | str]:
        """The numbers a benchmark or report prints about the model."""
        first = self.blocks[0]
        return {"family": self.family, "image_size": self.image_size, "patch_size": self.patch,
                "num_layers": len(self.blocks), "hidden_dim": int(self.conv_w.shape[0]),
                "mlp_dim": int(first.fc1_w.shape[0]), "num_classes": int(self.head_w.shape[0]),
                "tokens": first.resolution[0] * first.resolution[1], "window": first.window,
                "stages": max(self.stage_of) + 1}


def _p(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _torchvision(model: nn.Module) -> ViTParts:
    conv = model.conv_proj
    if not isinstance(conv, nn.Conv2d):
        raise UnsupportedModel("torchvision ViT with a conv stem (conv_proj is not one Conv2d) is not supported")
    if len(model.heads) != 1:
        raise UnsupportedModel("torchvision ViT with a pre-logits layer (representation_size) is not supported")
    blocks = []
    for blk in model.encoder.layers:
        mha = blk.self_attention
        if not mha._qkv_same_embed_dim or not mha.batch_first:
            raise UnsupportedModel("expected torchvision's batch-first self-attention with a packed in_proj")
        fc1, fc2 = blk.mlp[0], blk.mlp[3]
        if not isinstance(blk.mlp[1], _GELU) or blk.mlp[1].approximate != "none":
            raise UnsupportedModel(f"torchvision ViT MLP activation {blk.mlp[1]} is not the exact GELU")
        blocks.append(BlockParts(blk.ln_1, _p(mha.in_proj_weight), _p(mha.in_proj_bias), mha.num_heads,
                                 _p(mha.out_proj.weight), _p(mha.out_proj.bias), blk.ln_2,
                                 _p(fc1.weight), _p(fc1.bias), _p(fc2.weight), _p(fc2.bias)))
    pos = model.encoder.pos_embedding.detach()
    head = model.heads.head
    return ViTParts("torchvision", model.patch_size, model.image_size, _p(conv.weight), _p(conv.bias),
                    model.class_token.detach() + pos[:, :1], pos[:, 1:], blocks, model.encoder.ln,
                    _p(head.weight), _p(head.bias))


def _refuse(model: nn.Module, what: str) -> None:
    raise UnsupportedModel(f"{type(model).__name__}: {what} is not supported by ptq's quantized ViT "
                           "(spec/quantized-swin.md); use a model without it")


def _is_identity(m: nn.Module | None) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _layer_scale(ls: nn.Module) -> Tensor | None:
    if isinstance(ls, nn.Identity):
        return None
    gamma = getattr(ls, "gamma", None)
    if gamma is None:
        raise UnsupportedModel(f"layer scale {type(ls).__name__} without a gamma is not supported")
    return gamma.detach()


def _scaled(w: Tensor, b: Tensor | None, gamma: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``gamma * (W x + b)`` as one linear: LayerScale folded into its output channels."""
    if gamma is None:
        return w, b
    return w * gamma[:, None], None if b is None else b * gamma


def _check_mlp_norms(model: nn.Module, name: str, blk: nn.Module) -> None:
    """A timm block's MLP is fc1 -> exact GELU -> fc2 and its two norms are LayerNorms, or it is refused."""
    mlp = blk.mlp
    if type(mlp).__name__ != "Mlp" or not _is_identity(getattr(mlp, "norm", None)):
        _refuse(model, f"MLP type {type(mlp).__name__} or an MLP norm ({name}.mlp)")
    if not isinstance(mlp.act, _GELU) or mlp.act.approximate != "none":
        _refuse(model, f"MLP activation {mlp.act} ({name}.mlp.act; only the exact GELU)")
    for ln in (blk.norm1, blk.norm2):
        if not isinstance(ln, nn.LayerNorm):
            _refuse(model, f"norm layer {type(ln).__name__} ({name})")


def _timm_block(model: nn.Module, i: int, blk: nn.Module) -> BlockParts:
    attn, mlp = blk.attn, blk.mlp
    if type(blk).__name__ != "Block":
        _refuse(model, f"block type {type(blk).__name__} (blocks.{i})")
    if type(attn).__name__ != "Attention" or getattr(attn, "gate", None) is not None:
        _refuse(model, f"attention type {type(attn).__name__} (blocks.{i}.attn)")
    for key in ("q_norm", "k_norm", "norm"):
        if not _is_identity(getattr(attn, key, None)):
            _refuse(model, f"attention {key} (qk_norm / scale_norm, blocks.{i}.attn.{key})")
    if abs(attn.scale - attn.head_dim ** -0.5) > 1e-12:
        _refuse(model, f"attention scale {attn.scale} != head_dim ** -0.5 (blocks.{i}.attn)")
    _check_mlp_norms(model, f"blocks.{i}", blk)
    proj_w, proj_b = _scaled(attn.proj.weight.detach(), _p(attn.proj.bias), _layer_scale(blk.ls1))
    fc2_w, fc2_b = _scaled(mlp.fc2.weight.detach(), _p(mlp.fc2.bias), _layer_scale(blk.ls2))
    return BlockParts(blk.norm1, _p(attn.qkv.weight), _p(attn.qkv.bias), attn.num_heads, proj_w, proj_b,
                      blk.norm2, _p(mlp.fc1.weight), _p(mlp.fc1.bias), fc2_w, fc2_b)


def _timm_vit(model: nn.Module) -> ViTParts:
    distilled = getattr(model, "dist_token", None) is not None
    pe = model.patch_embed
    checks = [
        (getattr(model, "global_pool", "token") != "token", f"global_pool={model.global_pool!r} (fc_norm / pooled head)"),
        (not _is_identity(getattr(model, "fc_norm", None)), "fc_norm (a global-pool head)"),
        (getattr(model, "attn_pool", None) is not None, "an attention-pool head"),
        (getattr(model, "reg_token", None) is not None, "register tokens"),
        (model.cls_token is None, "a model without a class token"),
        (model.pos_embed is None, "a model without a position embedding"),
        (bool(getattr(model, "dynamic_img_size", False)), "dynamic_img_size"),
        (not _is_identity(getattr(model, "norm_pre", None)), "a pre-norm (norm_pre)"),
        (not _is_identity(getattr(pe, "norm", None)), "a patch-embed norm"),
        (not isinstance(getattr(pe, "proj", None), nn.Conv2d), "a patch embed that is not one Conv2d"),
        (not isinstance(model.norm, nn.LayerNorm), "a final norm that is not LayerNorm"),
        (not isinstance(model.head, nn.Linear), "a model without a linear head (num_classes=0)"),
        (distilled and getattr(model, "distilled_training", False), "distilled_training=True"),
    ]
    for bad, what in checks:
        if bad:
            _refuse(model, what)
    conv = pe.proj
    p = conv.kernel_size[0]
    if conv.kernel_size != conv.stride or conv.kernel_size[0] != conv.kernel_size[1] or pe.img_size[0] != pe.img_size[1]:
        _refuse(model, f"a non-square or overlapping patch embed (kernel {conv.kernel_size}, stride {conv.stride})")
    blocks = [_timm_block(model, i, blk) for i, blk in enumerate(model.blocks)]
    tokens = [model.cls_token.detach()] + ([model.dist_token.detach()] if distilled else [])
    prefix = torch.cat(tokens, dim=1)
    pos = model.pos_embed.detach()
    if model.no_embed_class:
        patches_pos = pos
    else:
        prefix, patches_pos = prefix + pos[:, : prefix.shape[1]], pos[:, prefix.shape[1]:]
    if distilled:
        hd = model.head_dist
        head_w = torch.cat([model.head.weight.detach(), hd.weight.detach()], dim=1) / 2
        head_b = (model.head.bias.detach() + hd.bias.detach()) / 2
    else:
        head_w, head_b = model.head.weight.detach(), _p(model.head.bias)
    return ViTParts("timm-distilled" if distilled else "timm", p, pe.img_size[0], conv.weight.detach(),
                    _p(conv.bias), prefix, patches_pos, blocks, model.norm, head_w, head_b,
                    head_tokens=2 if distilled else 1)


def _swin_block(model: nn.Module, name: str, blk: nn.Module) -> SwinBlockParts:
    attn = blk.attn
    if type(blk).__name__ != "SwinTransformerBlock" or type(attn).__name__ != "WindowAttention":
        _refuse(model, f"block type {type(blk).__name__} ({name})")
    if bool(getattr(blk, "dynamic_mask", False)):
        _refuse(model, f"a dynamic attention mask ({name}; dynamic_img_size)")
    (h, w), (wh, ww), (sh, sw) = blk.input_resolution, blk.window_size, blk.shift_size
    if wh != ww or sh != sw or h % wh or w % ww:
        _refuse(model, f"windows {blk.window_size} / shift {blk.shift_size} that do not tile {h} x {w} ({name})")
    head_dim = attn.qkv.weight.shape[0] // 3 // attn.num_heads
    if abs(attn.scale - head_dim ** -0.5) > 1e-12:
        _refuse(model, f"attention scale {attn.scale} != head_dim ** -0.5 ({name}.attn)")
    _check_mlp_norms(model, name, blk)
    mlp, proj = blk.mlp, attn.proj
    base = BlockParts(blk.norm1, _p(attn.qkv.weight), _p(attn.qkv.bias), attn.num_heads, _p(proj.weight),
                      _p(proj.bias), blk.norm2, _p(mlp.fc1.weight), _p(mlp.fc1.bias), _p(mlp.fc2.weight),
                      _p(mlp.fc2.bias))
    keep = None
    if sh:
        mask = blk.attn_mask
        keep = (mask == 0) if mask is not None else None
    return SwinBlockParts(**vars(base), resolution=(h, w), window=wh, shift=sh,
                          rel_bias=attn._get_rel_pos_bias().detach()[0], keep=keep)


def describe_swin(model: nn.Module) -> SwinParts:
    """The parts of a timm ``SwinTransformer``; UnsupportedModel names what the quantized graph lacks."""
    if family_of(model) != "timm-swin":
        raise UnsupportedModel(f"{type(model).__name__} is not a timm SwinTransformer")
    pe, head = model.patch_embed, model.head
    checks = [
        (not isinstance(getattr(pe, "proj", None), nn.Conv2d), "a patch embed that is not one Conv2d"),
        (not isinstance(getattr(pe, "norm", None), nn.LayerNorm), "a patch embed without its LayerNorm"),
        (getattr(getattr(head, "global_pool", None), "pool_type", None) != "avg", "a head that is not average-pooled"),
        (not isinstance(getattr(head, "fc", None), nn.Linear), "a model without a linear head (num_classes=0)"),
        (not isinstance(model.norm, nn.LayerNorm), "a final norm that is not LayerNorm"),
        (pe.img_size[0] != pe.img_size[1], f"a non-square input {pe.img_size}"),
    ]
    for bad, what in checks:
        if bad:
            _refuse(model, what)
    conv = pe.proj
    if conv.kernel_size != conv.stride or conv.kernel_size[0] != conv.kernel_size[1]:
        _refuse(model, f"an overlapping or non-square patch embed (kernel {conv.kernel_size}, stride {conv.stride})")
    units: list[SwinBlockParts | MergeParts] = []
    stage_of: list[int] = []
    for si, stage in enumerate(model.layers):
        ds = stage.downsample
        if not isinstance(ds, nn.Identity):
            if type(ds).__name__ != "PatchMerging" or ds.reduction.bias is not None:
                _refuse(model, f"downsample {type(ds).__name__} (layers.{si})")
            res = stage.blocks[0].input_resolution if len(stage.blocks) else (0, 0)
            units.append(MergeParts((2 * res[0], 2 * res[1]), ds.norm, ds.reduction.weight.detach()))
            stage_of.append(si)
        for bi, blk in enumerate(stage.blocks):
            units.append(_swin_block(model, f"layers.{si}.blocks.{bi}", blk))
            stage_of.append(si)
    return SwinParts("timm-swin", conv.kernel_size[0], pe.img_size[0], conv.weight.detach(), _p(conv.bias),
                     pe.norm, units, stage_of, model.norm, head.fc.weight.detach(), _p(head.fc.bias))


def family_of(model: nn.Module) -> str:
    """``torchvision``, ``timm``, ``timm-distilled`` or ``timm-swin``; UnsupportedModel otherwise."""
    from torchvision.models.vision_transformer import VisionTransformer as TVViT

    if isinstance(model, TVViT):
        return "torchvision"
    mod, name = type(model).__module__, type(model).__name__
    if mod.startswith("timm.") and name == "VisionTransformerDistilled":
        return "timm-distilled"
    if mod.startswith("timm.") and name == "VisionTransformer":
        return "timm"
    if mod.startswith("timm.") and name == "SwinTransformer":
        return "timm-swin"
    raise UnsupportedModel(f"{mod}.{name} is not a supported model family; supported: torchvision "
                           "VisionTransformer, timm VisionTransformer / VisionTransformerDistilled / SwinTransformer")


def describe(model: nn.Module) -> ViTParts | SwinParts:
    """The parts of a supported model: :class:`ViTParts` (torchvision, timm ViT / DeiT) or :class:`SwinParts`."""
    family = family_of(model)
    if family == "torchvision":
        return _torchvision(model)
    if family in ("timm", "timm-distilled"):
        return _timm_vit(model)
    return describe_swin(model)
