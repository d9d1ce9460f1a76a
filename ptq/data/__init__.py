"""Data sets: augmented scikit-learn digits (the embedded default) and ImageNet folders.

Exports are loaded lazily so that importing ``ptq.data.build`` does not pull in scikit-learn.
"""

from __future__ import annotations

from typing import Any

__all__ = ["digits_splits", "source_split"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ptq.data import digits

        return getattr(digits, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
