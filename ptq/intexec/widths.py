"""Range report of an integer program: largest integers seen against declared widths.

A :class:`WidthRecorder` is an interpreter hook; it keeps the min/max of every
integer value over all batches. The report gives, per value, the width it needs
against the width the graph declares, and, per matmul (linear layers and the two
attention matmuls), the accumulator width needed against INT32:
``bits = 1 + max(bitlen(max), bitlen(-min - 1))`` (= ceil(log2(max|acc| + 1)) + 1 for
a symmetric range). Needs no model code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

ACC_BITS = 32


def needed_bits(lo: int, hi: int, signed: bool) -> int:
    """Smallest two's complement (signed) or unsigned width holding [lo, hi]."""
    if not signed:
        return max(1, hi.bit_length()) if lo >= 0 else 1 + max(hi.bit_length(), (-lo - 1).bit_length())
    return 1 + max(max(hi, 0).bit_length(), max(-lo - 1, 0).bit_length())


def _limits(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


class WidthRecorder:
    """Interpreter hook collecting per-value integer ranges (``hook(op, value)``)."""

    def __init__(self, graph: dict[str, Any]) -> None:
        self.graph = graph
        self.lo: dict[str, int] = {}
        self.hi: dict[str, int] = {}
        self.images = 0

    def __call__(self, op: dict[str, Any], value: Tensor) -> None:
        if value.is_floating_point() or value.numel() == 0:
            return
        if op["op"] == "quantize":
            self.images += int(value.shape[0])
        lo, hi = torch.aminmax(value)
        name = op["out"]
        self.lo[name] = min(self.lo.get(name, int(lo)), int(lo))
        self.hi[name] = max(self.hi.get(name, int(hi)), int(hi))

    def report(self, constants: dict[str, Tensor] | None = None) -> dict[str, Any]:
        """Full report (``widths.json``): values, constants, matmul accumulators, requantizer products, summary."""
        g = self.graph
        values, accs, products = [], [], []
        for op in g["ops"]:
            name = op["out"]
            if name not in self.lo:
                continue
            decl = g["values"][name]
            lo, hi = self.lo[name], self.hi[name]
            row = {"tensor": name, "op": op["op"], "kind": decl["kind"], "bits": decl["bits"],
                   "signed": decl["signed"], "min": lo, "max": hi, "max_abs": max(-lo, hi),
                   "needed_bits": needed_bits(lo, hi, decl["signed"])}
            qlo, qhi = _limits(decl["bits"], decl["signed"])
            row["overflow"] = lo < qlo or hi > qhi
            values.append(row)
            if "matmul" in op:
                accs.append({"tensor": name, "matmul": op["matmul"], "max_abs": row["max_abs"],
                             "bits": needed_bits(lo, hi, True), "fits_int32": row["needed_bits"] <= ACC_BITS})
            if op["op"] == "requantize" and op["in"][0] in self.lo:
                src = op["in"][0]
                q_abs = max(-self.lo[src], self.hi[src])
                m = op["m"] if isinstance(op["m"], list) else [op["m"]]
                p_abs = q_abs * max(abs(v) for v in m)
                products.append({"tensor": name, "input_max_abs": q_abs, "product_max_abs": p_abs,
                                 "product_bits": 1 + p_abs.bit_length(), "fits_int64": p_abs < 2**63})
        consts = []
        for name, spec in g["constants"].items():
            if constants is None or name not in constants or constants[name].numel() == 0:
                continue
            lo, hi = (int(v) for v in torch.aminmax(constants[name].to(torch.int64)))
            qlo, qhi = _limits(spec["bits"], spec["signed"])
            consts.append({"tensor": name, "role": spec["role"], "bits": spec["bits"], "signed": spec["signed"],
                           "max_abs": max(-lo, hi), "needed_bits": needed_bits(lo, hi, spec["signed"]),
                           "overflow": lo < qlo or hi > qhi})
        return {"images": self.images, "accumulator_bits": ACC_BITS, "summary": self.summary(accs, values, consts),
                "accumulators": accs, "values": values, "constants": consts, "requantize_products": products}

    @staticmethod
    def summary(accs: list[dict], values: list[dict], consts: list[dict]) -> dict[str, Any]:
        """Per matmul kind the largest |acc| and the width it needs; every value/constant over its width."""
        kinds: dict[str, dict[str, Any]] = {}
        for a in accs:
            k = kinds.setdefault(a["matmul"], {"max_abs": 0, "bits": 0, "layers": 0})
            k["max_abs"] = max(k["max_abs"], a["max_abs"])
            k["bits"] = max(k["bits"], a["bits"])
            k["layers"] += 1
        for k in kinds.values():
            k["fits_int32"] = k["bits"] <= ACC_BITS
        over = [f"{r['tensor']} (needs {r['needed_bits']} > {r['bits']} bits)" for r in values + consts if r["overflow"]]
        return {"matmuls": kinds, "all_accumulators_fit_int32": all(k["fits_int32"] for k in kinds.values()),
                "over_declared_width": over}
