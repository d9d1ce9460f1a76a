"""Sweeps through the real CLI: joblib, submitit_local, Optuna; the stage cache and failing jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from ptq import calib, pipeline, table
from ptq.cache import StageCache


def multirun(tmp_path: Path, *args: str, timeout: int = 300) -> tuple[subprocess.CompletedProcess, Path]:
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "ptq.main", "-m", "debug=quick", f"cache_dir={tmp_path / 'cache'}",
           f"hydra.sweep.dir={sweep_dir}", *args]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    return res, sweep_dir


def records(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/metrics.json"))]


def test_joblib_multirun_gives_one_record_per_job_and_a_shared_group(tmp_path: Path) -> None:
    res, sweep = multirun(tmp_path, "wbits=4,6,8", "hydra/launcher=local_jobs", "hydra.launcher.n_jobs=2")
    assert res.returncode == 0, res.stderr[-3000:]
    recs = records(sweep)
    assert sorted(r["row"]["wbits"] for r in recs) == [4, 6, 8] and all(r["status"] == "ok" for r in recs)
    groups = {r["group"] for r in recs}
    assert len(groups) == 1 and groups.pop().startswith("multirun@")
    ok, failed = table.load_local_runs([sweep])
    assert len(ok) == 3 and not failed


def test_a_failing_job_is_recorded_and_the_others_finish(tmp_path: Path) -> None:
    res, sweep = multirun(tmp_path, "wbits=4,0")  # wbits=0 is impossible: that job fails, the sweep goes on
    assert res.returncode == 0, res.stderr[-3000:]
    by_status = {r["status"]: r for r in records(sweep)}
    assert set(by_status) == {"ok", "failed"} and "wbits" in by_status["failed"]["error"]
    ok, failed = table.load_local_runs([sweep])
    assert len(ok) == 1 and len(failed) == 1


def test_submitit_local_runs_a_job(tmp_path: Path) -> None:
    res, sweep = multirun(tmp_path, "wbits=4", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10")
    assert res.returncode == 0, res.stderr[-3000:]
    recs = records(sweep)
    assert len(recs) == 1 and recs[0]["status"] == "ok"


def test_optuna_search_of_three_trials(tmp_path: Path) -> None:
    res, sweep = multirun(tmp_path, "+sweep=optuna_lr", "hydra.sweeper.n_trials=3", "adaround.iters=5",
                          "adaround.calib_images=32", "data.eval_images=64")
    assert res.returncode == 0, res.stderr[-3000:]
    recs = records(sweep)
    assert len(recs) == 3 and all(r["status"] == "ok" for r in recs)
    best = (sweep / "optimization_results.yaml").read_text()
    assert "adaround.lr" in best and "best_value" in best


def test_second_run_reuses_calibration_and_matches_cache_off(compose_cfg, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    base = ("debug=quick", "wquant=adaround", "granularity=block", "wbits=4", "adaround.iters=10",
            "adaround.resume=false")
    passes = []
    real = calib.calibrate
    monkeypatch.setattr(calib, "calibrate", lambda *a, **k: (passes.append(1), real(*a, **k))[1])
    first = pipeline.run(compose_cfg(*base, "adaround.lr=1e-2"), tmp_path / "a")
    assert first["cached"] == {"fp_baseline": False, "calibrate": False} and len(passes) == 1
    second = pipeline.run(compose_cfg(*base, "adaround.lr=3e-3"), tmp_path / "b")
    assert second["cached"] == {"fp_baseline": True, "calibrate": True} and len(passes) == 1  # no calibration pass
    no_cache = pipeline.run(compose_cfg(*base, "adaround.lr=3e-3", "cache_dir=null"), tmp_path / "c")
    assert len(passes) == 2
    for key in ("acc1", "acc5", "agreement", "kl"):
        assert second[key] == no_cache[key], key


@pytest.mark.parametrize("damage", ["truncate", "drop_sidecar", "flip_byte"])
def test_corrupt_cache_entry_is_rebuilt(compose_cfg, tmp_path: Path, damage: str) -> None:
    cfg = compose_cfg("debug=quick")
    ref = pipeline.run(cfg, tmp_path / "a")
    entries = sorted((tmp_path / "cache" / "calibration").glob("*.pt"))
    assert len(entries) == 1
    entry = entries[0]
    if damage == "truncate":
        entry.write_bytes(entry.read_bytes()[:100])
    elif damage == "drop_sidecar":
        entry.with_suffix(".json").unlink()
    else:
        data = bytearray(entry.read_bytes())
        data[len(data) // 2] ^= 0xFF
        entry.write_bytes(bytes(data))
    again = pipeline.run(cfg, tmp_path / "b")
    assert again["cached"]["calibrate"] is False  # not trusted: recomputed
    assert again["acc1"] == ref["acc1"] and again["kl"] == ref["kl"]
    assert StageCache(tmp_path / "cache").load("calibration", json.loads(entry.with_suffix(".json").read_text())["spec"]) is not None
