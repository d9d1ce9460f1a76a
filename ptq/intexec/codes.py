"""The ONNX side of the non-uniform activation codes (docs/act-quantizers.md): logsqrt2 probabilities
and twin-uniform ranges, as :class:`OnnxGraph` methods (mixed in, so that ``graph.py`` stays the
map of the common ops)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ptq.intexec import kernels
from ptq.intexec.kernels import I32, I64
from ptq.quant.symbolic import Sym


class CodesOps:
    """``logsqrt2_probs`` and ``twin`` of ``ptq.quant.symbolic.IntGraph``; needs :class:`OnnxGraph`'s helpers."""

    em: kernels.Emitter
    _cast: Any
    _out: Any
    requantize: Any

    def logsqrt2_probs(self, p: Sym, name: str) -> Sym:
        """logsqrt2 codes of a 16-bit Shiftmax's integers, in their integer form (UINT16 at scale 2**-15)."""
        self.em.scope = f"shiftmax:{name}"
        y = kernels.logsqrt2_probs(self.em, self._cast(p, I64), name + ".i64")
        y = self.em.op("Cast", [y], out=name, to=I32)
        return self._out(y, p.shape, "int32", 0, 2**15, kind="activation", bits=16, signed=False)

    def twin(self, x: Sym, rf: tuple[Tensor, Tensor], rc: tuple[Tensor, Tensor], k: int, lo1: int, hi1: int,
             top: int, name: str) -> Sym:
        """Twin-uniform codes of integers ``x``: the fine code ``clamp(requant, lo1, hi1 + 1)`` (``rf``), the
        coarse ``clamp(requant, 1, top)`` (``rc``), then the select into one int32 tensor at the fine scale."""
        fine = self.requantize(x, *rf, lo1, hi1 + 1, True, name + ".fine")
        coarse = self.requantize(x, *rc, 1, top, True, name + ".coarse")
        self.em.scope = f"twin:{name}"
        y = kernels.twin_select(self.em, fine.name, coarse.name, k, hi1, name)
        hi = top << k
        signed = lo1 < 0
        bits = max(hi.bit_length(), (-lo1 - 1).bit_length()) + 1 if signed else hi.bit_length()
        return self._out(y, x.shape, "int32", lo1, hi, kind="activation", bits=bits, signed=signed)
