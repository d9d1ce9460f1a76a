"""Range report of the integer model: the largest integers each value reached, against its declared width.

A :class:`WidthRecorder` is fed the named integer values of the debug export (every value the
simulation's range audit also names) batch after batch and keeps their min/max. The report
gives, per value, the width it needs against the width the export declares and, per matmul
kind (linear layers and the two attention matmuls), the accumulator width needed against
INT32: ``bits = 1 + max(bitlen(max), bitlen(-min - 1))``. Constants (weights, biases, the
folded position embedding, I-LayerNorm bias terms) are reported from the export's own record.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ACC_BITS = 32


def needed_bits(lo: int, hi: int, signed: bool) -> int:
    """Smallest two's complement (signed) or unsigned width holding [lo, hi]."""
    if not signed:
        return max(1, hi.bit_length()) if lo >= 0 else 1 + max(hi.bit_length(), (-lo - 1).bit_length())
    return 1 + max(max(hi, 0).bit_length(), max(-lo - 1, 0).bit_length())


def _limits(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


class WidthRecorder:
    """Per named value: the min/max integer over every batch it is shown (:meth:`update`)."""

    def __init__(self, decl: dict[str, Any]) -> None:
        self.values: dict[str, dict[str, Any]] = decl["values"]
        self.constants: dict[str, dict[str, Any]] = decl.get("constants", {})
        self.lo: dict[str, int] = {}
        self.hi: dict[str, int] = {}
        self.images = 0

    def update(self, outputs: dict[str, np.ndarray], images: int) -> None:
        """Fold one batch's named values (name -> integer array) into the ranges."""
        self.images += images
        for name, arr in outputs.items():
            if name not in self.values or arr.size == 0:
                continue
            lo, hi = int(arr.min()), int(arr.max())
            self.lo[name] = min(self.lo.get(name, lo), lo)
            self.hi[name] = max(self.hi.get(name, hi), hi)

    def report(self) -> dict[str, Any]:
        """Full report (``widths.json``): values, matmul accumulators, constants, summary."""
        values, accs = [], []
        for name, decl in self.values.items():
            if name not in self.lo:
                continue
            lo, hi = self.lo[name], self.hi[name]
            row = {"tensor": name, "kind": decl["kind"], "bits": decl["bits"], "signed": decl["signed"],
                   "min": lo, "max": hi, "max_abs": max(-lo, hi), "needed_bits": needed_bits(lo, hi, decl["signed"])}
            qlo, qhi = _limits(decl["bits"], decl["signed"])
            row["overflow"] = lo < qlo or hi > qhi
            values.append(row)
            if "matmul" in decl:
                accs.append({"tensor": name, "matmul": decl["matmul"], "max_abs": row["max_abs"],
                             "bits": needed_bits(lo, hi, True), "fits_int32": row["needed_bits"] <= ACC_BITS})
        consts = []
        for name, c in self.constants.items():
            lo, hi = c["min"], c["max"]
            consts.append({"tensor": name, "role": c["role"], "dtype": c["dtype"], "max_abs": max(-lo, hi),
                           "needed_bits": needed_bits(lo, hi, True)})
        return {"images": self.images, "accumulator_bits": ACC_BITS, "summary": self.summary(accs, values),
                "accumulators": accs, "values": values, "constants": consts}

    @staticmethod
    def summary(accs: list[dict], values: list[dict]) -> dict[str, Any]:
        """Per matmul kind the largest |acc| and the width it needs; every value over its declared width."""
        kinds: dict[str, dict[str, Any]] = {}
        for a in accs:
            k = kinds.setdefault(a["matmul"], {"max_abs": 0, "bits": 0, "layers": 0})
            k["max_abs"] = max(k["max_abs"], a["max_abs"])
            k["bits"] = max(k["bits"], a["bits"])
            k["layers"] += 1
        for k in kinds.values():
            k["fits_int32"] = k["bits"] <= ACC_BITS
        over = [f"{r['tensor']} (needs {r['needed_bits']} > {r['bits']} bits)" for r in values if r["overflow"]]
        return {"matmuls": kinds, "all_accumulators_fit_int32": all(k["fits_int32"] for k in kinds.values()),
                "over_declared_width": over}
