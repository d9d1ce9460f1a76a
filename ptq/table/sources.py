"""Where runs come from: local run dirs (metrics.json + .hydra/config.yaml) or a W&B project, as records."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ptq.naming import row_name
from ptq.rundir import CONFIG_FILE, METRICS_FILE, describe_progress, find_run_dirs, resume_command, run_state
from ptq.tracking import flatten, to_plain

log = logging.getLogger("ptq.table")

DEFAULT_RUNS = ("outputs", "multirun")


METRIC_KEYS = ("acc1", "acc5", "fp_acc1", "fp_acc5", "agreement", "kl")


CONFIG_COLUMNS = ("adaround.lr", "tracking.group")


class InputError(ValueError):
    """Bad command-line input: reported as one line on stderr, exit code 2."""


class _Skip(Exception):
    """A run dir/object that is running, half-written or malformed."""


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
    if status not in ("ok", "failed", "interrupted"):
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
    elif status == "interrupted":
        error = str(metrics.get("error") or "interrupted")
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


def _load_run_dir(d: Path) -> dict[str, Any]:
    """Record of one local run dir; raises _Skip for running/half-written/malformed dirs."""
    mfile, cfile = d / METRICS_FILE, d / CONFIG_FILE
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
    if metrics.get("status") == "running" and run_state(metrics) == "interrupted":
        resume = resume_command(d)
        metrics = {**metrics, "status": "interrupted",
                   "error": f"killed (process {metrics['process'].get('pid')} gone) {describe_progress(metrics)}"
                            + (f"; resume: {resume}" if resume else "")}
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
        for d in find_run_dirs(top):
            if d.resolve() in seen:
                continue
            seen.add(d.resolve())
            try:
                records.append(_load_run_dir(d))
            except _Skip as why:
                log.warning("skipping run dir %s: %s", d.as_posix(), why)
    return split_failed(records)


def split_failed(records: Iterable[dict]) -> tuple[list[dict], list[dict]]:
    """(status ok, status failed or interrupted) records, each sorted by dir then name."""
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
