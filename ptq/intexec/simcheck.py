"""The simulation's side of the integer check: its head accumulator and its named integer tensors."""

from __future__ import annotations

import torch
from torch import Tensor

from ptq.quant import audit
from ptq.quant.vit import QuantModel


@torch.no_grad()
def simulate(qmodel: QuantModel, image: Tensor) -> tuple[Tensor, Tensor]:
    """The simulation's head accumulator (int64, exact integers) and logits for one batch."""
    got: list[Tensor] = []
    handle = qmodel.head.fc.register_forward_hook(lambda mod, args, out: got.append(out.v))
    try:
        dev = next(qmodel.parameters()).device
        logits = qmodel(image.to(dev))
    finally:
        handle.remove()
    acc = got[0]
    if not bool((acc == acc.round()).all()):
        raise ValueError("the simulation's head accumulator is not integer (not an integer-only model?)")
    return acc.to(torch.int64).cpu(), logits.float().cpu()


class _Capture(audit.RangeAudit):
    """Audit recorder that keeps the simulation's named integer tensors (last batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors: dict[str, Tensor] = {}

    def record(self, name: str, q: Tensor, bits: int, signed: bool) -> None:
        self.tensors[name] = q.detach().cpu()


@torch.no_grad()
def capture(qmodel: QuantModel, image: Tensor) -> dict[str, Tensor]:
    """Every integer tensor the simulation's range audit names, for one batch."""
    cap = _Capture()
    with audit.active(cap):
        qmodel(image.to(next(qmodel.parameters()).device))
    return cap.tensors
