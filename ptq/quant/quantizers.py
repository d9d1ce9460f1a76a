"""Quantizers: small modules with explicit state (scale buffers), torchao/Brevitas style.

- :class:`WeightQuantizer`: symmetric per-output-channel absmax, nearest rounding.
- :class:`ActQuantizer`: symmetric per-tensor moving-average absmax; optional
  LSQ (learned step size). It requantizes integer accumulators with the
  dyadic multiplier (``ptq.quant.requant.requantize``) so the simulation is
  what integer hardware computes.

:func:`absmax_scale` is the one place a scale is derived from a range.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ptq.quant import audit, requant
from ptq.quant.qtensor import QTensor, fake_quant, grad_scale, qmax, qrange

SCALE_EPS = 1e-8


def absmax_scale(absmax: Tensor, bits: int, signed: bool = True) -> Tensor:
    """Scale that maps ``absmax`` onto the largest integer of the range (floored at SCALE_EPS)."""
    return (absmax.float() / qmax(bits, signed)).clamp_min(SCALE_EPS)


def channel_view(scale: Tensor, like: Tensor) -> Tensor:
    """Per-output-channel scale shaped to broadcast over a weight of any rank."""
    return scale.view(-1, *([1] * (like.dim() - 1)))


class WeightQuantizer(nn.Module):
    """Symmetric per-output-channel absmax weight quantizer with nearest rounding.

    ``forward(weight)`` returns the integer weights (as floats); ``scale`` is
    their per-channel step. ``integer`` tells callers the output holds exact
    integers (AdaRound's soft mode does not).
    """

    def __init__(self, weight: Tensor, bits: int) -> None:
        super().__init__()
        self.bits = bits
        absmax = weight.detach().abs().flatten(1).amax(1)
        self.register_buffer("scale", absmax_scale(absmax, bits))

    @property
    def integer(self) -> bool:
        return True

    def forward(self, weight: Tensor) -> Tensor:
        lo, hi = qrange(self.bits)
        return torch.clamp(torch.round(weight / channel_view(self.scale, weight)), lo, hi)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channels={self.scale.numel()}"


class ActQuantizer(nn.Module):
    """Per-tensor symmetric activation quantizer, scale from a moving average of the absmax.

    Modes: ``off`` (pass the float value through), ``observe`` (update the
    moving average, pass through) and ``quant``. A disabled quantizer
    (``enabled=False``: A32, or a switched-off input/output quantizer) stays
    ``off`` whatever mode is asked for.
    """

    MODES = ("off", "observe", "quant")

    def __init__(self, bits: int, signed: bool = True, momentum: float = 0.95, enabled: bool = True) -> None:
        super().__init__()
        self.bits, self.signed, self.momentum, self.enabled = bits, signed, momentum, enabled
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.register_buffer("running_absmax", torch.zeros(()))
        self.register_buffer("n_batches", torch.zeros((), dtype=torch.long))
        self.mode = "off"
        self.name = ""

    # -- state -------------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode {mode!r} is not one of {self.MODES}")
        self.mode = mode if self.enabled else "off"

    @property
    def lsq(self) -> bool:
        """True while the step size is being learned (LSQ)."""
        return self.scale.requires_grad

    def observe(self, real: Tensor) -> None:
        """Fold one batch's absmax into the moving average (the first batch initialises it)."""
        m = real.detach().abs().amax().float()
        if int(self.n_batches) == 0:
            self.running_absmax.copy_(m)
        else:
            self.running_absmax.mul_(self.momentum).add_((1.0 - self.momentum) * m)
        self.n_batches += 1

    @torch.no_grad()
    def freeze(self) -> None:
        """Set the scale from the observed range; error if nothing was observed."""
        if not self.enabled:
            return
        if int(self.n_batches) == 0:
            raise RuntimeError(f"activation quantizer {self.name or '?'} saw no calibration data")
        self.scale.copy_(absmax_scale(self.running_absmax, self.bits, self.signed))

    # -- forward -----------------------------------------------------------
    def _step(self, x: Tensor) -> Tensor:
        """The scale, with LSQ's gradient scaling when it is learned."""
        if not self.lsq:
            return self.scale
        per_sample = x[0].numel() if x.dim() > 1 else x.numel()
        return grad_scale(self.scale, 1.0 / math.sqrt(per_sample * qmax(self.bits, self.signed)))

    def _emit(self, q: Tensor, s: Tensor) -> QTensor:
        audit.record(self.name, q, self.bits, self.signed)
        return QTensor(q, s, self.bits, self.signed)

    def forward(self, x: QTensor) -> QTensor:
        if self.mode == "off":
            return x.dequant() if x.integer or x.per_channel else x
        if self.mode == "observe":
            real = x.real()
            self.observe(real)
            return QTensor.from_float(real)
        s = self._step(x.v)
        if x.integer and not torch.is_grad_enabled():
            q = requant.requantize(x.v, x.s, self.scale.detach(), self.bits, self.signed).to(torch.float32)
        else:
            # training (or a float input): fake quantization of the real value. For an integer input it
            # equals the dyadic requantizer except where x*s_in/s_out lies within 2**-31 of a rounding tie.
            q = fake_quant(x.real(), s, *qrange(self.bits, self.signed))
        return self._emit(q, s)

    def add(self, a: QTensor, b: QTensor) -> QTensor:
        """Residual add (IdAdd): requantize both operands to this scale unclamped, add, clamp once.

        A non-integer ``b`` (a float constant such as the position embedding)
        is rounded to this scale once, as a compiler would fold it.
        """
        if self.mode != "quant" or not a.integer:
            return self(QTensor.from_float(a.real() + b.real()))
        if torch.is_grad_enabled():  # training: fake quantization of the sum (see forward)
            s = self._step(a.v)
            return self._emit(fake_quant(a.real() + b.real(), s, *qrange(self.bits, self.signed)), s)
        sd = self.scale
        qa = requant.requantize(a.v, a.s, sd, self.bits, self.signed, clamp=False)
        if b.integer:
            qb = requant.requantize(b.v, b.s, sd, self.bits, self.signed, clamp=False)
        else:
            qb = torch.round(b.real().double() / sd.double()).to(torch.int64)
        return self._emit(requant.clamp_int(qa + qb, self.bits, self.signed).to(torch.float32), sd)

    def extra_repr(self) -> str:
        kind = "int" if self.signed else "uint"
        return f"{kind}{self.bits}, momentum={self.momentum}, enabled={self.enabled}, mode={self.mode}"
