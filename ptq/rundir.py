"""A run dir's layout and the honest state of a run: ok, failed, running, or interrupted.

Every run writes ``metrics.json`` with ``status: running`` when it starts, together with
the process that runs it (pid, host, and the process's start time, so a reused pid is not
mistaken for it), and rewrites it as the run advances (``progress``: the stage, and in
AdaRound the last finished unit). A run killed without a chance to write its end
(SIGKILL, power loss) stays ``running`` in the file; :func:`run_state` tells such a run
from a live one by asking whether its process is still there.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.json"
CONFIG_FILE = Path(".hydra") / "config.yaml"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
QUANT_STATE_FILE = "quant_state.pt"
QUANT_STATE_SUM_FILE = "quant_state.pt.sha256"  # its SHA-256, as `sha256sum` writes it (and `sha256sum -c` reads)


def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 onwards
    return int(fields[19])


def process_identity() -> dict[str, Any]:
    """What identifies this process: pid, host and start time (recorded in metrics.json at the start)."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "proc_start": _proc_start(pid)}


def process_alive(ident: Mapping[str, Any]) -> bool | None:
    """Whether the recorded process still runs: True/False on its own host, None where it cannot be told."""
    pid, host = ident.get("pid"), ident.get("host")
    if not isinstance(pid, int) or host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process holds the pid: not ours any more, unless the start matches
        pass
    start = ident.get("proc_start")
    return start is None or _proc_start(pid) == start


def run_state(metrics: Mapping[str, Any]) -> str:
    """``ok``, ``failed``, ``running`` or ``interrupted`` (running in the file, its process gone)."""
    status = str(metrics.get("status"))
    if status == "running" and process_alive(metrics.get("process") or {}) is False:
        return "interrupted"
    return status


def describe_progress(metrics: Mapping[str, Any]) -> str:
    """Where a run got to, e.g. ``in reconstruct, 3/10 units done (last blocks.0.mlp)``."""
    prog = metrics.get("progress") or {}
    stage = prog.get("stage")
    if not stage:
        return "before its first stage"
    if prog.get("units"):
        last = f" (last {prog['last_unit']})" if prog.get("last_unit") else ""
        return f"in {stage}, {prog.get('units_done', 0)}/{prog['units']} units done{last}"
    return f"in {stage}"


def resume_command(run_dir: Path | str) -> str | None:
    """The command that reruns (and so resumes) this run, from Hydra's recorded overrides.

    ``hydra.mode=RUN`` makes a sweep job's overrides (``+sweep=NAME`` among them) one run again,
    written into the same dir; AdaRound then resumes after the last finished unit.
    """
    path = Path(run_dir) / OVERRIDES_FILE
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        overrides = [str(o) for o in OmegaConf.load(path)]
    except Exception:
        return None
    return " ".join(["python -m ptq.main", *overrides, "hydra.mode=RUN", f"hydra.run.dir={Path(run_dir).as_posix()}"])


def read_metrics(run_dir: Path | str) -> dict[str, Any]:
    """The run's metrics.json; OSError / ValueError when missing or unreadable."""
    data = json.loads((Path(run_dir) / METRICS_FILE).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{Path(run_dir) / METRICS_FILE} is not a JSON object")
    return data


def find_run_dirs(top: Path | str) -> list[Path]:
    """Every dir under ``top`` (itself included) holding metrics.json or .hydra/config.yaml, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        if METRICS_FILE in filenames or (here / CONFIG_FILE).is_file():
            found.append(here)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")) and d != "wandb")
    return found
