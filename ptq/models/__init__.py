"""Models: the embedded tiny digits ViT (a stock torchvision ``VisionTransformer``) and the zoo.

Exports are loaded lazily so that importing ``ptq.models.zoo`` does not pull in the digits data.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TINY_DIGITS_ARCH", "build_tiny_vit", "evaluate_top1", "load_tiny_digits", "train_tiny_digits"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ptq.models import tiny

        return getattr(tiny, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
