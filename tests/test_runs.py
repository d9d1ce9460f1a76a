"""Finished runs verify from their run dir alone; a killed run is reported as interrupted; inert options warn."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnxruntime
import pytest

from conftest import ROOT
from ptq.config import no_effect
from ptq.intexec.verify import main as intexec_main
from ptq.rundir import describe_progress, process_identity, run_state

ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def _ptq(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=ENV)


def _main(run: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = _ptq("ptq.main", f"hydra.run.dir={run}", f"cache_dir={cache}", "debug=quick", *overrides)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _intexec(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """``python -m ptq.intexec ARGS`` in this process (its kernels compiled once per worker): status, stdout.
    The module entry point and its one-line errors on stderr are checked in subprocesses below and in test_intexec."""
    capsys.readouterr()
    rc = intexec_main(list(args))
    return rc, capsys.readouterr().out


def test_a_finished_adaround_ivit_run_verifies_without_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    _main(run, tmp_path / "cache", "nonlinear=ivit", "wquant=adaround", "wbits=4", "granularity=block",
          "data.eval_images=64")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "ok" and "progress" not in metrics and metrics["process"]["pid"] > 0
    assert not (run / "intexec").exists() and metrics["quant_state_kB"] > 0
    rc, out = _intexec(capsys, str(run))
    assert rc == 0
    assert out.strip() == f"mismatches=0/{metrics['n_eval']}  (onnxruntime {onnxruntime.__version__})"
    # issue 27: 64 zero bytes in the middle of the state file. torch.load reads it without complaint;
    # the checksum refuses it in one line, before any use, and says what to do
    state = run / "quant_state.pt"
    data = bytearray(state.read_bytes())
    mid = len(data) // 2
    assert data[mid:mid + 64] != bytes(64)
    data[mid:mid + 64] = bytes(64)
    state.write_bytes(bytes(data))
    proc = _ptq("ptq.intexec", str(run))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and proc.stdout == "" and len(lines) == 1, proc.stderr[-2000:]
    assert "quant_state.pt is damaged" in lines[0] and "rerun python -m ptq.main " in lines[0]
    assert f"hydra.run.dir={run.as_posix()}" in lines[0]  # the command that rewrites it


def test_unverifiable_runs_say_why_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "fp"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"status": "ok", "row": {"nonlinear": "fp"}}))
    proc = _ptq("ptq.intexec", str(run))
    assert proc.returncode == 2 and proc.stdout == ""
    assert "only nonlinear=ivit runs can be verified" in proc.stderr
    (run / "metrics.json").write_text(json.dumps({"status": "failed", "error": "ValueError: boom"}))
    rc, out = _intexec(capsys, str(run))  # the same entry point in this process: its logged line
    assert rc == 2 and out == "" and "the run failed (ValueError: boom)" in caplog.text


def test_runs_verifies_every_job_of_a_multirun(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = tmp_path / "sweep"
    proc = _ptq("ptq.main", "-m", f"hydra.sweep.dir={sweep}", f"cache_dir={tmp_path / 'cache'}", "debug=quick",
                "nonlinear=ivit", "data.eval_images=64", "wbits=4,8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rc, out = _intexec(capsys, "--runs", str(sweep))
    assert rc == 0
    lines = out.strip().splitlines()
    assert len(lines) == 3 and all(ln.startswith("mismatches=0/64  ") for ln in lines[:2])
    assert lines[2] == "total: mismatches=0/128 over 2 verified run(s), 0 not verified"
    # a tampered state in one job: that job's line says so and the exit status is non-zero
    state = sweep / "1" / "quant_state.pt"
    import torch

    obj = torch.load(state, weights_only=True)
    scale_key = next(k for k in obj["state"]["tensors"] if k.endswith(".scale"))
    obj["state"]["tensors"][scale_key] *= 1.5
    torch.save(obj, state)
    from ptq.cache import file_digest
    from ptq.rundir import QUANT_STATE_SUM_FILE

    sums = state.with_name(QUANT_STATE_SUM_FILE)
    rc, out = _intexec(capsys, "--runs", str(sweep))  # its checksum file still vouches for the old bytes
    assert rc == 0 and out.strip().splitlines()[-1].endswith("1 verified run(s), 1 not verified")
    assert any(ln.startswith("skipped  ") and "is damaged" in ln for ln in out.splitlines())
    sums.write_text(f"{file_digest(state)}  {state.name}\n")  # a consistent state file that is not the run's
    rc, out = _intexec(capsys, "--runs", str(sweep))
    assert rc == 1
    assert any(ln.startswith("differs  ") and "does not reproduce" in ln for ln in out.splitlines())
    assert out.strip().splitlines()[-1].endswith("over 1 verified run(s), 1 not verified")


def test_a_killed_run_is_interrupted_with_progress_and_a_resume_command(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    run, cache = tmp_path / "run", tmp_path / "cache"
    cmd = [sys.executable, "-m", "ptq.main", f"hydra.run.dir={run}", f"cache_dir={cache}", "debug=quick",
           "wquant=adaround", "granularity=encoder", "adaround.iters=40", "data.eval_images=64"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            try:
                prog = json.loads((run / "metrics.json").read_text()).get("progress") or {}
            except (OSError, ValueError):
                prog = {}
            if prog.get("units_done", 0) >= 1:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("no AdaRound unit finished within 240 s")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "running" and run_state(metrics) == "interrupted"
    where = describe_progress(metrics)
    assert where.startswith("in reconstruct, ") and "units done (last " in where

    table = _ptq("ptq.table", "--runs", str(tmp_path))
    assert table.returncode == 0, table.stderr
    assert "### Interrupted runs" in table.stdout and where in table.stdout
    resume = table.stdout.split("resume: ", 1)[1].split(" |", 1)[0].strip()
    assert resume.startswith("python -m ptq.main ") and f"hydra.run.dir={run.as_posix()}" in resume
    assert intexec_main([str(run)]) == 2 and "was interrupted" in caplog.text

    # the printed command resumes the same run in the same dir, after the finished units
    done = metrics["progress"]["units_done"]
    rerun = subprocess.run([sys.executable, *resume.split()[1:]], cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    final = json.loads((run / "metrics.json").read_text())
    assert final["status"] == "ok" and final["resumed_units"] == done
    assert "Interrupted runs" not in _ptq("ptq.table", "--runs", str(tmp_path)).stdout


def test_a_live_run_is_running_and_a_gone_one_interrupted() -> None:
    me = process_identity()
    assert run_state({"status": "running", "process": me}) == "running"
    gone = {**me, "proc_start": (me["proc_start"] or 0) + 1}  # the pid reused by another process
    assert run_state({"status": "running", "process": gone}) == "interrupted"
    assert run_state({"status": "running"}) == "running"  # no process recorded: cannot tell
    assert run_state({"status": "ok", "process": gone}) == "ok"


def test_options_without_effect_warn_at_start(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg("wquant=absmax", "nonlinear=fp", "aquant=none")
    lines = no_effect(cfg, ["granularity=block", "+adaround.lr=0.1", "nonlinear.gelu.n=20", "abits=4", "wbits=4"])
    assert lines == [
        "granularity=block, +adaround.lr=0.1: no effect, they apply only to wquant=adaround (got wquant=absmax)",
        "abits=4: no effect, activations stay float with aquant=none",
        "nonlinear.gelu.n=20: no effect, they set the integer kernels of nonlinear=ivit (got nonlinear=fp)",
    ]
    assert no_effect(compose_cfg("wquant=adaround"), ["granularity=block", "adaround.lr=0.1"]) == []
    proc = _ptq("ptq.main", f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", "debug=quick",
                "data.eval_images=16", "granularity=block")
    assert proc.returncode == 0
    warned = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "no effect" in ln]
    assert len(warned) == 1 and "granularity=block: no effect" in warned[0]
