"""Names of a configuration: the run/row name and the seed-table labels.

This module is the single source of truth for how a configuration is called,
used by the run's summary line, W&B run names and the results table.

A *row* is the dict stored under ``metrics.json["row"]``::

    {"model": "tiny_digits", "data": "digits", "wquant": "absmax" | "adaround" | "none",
     "wbits": 4, "aquant": "movavg" | "mse" | "percentile" | "none", "abits": 8, "nonlinear": "fp" | "ivit",
     "granularity": None | "layer" | "block" | "encoder" | "model",
     "lsq": bool, "quant_io": bool,
     "softmax": {"n": 15, "out_bits": 8}, "gelu": {"n": 23, "sig_bits": 8},
     "idadd_bits": 16}

plus ``"ln_reparam": True`` (with ``"ln_reparam_alpha": 0.5`` below full strength: ``lnrep0.5``), ``"kernel_in_bits": 8``, ``softmax["log2"] = True``, ``"probs": "logsqrt2" | "twin"``,
``"gelu_out": "twin"``, ``"scores": "twin"`` (docs/act-quantizers.md), ``"qdrop": 0.5`` (AdaRound's QDrop probability) and
``"recon_loss": "fisher"``, ``"image_bits": 8``, ``"adaround_init": "gptq"`` when those options are on, and
``"gptq": {"damp": 0.01, "act_order": False}`` for wquant=gptq (named ``W4A8-gptq[-actorder][-damp0.1]-...``:
the default damping unnamed) and for adaround.init=gptq (``W4A4-adaround-block-...-gptqinit[-actorder]-...``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ptq.config import GeluConfig, GPTQConfig, NonlinearConfig, SoftmaxConfig

FLOAT_BITS = 32
PROBS_PARTS = {"logsqrt2": "logsqrt2", "twin": "ptwin"}  # row-name part of aquant.probs (log2: "log2")
GPTQ_DAMP = GPTQConfig().damp  # rows at gptq.damp's default are not named by it
_SM, _GE = SoftmaxConfig(), GeluConfig()
IDADD_BITS = NonlinearConfig().idadd_bits
#: The integer kernels' widths, (row section, key, default, name prefix): an ivit row names each one
#: off its default, so two rows that differ only there never share a name.
KERNEL_WIDTHS = (("softmax", "out_bits", _SM.out_bits, "sm"), ("softmax", "n", _SM.n, "smn"),
                 ("gelu", "sig_bits", _GE.sig_bits, "gb"), ("gelu", "n", _GE.n, "gn"))


def effective_bits(row: Mapping[str, Any]) -> tuple[int, int]:
    """(W, A) bit widths as the seed table prints them: 32 where a quantizer is off."""
    w = int(row["wbits"]) if row.get("wquant", "none") != "none" else FLOAT_BITS
    a = int(row["abits"]) if row.get("aquant", "none") != "none" else FLOAT_BITS
    return w, a


def row_name(row: Mapping[str, Any]) -> str:
    """Short unique name of a configuration, e.g. ``W4A8-adaround-block-ivit``."""
    w, a = effective_bits(row)
    parts = [f"W{w}A{a}", str(row.get("wquant", "none"))]
    if row.get("wquant") == "adaround" and row.get("granularity"):
        parts.append(str(row["granularity"]))
        if row.get("lsq") and row.get("aquant", "none") != "none":
            parts.append("lsq")
        if row.get("qdrop"):
            parts.append(f"qdrop{row['qdrop']:g}")
        if row.get("recon_loss"):
            parts.append(str(row["recon_loss"]))
        if row.get("adaround_init") == "gptq":
            parts += ["gptqinit", *_gptq_parts(row)]
    if row.get("wquant") == "gptq":
        parts += _gptq_parts(row)
    if row.get("aquant") in ("mse", "percentile"):
        parts.append(str(row["aquant"]))
    if row.get("ln_reparam"):
        parts.append(f"lnrep{row.get('ln_reparam_alpha', '')}")
    if row.get("kernel_in_bits"):
        parts.append(f"k{row['kernel_in_bits']}")
    if row.get("image_bits"):
        parts.append(f"img{row['image_bits']}")
    if (row.get("softmax") or {}).get("log2"):
        parts.append("log2")
    if row.get("probs"):
        parts.append(PROBS_PARTS[str(row["probs"])])
    if row.get("gelu_out"):
        parts.append("gtwin")
    if row.get("scores"):
        parts.append("stwin")
    if row.get("nonlinear") == "ivit":
        parts += _kernel_width_parts(row)
    parts.append(str(row.get("nonlinear", "fp")))
    if row.get("quant_io") is False:
        parts.append("noio")
    if row.get("model", "tiny_digits") != "tiny_digits":
        parts.insert(0, str(row["model"]))
    return "-".join(parts)


def _gptq_parts(row: Mapping[str, Any]) -> list[str]:
    """GPTQ's options off their defaults: ``actorder``, ``damp0.1``."""
    g = row.get("gptq") or {}
    parts = ["actorder"] if g.get("act_order") else []
    if g.get("damp", GPTQ_DAMP) != GPTQ_DAMP:
        parts.append(f"damp{g['damp']:g}")
    return parts


def _kernel_width_parts(row: Mapping[str, Any]) -> list[str]:
    """``sm4``-style parts for the integer kernels' widths that differ from their defaults (the Softmax
    output width only where its codes are uniform: log2 / logsqrt2 / twin codes fix their own)."""
    coded = bool((row.get("softmax") or {}).get("log2") or row.get("probs"))
    widths = [(prefix, (row.get(sec) or {}).get(key, default), default) for sec, key, default, prefix in KERNEL_WIDTHS
              if not (coded and key == "out_bits")]
    widths.append(("id", row.get("idadd_bits", IDADD_BITS), IDADD_BITS))
    return [f"{prefix}{value}" for prefix, value, default in widths if value != default]


def nonlinear_labels(row: Mapping[str, Any]) -> dict[str, str]:
    """Seed-table labels of the nonlinear columns: ``FP`` or ``I[b8,n15]``-style."""
    if row.get("nonlinear", "fp") != "ivit":
        return {"SoftMax": "FP", "GELU": "FP", "LN": "FP", "IdAdd": "FP"}
    sm = row.get("softmax") or {}
    ge = row.get("gelu") or {}
    codes = "log2" if sm.get("log2") else row.get("probs")
    return {
        "SoftMax": f"I[{codes or 'b' + str(sm.get('out_bits', _SM.out_bits))},n{sm.get('n', _SM.n)}]",
        "GELU": f"I[{'twin' if row.get('gelu_out') else 'b' + str(ge.get('sig_bits', _GE.sig_bits))},n{ge.get('n', _GE.n)}]",
        "LN": "I[b8]",
        "IdAdd": str(row.get("idadd_bits", IDADD_BITS)),
    }


def summary_line(name: str, metrics: Mapping[str, Any]) -> str:
    """The one line a run prints at the end."""
    return (
        f"{name}  acc1={metrics['acc1']:.2f}  acc5={metrics['acc5']:.2f}  "
        f"(fp {metrics['fp_acc1']:.2f})  agree={metrics['agreement']:.2f}  kl={metrics['kl']:.3g}"
    )
