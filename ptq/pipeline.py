"""The one pipeline every configuration runs: calibrate -> reconstruct -> evaluate.

``run(cfg, run_dir)`` validates the config and its inputs before anything
heavy, writes ``metrics.json`` with ``status: running`` at the start and the
final metrics (or ``status: failed`` and the error) at the end, so a crashed
run never looks complete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ptq import calib, naming, rundir
from ptq.atomic import write_json
from ptq.cache import StageCache
from ptq.config import validate
from ptq.data import build as data_build
from ptq.evaluate import fidelity, float_baseline, predict, topk_accuracy
from ptq.models.zoo import check_model_inputs, load_model
from ptq.quant import audit
from ptq.quant.models import quantize_model
from ptq.quant.vit import QuantModel
from ptq.runspec import eval_set as eval_subset
from ptq.runspec import resolve_device, row_of, settings_of
from ptq.runtime import seed_everything, set_threads, tune_malloc, use_compile_cache

log = logging.getLogger(__name__)


class Progress:
    """Where the run is, kept in ``metrics["progress"]`` and rewritten to metrics.json as it advances.

    A run killed without a chance to write its end keeps the last of these, so the table
    tool can say how far it got (``ptq.rundir.describe_progress``).
    """

    def __init__(self, metrics: dict[str, Any], path: Path) -> None:
        self.metrics, self.path = metrics, path

    def __call__(self, stage: str, **extra: Any) -> None:
        self.metrics["progress"] = {"stage": stage, **extra}
        write_json(self.path, self.metrics)

    def unit_done(self, done: int, units: int, name: str) -> None:
        """AdaRound's callback after each finished (and checkpointed) unit."""
        self("reconstruct", units_done=done, units=units, last_unit=name)


@contextmanager
def stage(seconds: dict[str, float], name: str, progress: Progress | None = None) -> Iterator[None]:
    """Time a pipeline stage into ``seconds[name]`` (and record its start in ``progress``)."""
    t0 = time.perf_counter()
    log.info("stage %s ...", name)
    if progress is not None:
        progress(name)
    try:
        yield
    finally:
        seconds[name] = round(time.perf_counter() - t0, 3)
        log.info("stage %s done in %.1fs", name, seconds[name])


def reconstruct(cfg: Any, qmodel: QuantModel, fp_model: nn.Module, calib_source: Any, device: torch.device,
                run_dir: Path, metrics: dict[str, Any], progress: Progress | None = None) -> None:
    """Weight reconstruction stage: AdaRound for ``wquant=adaround``, GPTQ for ``wquant=gptq``, else nothing."""
    on_unit = progress.unit_done if progress is not None else None
    if cfg.wquant.name == "gptq":
        from ptq.recon import gptq

        gptq.reconstruct_model(cfg, qmodel, calib_source, device, metrics, on_unit=on_unit)
        return
    if cfg.wquant.name != "adaround":
        return
    from ptq.recon.adaround import reconstruct_model

    reconstruct_model(cfg, qmodel, fp_model, calib_source, device, run_dir, metrics,
                      on_unit=on_unit)


def check_inputs(cfg: Any) -> None:
    """Every check that needs no model or data: config values, paths, device."""
    validate(cfg)
    if cfg.export:
        from ptq.intexec import check_exportable

        check_exportable(cfg)
    check_model_inputs(cfg)
    data_build.check_data_inputs(cfg)
    resolve_device(cfg.device)


def record_failure(cfg: DictConfig, run_dir: Path, exc: BaseException) -> None:
    """A metrics.json saying this run failed before it started (e.g. a bad value in one sweep job)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        row = row_of(cfg)
        name = naming.row_name(row)
    except Exception:
        row, name = {}, run_dir.name
    write_json(run_dir / rundir.METRICS_FILE, {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                          "name": name, "row": row, "group": cfg.tracking.group})


@contextmanager
def recorded(metrics: dict[str, Any], path: Path, tracker: Any | None = None) -> Iterator[None]:
    """The body's outcome in ``metrics`` and at ``path``: ``status`` ok, or failed with the error (the
    tracker finished with it, the exception raised on), so a crashed run or scan never looks complete."""
    try:
        yield
        metrics["status"] = "ok"
    except BaseException as exc:
        metrics.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        write_json(path, metrics)
        if tracker is not None:
            tracker.finish(metrics)
        raise
    write_json(path, metrics)


def run(cfg: DictConfig, run_dir: Path, tracker: Any | None = None) -> dict[str, Any]:
    """Run one configuration end to end; returns (and writes) its metrics."""
    check_inputs(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    row = row_of(cfg)
    name = naming.row_name(row)
    metrics: dict[str, Any] = {"status": "running", "error": None, "name": name, "row": row,
                               "seed": int(cfg.seed), "group": cfg.tracking.group, "seconds": {}, "cached": {},
                               "process": rundir.process_identity()}
    metrics_path = run_dir / rundir.METRICS_FILE
    write_json(metrics_path, metrics)
    if tracker is not None:
        tracker.start(OmegaConf.to_container(cfg, resolve=True), run_dir, name, row)
    with recorded(metrics, metrics_path, tracker):
        _run_stages(cfg, run_dir, metrics, Progress(metrics, metrics_path))
        metrics.pop("progress", None)
    if tracker is not None:
        tracker.log_curves(metrics.get("curves") or {})
        if metrics.get("recon_plot"):
            tracker.log_image("recon/plot", run_dir / metrics["recon_plot"])
        tracker.finish(metrics)
    return metrics


def setup(cfg: DictConfig) -> tuple[torch.device, StageCache]:
    """What a process does before it loads anything for a config: seed, device, allocator, caches."""
    seed_everything(int(cfg.seed))
    device = resolve_device(cfg.device)
    tune_malloc()
    use_compile_cache(cfg.cache_dir)
    return device, StageCache(cfg.cache_dir or ".", enabled=cfg.cache_dir is not None)


def calibrated(cfg: DictConfig, fp_model: nn.Module, calib_source: Any, device: torch.device, cache: StageCache,
               cached: dict[str, bool]) -> QuantModel:
    """The config's QuantModel with every activation step fixed (stage-cached), or activations off at A32."""
    qmodel = quantize_model(fp_model, settings_of(cfg)).to(device)
    if qmodel.settings.abits is not None:
        calib.calibrate_cached(cfg, qmodel, calib_source, device, cache, cached)
    else:
        qmodel.set_mode("off")
    return qmodel


def _run_stages(cfg: DictConfig, run_dir: Path, metrics: dict[str, Any], progress: Progress) -> None:
    device, cache = setup(cfg)
    seconds, cached = metrics["seconds"], metrics["cached"]
    log.info("run %s on %s -> %s", metrics["name"], device, run_dir)

    fp_model = load_model(cfg).to(device)
    set_threads(cfg.threads, device)
    calib_source, eval_split = data_build.splits(cfg)
    eval_set = eval_subset(cfg, eval_split)
    eval_loader = data_build.loader(eval_set, cfg.data.batch_size, cfg.data.num_workers, device)
    fp_logits, labels = float_baseline(cfg, fp_model, eval_loader, device, cache, cached)
    metrics["fp_acc1"], metrics["fp_acc5"] = topk_accuracy(fp_logits, labels)

    st = settings_of(cfg)
    if st.wbits is None and st.abits is None:
        log.info("nothing to quantize (wquant=none, aquant=none): evaluating the float model itself")
        qmodel: nn.Module = fp_model
        seconds["calibrate"] = seconds["reconstruct"] = 0.0
    else:
        with stage(seconds, "calibrate", progress):
            qmodel = calibrated(cfg, fp_model, calib_source, device, cache, cached)
        with stage(seconds, "reconstruct", progress):
            reconstruct(cfg, qmodel, fp_model, calib_source, device, run_dir, metrics, progress)

    recorder = audit.RangeAudit() if cfg.nonlinear.audit else None
    with stage(seconds, "evaluate", progress), audit.active(recorder):
        q_logits, _ = predict(qmodel, eval_loader, device, metrics["name"])
    metrics["acc1"], metrics["acc5"] = topk_accuracy(q_logits, labels)
    metrics.update(fidelity(q_logits, fp_logits))
    metrics["n_eval"] = int(labels.numel())
    if recorder is not None:
        metrics["audit"] = recorder.report()
        recorder.check()
    if isinstance(qmodel, QuantModel):
        from ptq.intexec.rebuild import save_run_state

        # what `python -m ptq.intexec [--format qdq] RUN_DIR` rebuilds from
        path = save_run_state(qmodel, cfg, run_dir, q_logits)
        metrics["quant_state_kB"] = round(path.stat().st_size / 1024, 1)
    if cfg.export_qdq and isinstance(qmodel, QuantModel):
        from ptq.intexec.qdq import export_and_measure

        with stage(seconds, "export_qdq", progress):
            metrics["qdq"] = export_and_measure(qmodel, run_dir, eval_set, labels, q_logits, fp_logits)
        log.info("QDQ model on onnxruntime: acc1=%.2f (simulation %.2f), agree with simulation %.2f%%, kl %.4g",
                 metrics["qdq"]["acc1"], metrics["acc1"], metrics["qdq"]["agreement_sim"], metrics["qdq"]["kl_sim"])
    if cfg.export:
        from ptq.intexec import export_and_verify

        with stage(seconds, "export", progress):
            metrics["intexec"] = export_and_verify(qmodel, cfg, run_dir, eval_set)
