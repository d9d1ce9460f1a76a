"""The one pipeline every configuration runs: calibrate -> reconstruct -> evaluate.

``run(cfg, run_dir)`` validates the config and its inputs before anything
heavy, writes ``metrics.json`` with ``status: running`` at the start and the
final metrics (or ``status: failed`` and the error) at the end, so a crashed
run never looks complete.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ptq import naming
from ptq.atomic import atomic_path
from ptq.cache import StageCache, file_digest
from ptq.config import ConfigError, validate
from ptq.data import build as data_build
from ptq.models.zoo import check_model_inputs, load_model
from ptq.quant import audit
from ptq.quant.nonlinear import Backend
from ptq.quant.vit import QuantSettings, QuantViT
from ptq.runtime import tune_malloc

log = logging.getLogger(__name__)

EVAL_SUBSET_SEED = 0  # the eval subset is the same for every run seed, so the float baseline is shared


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when present; asking for CUDA without one is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available; use device=auto or device=cpu")
    return torch.device(name)


def set_threads(threads: int | None, device: torch.device) -> None:
    """On CUDA, TF32 off (exactness); on the CPU, ``threads`` intra-op threads when given, else torch's
    default (one per core, or what OMP_NUM_THREADS says, e.g. inside a parallel joblib sweep job).

    Measured on the 2-core machine with nothing else running: the embedded default's AdaRound
    iterations run 1.4-1.7x faster with 2 threads than with 1, and its evaluation 1.5-1.6x faster.
    """
    if device.type == "cuda":
        # exact integer accumulation in float32 GEMMs needs full fp32 products: no TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return
    if device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    log.info("CPU threads: %d", torch.get_num_threads())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def row_of(cfg: Any) -> dict[str, Any]:
    """The config fields that name this run's results-table row (see ptq.naming)."""
    return {
        "model": cfg.model.name,
        "data": cfg.data.name,
        "wquant": cfg.wquant.name,
        "wbits": int(cfg.wbits),
        "aquant": cfg.aquant.name,
        "abits": int(cfg.abits),
        "nonlinear": cfg.nonlinear.name,
        "granularity": cfg.granularity.name if cfg.wquant.name == "adaround" else None,
        "lsq": bool(cfg.lsq.enabled) if cfg.wquant.name == "adaround" else False,
        "quant_io": bool(cfg.aquant.quant_io),
        "softmax": {"n": int(cfg.nonlinear.softmax.n), "out_bits": int(cfg.nonlinear.softmax.out_bits)},
        "gelu": {"n": int(cfg.nonlinear.gelu.n), "sig_bits": int(cfg.nonlinear.gelu.sig_bits)},
        "idadd_bits": int(cfg.nonlinear.idadd_bits),
    }


def settings_of(cfg: Any) -> QuantSettings:
    """QuantSettings from the config (None widths where a quantizer is off)."""
    nl = cfg.nonlinear
    return QuantSettings(
        wbits=None if cfg.wquant.name == "none" else int(cfg.wbits),
        abits=None if cfg.aquant.name == "none" else int(cfg.abits),
        idadd_bits=int(nl.idadd_bits),
        momentum=float(cfg.aquant.momentum),
        quant_io=bool(cfg.aquant.quant_io),
        backend=Backend(nl.name, nl.softmax.n, nl.softmax.out_bits, nl.gelu.n, nl.gelu.sig_bits),
    )


def model_identity(cfg: Any) -> dict[str, Any]:
    """What identifies the float model's weights, for cache keys."""
    ident: dict[str, Any] = {"name": cfg.model.name}
    if cfg.model.weights_path:
        ident["weights_sha"] = file_digest(cfg.model.weights_path)
    elif cfg.model.name == "tiny_digits":
        from ptq.models import tiny

        ident["weights_sha"] = file_digest(tiny.DEFAULT_WEIGHTS)
    else:
        ident["weights"] = cfg.model.weights if cfg.model.pretrained else f"random-seed{cfg.seed}"
    return ident


def data_identity(cfg: Any) -> dict[str, Any]:
    return {"name": cfg.data.name, "root": cfg.data.root, "image_size": cfg.data.image_size}


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Atomic JSON write: a reader sees the old file or the new one, never half of one."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


@contextmanager
def stage(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Time a pipeline stage into ``seconds[name]``."""
    t0 = time.perf_counter()
    log.info("stage %s ...", name)
    try:
        yield
    finally:
        seconds[name] = round(time.perf_counter() - t0, 3)
        log.info("stage %s done in %.1fs", name, seconds[name])


@torch.no_grad()
def predict(model: Callable[[Tensor], Tensor], batches: DataLoader, device: torch.device, desc: str) -> tuple[Tensor, Tensor]:
    """Logits and labels of every image, on the CPU."""
    logits, labels = [], []
    for x, y in tqdm(batches, desc=desc, leave=False):
        logits.append(model(x.to(device, non_blocking=True)).float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


@torch.no_grad()
def calibrate(qmodel: QuantViT, batches: DataLoader, device: torch.device) -> None:
    """Moving-average absmax over the calibration images, then fix every scale."""
    qmodel.set_mode("observe")
    for x, _ in tqdm(batches, desc="calibrate", leave=False):
        qmodel(x.to(device, non_blocking=True))
    qmodel.freeze()


def calibration_stats(qmodel: QuantViT) -> dict[str, Tensor]:
    """The observed state of every activation quantizer (what calibration produces)."""
    return {k: v.detach().cpu() for k, v in qmodel.state_dict().items()
            if k.endswith(("running_absmax", "n_batches"))}


def calibrate_cached(cfg: Any, qmodel: QuantViT, calib_source: Any, device: torch.device,
                     cache: StageCache, cached: dict[str, bool]) -> None:
    """Calibrate, or load the statistics of an identical calibration from the stage cache."""
    st = qmodel.settings
    spec = {"model": model_identity(cfg), "data": data_identity(cfg), "seed": int(cfg.seed),
            "calib_images": cfg.aquant.calib_images, "calib_batch_size": cfg.aquant.calib_batch_size,
            "wbits": st.wbits, "abits": st.abits, "idadd_bits": st.idadd_bits, "momentum": st.momentum,
            "quant_io": st.quant_io, "n_quantizers": sum(1 for _ in qmodel.act_quantizers())}
    hit = cache.load("calibration", spec)
    cached["calibrate"] = hit is not None
    if hit is not None:
        qmodel.load_state_dict(hit, strict=False)
        qmodel.freeze()
        return
    calib_set = data_build.subset(calib_source, cfg.aquant.calib_images, int(cfg.seed))
    calibrate(qmodel, data_build.loader(calib_set, cfg.aquant.calib_batch_size, cfg.data.num_workers, device), device)
    cache.save("calibration", spec, calibration_stats(qmodel))


def topk_accuracy(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Top-k accuracies in percent."""
    k = min(max(ks), logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hits = top == labels[:, None]
    return [100.0 * hits[:, : min(kk, k)].any(1).float().mean().item() for kk in ks]


def fidelity(q_logits: Tensor, fp_logits: Tensor) -> dict[str, float]:
    """Top-1 agreement with the float model (percent) and mean KL(float || quantized)."""
    agreement = 100.0 * (q_logits.argmax(1) == fp_logits.argmax(1)).float().mean().item()
    kl = F.kl_div(F.log_softmax(q_logits.double(), 1), F.log_softmax(fp_logits.double(), 1),
                  log_target=True, reduction="batchmean").item()
    return {"agreement": agreement, "kl": max(kl, 0.0)}


def float_baseline(cfg: Any, model: nn.Module, eval_loader: DataLoader, device: torch.device,
                   cache: StageCache, cached: dict[str, bool]) -> tuple[Tensor, Tensor]:
    """Float logits and labels on the eval split, from the stage cache when present."""
    spec = {"model": model_identity(cfg), "data": data_identity(cfg), "eval_images": cfg.data.eval_images,
            "subset_seed": EVAL_SUBSET_SEED}
    hit = cache.load("fp_baseline", spec)
    cached["fp_baseline"] = hit is not None
    if hit is not None:
        return hit["logits"], hit["labels"]
    logits, labels = predict(model, eval_loader, device, "float model")
    cache.save("fp_baseline", spec, {"logits": logits, "labels": labels})
    return logits, labels


def reconstruct(cfg: Any, qmodel: QuantViT, fp_model: nn.Module, calib_source: Any, device: torch.device,
                run_dir: Path, metrics: dict[str, Any]) -> None:
    """Weight reconstruction stage: AdaRound for ``wquant=adaround``, else nothing."""
    if cfg.wquant.name != "adaround":
        return
    from ptq.recon.adaround import reconstruct_model

    reconstruct_model(cfg, qmodel, fp_model, calib_source, device, run_dir, metrics)


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
    write_json(run_dir / "metrics.json", {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                          "name": name, "row": row, "group": cfg.tracking.group})


def run(cfg: DictConfig, run_dir: Path, tracker: Any | None = None) -> dict[str, Any]:
    """Run one configuration end to end; returns (and writes) its metrics."""
    check_inputs(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    row = row_of(cfg)
    name = naming.row_name(row)
    metrics: dict[str, Any] = {"status": "running", "error": None, "name": name, "row": row,
                               "seed": int(cfg.seed), "group": cfg.tracking.group, "seconds": {}, "cached": {}}
    metrics_path = run_dir / "metrics.json"
    write_json(metrics_path, metrics)
    if tracker is not None:
        tracker.start(OmegaConf.to_container(cfg, resolve=True), run_dir, name, row)
    try:
        _run_stages(cfg, run_dir, metrics)
        metrics["status"] = "ok"
    except BaseException as exc:
        metrics.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        write_json(metrics_path, metrics)
        if tracker is not None:
            tracker.finish(metrics)
        raise
    write_json(metrics_path, metrics)
    if tracker is not None:
        tracker.log_curves(metrics.get("curves") or {})
        if metrics.get("recon_plot"):
            tracker.log_image("recon/plot", run_dir / metrics["recon_plot"])
        tracker.finish(metrics)
    return metrics


def _run_stages(cfg: DictConfig, run_dir: Path, metrics: dict[str, Any]) -> None:
    seed_everything(int(cfg.seed))
    device = resolve_device(cfg.device)
    tune_malloc()
    seconds, cached = metrics["seconds"], metrics["cached"]
    cache = StageCache(cfg.cache_dir or ".", enabled=cfg.cache_dir is not None)
    log.info("run %s on %s -> %s", metrics["name"], device, run_dir)

    fp_model = load_model(cfg).to(device)
    set_threads(cfg.threads, device)
    calib_source, eval_split = data_build.splits(cfg)
    eval_set = data_build.subset(eval_split, cfg.data.eval_images, EVAL_SUBSET_SEED)
    eval_loader = data_build.loader(eval_set, cfg.data.batch_size, cfg.data.num_workers, device)
    fp_logits, labels = float_baseline(cfg, fp_model, eval_loader, device, cache, cached)
    metrics["fp_acc1"], metrics["fp_acc5"] = topk_accuracy(fp_logits, labels)

    st = settings_of(cfg)
    if st.wbits is None and st.abits is None:
        log.info("nothing to quantize (wquant=none, aquant=none): evaluating the float model itself")
        qmodel: nn.Module = fp_model
        seconds["calibrate"] = seconds["reconstruct"] = 0.0
    else:
        qmodel = QuantViT(fp_model, st).to(device)
        with stage(seconds, "calibrate"):
            if st.abits is not None:
                calibrate_cached(cfg, qmodel, calib_source, device, cache, cached)
            else:
                qmodel.set_mode("off")
        with stage(seconds, "reconstruct"):
            reconstruct(cfg, qmodel, fp_model, calib_source, device, run_dir, metrics)

    recorder = audit.RangeAudit() if cfg.nonlinear.audit else None
    with stage(seconds, "evaluate"), audit.active(recorder):
        q_logits, _ = predict(qmodel, eval_loader, device, metrics["name"])
    metrics["acc1"], metrics["acc5"] = topk_accuracy(q_logits, labels)
    metrics.update(fidelity(q_logits, fp_logits))
    metrics["n_eval"] = int(labels.numel())
    if recorder is not None:
        metrics["audit"] = recorder.report()
        recorder.check()
    if cfg.export:
        from ptq.intexec import export_and_verify, save_quant_model

        save_quant_model(qmodel, cfg, run_dir)
        with stage(seconds, "export"):
            metrics["intexec"] = export_and_verify(qmodel, cfg, run_dir, eval_set)
