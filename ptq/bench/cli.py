"""``python -m ptq.bench``: run every measurement, write the JSON, print the table, update its blocks
(the Performance block of docs/benchmarks.md, the onnx block of docs/deployment.md)."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptq.atomic import block_page, check_block
from ptq.bench.adaround import bench_adaround
from ptq.bench.evaluation import bench_eval
from ptq.bench.memory import cache_report
from ptq.bench.onnxrt import onnx_table, run_onnx_bench, update_readme_onnx
from ptq.bench.plans import (
    ADAROUND_BACKENDS,
    DEFAULT_ONNX_OUT,
    DEFAULT_OUT,
    ONNX_BLOCK,
    PERF_BLOCK,
    PLANS,
    TARGETS,
    build_model,
    images_for,
    ratio_key,
)
from ptq.bench.recon import DEFAULT_RECON_OUT, RECON_BLOCK, render_recon, run_recon_bench, update_recon_block
from ptq.bench.report import markdown_table, update_readme
from ptq.bench.timing import machine_info
from ptq.models.families import describe
from ptq.runspec import resolve_device
from ptq.runtime import tune_malloc

log = logging.getLogger(__name__)

DESCRIPTION = "Performance benchmark: quantized evaluation, AdaRound iterations, calibration and cache memory."
HOME = Path("<each block's page>")  # ``--write`` without a page: every block to the page it lives on


def bench_model(name: str, quick: bool, device: torch.device, backends: Sequence[str] = ADAROUND_BACKENDS,
                compile_step: bool = True) -> dict[str, Any]:
    """Every measurement for one model; AdaRound once per nonlinear backend in ``backends``."""
    plan = PLANS[(name, quick)]
    model, meta = build_model(name, plan)
    log.info("benchmarking %s (%s) on %s", name, meta, device)
    calib = images_for(name, model, max(plan.calib_images, plan.ada_cache_images, plan.ada_batch), "train")
    images = images_for(name, model, plan.eval_batch, "test")
    t0 = time.perf_counter()
    res, _ = bench_eval(model, calib[:plan.calib_images], images, plan, device)
    log.info("%s: calibration and eval measured in %.1fs", name, time.perf_counter() - t0)
    ratios = {"eval_fp_ops": res["eval"]["fp_ops"]["ratio_to_float"], "eval_ivit": res["eval"]["ivit"]["ratio_to_float"]}
    adaround: dict[str, Any] = {}
    memory = None
    for i, backend in enumerate(backends):
        t1 = time.perf_counter()
        ada = bench_adaround(model, calib, plan, device, backend, compile_step, measure_memory=i == 0)
        log.info("%s: AdaRound (%s) measured in %.1fs", name, backend, time.perf_counter() - t1)
        if i == 0:
            memory = cache_report(name, model, ada.pop("memory"), device)
        adaround[backend] = ada
        ratios.update(unit_ratios(ada["units"], backend))
    return {"model": meta | {"name": name, "arch": _arch(model)}, "plan": asdict(plan), "ratios": ratios,
            **res, "adaround": adaround, "cache_memory": memory, "seconds": round(time.perf_counter() - t0, 2)}


def unit_ratios(units: dict[str, Any], backend: str) -> dict[str, float]:
    """Per unit kind, the worst (largest) ratio of its units: the issue's target is on every unit."""
    kinds = {"layer": ("layer_qkv", "layer_fc1"), "block": ("block_attn", "block_mlp"), "encoder": ("encoder",)}
    return {ratio_key(k, backend): max(units[u]["ratio"] for u in us) for k, us in kinds.items()}


def _arch(model: nn.Module) -> dict[str, int]:
    a = describe(model).arch()
    return {k: a[k] for k in ("image_size", "patch_size", "num_layers", "hidden_dim", "mlp_dim", "num_classes")}


def run_bench(models: Sequence[str], quick: bool, device_name: str = "auto",
              backends: Sequence[str] = ADAROUND_BACKENDS, compile_step: bool = True,
              onnx_out: Path | None = None, onnx: bool = True) -> dict[str, Any]:
    """Run the benchmark; the JSON-ready result.

    With ``onnx`` the onnxruntime comparison (``ptq.bench.onnxrt``, the same as ``--onnx``) runs last,
    its result under ``"onnx"`` and its ``ort_*`` ratios merged into each model's ratios; its models
    are written to ``onnx_out`` when given.
    """
    device = resolve_device(device_name)
    result: dict[str, Any] = {
        "created": _dt.datetime.now().isoformat(timespec="seconds"), "quick": quick, "device": device.type,
        "machine": machine_info(device), "targets": TARGETS, "models": {},
    }
    for name in models:
        result["models"][name] = bench_model(name, quick, device, backends, compile_step)
    targets = {name: dict(TARGETS) for name in models}
    if onnx:
        result["onnx"] = run_onnx_bench(list(models), quick, onnx_out)
        for name, ores in result["onnx"]["models"].items():
            result["models"][name]["ratios"].update(ores["ratios"])
            targets[name].update(ores["targets"])
    primary = "vit_b_16" if "vit_b_16" in result["models"] else models[0]
    result["ratios_model"] = primary
    result["ratios"] = dict(result["models"][primary]["ratios"])
    result["ratios_by_model"] = {k: v["ratios"] for k, v in result["models"].items()}
    result["targets_by_model"] = targets
    result["targets_met"] = {k: bool(v <= targets[primary][k]) for k, v in result["ratios"].items()
                             if k in targets[primary]}
    if "vit_b_16" in result["models"]:
        peak = result["models"]["vit_b_16"]["cache_memory"]["analytic"]["capture_peak_bytes"]
        result["targets_met"]["cache_bytes_vit_b_16_1024"] = bool(peak <= TARGETS["cache_bytes_vit_b_16_1024"])
    return result


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj)


def _onnx_part(result: dict[str, Any]) -> dict[str, Any]:
    """A full benchmark's onnxruntime comparison, dated and placed as an ``--onnx`` result is."""
    return result["onnx"] | {"created": result["created"], "cpu": result["machine"].get("cpu"),
                             "command": "python -m ptq.bench"}


def _saved_part(result: dict[str, Any], out: Path) -> dict[str, Any]:
    """A part's result (``--onnx``, ``--recon``) dated, with this CPU, written to ``out``."""
    result["created"] = _dt.datetime.now().isoformat(timespec="seconds")
    result["cpu"] = machine_info(torch.device("cpu")).get("cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=_json_default))
    log.info("wrote %s", out)
    return result


def _onnx_main(models: list[str], args: argparse.Namespace, loaded: dict[str, Any] | None) -> int:
    """``--onnx``: the onnxruntime comparison alone (or re-rendered from ``--from-json``: an ``--onnx``
    result, or a full benchmark's, whose ``"onnx"`` part it takes)."""
    if loaded is not None:
        result = _onnx_part(loaded) if "onnx" in loaded else loaded
    else:
        out = DEFAULT_ONNX_OUT if args.out == DEFAULT_OUT else args.out
        result = _saved_part(run_onnx_bench(models, args.quick, out.parent / "onnx_models"), out)
    print(onnx_table(result))
    if args.write is not None:
        page = write_pages(args.write)[ONNX_BLOCK]
        update_readme_onnx(page, result)
        log.info("updated the onnx block of %s", page)
    return 0


def _recon_main(args: argparse.Namespace, loaded: dict[str, Any] | None) -> int:
    """``--recon``: GPTQ against AdaRound at equal accuracy, real runs on the embedded default
    (``ptq.bench.recon``), or re-rendered from ``--from-json``."""
    if loaded is not None:
        result = loaded
    else:
        out = DEFAULT_RECON_OUT if args.out == DEFAULT_OUT else args.out
        result = _saved_part(run_recon_bench(args.quick, out.parent / "recon_runs", args.threads), out)
    print(render_recon(result))
    if args.write is not None:
        page = write_pages(args.write)[RECON_BLOCK]
        update_recon_block(page, result)
        log.info("updated the %s block of %s", RECON_BLOCK, page)
    return 0


def write_pages(write: Path) -> dict[str, Path]:
    """The page of each block for ``--write``: ``write``, or for ``HOME`` each block's own page."""
    return {b: block_page(b) if write == HOME else write for b in (PERF_BLOCK, ONNX_BLOCK, RECON_BLOCK)}


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m ptq.bench``."""
    p = argparse.ArgumentParser(prog="python -m ptq.bench", description=DESCRIPTION)
    p.add_argument("--quick", action="store_true", help="small sizes: the whole run takes under a minute on 2 cores")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--models", default="tiny,vit_b_16", help="comma-separated subset of tiny,vit_b_16")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    p.add_argument("--adaround-backend", default="both", choices=("both", *ADAROUND_BACKENDS),
                   help="nonlinear backend(s) of the AdaRound units (fp: what `wquant=adaround wbits=4` runs; "
                        "ivit: the integer table rows; both: each, ratios of ivit with an _ivit suffix)")
    p.add_argument("--adaround-compile", action=argparse.BooleanOptionalAction, default=True,
                   help="time the compiled AdaRound step, as runs do (adaround.compile); --no-adaround-compile: eager")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 gives steadier timings on a busy machine)")
    p.add_argument("--tune-malloc", action="store_true",
                   help="raise glibc's mmap/trim thresholds first (large CPU temporaries stop page-faulting)")
    p.add_argument("--write", "--readme", dest="write", type=Path, nargs="?", const=HOME, default=None, metavar="PAGE",
                   help="rewrite the perf:start/perf:end block (and the onnx block) of PAGE; --write alone: "
                        "each block on its own page (docs/benchmarks.md, docs/deployment.md)")
    p.add_argument("--onnx", action="store_true",
                   help="only the onnxruntime comparison: float.onnx against the W8A8 / W4A8 integer models "
                        "(JSON to --out, default outputs/bench_onnx.json; block onnx:start/onnx:end)")
    p.add_argument("--recon", action="store_true",
                   help="only GPTQ against AdaRound (block) at equal accuracy: real W4A8 ivit runs of the embedded "
                        "default, AdaRound at a ladder of iterations (JSON to --out, default "
                        "outputs/bench_recon.json; block recon_time:start/recon_time:end of docs/benchmarks.md)")
    p.add_argument("--skip-onnx", action="store_true",
                   help="leave out the onnxruntime comparison (the ort_* rows) that a full benchmark ends with")
    p.add_argument("--from-json", type=Path, default=None,
                   help="render --write / the table from this JSON instead of benchmarking")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    p = parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in ("tiny", "vit_b_16")]
    if bad or not models:
        p.error(f"--models: unknown {bad or 'empty list'}; choose from tiny,vit_b_16")
    loaded = None
    if args.from_json is not None:
        try:
            loaded = json.loads(args.from_json.read_text())
        except (OSError, ValueError) as exc:
            p.error(f"--from-json {args.from_json}: {exc}")
    if args.onnx and args.recon:
        p.error("--onnx and --recon each run one part alone; give one of them")
    if args.recon and args.write is not None:
        page = write_pages(args.write)[RECON_BLOCK]
        try:
            check_block(page, RECON_BLOCK)
        except (OSError, ValueError) as exc:
            p.error(f"--write {page}: {exc}")
    if args.recon:
        return _recon_main(args, loaded)
    if args.write is not None:  # fail before minutes of benchmarking
        with_onnx = args.onnx or ("onnx" in loaded if loaded is not None else not args.skip_onnx)
        blocks = [b for b, needed in ((PERF_BLOCK, not args.onnx), (ONNX_BLOCK, with_onnx)) if needed]
        for block in blocks:
            page = write_pages(args.write)[block]
            try:
                check_block(page, block)
            except (OSError, ValueError) as exc:
                p.error(f"--write {page}: {exc}")
    if args.onnx:
        return _onnx_main(models, args, loaded)
    if loaded is not None:
        result = loaded
    else:
        threads = torch.get_num_threads()
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        malloc_tuned = tune_malloc() if args.tune_malloc else False
        try:
            backends = ADAROUND_BACKENDS if args.adaround_backend == "both" else (args.adaround_backend,)
            result = run_bench(models, args.quick, args.device, backends, args.adaround_compile,
                               args.out.parent / "onnx_models", onnx=not args.skip_onnx)
        finally:
            torch.set_num_threads(threads)
        result["machine"]["malloc_tuned"] = malloc_tuned
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=_json_default))
        log.info("wrote %s", args.out)
    print(markdown_table(result))
    if args.write is not None:
        pages = write_pages(args.write)
        update_readme(pages[PERF_BLOCK], result, pages[ONNX_BLOCK])
        log.info("updated the Performance section of %s", pages[PERF_BLOCK])
        if "onnx" in result:
            update_readme_onnx(pages[ONNX_BLOCK], _onnx_part(result))
            log.info("updated the onnx block of %s", pages[ONNX_BLOCK])
    return 0

