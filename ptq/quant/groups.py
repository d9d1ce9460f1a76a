"""Quantizer groups of a :class:`QuantModel`, and the two temporary changes a sensitivity scan makes to one.

A group is a set of quantizers a researcher asks about together:

- ``role``: every activation quantizer of one role (``input``, ``ln``, ``q``, ``k``, ``v``, ``scores``,
  ``probs``, ``context``, ``fc1_out``, ``gelu_out``, ``residual``, ``final_ln``);
- ``weights``: the weight quantizers of every linear of one :attr:`QLinear.kind` (``weights.qkv``...);
- ``block``: everything inside ``blocks.i`` (its activation and weight quantizers, its Shiftmax);
- ``stage``: everything inside the blocks of one stage (Swin: ``stage.k``, its patch merging included;
  only for models of more than one stage).

Swin adds the roles ``embed_out`` (the patch embedding's INT16 accumulator) and ``pooled`` (the
mean over tokens) and the weight kind ``merge`` (patch-merging reductions); they are listed only
for models that have them.

Every enabled quantizer is in exactly one role or weight group and in at most one block group.
A quantizer disabled by the config (``quant_io=false``, A32, wquant=none) is in none, so such a
group has no members and is reported as skipped.

:func:`left_float` turns a group's quantizers off (activations pass the float value, ``QLinear.wq``
is None: float weights); :func:`raised` gives them ``bits`` (at least: a wider quantizer, e.g. the
16-bit residual, is left as it is): an activation quantizer gets its step again from the kept
calibration statistics at the new width (``freeze``), a linear a fresh :class:`WeightQuantizer`.
Both put every bit width, step, mode, weight quantizer and backend back exactly on exit.

In the ``ivit`` backend:

- the attention probabilities come from Shiftmax at ``softmax_out_bits``, not from ``probs_q``: the
  ``probs`` group holds the attention modules' Shiftmax too. Left float, the softmax is the float op
  (``Backend.softmax`` with ``probs_q`` off); raised, Shiftmax outputs UINT``bits`` (log2 codes off);
- a kernel whose input is left float falls back to the float op: ``scores`` float -> float Softmax,
  ``fc1_out`` float -> float GELU, ``residual`` float -> float LayerNorm (``ln`` and ``final_ln``
  then quantize the float LayerNorm's output). With ``scores`` float (and ``probs`` not), the float
  Softmax's output goes through ``probs_q``, set for the duration to the Shiftmax's output width
  (``Backend.probs_bits``), so the group measures the scores' quantization, not narrower probabilities;
- raising past 8 bits widens the Shiftmax / ShiftGELU inputs beyond the INT8 their ``n`` is chosen for:
  on the embedded default at W4A4, ``fc1_out`` at 16 bits drops top-1 to 45% (ShiftGELU, ``gelu.n=23``),
  where the fp backend gains. ``ptq.sensitivity`` warns about it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ptq.quant.quantizers import ActQuantizer, WeightQuantizer
from ptq.quant.vit import QAttention, QLinear, QuantModel

#: Activation roles in network order, by the quantizer's attribute name (``head.ln_q`` is ``final_ln``).
ACT_ROLES: dict[str, str] = {
    "in_q": "input", "ln_q": "ln", "q_q": "q", "k_q": "k", "v_q": "v", "scores_q": "scores",
    "probs_q": "probs", "ctx_q": "context", "fc1_q": "fc1_out", "gelu_q": "gelu_out", "res_q": "residual",
}
#: Swin's own roles (``proj_q``: the patch embedding's INT16 accumulator, ``pool_q``: the mean over tokens)
SWIN_ACT_ROLES: dict[str, str] = {"proj_q": "embed_out", "pool_q": "pooled"}
ROLES: tuple[str, ...] = (*dict.fromkeys(ACT_ROLES.values()), "final_ln")
WEIGHT_KINDS: tuple[str, ...] = ("patch_embed", "qkv", "attn_out", "fc1", "fc2", "head")
#: roles and weight kinds only some families have: listed (after the common ones) only for a model that has them
EXTRA_ROLES: tuple[str, ...] = tuple(SWIN_ACT_ROLES.values())
EXTRA_WEIGHT_KINDS: tuple[str, ...] = ("merge",)
KINDS: tuple[str, ...] = ("role", "weights", "block", "stage")


@dataclass(frozen=True, eq=False)
class Group:
    """One group's quantizers; ``shiftmax``: ivit attention modules whose Shiftmax output is in it,
    ``fallback``: ivit attention modules whose scores are in it and their Shiftmax not (see module doc)."""

    name: str
    kind: str
    acts: tuple[ActQuantizer, ...] = ()
    linears: tuple[QLinear, ...] = ()
    shiftmax: tuple[QAttention, ...] = ()
    fallback: tuple[QAttention, ...] = ()

    @property
    def members(self) -> int:
        """How many quantizers (activation and weight) the group holds."""
        return len(self.acts) + len(self.linears)


def act_role(name: str) -> str:
    """The role of an activation quantizer from its module name (``blocks.0.attn.scores_q`` -> ``scores``)."""
    attr = name.rsplit(".", 1)[-1]
    return "final_ln" if name == "head.ln_q" else ACT_ROLES.get(attr) or SWIN_ACT_ROLES[attr]


def _group(name: str, kind: str, acts: Iterable[ActQuantizer], linears: Iterable[QLinear],
           attns: list[QAttention]) -> Group:
    acts, linears = tuple(acts), tuple(linears)
    ids = {id(q) for q in acts}
    shiftmax = tuple(a for a in attns if id(a.probs_q) in ids)
    fallback = tuple(a for a in attns if id(a.scores_q) in ids and a not in shiftmax)
    return Group(name, kind, acts, linears, shiftmax, fallback)


def groups(model: QuantModel) -> list[Group]:
    """Role groups, then weight groups, then one group per block (empty groups included, members 0)."""
    acts = [q for q in model.act_quantizers() if q.enabled]
    linears = [m for m in model.linears() if m.wq is not None]
    attns = [m for m in model.modules() if isinstance(m, QAttention) and m.backend.integer]
    present = {act_role(q.name) for q in model.act_quantizers()} | {m.kind for m in model.linears()}
    roles = [*ROLES, *(r for r in EXTRA_ROLES if r in present)]
    kinds = [*WEIGHT_KINDS, *(k for k in EXTRA_WEIGHT_KINDS if k in present)]
    out = [_group(role, "role", (q for q in acts if act_role(q.name) == role), (), attns) for role in roles]
    out += [_group(f"weights.{kind}", "weights", (), (m for m in linears if m.kind == kind), attns)
            for kind in kinds]
    for i in range(len(model.blocks)):
        prefix = f"blocks.{i}."
        out.append(_group(f"blocks.{i}", "block", (q for q in acts if q.name.startswith(prefix)),
                          (m for m in linears if m.name.startswith(prefix)), attns))
    stage_of = model.stages()
    if len(set(stage_of)) > 1:
        for k in sorted(set(stage_of)):
            prefixes = tuple(f"blocks.{i}." for i, s in enumerate(stage_of) if s == k)
            out.append(_group(f"stage.{k}", "stage", (q for q in acts if q.name.startswith(prefixes)),
                              (m for m in linears if m.name.startswith(prefixes)), attns))
    return out


@contextmanager
def _kept(acts: Iterable[ActQuantizer], linears: Iterable[QLinear], attns: Iterable[QAttention]) -> Iterator[None]:
    """Put back the bits, step and mode of ``acts``, the weight quantizer of ``linears`` and the backend
    of ``attns`` exactly as they were, however the block ends."""
    saved_acts = [(q, q.bits, q.scale.detach().clone(), q.mode) for q in acts]
    saved_wq = [(m, m.wq) for m in linears]
    saved_backends = [(a, a.backend) for a in attns]
    try:
        yield
    finally:
        with torch.no_grad():
            for q, bits, scale, mode in saved_acts:
                q.bits, q.mode = bits, mode
                q.scale.copy_(scale)
        for m, wq in saved_wq:
            m.wq = wq
        for a, backend in saved_backends:
            a.backend = backend


def _rebits(q: ActQuantizer, bits: int) -> None:
    """Quantize at ``bits`` with the step calibration gives that width."""
    q.bits = bits
    q.freeze()
    q.set_mode("quant")


@contextmanager
def left_float(group: Group) -> Iterator[None]:
    """The group's quantizers off for the block: float activations and float weights."""
    probs = [a.probs_q for a in group.fallback]
    with _kept((*group.acts, *probs), group.linears, ()):
        for q in group.acts:
            q.set_mode("off")
        for m in group.linears:
            m.wq = None
        for a in group.fallback:
            _rebits(a.probs_q, a.backend.probs_bits)
        yield


def _narrow_softmax(a: QAttention, bits: int) -> bool:
    return a.backend.probs_codes != "uniform" or a.backend.softmax_out_bits < bits


def raisable(group: Group, bits: int) -> int:
    """How many of the group's quantizers :func:`raised` would widen (0: the group is at ``bits`` or wider)."""
    shadowed = {id(a.probs_q) for a in group.shiftmax}  # ivit: Shiftmax, not probs_q, makes the probabilities
    return (sum(q.bits < bits for q in group.acts if id(q) not in shadowed)
            + sum(m.wq.bits < bits for m in group.linears) + sum(_narrow_softmax(a, bits) for a in group.shiftmax))


@contextmanager
def raised(group: Group, bits: int) -> Iterator[None]:
    """The group's quantizers at ``bits`` (those narrower) for the block, the rest of the model as it is."""
    with _kept(group.acts, group.linears, group.shiftmax):
        for q in group.acts:
            if q.bits < bits:
                _rebits(q, bits)
        for m in group.linears:
            if m.wq.bits < bits:
                m.wq = WeightQuantizer(m.weight, bits)
        for a in group.shiftmax:
            if _narrow_softmax(a, bits):
                out_bits = max(a.backend.softmax_out_bits, bits)
                a.backend = dataclasses.replace(a.backend, softmax_out_bits=out_bits, softmax_log2=False,
                                                probs="uniform")
        yield
