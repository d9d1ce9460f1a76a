"""A finished run's quantized model, rebuilt from its run dir alone.

Every quantized run writes ``quant_state.pt`` (:func:`save_run_state`): the resolved config,
the compact quantized state (``ptq.quant.state``: activation scales and AdaRound's rounding
bits, about 10.8 MB at vit_b_16 size) and a fingerprint of the run's own quantized logits on
its eval set. :func:`load_run_model` rebuilds the ``QuantModel`` from the float model the
config names plus that state; the verifier then checks that the rebuilt model reproduces the
fingerprint bit for bit, so ``mismatches=0/N`` is a statement about the run, not about a
lookalike. Next to the state file, ``quant_state.pt.sha256`` holds its SHA-256: a file damaged
since (a flipped block the zip reader does not notice) is refused before it is read. A run that
cannot be verified raises :class:`NotVerifiable` with one line saying why and what to do.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from ptq.atomic import atomic_path
from ptq.cache import file_digest
from ptq.config import Config
from ptq.models.zoo import load_model
from ptq.quant.models import quantize_model
from ptq.quant.state import compact_state, load_compact_state
from ptq.quant.vit import QuantModel
from ptq.rundir import (
    QUANT_STATE_FILE,
    QUANT_STATE_SUM_FILE,
    describe_progress,
    read_metrics,
    resume_command,
    run_state,
)
from ptq.runspec import settings_of
from ptq.runtime import seed_everything

log = logging.getLogger(__name__)

CHECK_IMAGES = 8  # logits of the first eval images kept verbatim (a check that needs no full pass)


class NotVerifiable(Exception):
    """This run dir holds no verifiable integer-only run; the message is one line: why, and what to do."""


class NotReproduced(NotVerifiable):
    """The model rebuilt from the run dir is not the run's model (its logits fingerprint differs)."""


def logits_digest(logits: Tensor) -> str:
    """SHA-256 of float32 logits' bytes (row order), the fingerprint of a run's evaluation."""
    return hashlib.sha256(logits.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def save_run_state(qmodel: QuantModel, cfg: Any, run_dir: Path | str, q_logits: Tensor) -> Path:
    """Write ``run_dir/quant_state.pt`` atomically, then its checksum file; returns its path."""
    config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    check = {"n": int(q_logits.shape[0]), "logits_sha256": logits_digest(q_logits),
             "first_logits": q_logits[:CHECK_IMAGES].detach().float().cpu().clone()}
    path = Path(run_dir) / QUANT_STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"config": config, "state": compact_state(qmodel), "check": check}, tmp)
    with atomic_path(path.with_name(QUANT_STATE_SUM_FILE)) as tmp:  # after the state: a crash between is refused
        tmp.write_text(f"{file_digest(path)}  {path.name}\n")
    log.info("quantized state (%.1f kB) saved to %s", path.stat().st_size / 1024, path)
    return path


def _check_run_dir(run_dir: Path, integer: bool = True) -> None:
    """NotVerifiable unless ``run_dir`` is a finished run (metrics.json may be absent: a bare state file)."""
    if not run_dir.is_dir():
        raise NotVerifiable(f"{run_dir} is not a directory; pass a run dir (outputs/<date>/<time>)")
    try:
        metrics = read_metrics(run_dir)
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        raise NotVerifiable(f"{run_dir}: unreadable metrics.json ({exc})") from None
    state = run_state(metrics)
    if state == "failed":
        raise NotVerifiable(f"{run_dir}: the run failed ({metrics.get('error')}); fix it and rerun before verifying")
    if state == "interrupted":
        raise NotVerifiable(f"{run_dir}: the run was interrupted ({describe_progress(metrics)}); rerun its command "
                            "to resume, then verify")
    if state == "running":
        raise NotVerifiable(f"{run_dir}: the run is still running; verify it once it has finished")
    row = metrics.get("row") or {}
    if integer and row.get("nonlinear") == "fp":
        raise NotVerifiable(f"{run_dir}: a nonlinear=fp run has no integer program (float Softmax/GELU/LayerNorm); "
                            "only nonlinear=ivit runs can be verified")


def _rewrite_hint(run_dir: Path) -> str:
    """What to do about a bad state file: rerun the run (its recorded command when there is one)."""
    cmd = resume_command(run_dir) or "the run's command (python -m ptq.main ...)"
    return f"rerun {cmd} to rewrite it"


def _check_sum(path: Path, run_dir: Path) -> None:
    """NotVerifiable when the state file's bytes are not the ones its checksum file vouches for."""
    sums = path.with_name(QUANT_STATE_SUM_FILE)
    if not sums.is_file():
        log.warning("%s has no %s (written before checksums were kept): not checked for damage", path, sums.name)
        return
    recorded = (sums.read_text(errors="replace").split() or [""])[0]
    if file_digest(path) != recorded:
        raise NotVerifiable(f"{path} is damaged (its SHA-256 differs from {sums.name}); {_rewrite_hint(run_dir)}")


def check_run_state(run_dir: Path | str, integer: bool = True) -> Path:
    """The finished run's ``quant_state.pt``, its checksum verified; NotVerifiable if there is none (nothing loaded)."""
    run_dir = Path(run_dir)
    _check_run_dir(run_dir, integer)
    path = run_dir / QUANT_STATE_FILE
    if not path.is_file():
        raise NotVerifiable(f"{path} not found: the run predates quant_state.pt or quantized nothing; rerun its "
                            "command (python -m ptq.main ...) to write it")
    _check_sum(path, run_dir)
    return path


def load_run_model(run_dir: Path | str, integer: bool = True) -> tuple[QuantModel, DictConfig, dict[str, Any]]:
    """The run's ``QuantModel`` (CPU, quant mode), its config and its logits fingerprint; NotVerifiable if none.

    ``integer``: only a ``nonlinear=ivit`` run has an integer program; the QDQ export takes any run.
    """
    run_dir = Path(run_dir)
    path = check_run_state(run_dir, integer)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise NotVerifiable(f"{path}: unreadable ({type(exc).__name__}); {_rewrite_hint(run_dir)}") from None
    # the schema's defaults under the saved config: a run from before a key existed ran with its default
    cfg = OmegaConf.merge(OmegaConf.structured(Config), obj["config"])
    if integer and cfg.nonlinear.name != "ivit":
        raise NotVerifiable(f"{run_dir}: nonlinear={cfg.nonlinear.name} has no integer program; only "
                            "nonlinear=ivit runs can be verified")
    seed_everything(int(cfg.seed))  # as the pipeline did before loading: a randomly initialised model is the same
    try:
        qmodel = load_compact_state(quantize_model(load_model(cfg), settings_of(cfg)), obj["state"])
    except ValueError as exc:
        raise NotVerifiable(f"{path}: {exc}") from None
    return qmodel, cfg, obj["check"]


def check_fingerprint(logits: Tensor, check: dict[str, Any], run_dir: Path | str) -> None:
    """NotVerifiable unless the rebuilt model's simulated logits are the run's own, bit for bit.

    Over the whole eval set the SHA-256 must match; over a prefix (``--images N``) the
    first logits kept verbatim must.
    """
    logits = logits.detach().float().cpu()
    if logits.shape[0] == check["n"]:
        same = logits_digest(logits) == check["logits_sha256"]
    else:
        k = min(logits.shape[0], check["first_logits"].shape[0])
        same = torch.equal(logits[:k].view(torch.int32), check["first_logits"][:k].view(torch.int32))
    if not same:
        raise NotReproduced(f"{run_dir}: the rebuilt model does not reproduce the run's logits (its float model or "
                            "data changed since it ran?); rerun its command and verify again")
