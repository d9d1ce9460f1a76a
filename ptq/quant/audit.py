"""Range audit: the largest integers each quantized tensor reaches, against its declared width.

Enabled with ``nonlinear.audit=true``. Recording is a no-op unless an
:class:`RangeAudit` is active (``with audit.active(RangeAudit()):``), so the
hot path pays one attribute check when auditing is off.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor

from ptq.quant.qtensor import qrange


class RangeOverflow(RuntimeError):
    """An integer tensor left the range of its declared width."""


class RangeAudit:
    """Per tensor name: observed min/max integer and the declared width."""

    def __init__(self) -> None:
        self.records: dict[str, dict] = {}

    def record(self, name: str, q: Tensor, bits: int, signed: bool) -> None:
        lo, hi = int(q.min().item()), int(q.max().item())
        rec = self.records.setdefault(name, {"bits": bits, "signed": signed, "min": lo, "max": hi})
        rec["min"], rec["max"] = min(rec["min"], lo), max(rec["max"], hi)

    def report(self) -> list[dict]:
        """One row per tensor: name, width, observed max |integer|, the limit, and whether it overflowed."""
        rows = []
        for name, rec in self.records.items():
            qlo, qhi = qrange(rec["bits"], rec["signed"])
            rows.append({
                "tensor": name,
                "bits": rec["bits"],
                "signed": rec["signed"],
                "max_abs": max(abs(rec["min"]), abs(rec["max"])),
                "limit": max(abs(qlo), qhi),
                "overflow": rec["min"] < qlo or rec["max"] > qhi,
            })
        return rows

    def check(self) -> None:
        """Raise :class:`RangeOverflow` naming every tensor that overflowed."""
        bad = [r for r in self.report() if r["overflow"]]
        if bad:
            names = ", ".join(f"{r['tensor']} (|q|={r['max_abs']} > {r['limit']}, {r['bits']} bits)" for r in bad)
            raise RangeOverflow(f"range audit: {len(bad)} tensor(s) overflowed their width: {names}")


_ACTIVE: RangeAudit | None = None


@contextmanager
def active(audit: RangeAudit | None) -> Iterator[RangeAudit | None]:
    """Make ``audit`` the recorder for the duration of the block (None disables)."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, audit
    try:
        yield audit
    finally:
        _ACTIVE = previous


def record(name: str, q: Tensor, bits: int, signed: bool = True) -> None:
    """Record an integer tensor if an audit is active."""
    if _ACTIVE is not None:
        _ACTIVE.record(name, q.detach(), bits, signed)
