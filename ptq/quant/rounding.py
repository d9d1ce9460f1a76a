"""AdaRound's weight quantizer: the absmax grid with a learned rounding decision per weight.

A small module with explicit state (the floor of ``W / s`` and the rounding variable ``V``),
like :class:`~ptq.quant.quantizers.WeightQuantizer`, which it extends. Training it is the
job of ``ptq.recon``; anything that only needs the hard-rounded weights (evaluation, the
integer program, rebuilding a finished run) uses this module alone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ptq.quant.qtensor import qrange
from ptq.quant.quantizers import CodeQuantizer, WeightQuantizer, channel_view
from ptq.quant.vit import QuantModel

ZETA, GAMMA = 1.1, -0.1
V_SATURATED = 12.0  # |V| where the rectified sigmoid is clamped: h is exactly 0 or 1


class AdaRoundQuantizer(WeightQuantizer):
    """Per-channel absmax grid with learned rounding: W_int = clamp(floor(W/s) + h(V)).

    ``soft=True`` while training (h in [0, 1]); otherwise hard rounding
    ``h(V) >= 0.5``. Untrained, V starts where h(V) is the fractional part,
    so the hard weights are nearest rounding.
    """

    def __init__(self, weight: Tensor, bits: int, start: Tensor | None = None) -> None:
        """``start``: where to start in units of the step, ``W / s`` if None (the spec); AdaRound then
        chooses between ``floor(start)`` and the code above it (``adaround.init=gptq``: GPTQ's
        compensated weights, ``ptq.recon.gptq.install_rounding``)."""
        super().__init__(weight, bits)
        if start is not None and start.shape != weight.shape:
            raise ValueError(f"start of shape {tuple(start.shape)} for a weight of shape {tuple(weight.shape)}")
        w_s = weight.detach() / channel_view(self.scale, weight) if start is None else start.detach().to(weight)
        floor = torch.floor(w_s)
        self.register_buffer("w_floor", floor)
        frac = (w_s - floor).clamp(0.0, 1.0)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0), requires_grad=False)
        self.soft = False

    @property
    def integer(self) -> bool:
        return not self.soft

    def h(self) -> Tensor:
        """Rectified sigmoid: the soft rounding offset in [0, 1]."""
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def rounding(self) -> Tensor:
        """Hard rounding decisions (0 or 1)."""
        return (self.h() >= 0.5).to(self.w_floor.dtype)

    @torch.no_grad()
    def set_rounding(self, up: Tensor) -> None:
        """Fix the hard rounding decisions (1 = up): V saturates where h is exactly 0 or 1."""
        if up.shape != self.v.shape:
            raise ValueError(f"rounding of shape {tuple(up.shape)} for a weight of shape {tuple(self.v.shape)}")
        self.v.copy_(torch.where(up.to(self.v.device).bool(), V_SATURATED, -V_SATURATED))

    def hard_codes(self) -> Tensor:
        """The integer codes of the hard rounding, ``clamp(floor + (h >= 0.5))``."""
        return torch.clamp(self.w_floor + self.rounding(), *qrange(self.bits)).detach()

    def forward(self, weight: Tensor) -> Tensor:
        lo, hi = qrange(self.bits)
        offset = self.h() if self.soft else self.rounding()
        return torch.clamp(self.w_floor + offset, lo, hi)

    def regularizer(self, beta: float) -> Tensor:
        """sum(1 - |2h - 1|^beta): zero exactly when every h is 0 or 1."""
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()


def install_adaround(qmodel: QuantModel) -> list[AdaRoundQuantizer]:
    """Replace every weight quantizer by an AdaRound one on the same grid (hard = nearest until trained)."""
    out = []
    for lin in qmodel.linears():
        if lin.wq is not None and not isinstance(lin.wq, AdaRoundQuantizer):
            lin.wq = AdaRoundQuantizer(lin.weight, lin.wq.bits).to(lin.weight.device)
        if lin.wq is not None:
            out.append(lin.wq)
    return out


def rounding_as_codes(qmodel: QuantModel) -> None:
    """Replace every AdaRound quantizer by a :class:`CodeQuantizer` holding its hard codes.

    For a rounding whose floor is not ``floor(W / s)`` (``adaround.init=gptq``): the compact state
    rebuilds AdaRound from one bit per weight over that floor, so such codes are kept as codes.
    """
    for lin in qmodel.linears():
        if isinstance(lin.wq, AdaRoundQuantizer):
            lin.wq = CodeQuantizer(lin.weight, lin.wq.bits, lin.wq.hard_codes()).to(lin.weight.device)
