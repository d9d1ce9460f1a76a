"""The results table as a pandas frame: seed-table labels, the documented row order, mean ± std over seeds."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from ptq.naming import effective_bits, nonlinear_labels, row_name
from ptq.table.sources import METRIC_KEYS

log = logging.getLogger("ptq.table")

METRICS = {"Acc@1": "acc1", "Acc@5": "acc5", "Agree": "agreement", "KL": "kl"}


LABELS = ["[W]", "[A]", "W", "A", "SoftMax", "GELU", "LN", "IdAdd"]


GRANULARITY = ("layer", "block", "encoder", "model")
WQUANT_RANK = {"none": 0, "absmax": 1, **{f"adaround:{g}": 2 + i for i, g in enumerate(GRANULARITY)},
               "gptq": 2 + len(GRANULARITY)}
NONLINEAR_RANK = {"fp": 0, "ivit": 1}
FAILED_COLUMNS = ["name", "dir", "error"]
A_LABELS = {"movavg": "Mov", "mse": "MSE", "percentile": "Pct"}
A_RANK = {"movavg": 0, "percentile": 1, "mse": 2}


def _labels(row: Mapping[str, Any]) -> dict[str, Any]:
    """Seed-table label columns of a row."""
    wq, aq = row.get("wquant", "none"), row.get("aquant", "none")
    w, a = effective_bits(row)
    if wq == "absmax":
        wl = "Abs"
    elif wq == "adaround":
        wl = f"AdaRound({str(row.get('granularity') or '?').capitalize()})"
        if row.get("qdrop"):
            wl += "+QDrop"
        if row.get("recon_loss") == "fisher":
            wl += "+Fisher"
        if row.get("adaround_init") == "gptq":
            wl += "+GPTQinit"
    elif wq == "gptq":
        wl = "GPTQ+ActOrder" if (row.get("gptq") or {}).get("act_order") else "GPTQ"
    else:
        wl = "-" if wq == "none" else str(wq)
    if aq == "none":
        al = "-"
    else:
        al = A_LABELS.get(aq, str(aq))
        if wq == "adaround" and row.get("lsq"):
            al = "LSQ" if aq == "movavg" else f"LSQ({al})"
        if row.get("ln_reparam"):
            al += f"+RepLN{row.get('ln_reparam_alpha', '')}"
        if row.get("kernel_in_bits"):
            al += f"+K{row['kernel_in_bits']}"
        if row.get("image_bits"):
            al += f"+Img{row['image_bits']}"
    return {"[W]": wl, "[A]": al, "W": w, "A": a, **nonlinear_labels(row)}


def _sort_keys(row: Mapping[str, Any]) -> dict[str, Any]:
    """Hidden sort columns implementing the documented row order."""
    wq = row.get("wquant", "none")
    wkey = f"adaround:{row.get('granularity')}" if wq == "adaround" else wq
    w, a = effective_bits(row)
    return {
        "_nl": NONLINEAR_RANK.get(row.get("nonlinear", "fp"), 9),
        "_a": -a,
        "_wq": WQUANT_RANK.get(wkey, 9),
        "_w": -w,
        "_aq": (100 * int(bool(row.get("lsq"))) if wq == "adaround" else 0) + 10 * A_RANK.get(row.get("aquant"), 0)
        + 2 * int(bool(row.get("ln_reparam"))) + int(bool((row.get("softmax") or {}).get("log2")))
        + 4 * int(bool(row.get("kernel_in_bits"))) + 200 * int(bool(row.get("qdrop")))
        + 400 * int(row.get("recon_loss") == "fisher"),
    }


def _row_key(row: Mapping[str, Any]) -> str:
    """Canonical identity of a configuration (None-valued keys ignored)."""
    return json.dumps({k: v for k, v in row.items() if v is not None}, sort_keys=True, default=str)


def _hashable(v: Any) -> Any:
    """A grouping-safe config value (lists/dicts as JSON text, None kept)."""
    return json.dumps(v, sort_keys=True, default=str) if isinstance(v, (list, dict)) else v


def _config_value(rec: Mapping[str, Any], key: str) -> Any:
    """A record's value of config key ``key`` (record-level columns first)."""
    return rec[key] if key in rec and key != "config" else rec.get("config", {}).get(key)


def _warn_mixed_configs(ok: Sequence[dict], groups: Iterable[Sequence[int]]) -> None:
    """Warn once if a table row averages runs whose configs differ beyond the seed (e.g. adaround.lr)."""
    differ: set[str] = set()
    for idx in groups:
        cfgs = [ok[i].get("config", {}) for i in idx]
        keys = set().union(*cfgs) if cfgs else set()
        differ |= {
            k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in cfgs}) > 1
        }
    differ = {k for k in differ if k != "seed" and not k.endswith(".seed") and not k.startswith("tracking.")}
    if differ:
        keys = sorted(differ)
        log.warning(
            "some table rows average runs whose configs differ in %s (not only the seed); "
            "add --by %s to split them",
            ", ".join(keys),
            " --by ".join(keys),
        )


def _table_columns(by: Sequence[str], model: bool) -> list[str]:
    std = [f"{c} std" for c in METRICS]
    return (["Model"] if model else []) + LABELS + list(by) + list(METRICS) + ["n", "Name"] + std


def build_table(records: Iterable[dict], by: Sequence[str] = ()) -> pd.DataFrame:
    """One row per configuration (+ ``by`` values): mean metrics, ``<col> std`` and count ``n``.

    Only status-ok records count.  A ``Base`` row per model/data holds the float
    model's accuracy (fp_acc1/fp_acc5), one sample per distinct (seed, fp value).
    A ``Model`` column appears when runs cover more than one model/data.
    """
    by = list(by)
    ok = [r for r in records if r.get("status", "ok") == "ok"]
    if not ok:
        return pd.DataFrame(columns=_table_columns(by, False))
    rows = [r["row"] for r in ok]
    frame = pd.DataFrame(
        {
            "_key": [_row_key(r) for r in rows],
            "_model": [f"{r.get('model', '?')}/{r.get('data', '?')}" for r in rows],
            "_seed": [_hashable(r.get("seed")) for r in ok],
            **{k: [r[k] for r in ok] for k in METRIC_KEYS},
            **{k: [_hashable(_config_value(r, k)) for r in ok] for k in by},
        }
    )
    first_row = dict(zip(frame["_key"], rows, strict=True))
    grouped = frame.groupby(["_model", "_key", *by], dropna=False, sort=False)
    _warn_mixed_configs(ok, grouped.indices.values())
    agg = grouped[list(METRICS.values())].agg(["mean", "std"])
    agg.columns = [f"{c}:{s}" for c, s in agg.columns]
    agg["n"] = grouped.size()
    agg = agg.reset_index()
    quant = pd.DataFrame([{**_labels(first_row[k]), **_sort_keys(first_row[k])} for k in agg["_key"]])
    quant["Name"] = [row_name(first_row[k]) for k in agg["_key"]]
    quant["_base"] = 1
    table = pd.concat([agg.drop(columns="_key"), quant], axis=1)

    fp = frame.drop_duplicates(["_model", "_seed", "fp_acc1", "fp_acc5"]).dropna(subset=["fp_acc1"])
    base = fp.groupby("_model", sort=False)[["fp_acc1", "fp_acc5"]].agg(["mean", "std", "size"])
    if len(base):
        models = base.index.to_series()
        float_rows = [
            {"model": m.split("/")[0], "wquant": "none", "aquant": "none", "nonlinear": "fp"} for m in models
        ]
        base_df = pd.DataFrame(
            {
                "_model": models.to_numpy(),
                "acc1:mean": base[("fp_acc1", "mean")].to_numpy(),
                "acc1:std": base[("fp_acc1", "std")].to_numpy(),
                "acc5:mean": base[("fp_acc5", "mean")].to_numpy(),
                "acc5:std": base[("fp_acc5", "std")].to_numpy(),
                "n": base[("fp_acc1", "size")].to_numpy(),
                "Name": [row_name(r) for r in float_rows],
                "_base": 0,
                **{k: None for k in by},
            }
        )
        base_df = base_df.assign(
            **{**nonlinear_labels({}), "[W]": "Base", "[A]": "Base", "W": 32, "A": 32},
            _nl=-1,
            _a=0,
            _wq=0,
            _w=0,
            _aq=0,
        )
        table = pd.concat([base_df, table], ignore_index=True)

    sort_cols = ["_model", "_base", "_nl", "_a", "_wq", "_w", "_aq"]
    for i, k in enumerate(by):  # numeric first (NaN last), then text
        table[f"_by{i}n"] = pd.to_numeric(table[k], errors="coerce")
        table[f"_by{i}s"] = table[k].map(lambda v: "" if v is None or v != v else str(v))
        sort_cols += [f"_by{i}n", f"_by{i}s"]
    table = table.sort_values(sort_cols + ["Name"], kind="mergesort", na_position="last")

    for col, key in METRICS.items():
        table[col] = table.get(f"{key}:mean", math.nan)
        table[f"{col} std"] = table.get(f"{key}:std", math.nan)
    table["Model"] = table["_model"]
    for k in by:  # numeric config values stay numeric (right-aligned, CSV-friendly)
        num = pd.to_numeric(table[k], errors="coerce")
        if num.notna().sum() == table[k].notna().sum():
            table[k] = num
    table["n"] = table["n"].astype(int)
    table[["W", "A"]] = table[["W", "A"]].astype(int)
    cols = _table_columns(by, table["_model"].nunique() > 1)
    return table[cols].reset_index(drop=True)


def failed_table(failed: Iterable[dict], limit: int | None = 160) -> pd.DataFrame:
    """Failed (or interrupted) runs: name, dir and the error's last line (never averaged into the table).

    ``limit=None`` keeps the line whole (an interrupted run's resume command).
    """
    recs = sorted(failed, key=lambda r: (r["dir"], r["name"]))
    df = pd.DataFrame([{k: r.get(k) for k in FAILED_COLUMNS} for r in recs], columns=FAILED_COLUMNS)
    df["error"] = df["error"].map(lambda text: _one_line(text, limit))
    return df


def _one_line(text: Any, limit: int | None = 160) -> str:
    """Last non-empty line of an error (a traceback's exception line), shortened to ``limit`` characters."""
    lines = [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]
    line = " ".join(lines[-1].split()) if lines else ""
    return line if limit is None or len(line) <= limit else line[: limit - 1] + "…"
