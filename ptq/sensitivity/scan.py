"""The sensitivity scan: the calibrated model, each quantizer group left float and raised, metrics.json.

It reuses the pipeline's pieces (``pipeline.setup`` and ``pipeline.calibrated``: the same stage
cache, so a second scan of a config skips calibration), evaluates on the eval subset that
``ptq.main data.eval_images=<sensitivity.eval_images>`` uses, and writes ``metrics.json`` the way
runs do: ``status: running`` first, then ``ok`` or ``failed`` with the error.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm.auto import tqdm

from ptq import naming, rundir
from ptq.atomic import atomic_path, write_json
from ptq.config import ConfigError
from ptq.data import build as data_build
from ptq.evaluate import fidelity, float_baseline, predict, topk_accuracy
from ptq.models.zoo import load_model
from ptq.pipeline import calibrated, recorded, setup, stage
from ptq.quant.groups import groups, left_float, raisable, raised
from ptq.quant.vit import QuantModel
from ptq.runspec import eval_set, row_of
from ptq.runtime import set_threads
from ptq.sensitivity import report

log = logging.getLogger(__name__)

PLOT_FILE = "sensitivity.png"
NEAREST_NOTE = "wquant=adaround measured with its nearest-rounding weights after calibration (no AdaRound)"
#: the same note for each weight reconstruction the scan does not run
NEAREST_NOTES = {"adaround": NEAREST_NOTE,
                 "gptq": "wquant=gptq measured with its nearest-rounding weights after calibration (no GPTQ)"}

RESULT_KEYS = ("float_acc1", "float_kl", "high_acc1", "high_kl", "cost_float", "cost_high")  # null when skipped

Measure = Callable[[str], tuple[dict[str, float], Tensor]]


def check(cfg: DictConfig) -> None:
    """ConfigError for a config with nothing to scan (no weight and no activation quantizer), or a
    ``sensitivity.run`` that is not a finished run with its quantized state."""
    if cfg.sensitivity.run:
        from ptq.intexec.rebuild import NotVerifiable, check_run_state

        try:
            check_run_state(cfg.sensitivity.run, integer=False)  # the model itself is loaded once, by the scan
        except NotVerifiable as exc:
            raise ConfigError(f"sensitivity.run: {exc}") from None
        return
    if cfg.wquant.name == "none" and cfg.aquant.name == "none":
        raise ConfigError("ptq.sensitivity needs a quantized model: wquant=none with aquant=none quantizes nothing")


def eval_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``data.eval_images = sensitivity.eval_images``: the eval subset (and float-baseline
    cache entry) of a ``ptq.main`` run of that size."""
    return OmegaConf.merge(cfg, {"data": {"eval_images": int(cfg.sensitivity.eval_images)}})


def scan_groups(qmodel: QuantModel, measure: Measure, high_bits: int | None,
                baseline: dict[str, float]) -> list[dict[str, Any]]:
    """One record per group, sorted by ``cost_float`` (largest first, ties by the lower KL; skipped groups last).

    ``high_bits=None``: groups are only left float (``high_*`` null, ``raised`` 0).
    """
    records = []
    for g in tqdm(groups(qmodel), desc="groups", leave=False):
        rec: dict[str, Any] = {"group": g.name, "kind": g.kind, "members": g.members}
        if g.members == 0:
            records.append({**rec, "skipped": "every quantizer of the group is disabled in this config", "raised": 0,
                            **dict.fromkeys(RESULT_KEYS)})
            continue
        with left_float(g):
            low, _ = measure(f"{g.name} float")
        n_raised = raisable(g, high_bits) if high_bits is not None else 0
        if high_bits is None:
            high: dict[str, Any] = {"acc1": None, "kl": None}
        elif n_raised:
            with raised(g, high_bits):
                high, _ = measure(f"{g.name} {high_bits}-bit")
        else:  # already at high_bits or wider (e.g. the 16-bit residual): the baseline itself
            high = baseline
        records.append({**rec, "raised": n_raised, "float_acc1": low["acc1"], "float_kl": low["kl"],
                        "high_acc1": high["acc1"], "high_kl": high["kl"],
                        "cost_float": low["acc1"] - baseline["acc1"],
                        "cost_high": None if high["acc1"] is None else high["acc1"] - baseline["acc1"]})
    return sorted(records, key=lambda r: (True, 0.0, 0.0, r["group"]) if r.get("skipped") else
                  (False, -r["cost_float"], r["float_kl"], r["group"]))


def finished_run(cfg: DictConfig) -> tuple[DictConfig, QuantModel]:
    """``sensitivity.run``: the run's own config (with this command's ``sensitivity``, device, threads and
    cache) and its reconstructed model, rebuilt from ``quant_state.pt``."""
    from ptq.intexec.rebuild import load_run_model

    qmodel, run_cfg, _ = load_run_model(cfg.sensitivity.run, integer=False)
    mine = {k: cfg[k] for k in ("sensitivity", "device", "threads", "cache_dir")}
    return OmegaConf.merge(run_cfg, mine), qmodel


def run(cfg: DictConfig, run_dir: Path, tracker: Any | None = None) -> dict[str, Any]:
    """Scan one configuration (or, with ``sensitivity.run``, a finished run's model); returns (and writes)
    its metrics, the chart beside them."""
    run_dir.mkdir(parents=True, exist_ok=True)
    qmodel = None
    if cfg.sensitivity.run:
        cfg, qmodel = finished_run(cfg)
    row = row_of(cfg)
    name = naming.row_name(row)
    metrics: dict[str, Any] = {"status": "running", "error": None, "tool": "sensitivity", "name": name, "row": row,
                               "seed": int(cfg.seed), "high_bits": int(cfg.sensitivity.high_bits),
                               "rounding": None if qmodel is not None else NEAREST_NOTES.get(cfg.wquant.name),
                               "source_run": cfg.sensitivity.run,
                               "seconds": {}, "cached": {}, "process": rundir.process_identity()}
    path = run_dir / rundir.METRICS_FILE
    write_json(path, metrics)
    if tracker is not None:
        plain = OmegaConf.to_container(cfg, resolve=True)
        plain["tracking"]["tags"] = [*plain["tracking"]["tags"], "sensitivity"]
        tracker.start(plain, run_dir, f"{name} sensitivity", row)
    with recorded(metrics, path, tracker):
        _scan(cfg, run_dir, metrics, qmodel)
    if tracker is not None:
        tracker.log({f"sensitivity/{r['group']}/{k}": r[k] for r in metrics["groups"] if not r.get("skipped")
                     for k in ("cost_float", "cost_high", "float_kl", "high_kl") if r[k] is not None})
        tracker.log_image("sensitivity/plot", run_dir / PLOT_FILE)
        tracker.finish({**metrics, "groups": {r["group"]: {k: v for k, v in r.items() if k != "group"}
                                              for r in metrics["groups"]}})
    return metrics


def _scan(cfg: DictConfig, run_dir: Path, metrics: dict[str, Any], finished: QuantModel | None = None) -> None:
    device, cache = setup(cfg)
    seconds, cached = metrics["seconds"], metrics["cached"]
    if metrics["rounding"]:
        log.warning("%s", metrics["rounding"])
    if cfg.nonlinear.name == "ivit" and cfg.sensitivity.high_bits > 8:
        log.warning("nonlinear=ivit with sensitivity.high_bits=%d: raised Softmax / GELU inputs leave the INT8 range "
                    "the kernels' n is set for; their rows measure the kernels outside it (see ptq.quant.groups)",
                    cfg.sensitivity.high_bits)
    log.info("sensitivity of %s on %s -> %s", metrics["name"], device, run_dir)
    fp_model = load_model(cfg).to(device)
    set_threads(cfg.threads, device)
    calib_source, eval_split = data_build.splits(cfg)
    ecfg = eval_config(cfg)
    loader = data_build.loader(eval_set(ecfg, eval_split), cfg.data.batch_size, cfg.data.num_workers, device)
    fp_logits, labels = float_baseline(ecfg, fp_model, loader, device, cache, cached)
    metrics["float"] = {"acc1": topk_accuracy(fp_logits, labels, (1,))[0]}
    metrics["n_eval"] = int(labels.numel())
    if finished is not None:  # its steps and weights are the run's; no calibration histograms to raise a group from
        qmodel = finished.to(device)
    else:
        with stage(seconds, "calibrate"):
            qmodel = calibrated(cfg, fp_model, calib_source, device, cache, cached)

    def measure(desc: str) -> tuple[dict[str, float], Tensor]:
        logits, _ = predict(qmodel, loader, device, desc)
        return {"acc1": topk_accuracy(logits, labels, (1,))[0], "kl": fidelity(logits, fp_logits)["kl"]}, logits

    with stage(seconds, "scan"):
        metrics["baseline"], before = measure("baseline")
        high_bits = None if finished is not None else int(cfg.sensitivity.high_bits)
        metrics["groups"] = scan_groups(qmodel, measure, high_bits, metrics["baseline"])
        _, after = measure("baseline again")
    if not torch.equal(before, after):
        raise RuntimeError("the scan did not restore the model: baseline logits differ after it")
    png = report.plot(metrics, run_dir / PLOT_FILE)
    metrics["plot"] = PLOT_FILE
    if cfg.sensitivity.plot:
        dest = Path(cfg.sensitivity.plot)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest) as tmp:
            shutil.copyfile(png, tmp)
        log.info("chart copied to %s", dest)
