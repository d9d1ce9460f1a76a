"""The quantized model of any supported float model: the one place that picks the class per family."""

from __future__ import annotations

from torch import nn

from ptq.models.families import family_of
from ptq.quant.vit import QuantModel, QuantSettings, QuantViT


def quantize_model(model: nn.Module, st: QuantSettings) -> QuantModel:
    """``QuantSwin`` for a timm Swin, ``QuantViT`` for the plain ViT families (``ptq.models.families``)."""
    if family_of(model) == "timm-swin":
        from ptq.quant.swin import QuantSwin

        return QuantSwin(model, st)
    return QuantViT(model, st)
