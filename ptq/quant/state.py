"""The compact state of a calibrated (and reconstructed) ``QuantModel``: what the float model cannot give back.

A ``QuantModel`` is its float model plus a little learned or observed state: every activation
quantizer's scale (and its calibration statistics), any folded LayerNorm factors
(``ptq.quant.reparam``) and, for AdaRound, one rounding bit per weight; for GPTQ, whose codes may lie
several steps from ``W / s``, the integer code of every weight. :func:`compact_state` keeps just that
(rounding bits packed eight to a byte; at vit_b_16 size about 10.8 MB against 690 MB for the full state
dict with AdaRound's float V; GPTQ codes as unsigned offsets from the range's bottom, two to a byte at
4 bits or fewer),
and :func:`load_compact_state` puts it back into a ``QuantModel`` rebuilt from the same float
model and settings. Everything else (weights, biases, LayerNorm affine, the weight scales and
AdaRound's floor) is derived from the float weights exactly as at the start of the run.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ptq.quant import reparam
from ptq.quant.qtensor import qrange
from ptq.quant.quantizers import CodeQuantizer
from ptq.quant.rounding import AdaRoundQuantizer, install_adaround
from ptq.quant.vit import QuantModel

FORMAT = "ptq-quant-state/1"
#: entries a state may lack (it predates them): a fresh model's value is what such a run had (no fold)
_OPTIONAL = re.compile(r"(\.seen_max|\.ln_r)$")
#: state-dict entries a rebuilt QuantModel derives from the float model by itself (weights, with the
#: saved LayerNorm factors folded in), needs no more once the scales are fixed (histograms), or that are
#: kept apart, packed (GPTQ's codes, under "codes")
_DERIVED = re.compile(r"(\.weight|\.bias|\.const|\.wq\.scale|\.wq\.w_floor|\.wq\.v|\.wq\.codes|\.hist)$")


def _pack(bits: Tensor) -> dict[str, Any]:
    flat = bits.detach().cpu().reshape(-1).to(torch.uint8).numpy()
    return {"shape": list(bits.shape), "packed": torch.from_numpy(np.packbits(flat))}


def _unpack(entry: dict[str, Any]) -> Tensor:
    n = int(np.prod(entry["shape"]))
    flat = np.unpackbits(entry["packed"].numpy(), count=n)
    return torch.from_numpy(flat.astype(np.float32)).reshape(entry["shape"])


def _pack_codes(codes: Tensor, bits: int) -> dict[str, Any]:
    """Integer codes in the signed ``bits`` range as uint8 offsets ``code - lo``, two per byte at <= 4 bits."""
    off = (codes.detach().cpu().reshape(-1).to(torch.int16) - qrange(bits)[0]).to(torch.uint8)
    if bits <= 4:
        off = torch.cat([off, off.new_zeros(off.numel() % 2)])
        off = off[0::2] | (off[1::2] << 4)
    return {"shape": list(codes.shape), "bits": int(bits), "packed": off.clone()}


def _unpack_codes(entry: dict[str, Any]) -> Tensor:
    n, bits, packed = int(np.prod(entry["shape"])), int(entry["bits"]), entry["packed"]
    if bits <= 4:
        packed = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:n]
    return (packed.to(torch.int16) + qrange(bits)[0]).to(torch.float32).reshape(entry["shape"])


def compact_state(qmodel: QuantModel) -> dict[str, Any]:
    """``{"format", "tensors": {state-dict key: tensor}, "rounding": {linear: packed bits}, "codes": {linear:
    packed codes}}``, on the CPU (``codes`` only where a linear holds chosen codes: GPTQ)."""
    tensors = {k: v.detach().cpu().clone() for k, v in qmodel.state_dict().items() if not _DERIVED.search(k)}
    rounding = {lin.name: _pack(lin.wq.rounding()) for lin in qmodel.linears() if isinstance(lin.wq, AdaRoundQuantizer)}
    out = {"format": FORMAT, "tensors": tensors, "rounding": rounding}
    codes = {lin.name: _pack_codes(lin.wq.codes, lin.wq.bits) for lin in qmodel.linears()
             if isinstance(lin.wq, CodeQuantizer)}
    if codes:
        out["codes"] = codes
    return out


def load_compact_state(qmodel: QuantModel, state: dict[str, Any]) -> QuantModel:
    """Put a :func:`compact_state` back into a fresh ``QuantModel`` of the same float model; quant mode after."""
    if state.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} state (format {state.get('format')!r})")
    own = qmodel.state_dict()
    unknown = sorted(set(state["tensors"]) - set(own))
    missing = sorted(k for k in own if not _DERIVED.search(k) and not _OPTIONAL.search(k) and k not in state["tensors"])
    if unknown or missing:
        raise ValueError(f"quantized state does not fit this model: unknown {unknown[:4]}, missing {missing[:4]}")
    reparam.apply_saved(qmodel, state["tensors"])  # before AdaRound: its floor comes from the folded weights
    qmodel.load_state_dict(state["tensors"], strict=False)
    if state["rounding"]:
        install_adaround(qmodel)
        by_name = {lin.name: lin for lin in qmodel.linears()}
        for name, entry in state["rounding"].items():
            by_name[name].wq.set_rounding(_unpack(entry))
    if state.get("codes"):
        by_name = {lin.name: lin for lin in qmodel.linears()}
        for name, entry in state["codes"].items():
            lin = by_name.get(name)
            if lin is None or lin.wq is None or lin.wq.bits != int(entry["bits"]):
                raise ValueError(f"{name}: saved {entry['bits']}-bit codes do not fit this model's weight quantizer")
            lin.wq = CodeQuantizer(lin.weight, lin.wq.bits, _unpack_codes(entry))
    qmodel.set_mode("quant")
    return qmodel.eval()
