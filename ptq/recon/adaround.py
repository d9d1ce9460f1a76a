"""AdaRound reconstruction with LSQ-learned activation step sizes (spec/adaround.md): the stage.

Units run in network order (:func:`units_of`). For each unit, the quantized model
(earlier units already hard-rounded) gives the unit's inputs and the float twin gives
its targets, both captured once into host caches (``ptq.recon.unitcache``); the unit is
then trained on batches from them (``ptq.recon.train``) and left hard-rounded. The
rounding quantizer itself is ``ptq.quant.rounding``.

Resume: after each unit the run dir holds ``recon_checkpoint.pt`` (model
state, per-unit records, curves) and ``<cache_dir>/recon/<key>.json`` points
to it, keyed by everything that determines the result; re-running the same
command loads it and continues after the last finished unit. Batch sampling
is seeded per unit, so a resumed run ends with the same model as an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptq.atomic import atomic_path
from ptq.cache import spec_key
from ptq.calib import calibration_spec
from ptq.config import uses_gptq_start
from ptq.data.build import loader, subset
from ptq.quant.models import quantize_model
from ptq.quant.rounding import install_adaround, rounding_as_codes
from ptq.quant.vit import QLinear, QuantModel, QuantSettings
from ptq.recon import gptq
from ptq.recon.plots import plot_reconstruction
from ptq.recon.train import flush_denormals, train_unit
from ptq.recon.unitcache import capture, capture_fisher
from ptq.runspec import row_of

log = logging.getLogger(__name__)

RECON_PLOT = "recon.png"  # in the run dir: curves and per-unit losses (ptq.recon.plots)


def units_of(qmodel: nn.Module, granularity: str) -> list[tuple[str, nn.Module]]:
    """Reconstruction units in network order (spec/adaround.md, spec/quantized-swin.md).

    ``block``: each block's attention and MLP sub-blocks; a block without them (a Swin patch
    merging) is its own unit at ``block`` and ``encoder`` granularity.
    """
    if granularity == "model":
        return [("model", qmodel)]
    if granularity == "layer":
        return [(n, m) for n, m in qmodel.named_modules() if isinstance(m, QLinear)]
    inner: list[tuple[str, nn.Module]] = []
    for i, blk in enumerate(qmodel.blocks):
        if granularity == "block" and hasattr(blk, "attn"):
            inner += [(f"blocks.{i}.attn", blk.attn), (f"blocks.{i}.mlp", blk.mlp)]
        elif granularity == "block":
            inner.append((f"blocks.{i}", blk))
        elif granularity == "encoder":
            inner.append((f"blocks.{i}", blk))
        else:
            raise ValueError(f"granularity {granularity!r} is not one of layer, block, encoder, model")
    return [("embed", qmodel.embed), *inner, ("head", qmodel.head)]


def resume_key(cfg: Any, qmodel: QuantModel) -> str:
    """Hash of everything that determines the reconstructed model.

    The calibration part is the calibration stage's own cache key (``calib.calibration_spec``), so an
    option that changes calibration changes this key too, without a second list of fields here.
    """
    return spec_key({
        "row": row_of(cfg), "calibration": calibration_spec(cfg, qmodel), "seed": int(cfg.seed),
        "adaround": dict(cfg.adaround), "lsq": dict(cfg.lsq),
        **({"gptq": {k: cfg.gptq[k] for k in ("damp", "block_size", "act_order")}} if uses_gptq_start(cfg) else {}),
    })


def _atomic_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _write_index(index: Path, ckpt_path: Path, done: int) -> None:
    """Point the resume index at the checkpoint, atomically (a crash leaves the old index or the new one)."""
    index.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(index) as tmp:
        tmp.write_text(json.dumps({"checkpoint": str(ckpt_path.resolve()), "done": done}))


def _load_resume(index: Path, qmodel: QuantModel) -> dict[str, Any] | None:
    if not index.exists():
        return None
    try:
        ckpt_path = Path(json.loads(index.read_text())["checkpoint"])
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        qmodel.load_state_dict(ckpt["state"])
    except Exception as exc:
        log.warning("cannot resume from %s (%s); reconstructing from the start", index, exc)
        return None
    log.info("resuming AdaRound after unit %d from %s", ckpt["done"], ckpt_path)
    return ckpt


def reconstruct_model(cfg: Any, qmodel: QuantModel, fp_model: nn.Module, calib_source: Any, device: torch.device,
                      run_dir: Path, metrics: dict[str, Any],
                      on_unit: Callable[[int, int, str], None] | None = None) -> None:
    """AdaRound every unit of ``qmodel`` in network order; records go into ``metrics``.

    ``on_unit(done, units, name)`` is called after each unit is checkpointed (the pipeline
    records it as the run's progress).
    """
    install_adaround(qmodel)
    qmodel.to(device)
    twin = quantize_model(fp_model, QuantSettings(wbits=None, abits=None)).to(device)
    twin.set_mode("off")
    ada = cfg.adaround
    calib = subset(calib_source, ada.calib_images, int(cfg.seed) + 1)
    images = torch.cat([x for x, _ in loader(calib, cfg.data.batch_size, cfg.data.num_workers, torch.device("cpu"))])
    units = units_of(qmodel, cfg.granularity.name)
    twin_units = dict(units_of(twin, cfg.granularity.name))

    index = Path(cfg.cache_dir) / "recon" / f"{resume_key(cfg, qmodel)}.json" if cfg.cache_dir else None
    ckpt_path = run_dir / "recon_checkpoint.pt"
    state = _load_resume(index, qmodel) if index is not None and cfg.adaround.resume else None
    bs = cfg.data.batch_size
    if state is None and uses_gptq_start(cfg):  # a resumed run's checkpoint holds its GPTQ start already
        xs = [images[j:j + bs].to(device) for j in range(0, len(images), bs)]
        metrics["gptq_layers"] = gptq.sequential(qmodel, xs, cfg.gptq, device, gptq.install_rounding)
    elif state is not None and state.get("gptq_layers"):
        metrics["gptq_layers"] = state["gptq_layers"]
    done = state["done"] if state else 0
    records: list[dict[str, Any]] = state["records"] if state else []
    curves: dict[str, dict[str, list[float]]] = state["curves"] if state else {}
    metrics["resumed_units"] = done
    with flush_denormals():
        for i, (name, unit) in enumerate(units):
            if i < done:
                continue
            inputs = capture(qmodel, unit, images, device, "input", bs)
            targets = capture(twin, twin_units[name], images, device, "output", bs)
            fisher = capture_fisher(twin, twin_units[name], images, device, bs) if ada.loss == "fisher" else None
            record, curve = train_unit(name, unit, inputs, targets, cfg, device, seed=int(cfg.seed) * 100003 + i,
                                       fisher=fisher)
            records.append(record)
            curves[name] = curve
            log.info("unit %d/%d %s: loss %.4g -> %.4g in %d iters (%s, %.1fs)", i + 1, len(units), name,
                     record["loss_before"], record["loss_after"], record["iters"],
                     "early stop" if record["early_stopped"] else "all iters", record["seconds"])
            _atomic_save({"done": i + 1, "state": qmodel.state_dict(), "records": records, "curves": curves,
                          "gptq_layers": metrics.get("gptq_layers")}, ckpt_path)
            if index is not None:
                _write_index(index, ckpt_path, i + 1)
            if on_unit is not None:
                on_unit(i + 1, len(units), name)
    if uses_gptq_start(cfg):  # floors off floor(W / s): the state keeps the codes themselves (ptq.quant.state)
        rounding_as_codes(qmodel)
    metrics["units"] = records
    metrics["curves"] = curves
    try:
        metrics["recon_plot"] = plot_reconstruction(records, curves, run_dir / RECON_PLOT).name
    except Exception as exc:  # a picture is not worth failing a finished reconstruction for
        log.warning("could not draw %s (%s: %s)", RECON_PLOT, type(exc).__name__, exc)
    metrics["adaround_iters"] = int(sum(r["iters"] for r in records))
    if not math.isfinite(sum(r["loss_after"] for r in records)):
        raise FloatingPointError("AdaRound produced a non-finite reconstruction loss")
