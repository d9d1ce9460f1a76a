"""The compact state of a calibrated (and reconstructed) ``QuantModel``: what the float model cannot give back.

A ``QuantModel`` is its float model plus a little learned or observed state: every activation
quantizer's scale (and its calibration statistics), any folded LayerNorm factors
(``ptq.quant.reparam``) and, for AdaRound, one rounding bit per weight. :func:`compact_state` keeps just that (rounding bits packed eight to a byte; at
vit_b_16 size about 10.8 MB against 690 MB for the full state dict with AdaRound's float V),
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
from ptq.quant.rounding import AdaRoundQuantizer, install_adaround
from ptq.quant.vit import QuantModel

FORMAT = "ptq-quant-state/1"
#: entries a state may lack (it predates them): a fresh model's value is what such a run had (no fold)
_OPTIONAL = re.compile(r"(\.seen_max|\.ln_r)$")
#: state-dict entries a rebuilt QuantModel derives from the float model by itself (weights, with the
#: saved LayerNorm factors folded in), or needs no more once the scales are fixed (histograms)
_DERIVED = re.compile(r"(\.weight|\.bias|\.const|\.wq\.scale|\.wq\.w_floor|\.wq\.v|\.hist)$")


def _pack(bits: Tensor) -> dict[str, Any]:
    flat = bits.detach().cpu().reshape(-1).to(torch.uint8).numpy()
    return {"shape": list(bits.shape), "packed": torch.from_numpy(np.packbits(flat))}


def _unpack(entry: dict[str, Any]) -> Tensor:
    n = int(np.prod(entry["shape"]))
    flat = np.unpackbits(entry["packed"].numpy(), count=n)
    return torch.from_numpy(flat.astype(np.float32)).reshape(entry["shape"])


def compact_state(qmodel: QuantModel) -> dict[str, Any]:
    """``{"format", "tensors": {state-dict key: tensor}, "rounding": {linear: packed bits}}``, on the CPU."""
    tensors = {k: v.detach().cpu().clone() for k, v in qmodel.state_dict().items() if not _DERIVED.search(k)}
    rounding = {lin.name: _pack(lin.wq.rounding()) for lin in qmodel.linears() if isinstance(lin.wq, AdaRoundQuantizer)}
    return {"format": FORMAT, "tensors": tensors, "rounding": rounding}


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
    qmodel.set_mode("quant")
    return qmodel.eval()
