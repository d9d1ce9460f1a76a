"""GPTQ against AdaRound at equal accuracy: ``python -m ptq.bench --recon``.

Real runs of ``python -m ptq.main`` on the embedded default (one subprocess each, as a user runs
them), at one quantizer setting (W4A8 fully integer by default): nearest rounding (absmax), GPTQ, and
AdaRound (block) at a ladder of iterations per unit. Each run's ``metrics.json`` gives its top-1, KL
and the seconds of its ``reconstruct`` stage. The comparison: the fewest AdaRound iterations whose KL
reaches GPTQ's, and how many times GPTQ's reconstruction time that rung takes.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ptq.atomic import write_block

log = logging.getLogger(__name__)

RECON_BLOCK = "recon_time"  # docs/benchmarks.md (ptq.atomic.BLOCK_PAGES)
DEFAULT_RECON_OUT = Path("outputs/bench_recon.json")
SETTING = ("nonlinear=ivit", "wbits=4", "abits=8")  # W4A8, every nonlinear op integer
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ReconPlan:
    """The runs of one ``--recon`` benchmark: extra overrides of every run and AdaRound's ladder."""

    overrides: tuple[str, ...]
    ladder: tuple[int, ...]  # AdaRound iterations per unit, increasing


RECON_PLANS = {
    True: ReconPlan(("debug=quick",), (10, 40)),
    False: ReconPlan((), (250, 500, 1000, 2000)),
}


def _runs(plan: ReconPlan) -> list[tuple[str, str, int | None, tuple[str, ...]]]:
    """(tag, method, iterations, overrides) of every run, nearest rounding first."""
    runs = [("absmax", "absmax", None, ("wquant=absmax",)), ("gptq", "gptq", None, ("wquant=gptq",))]
    runs += [(f"adaround_block_{n}", "adaround", n, ("wquant=adaround", "granularity=block", f"adaround.iters={n}",
                                                     "adaround.early_stop=0"))
             for n in plan.ladder]
    return runs


def _run_one(run_dir: Path, overrides: Sequence[str], threads: int | None) -> dict[str, Any]:
    """One ``python -m ptq.main`` run into ``run_dir`` (the stage cache beside it, shared by the bench's
    runs: every run calibrates the same way); its metrics.json (RuntimeError with the log's tail when the
    run fails)."""
    cmd = [sys.executable, "-m", "ptq.main", *overrides, f"hydra.run.dir={run_dir}",
           f"cache_dir={run_dir.parent / 'cache'}", "tracking.mode=disabled"]
    if threads is not None:
        cmd.append(f"threads={threads}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    if proc.returncode != 0 or metrics.get("status") != "ok":
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"run {' '.join(overrides)} failed (exit {proc.returncode}): {tail}")
    return metrics


def run_recon_bench(quick: bool, out_dir: Path, threads: int | None = None) -> dict[str, Any]:
    """Every run of the plan; the JSON-ready result (rows, GPTQ's time against AdaRound's at equal KL)."""
    plan = RECON_PLANS[quick]
    rows = []
    for tag, method, iters, extra in tqdm(_runs(plan), desc="recon bench runs"):
        overrides = (*SETTING, *plan.overrides, *extra)
        m = _run_one(out_dir / tag, overrides, threads)
        rows.append({"tag": tag, "method": method, "iters": iters, "name": m["name"], "acc1": m["acc1"],
                     "kl": m["kl"], "reconstruct_s": m["seconds"]["reconstruct"], "fp_acc1": m["fp_acc1"],
                     "n_eval": m["n_eval"], "overrides": list(overrides)})
        log.info("%s: acc1 %.2f kl %.4g reconstruct %.1fs", tag, m["acc1"], m["kl"], m["seconds"]["reconstruct"])
    return {"setting": list(SETTING), "plan": {"overrides": list(plan.overrides), "ladder": list(plan.ladder)},
            "quick": quick, "threads": threads, "rows": rows, "equal_kl": equal_kl(rows)}


def equal_kl(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The fewest-iteration AdaRound run whose KL is at most GPTQ's, and its time over GPTQ's
    (``reached`` false and the ladder's best KL where none is)."""
    gptq = next(r for r in rows if r["method"] == "gptq")
    ladder = sorted((r for r in rows if r["method"] == "adaround"), key=lambda r: r["iters"])
    hit = next((r for r in ladder if r["kl"] <= gptq["kl"]), None)
    chosen = hit or min(ladder, key=lambda r: r["kl"])
    return {"reached": hit is not None, "gptq_kl": gptq["kl"], "gptq_s": gptq["reconstruct_s"],
            "adaround_iters": chosen["iters"], "adaround_kl": chosen["kl"], "adaround_s": chosen["reconstruct_s"],
            "time_ratio": chosen["reconstruct_s"] / max(gptq["reconstruct_s"], 1e-9)}


def render_recon(result: dict[str, Any]) -> str:
    """The recon_time block: one row per run, then the equal-KL comparison in a sentence."""
    cmd = "python -m ptq.bench --recon" + (" --quick" if result["quick"] else "")
    rows = ["| reconstruction | iterations / unit | reconstruct (s) | Acc@1 | KL | name |",
            "| --- | ---: | ---: | ---: | ---: | --- |"]
    titles = {"absmax": "nearest (absmax)", "gptq": "GPTQ", "adaround": "AdaRound (block) + LSQ"}
    for r in result["rows"]:
        rows.append(f"| {titles[r['method']]} | {r['iters'] or ''} | {r['reconstruct_s']:.1f} | {r['acc1']:.2f} | "
                    f"{r['kl']:.4f} | {r['name']} |")
    e, first = result["equal_kl"], result["rows"][0]
    if e["reached"]:
        verdict = (f"AdaRound first reaches GPTQ's KL ({e['gptq_kl']:.4f}) at {e['adaround_iters']} iterations per "
                   f"unit: {e['adaround_s']:.1f} s against GPTQ's {e['gptq_s']:.1f} s, {e['time_ratio']:.1f}x.")
    else:
        verdict = (f"No AdaRound rung reaches GPTQ's KL ({e['gptq_kl']:.4f}) in {e['gptq_s']:.1f} s; its best, "
                   f"{e['adaround_iters']} iterations, has KL {e['adaround_kl']:.4f} in {e['adaround_s']:.1f} s "
                   f"({e['time_ratio']:.1f}x GPTQ's time).")
    head = (f"Measured by `{cmd}` ({result['created']}, {result['cpu']}, "
            f"{result['threads'] or 'default'} thread(s) per run), `{' '.join(result['setting'])}` on the "
            f"embedded default ({first['n_eval']} eval images, float top-1 {first['fp_acc1']:.2f} %). "
            "Reconstruct = the run's `reconstruct` stage (metrics.json `seconds`).")
    return "\n".join([head, "", *rows, "", verdict])


def update_recon_block(path: Path, result: dict[str, Any]) -> None:
    """Rewrite the recon_time block of the page at ``path``."""
    write_block(path, RECON_BLOCK, render_recon(result))
