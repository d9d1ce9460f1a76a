"""ptq.tracking: offline runs land in the run dir; W&B failures never break a run."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import wandb
from omegaconf import OmegaConf

from ptq import table as T
from ptq.tracking import Tracker

ROW = {
    "model": "tiny_digits",
    "data": "digits",
    "wquant": "adaround",
    "wbits": 4,
    "aquant": "movavg",
    "abits": 8,
    "nonlinear": "ivit",
    "granularity": "block",
    "lsq": False,
    "quant_io": True,
    "softmax": {"n": 15, "out_bits": 8},
    "gelu": {"n": 23, "sig_bits": 8},
    "idadd_bits": 16,
}
NAME = "W4A8-adaround-block-ivit"
METRICS = {
    "status": "ok",
    "error": None,
    "name": NAME,
    "row": ROW,
    "acc1": 88.1,
    "acc5": 99.2,
    "fp_acc1": 89.0,
    "fp_acc5": 99.5,
    "agreement": 97.3,
    "kl": 0.012,
    "n_eval": 2400,
    "seed": 0,
    "seconds": {"calibrate": 3.1, "reconstruct": 0.0, "evaluate": 5.2},
    "units": [
        {
            "unit": "encoder.layers.0.attn",
            "loss_before": 1.0,
            "loss_after": 0.5,
            "iters": 3,
            "early_stopped": True,
            "seconds": 0.1,
        }
    ],
    "curves": {
        "encoder.layers.0.attn": {
            "step": [0, 1, 2],
            "loss": [1.0, 0.7, 0.5],
            "reg": [3.0, 2.0, 1.0],
            "beta": [20.0, 11.0, 2.0],
        }
    },
}


@pytest.fixture(autouse=True)
def _isolated_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No credentials, no netrc, no user settings: HOME/WANDB_DIR point into tmp_path."""
    for var in (
        "WANDB_API_KEY",
        "WANDB_MODE",
        "WANDB_IDENTITY_TOKEN_FILE",
        "WANDB_BASE_URL",
        "NETRC",
        "WANDB_ENTITY",
        "WANDB_PROJECT",
    ):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_DIR", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / ".cache" / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def config(mode: str, **tracking: object) -> object:
    """A resolved Hydra-like config with a tracking node."""
    return OmegaConf.create(
        {
            "seed": 0,
            "adaround": {"lr": 0.01},
            "tracking": {
                "mode": mode,
                "project": "ptq",
                "entity": None,
                "group": "g",
                "tags": ["test"],
                "dir": None,
                **tracking,
            },
        }
    )


def run_all(tr: Tracker, run_dir: Path, mode: str) -> None:
    """Every Tracker call in the order a run makes them."""
    tr.start(config(mode), run_dir, NAME, ROW)
    tr.log({"calib/seconds": 1.0}, step=0)
    tr.log_curves(METRICS["curves"])
    tr.finish(METRICS)


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_offline_writes_run_under_run_dir(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    tr = Tracker()
    with caplog.at_level(logging.WARNING, logger="ptq.tracking"):
        run_all(tr, run_dir, "offline")
    assert caplog.records == []
    runs = offline_runs(run_dir)
    assert len(runs) == 1
    assert len(list(runs[0].glob("*.wandb"))) == 1 and list(runs[0].glob("*.wandb"))[0].stat().st_size > 0
    assert tr.run is None and not tr.failed


def test_online_without_api_key_falls_back_to_offline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    modes = []
    real_init = wandb.init

    def init(*args: object, **kwargs: object) -> object:
        modes.append(kwargs.get("mode"))
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    with caplog.at_level(logging.WARNING, logger="ptq.tracking"):
        run_all(Tracker(), run_dir, "online")
    assert modes == ["offline"]  # never tries the network (no wait for a login prompt or a timeout)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "no API key" in warnings[0] and "offline" in warnings[0] and "metrics.json" in warnings[0]
    assert len(offline_runs(run_dir)) == 1


def test_disabled_mode_touches_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wandb, "init", lambda *a, **k: pytest.fail("wandb.init called in disabled mode"))
    with caplog.at_level(logging.WARNING, logger="ptq.tracking"):
        run_all(Tracker(), tmp_path / "run", "disabled")
    assert caplog.records == [] and not (tmp_path / "run" / "wandb").exists()


def test_init_failure_warns_once_then_noop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def boom(*args: object, **kwargs: object) -> None:
        calls.append(kwargs)
        raise wandb.errors.CommError("network is unreachable")

    monkeypatch.setattr(wandb, "init", boom)
    tr = Tracker()
    with caplog.at_level(logging.WARNING, logger="ptq.tracking"):
        run_all(tr, tmp_path / "run", "offline")
        tr.log({"x": 1.0})
        tr.finish(METRICS)
    assert len(calls) == 1 and calls[0]["mode"] == "offline" and calls[0]["name"] == NAME
    assert calls[0]["dir"] == str(tmp_path / "run") and calls[0]["group"] == "g"
    assert calls[0]["config"]["adaround"] == {"lr": 0.01}
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "wandb.init failed" in msgs[0] and "CommError" in msgs[0]
    assert "metrics.json" in msgs[0] and "unaffected" in msgs[0]
    assert tr.failed and not tr.active


class FakeRun:
    """Records what the tracker sends; optionally raises on log."""

    def __init__(self, fail_log: bool = False) -> None:
        self.summary: dict = {}
        self.logged: list[dict] = []
        self.defined: list[tuple] = []
        self.exit_code: int | None = None
        self.step = 0
        self.fail_log = fail_log

    def log(self, d: dict, step: int | None = None) -> None:
        if self.fail_log:
            raise RuntimeError("client crashed")
        self.logged.append(d)

    def define_metric(self, name: str, **kw: object) -> None:
        self.defined.append((name, kw))

    def finish(self, exit_code: int | None = None) -> None:
        self.exit_code = exit_code


def test_client_crash_mid_run_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRun(fail_log=True)
    monkeypatch.setattr(wandb, "init", lambda **kw: fake)
    tr = Tracker()
    with caplog.at_level(logging.WARNING, logger="ptq.tracking"):
        run_all(tr, tmp_path / "run", "offline")
    assert len(caplog.records) == 1 and "wandb.log failed" in caplog.records[0].getMessage()
    assert fake.exit_code is None and "acc1" not in fake.summary  # later calls were no-ops


def test_summary_round_trips_through_table_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What Tracker.finish puts in the summary is what rows_from_wandb_runs reads back."""
    seen: dict = {}
    fake = FakeRun()

    def init(**kw: object) -> FakeRun:
        seen.update(kw)
        return fake

    monkeypatch.setattr(wandb, "init", init)
    run_dir = tmp_path / "run"
    run_all(Tracker(), run_dir, "offline")
    assert fake.exit_code == 0
    assert fake.summary["row/softmax/n"] == 15 and fake.summary["seconds/calibrate"] == 3.1
    assert not any(k.startswith("curves") for k in fake.summary)
    # curves: one log call per step, all on the recon_step axis
    assert [d["recon_step"] for d in fake.logged[1:]] == [0, 1, 2]
    assert fake.logged[-1]["recon/encoder.layers.0.attn/loss"] == 0.5
    assert ("recon/*", {"step_metric": "recon_step"}) in fake.defined
    api_run = SimpleNamespace(
        config=seen["config"], summary=fake.summary, state="finished", name=NAME, group="g"
    )
    (rec,) = T.rows_from_wandb_runs([api_run])
    local = T.make_record(METRICS, seen["config"], run_dir.as_posix())
    assert rec == local and rec["row"] == ROW and rec["adaround.lr"] == 0.01 and rec["tracking.group"] == "g"


def test_failed_run_finishes_with_exit_code_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRun()
    monkeypatch.setattr(wandb, "init", lambda **kw: fake)
    tr = Tracker()
    tr.start({"tracking": {"mode": "offline"}}, tmp_path, NAME, ROW)
    tr.finish({"status": "failed", "error": "boom", "name": NAME, "row": ROW})
    assert fake.exit_code == 1 and fake.summary["status"] == "failed" and fake.summary["error"] == "boom"


def test_online_init_failure_falls_back_to_offline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    fake, modes = FakeRun(), []

    def init(**kw: object) -> FakeRun:
        modes.append(kw["mode"])
        if kw["mode"] == "online":
            raise wandb.errors.CommError("Timed out while retrying")
        return fake

    monkeypatch.setattr(wandb, "init", init)
    tr = Tracker()
    with caplog.at_level(logging.WARNING, logger="ptq.tracking"):
        run_all(tr, tmp_path / "run", "online")
    assert modes == ["online", "offline"] and tr.mode == "offline" and fake.exit_code == 0
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "online init failed" in msgs[0] and "offline" in msgs[0]


def test_online_and_offline_failure_is_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)

    def init(**kw: object) -> None:
        raise wandb.errors.CommError(f"{kw['mode']} broke")

    monkeypatch.setattr(wandb, "init", init)
    tr = Tracker()
    with caplog.at_level(logging.WARNING, logger="ptq.tracking"):
        run_all(tr, tmp_path / "run", "online")
        tr.start(config("offline"), tmp_path / "run", NAME, ROW)  # still a no-op
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "online broke" in msgs[0] and tr.failed


def test_missing_wandb_package_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    tr = Tracker()
    with caplog.at_level(logging.WARNING, logger="ptq.tracking"):
        run_all(tr, tmp_path / "run", "offline")
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "ModuleNotFoundError" in msgs[0] and tr.failed


def test_bad_tracking_config_is_a_warning_not_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tr = Tracker()
    with caplog.at_level(logging.WARNING, logger="ptq.tracking"):
        tr.start({"tracking": {"mode": "sometimes"}}, tmp_path, NAME, ROW)
        tr.start({"tracking": "not a mapping"}, tmp_path, NAME, ROW)
        tr.finish(METRICS)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "tracking.mode" in msgs[0] and tr.failed
