"""Results table in the seed's layout, from local run dirs or a W&B project.

``python -m ptq.table`` collects runs, aggregates repeated configurations
(same ``row``, different seeds) to mean ± std, and prints Markdown; it can
also rewrite the README's results block, write a CSV and PNG charts.

Sources give the same *record* dicts (one per run)::

    {"name", "dir", "status": "ok" | "failed", "error", "row": {...},
     "acc1", "acc5", "fp_acc1", "fp_acc5", "agreement", "kl", "n_eval", "seed",
     "adaround.lr", "tracking.group", "config": {dotted key: value}}

Row order (matches the seed table): per model/data, the float ``Base`` row
first, then nonlinear (FP before I-ViT), then activation bits descending
(32 = no activation quantizer first), then weight quantizer (none < Abs <
AdaRound Layer < Block < Encoder < Model), then weight bits descending, then
activation quantizer (Mov < LSQ), then ``--by`` values ascending, then name.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ptq.naming import effective_bits, nonlinear_labels, row_name
from ptq.tracking import flatten, to_plain

log = logging.getLogger("ptq.table" if __name__ == "__main__" else __name__)

DEFAULT_RUNS = ("outputs", "multirun")
#: table column -> record key of the aggregated metrics
METRICS = {"Acc@1": "acc1", "Acc@5": "acc5", "Agree": "agreement", "KL": "kl"}
METRIC_KEYS = ("acc1", "acc5", "fp_acc1", "fp_acc5", "agreement", "kl")
LABELS = ["[W]", "[A]", "W", "A", "SoftMax", "GELU", "LN", "IdAdd"]
#: config keys copied into every record (for filtering and plotting)
CONFIG_COLUMNS = ("adaround.lr", "tracking.group")
DECIMALS = {"KL": 4}  # everything else: 2
GRANULARITY = ("layer", "block", "encoder", "model")
WQUANT_RANK = {"none": 0, "absmax": 1, **{f"adaround:{g}": 2 + i for i, g in enumerate(GRANULARITY)}}
NONLINEAR_RANK = {"fp": 0, "ivit": 1}
FAILED_COLUMNS = ["name", "dir", "error"]


class InputError(ValueError):
    """Bad command-line input: reported as one line on stderr, exit code 2."""


class _Skip(Exception):
    """A run dir/object that is running, half-written or malformed."""


# ----------------------------------------------------------------------------- records


def _num(v: Any) -> float:
    """A finite-or-NaN float from a JSON value (None/garbage -> NaN)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """Inverse of :func:`ptq.tracking.flatten` (how Tracker.finish writes the summary)."""
    out: dict[str, Any] = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = str(key).split(sep)
        for p in parents:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = node[p] = {}
            node = nxt
        if isinstance(v, Mapping) and isinstance(node.get(leaf), dict):
            node[leaf].update(_plain(v))
        else:
            node[leaf] = _plain(v)
    return out


def _plain(x: Any) -> Any:
    """Mappings (also W&B's summary objects, which only offer ``items``) as plain dicts."""
    if isinstance(x, str):
        return x
    if isinstance(x, Mapping) or callable(getattr(x, "items", None)):
        return {str(k): _plain(v) for k, v in x.items()}
    return x


def make_record(metrics: Mapping[str, Any], config: Mapping[str, Any], run_dir: str) -> dict[str, Any]:
    """One run's record from its metrics.json content and resolved config; raises _Skip."""
    status = metrics.get("status")
    if status == "running":
        raise _Skip("still running")
    if status not in ("ok", "failed"):
        raise _Skip(f"malformed metrics.json (status {status!r})")
    row = metrics.get("row")
    if status == "ok":
        if not isinstance(row, Mapping):
            raise _Skip("malformed metrics.json (no 'row')")
        bad = [k for k in ("acc1", "acc5") if not math.isfinite(_num(metrics.get(k)))]
        if bad:
            raise _Skip(f"malformed metrics.json (no numeric {', '.join(bad)})")
    row = dict(row) if isinstance(row, Mapping) else {}
    cfg = flatten(config, sep=".")
    if metrics.get("group"):  # decided at run time (a sweep's group), so not in .hydra/config.yaml
        cfg["tracking.group"] = metrics["group"]
    name = metrics.get("name") or (row_name(row) if row else Path(run_dir).name)
    seed = metrics.get("seed", cfg.get("seed"))
    error = None
    if status == "failed":
        error = str(metrics.get("error") or "(no error text)")
    return {
        "name": str(name),
        "dir": str(run_dir),
        "status": status,
        "error": error,
        "row": row,
        **{k: _num(metrics.get(k)) for k in METRIC_KEYS},
        "n_eval": metrics.get("n_eval"),
        "seed": seed,
        **{k: cfg.get(k) for k in CONFIG_COLUMNS},
        "config": cfg,
    }


def _find_run_dirs(top: Path) -> list[Path]:
    """Every dir under ``top`` (itself included) holding metrics.json or .hydra/config.yaml."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        if "metrics.json" in filenames or (here / ".hydra" / "config.yaml").is_file():
            found.append(here)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")) and d != "wandb")
    return found


def _load_run_dir(d: Path) -> dict[str, Any]:
    """Record of one local run dir; raises _Skip for running/half-written/malformed dirs."""
    mfile, cfile = d / "metrics.json", d / ".hydra" / "config.yaml"
    if not mfile.is_file():
        raise _Skip("no metrics.json (still running, or killed before writing it)")
    try:
        metrics = json.loads(mfile.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Skip(f"unreadable metrics.json (half-written?): {exc}") from None
    if not isinstance(metrics, dict):
        raise _Skip("malformed metrics.json (not an object)")
    config: dict[str, Any] = {}
    if cfile.is_file():
        from omegaconf import OmegaConf

        try:
            config = to_plain(OmegaConf.load(cfile))
        except Exception as exc:
            raise _Skip(f"unreadable .hydra/config.yaml: {exc}") from None
        if not isinstance(config, dict):
            raise _Skip("malformed .hydra/config.yaml (not a mapping)")
    return make_record(metrics, config, d.as_posix())


def load_local_runs(paths: Iterable[str | Path]) -> tuple[list[dict], list[dict]]:
    """(ok records, failed records) of all run dirs under ``paths``; skipped dirs warn once each.

    Raises InputError for a path that does not exist.
    """
    records: list[dict] = []
    seen: set[Path] = set()
    for top in map(Path, paths):
        if not top.exists():
            raise InputError(f"--runs path does not exist: {top}")
        for d in _find_run_dirs(top):
            if d.resolve() in seen:
                continue
            seen.add(d.resolve())
            try:
                records.append(_load_run_dir(d))
            except _Skip as why:
                log.warning("skipping run dir %s: %s", d.as_posix(), why)
    return split_failed(records)


def split_failed(records: Iterable[dict]) -> tuple[list[dict], list[dict]]:
    """(status ok, status failed) records, each sorted by dir then name."""
    recs = sorted(records, key=lambda r: (r["dir"], r["name"]))
    return [r for r in recs if r["status"] == "ok"], [r for r in recs if r["status"] != "ok"]


def rows_from_wandb_runs(runs: Iterable[Any]) -> list[dict]:
    """Records (ok and failed) from W&B API run objects (``.config``, ``.summary``, ``.state``, ``.name``, ``.group``).

    ``summary`` holds metrics.json flattened with '/' (see Tracker.finish) plus
    ``run_dir``; runs that crashed before finish are reported as failed.
    """
    out = []
    for run in runs:
        state = getattr(run, "state", None)
        summary = _plain(getattr(run, "summary", None) or {})
        config = {
            k: v for k, v in _plain(getattr(run, "config", None) or {}).items() if not k.startswith("_")
        }
        metrics = _unflatten({k: v for k, v in summary.items() if not k.startswith("_")})
        metrics.setdefault("name", getattr(run, "name", None))
        path = getattr(run, "path", None)
        label = getattr(run, "name", None) or "?"
        where = metrics.get("run_dir") or (
            "wandb:" + "/".join(map(str, path)) if isinstance(path, list) else f"wandb:{label}"
        )
        if state == "running":
            log.warning("skipping W&B run %s: still running", label)
            continue
        if metrics.get("status") in (None, "running") and state in ("crashed", "failed", "killed"):
            metrics.update(status="failed", error=metrics.get("error") or f"W&B run {state} before finishing")
        try:
            rec = make_record(metrics, config, where)
        except _Skip as why:
            log.warning("skipping W&B run %s: %s", label, why)
            continue
        if rec["tracking.group"] is None and getattr(run, "group", None):
            rec["tracking.group"] = run.group
        out.append(rec)
    return sorted(out, key=lambda r: (r["dir"], r["name"]))


def load_wandb_runs(spec: str, group: str | None = None) -> list[dict]:
    """Records of a W&B project ``ENTITY/PROJECT`` through the public API."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        raise InputError(f"--wandb expects ENTITY/PROJECT, got {spec!r}")
    import wandb

    try:
        runs = wandb.Api(timeout=30).runs(spec, filters={"group": group} if group else None)
        return rows_from_wandb_runs(runs)
    except Exception as exc:
        raise InputError(f"cannot read W&B project {spec}: {type(exc).__name__}: {exc}") from None


# ----------------------------------------------------------------------------- table


def _labels(row: Mapping[str, Any]) -> dict[str, Any]:
    """Seed-table label columns of a row."""
    wq, aq = row.get("wquant", "none"), row.get("aquant", "none")
    w, a = effective_bits(row)
    if wq == "absmax":
        wl = "Abs"
    elif wq == "adaround":
        wl = f"AdaRound({str(row.get('granularity') or '?').capitalize()})"
    else:
        wl = "-" if wq == "none" else str(wq)
    if aq == "none":
        al = "-"
    elif wq == "adaround" and row.get("lsq"):
        al = "LSQ"
    else:
        al = "Mov" if aq == "movavg" else str(aq)
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
        "_aq": int(bool(row.get("lsq"))) if wq == "adaround" else 0,
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


def failed_table(failed: Iterable[dict]) -> pd.DataFrame:
    """Failed runs: name, dir and the error's last line (never averaged into the table)."""
    recs = sorted(failed, key=lambda r: (r["dir"], r["name"]))
    df = pd.DataFrame([{k: r.get(k) for k in FAILED_COLUMNS} for r in recs], columns=FAILED_COLUMNS)
    df["error"] = df["error"].map(_one_line)
    return df


def _one_line(text: Any, limit: int = 160) -> str:
    """Last non-empty line of an error (a traceback's exception line), shortened."""
    lines = [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]
    line = " ".join(lines[-1].split()) if lines else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


# ----------------------------------------------------------------------------- output


def _fmt(v: Any) -> str:
    """A plain cell: NaN/None empty, floats in %g, everything else str."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def to_markdown(df: pd.DataFrame) -> str:
    """A padded Markdown table; metric cells as ``88.12`` or ``88.12 ± 0.31`` (std only when n > 1)."""
    shown = [c for c in df.columns if not str(c).endswith(" std")]
    cells: dict[str, list[str]] = {}
    for c in shown:
        col = df[c]
        if c in METRICS:
            d = DECIMALS.get(c, 2)
            std = df[f"{c} std"] if f"{c} std" in df else pd.Series(math.nan, index=df.index)
            many = df["n"] > 1 if "n" in df else pd.Series(False, index=df.index)
            mean_s = col.map(lambda v, d=d: "" if pd.isna(v) else f"{v:.{d}f}")
            std_s = std.map(lambda v, d=d: "" if pd.isna(v) else f" ± {v:.{d}f}")
            cells[c] = (mean_s + std_s.where(many & (mean_s != ""), "")).tolist()
        else:
            cells[c] = [_fmt(v) for v in col]
        cells[c] = [s.replace("|", "\\|").replace("\n", " ") for s in cells[c]]
    right = {c for c in shown if c in METRICS or c in ("W", "A", "n") or pd.api.types.is_numeric_dtype(df[c])}
    width = {c: max([len(str(c)), 3, *map(len, cells[c])]) for c in shown}

    def line(vals: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                v.rjust(width[c]) if c in right else v.ljust(width[c])
                for c, v in zip(shown, vals, strict=True)
            )
            + " |"
        )

    sep = (
        "| "
        + " | ".join(("-" * (width[c] - 1) + ":") if c in right else "-" * width[c] for c in shown)
        + " |"
    )
    body = [line([cells[c][i] for c in shown]) for i in range(len(df))]
    return "\n".join([line([str(c) for c in shown]), sep, *body]) + "\n"


NOTE = (
    "Acc@1, Acc@5 and Agree (top-1 agreement with the float model) in %, KL = mean "
    "KL(float ‖ quantized); mean ± sample std over `n` runs (seeds). `Base` is the float "
    "model on the same evaluation split.\n"
)


def render(table: pd.DataFrame, failed: pd.DataFrame | None = None) -> str:
    """The full Markdown report: results table, note and the failed runs section."""
    text = to_markdown(table) + "\n" + NOTE
    if failed is not None and len(failed):
        text += "\n### Failed runs\n\n" + to_markdown(failed)
    return text


def markers(block: str = "results") -> tuple[str, str]:
    """The HTML-comment markers around a generated README block."""
    return f"<!-- {block}:start -->", f"<!-- {block}:end -->"


def write_readme_block(readme: Path, text: str, block: str = "results") -> None:
    """Replace the text between the ``block`` markers of ``readme`` (markers and all else kept byte-identical)."""
    start, end = markers(block)
    readme = Path(readme)
    if not readme.is_file():
        raise InputError(f"README not found: {readme}")
    with open(readme, encoding="utf-8", newline="") as f:
        old = f.read()
    if old.count(start) != 1 or old.count(end) != 1 or old.index(start) > old.index(end):
        raise InputError(f"{readme} needs exactly one '{start}' followed by one '{end}' line")
    head, rest = old.split(start, 1)
    _, tail = rest.split(end, 1)
    nl = "\r\n" if "\r\n" in old else "\n"
    body = nl + text.strip("\n").replace("\n", nl) + nl
    new = head + start + body + end + tail
    if new != old:
        with open(readme, "w", encoding="utf-8", newline="") as f:
            f.write(new)


# ----------------------------------------------------------------------------- plots


def plot(data: pd.DataFrame | Iterable[dict], out_dir: Path, by: Sequence[str] = ()) -> list[Path]:
    """PNG charts: Acc@1 per configuration (float baseline as a line) and, when
    AdaRound runs differ in ``adaround.lr``, Acc@1 against the rounding LR per configuration.

    ``data`` is a table from :func:`build_table` (the LR chart then needs an
    ``adaround.lr`` column) or a list of records.
    """
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(data, pd.DataFrame):
        table, lr_table = data, (data if "adaround.lr" in data else None)
    else:
        records = list(data)
        table = build_table(records, by)
        lr_table = build_table(records, ["adaround.lr"])
    written: list[Path] = []
    extra = [c for c in table.columns if c not in _table_columns([], True)]
    base = table[table["[W]"] == "Base"]
    quant = table[table["[W]"] != "Base"]
    if len(quant):
        labels = [
            " ".join([name] + [f"{k}={_fmt(r[k])}" for k in extra if _fmt(r[k])])
            for name, (_, r) in zip(quant["Name"], quant.iterrows(), strict=True)
        ]
        fig = Figure(figsize=(12, 1.2 + 0.35 * len(quant)), layout="constrained")
        ax, ax_kl = fig.subplots(1, 2, sharey=True, width_ratios=[3, 2])
        y = list(range(len(quant)))[::-1]
        # KL to the float model on a log axis: it separates configurations whose top-1 barely moves
        kl = pd.to_numeric(quant["KL"], errors="coerce").clip(lower=1e-6)
        ax_kl.barh(y, kl, color="tab:orange")
        for yi, v in zip(y, kl, strict=True):
            ax_kl.text(v, yi, f" {v:.2g}", va="center", fontsize=7)
        ax_kl.set_xscale("log")
        ax_kl.set_xlabel("mean KL(float || quantized), log scale")
        ax_kl.set_title("Fidelity to the float model")
        ax.barh(y, quant["Acc@1"], xerr=quant["Acc@1 std"].fillna(0), color="tab:blue", capsize=2)
        for yi, v in zip(y, quant["Acc@1"], strict=True):
            ax.text(v, yi, f" {v:.2f}", va="center", fontsize=7)
        for _, b in base.iterrows():
            ax.axvline(
                b["Acc@1"],
                color="tab:red",
                ls="--",
                lw=1,
                label=" ".join(filter(None, ["float", b.get("Model"), f"{b['Acc@1']:.2f}"])),
            )
        ax.set_yticks(y, labels, fontsize=7)
        ax.set_xlabel("Acc@1 (%)")
        ax.set_xlim(0, max(100.0, float(quant["Acc@1"].max()) * 1.05))
        if len(base):
            ax.legend(loc="lower right", fontsize=7)
        ax.set_title("Top-1 accuracy by configuration")
        written.append(out_dir / "acc1_by_config.png")
        fig.savefig(written[-1], dpi=120)

    if lr_table is not None:
        ada = lr_table[lr_table["[W]"].str.startswith("AdaRound") & lr_table["adaround.lr"].notna()]
        ada = ada.assign(lr=pd.to_numeric(ada["adaround.lr"], errors="coerce")).dropna(subset=["lr"])
        if ada["lr"].nunique() > 1:
            fig = Figure(figsize=(12, 4.5), layout="constrained")
            ax, ax_kl = fig.subplots(1, 2)
            for name, g in ada.groupby("Name", sort=True):
                g = g.sort_values("lr")
                ax.errorbar(
                    g["lr"], g["Acc@1"], yerr=g["Acc@1 std"].fillna(0), marker="o", capsize=3, label=name
                )
                ax_kl.plot(g["lr"], pd.to_numeric(g["KL"], errors="coerce"), marker="o", label=name)
            ax_kl.set_xscale("log")
            ax_kl.set_yscale("log")
            ax_kl.set_xlabel("AdaRound rounding LR (adaround.lr)")
            ax_kl.set_ylabel("mean KL(float || quantized)")
            ax_kl.set_title("Fidelity to the float model vs rounding LR")
            ax_kl.legend(fontsize=7)
            for _, b in lr_table[lr_table["[W]"] == "Base"].iterrows():
                ax.axhline(b["Acc@1"], color="tab:red", ls="--", lw=1, label=f"float {b['Acc@1']:.2f}")
            ax.set_xscale("log")
            ax.set_xlabel("AdaRound rounding LR (adaround.lr)")
            ax.set_ylabel("Acc@1 (%)")
            ax.set_title("Top-1 accuracy vs rounding LR")
            ax.legend(fontsize=7)
            written.append(out_dir / "acc1_vs_lr.png")
            fig.savefig(written[-1], dpi=120)
    return written


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ptq.table", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--runs", nargs="+", metavar="DIR", help="run/sweep dirs to scan (default: outputs/ multirun/)"
    )
    src.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from a W&B project instead")
    p.add_argument("--group", help="only runs whose tracking.group (W&B group) is G")
    p.add_argument(
        "--by",
        action="append",
        default=[],
        metavar="KEY",
        help="extra grouping column from the config, e.g. adaround.lr (repeatable)",
    )
    p.add_argument("--write", type=Path, metavar="README", help="replace the results block of this file")
    p.add_argument("--block", default="results",
                   help="name of the README block to replace: <!-- NAME:start --> ... <!-- NAME:end --> (default results)")
    p.add_argument("--csv", type=Path, metavar="FILE", help="write the table as CSV")
    p.add_argument("--plot", type=Path, metavar="DIR", help="write PNG charts into DIR")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; 0 on success, 2 on bad input (one line on stderr)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        if args.wandb:
            ok, failed = split_failed(load_wandb_runs(args.wandb, args.group))
            where = f"W&B project {args.wandb}"
        else:
            paths = args.runs or [d for d in DEFAULT_RUNS if Path(d).exists()]
            ok, failed = load_local_runs(paths)
            where = " ".join(map(str, args.runs or DEFAULT_RUNS))
        if args.group is not None:
            ok, failed = ([r for r in rs if r["tracking.group"] == args.group] for rs in (ok, failed))
            where += f" (group {args.group})"
        if not ok and not failed:
            raise InputError(f"no runs found in {where}")
        table = build_table(ok, args.by)
        text = render(table, failed_table(failed))
        print(text, end="")
        if args.write:
            write_readme_block(args.write, text, args.block)
        if args.csv:
            args.csv.parent.mkdir(parents=True, exist_ok=True)
            table.to_csv(args.csv, index=False)
        if args.plot:
            for path in plot(ok, args.plot, args.by):
                log.info("wrote %s", path)
    except InputError as exc:
        print(f"ptq.table: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
