"""Nonlinear-op backends: Softmax, GELU and LayerNorm of the quantized ViT.

``fp`` runs the float op on the dequantized input; ``ivit`` runs the integer
kernels of ``ptq.quant.ivit`` on the integer tensors (Shiftmax, ShiftGELU,
I-LayerNorm). Where an input is not integer (calibration, A32) the ``ivit``
backend falls back to the float op. In training, the integer kernels pass
the float op's gradient straight through.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptq.quant import actcodes, audit, ivit
from ptq.quant.qtensor import FLOAT32_EXACT, QTensor, ste_attach
from ptq.quant.quantizers import ActQuantizer
from ptq.quant.symbolic import graph_of

# The integer kernels read data-dependent Python integers (shifts, table sizes), which torch.compile
# cannot trace. They are registered as opaque custom ops instead: inside AdaRound's compiled step
# each is one call in the graph (its output shapes come from the fake implementations below), so
# the float code around it stays one forward and one backward graph. Before, they were
# ``torch.compiler.disable``d calls, each a graph break: an ivit attention unit ran as 5 graphs.


@torch.library.custom_op("ptq::shiftmax", mutates_args=())
def _shiftmax(q: Tensor, s: Tensor, n: int, out_bits: int, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Shiftmax's integers as float32 (exact: at most 2**15 here), what the simulation carries."""
    return ivit.shiftmax(q, s, n, out_bits, torch.float32, keep)


@torch.library.custom_op("ptq::log2_probs", mutates_args=())
def _log2_probs(p: Tensor) -> tuple[Tensor, Tensor]:
    return ivit.log2_probs(p)


@torch.library.custom_op("ptq::logsqrt2_probs", mutates_args=())
def _logsqrt2_probs(p: Tensor) -> tuple[Tensor, Tensor]:
    return actcodes.logsqrt2_probs(p)


@torch.library.custom_op("ptq::shift_gelu", mutates_args=())
def _shift_gelu(q: Tensor, s: Tensor, n: int, sig_bits: int, as_float: bool) -> tuple[Tensor, Tensor]:
    """``q * g`` as float32 when ``as_float`` (the caller knows float32 holds it exactly), else int64."""
    return ivit.shift_gelu(q, s, n, sig_bits, torch.float32 if as_float else torch.int64)


@torch.library.custom_op("ptq::int_layernorm", mutates_args=())
def _int_layernorm(q: Tensor, s: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    return ivit.int_layernorm(q, s, weight, bias)


def _ints_and_scalar(q: Tensor, *_: object) -> tuple[Tensor, Tensor]:
    return q.new_empty(q.shape, dtype=torch.int64), q.new_empty((), dtype=torch.float32)


@_shiftmax.register_fake
def _(q: Tensor, *_: object) -> tuple[Tensor, Tensor]:
    return q.new_empty(q.shape, dtype=torch.float32), q.new_empty((), dtype=torch.float32)


_log2_probs.register_fake(_ints_and_scalar)
_logsqrt2_probs.register_fake(_ints_and_scalar)


@_shift_gelu.register_fake
def _(q: Tensor, s: Tensor, n: int, sig_bits: int, as_float: bool) -> tuple[Tensor, Tensor]:
    return q.new_empty(q.shape, dtype=torch.float32 if as_float else torch.int64), q.new_empty((), dtype=torch.float32)


@_int_layernorm.register_fake
def _(q: Tensor, s: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    return q.new_empty(q.shape, dtype=torch.int64), q.new_empty(q.shape[-1:], dtype=torch.float32)


def _float_softmax(x: Tensor, keep: Tensor | None) -> Tensor:
    """Softmax over the last dim; entries where ``keep`` is False read as -inf (probability exactly 0)."""
    return F.softmax(x if keep is None else x.masked_fill(~keep, float("-inf")), dim=-1)


def _needs_grad(x: QTensor) -> bool:
    """Whether a straight-through gradient must be attached (e.g. not for a unit's cached input)."""
    return torch.is_grad_enabled() and (x.v.requires_grad or x.s.requires_grad)


@dataclass(frozen=True)
class Backend:
    """Which implementation of the nonlinear ops, and the integer kernels' settings."""

    name: str = "fp"
    softmax_n: int = 15
    softmax_out_bits: int = 8
    gelu_n: int = 23
    gelu_sig_bits: int = 8
    softmax_log2: bool = False  # probabilities as powers of two (ivit.log2_probs), 4-bit codes
    probs: str = "uniform"  # aquant.probs: the probabilities' codes (ptq.quant.actcodes.PROBS)

    @property
    def integer(self) -> bool:
        return self.name == "ivit"

    @property
    def probs_codes(self) -> str:
        """The probabilities' codes: ``log2`` with ``softmax_log2``, else ``probs``."""
        return "log2" if self.softmax_log2 else self.probs

    @property
    def probs_bits(self) -> int:
        """Width of the ivit probabilities: UINT(out_bits), UINT15 powers of two with log2, UINT16 with logsqrt2
        (the twin's width is its quantizer's, ``ActQuantizer.out_bits``)."""
        return {"log2": ivit.LOG2_SCALE_BITS + 1, "logsqrt2": actcodes.PROB_BITS}.get(self.probs_codes,
                                                                                    self.softmax_out_bits)

    def _coded(self, x: QTensor, out_q: ActQuantizer, name: str, keep: Tensor | None) -> QTensor:
        """Probabilities with non-uniform codes (``probs_codes`` log2, logsqrt2, twin) in quant mode.

        The probability integers ``P`` (``actcodes``) come from a 16-bit Shiftmax (ivit) or from the
        float softmax (fp); log2 / logsqrt2 map them to their integer form, twin goes through ``out_q``.
        In training the float softmax's gradient passes straight through.
        """
        codes, ps = self.probs_codes, torch.tensor(2.0**-actcodes.PROB_SCALE_BITS, device=x.v.device)
        g = graph_of(x.v) if self.integer else None
        if g is not None:  # exporting
            p = g.shiftmax(x.v, x.s, self.softmax_n, actcodes.PROB_BITS, name + ".shiftmax", keep)
            if codes == "twin":
                return out_q(QTensor(p, ps, actcodes.PROB_BITS, signed=False))
            p = g.log2_probs(p, name) if codes == "log2" else g.logsqrt2_probs(p, name)
            _, s = (ivit.log2_probs if codes == "log2" else actcodes.logsqrt2_probs)(torch.zeros(1, dtype=torch.int64))
            return QTensor(p, s.to(torch.float32), self.probs_bits, signed=False)
        with torch.no_grad():
            if self.integer:
                p, _ = _shiftmax(x.v.detach(), x.s.detach(), self.softmax_n, actcodes.PROB_BITS, keep)
            else:
                p = actcodes.prob_ints(_float_softmax(x.real().detach(), keep)).to(torch.float32)
        soft = _float_softmax(x.real(), keep) if _needs_grad(x) else None
        if codes == "twin":
            v = ste_attach(p, soft / ps) if soft is not None else p
            return out_q(QTensor(v, ps, actcodes.PROB_BITS, signed=False))
        with torch.no_grad():
            q, s = (_log2_probs if codes == "log2" else _logsqrt2_probs)(p)
        audit.record(name, q, self.probs_bits, signed=False)
        s = s.to(torch.float32)
        v = ste_attach(q, soft / s) if soft is not None else q.to(torch.float32)
        return QTensor(v, s, self.probs_bits, signed=False)

    def softmax(self, x: QTensor, out_q: ActQuantizer, name: str = "softmax", keep: Tensor | None = None) -> QTensor:
        """Attention probabilities; the ivit output is UINT(out_bits) at scale 2^-(out_bits-1).

        ``keep``: Swin's shifted-window mask (bool, broadcasting; False: not attended). Masked
        entries get probability exactly 0 from both ops: the float softmax reads them as -inf, the
        masked Shiftmax zeroes their exponential (docs/swin.md).

        Non-uniform codes (``probs_codes``: log2, logsqrt2, twin; ``docs/act-quantizers.md``) come
        from :meth:`_coded`. With ``out_q`` off (probabilities left float by a sensitivity scan,
        ``ptq.quant.groups``) the float op runs; export never sees that state.
        """
        if self.probs_codes != "uniform" and out_q.mode == "quant" and x.integer:
            return self._coded(x, out_q, name, keep)
        g = graph_of(x.v) if self.integer and x.integer else None
        if g is not None:  # exporting: the kernel as graph nodes, its output scale from the kernel
            p = g.shiftmax(x.v, x.s, self.softmax_n, self.softmax_out_bits, name, keep)
            _, s = ivit.shiftmax(torch.zeros(1, 1), x.s, self.softmax_n, self.softmax_out_bits)
            return QTensor(p, s.to(torch.float32), self.probs_bits, signed=False)
        if self.integer and x.integer and out_q.mode != "off":
            with torch.no_grad():
                p, s = _shiftmax(x.v.detach(), x.s.detach(), self.softmax_n, self.softmax_out_bits, keep)
            audit.record(name, p, self.probs_bits, signed=False)
            s = s.to(torch.float32)
            soft = _float_softmax(x.real(), keep) / s if _needs_grad(x) else None
            v = ste_attach(p, soft) if soft is not None else p.to(torch.float32)
            return QTensor(v, s, self.probs_bits, signed=False)
        return out_q(QTensor.from_float(_float_softmax(x.real(), keep)))

    def gelu(self, x: QTensor, out_q: ActQuantizer, name: str = "gelu") -> QTensor:
        """GELU, requantized by ``out_q`` (INT8 at W?A8)."""
        g = graph_of(x.v) if self.integer and x.integer else None
        if g is not None:  # exporting
            _, s = ivit.shift_gelu(torch.zeros(1, 1), x.s, self.gelu_n, self.gelu_sig_bits)
            return out_q(QTensor(g.shift_gelu(x.v, x.s, self.gelu_n, self.gelu_sig_bits, name), s, 32))
        if self.integer and x.integer:
            # |q * g| <= 2**(in_bits + sig_bits - 2): float32 holds it exactly at A8, not at A16 (int64)
            exact32 = 2 ** (x.bits + self.gelu_sig_bits - 2) <= FLOAT32_EXACT
            with torch.no_grad():
                g, s = _shift_gelu(x.v.detach(), x.s.detach(), self.gelu_n, self.gelu_sig_bits, exact32)
            audit.record(name, g, 32)
            s = s.to(torch.float32)
            v = ste_attach(g, F.gelu(x.real()) / s) if _needs_grad(x) else g
            return out_q(QTensor(v, s, 32))
        return out_q(QTensor.from_float(F.gelu(x.real())))

    def layernorm(self, x: QTensor, ln: nn.LayerNorm, out_q: ActQuantizer, name: str = "ln") -> QTensor:
        """LayerNorm of the residual stream (INT16 in), requantized by ``out_q`` (INT8)."""
        return out_q(self.norm(x, ln, name))

    def norm(self, x: QTensor, ln: nn.LayerNorm, name: str = "ln") -> QTensor:
        """LayerNorm before its output quantizer: I-LayerNorm's INT32 ``y`` (ivit) or the float op.

        Split from :meth:`layernorm` so that AdaRound can compute it once over a unit's cached
        inputs (``ptq.recon.unitcache.precompute_norm``): nothing in it is learned.
        """
        g = graph_of(x.v) if self.integer and x.integer else None
        if g is not None:  # exporting: I-LayerNorm with the layer's integer bias term
            b, s = ivit.layernorm_bias(ln.weight, ln.bias, ln.normalized_shape[0])
            return QTensor(g.layernorm(x.v, b, name), s, 32)
        if self.integer and x.integer:
            with torch.no_grad():
                y, s = _int_layernorm(x.v.detach(), x.s.detach(), ln.weight.detach(), ln.bias.detach())
            audit.record(name, y, 32)
            s = s.to(torch.float32)
            if _needs_grad(x):
                soft = F.layer_norm(x.real(), ln.normalized_shape, ln.weight, ln.bias, ln.eps) / s
                y = ste_attach(y, soft)
            # no grad: y stays int64, since |y| reaches 2**30 and float32 holds integers only to 2**24
            return QTensor(y, s, 32)
        return QTensor.from_float(F.layer_norm(x.real(), ln.normalized_shape, ln.weight, ln.bias, ln.eps))
