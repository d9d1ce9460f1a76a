"""The benchmark's Markdown table and the "Performance" block (docs/benchmarks.md) rendered from its JSON."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ptq.atomic import block_page, replace_block, write_block
from ptq.bench.plans import CACHE_IMAGES, ONNX_BLOCK, PERF_BLOCK, RATIO_KEYS, TARGETS, ratio_key

log = logging.getLogger(__name__)


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def _ok(value: float, target: float) -> str:
    return "yes" if value <= target else "no"


def _adaround_row(label: str, backend: str, ada: dict[str, Any], kind: str, u: dict[str, Any]) -> str:
    t = TARGETS[ratio_key(kind.split("_")[0], backend)]
    return (f"| {label} | AdaRound {kind} `{u['unit']}`, {ada['settings']}, batch {ada['batch']} (ms/iter vs fwd+bwd) | "
            f"{1e3 * u['adaround_iter_s']:.2f} | {1e3 * u['float_fwd_bwd_s']:.2f} | {u['ratio']:.2f}x | "
            f"<= {t:g}x | {_ok(u['ratio'], t)} |")


def _ort_rows(label: str, ores: dict[str, Any]) -> list[str]:
    """The onnxruntime comparison of one model: each integer model against ``float.onnx``, batch N and 1."""
    rows = []
    f = ores["models"]["float"]
    for key, m in ores["models"].items():
        if key == "float":
            continue
        for suffix, col, batch in (("", "batch_ms", ores["batch"]), ("_b1", "b1_ms", 1)):
            rk = f"ort_{key}{suffix}"
            t = ores["targets"].get(rk)
            tcol, met = (f"<= {t:g}x", _ok(ores["ratios"][rk], t)) if t is not None else ("", "")
            rows.append(f"| {label} | onnxruntime `{rk}`: {key.removeprefix('int_').upper()} integer ONNX vs "
                        f"float.onnx, batch {batch} (ms/batch) | {m[col]:.1f} | {f[col]:.1f} | "
                        f"{ores['ratios'][rk]:.2f}x | {tcol} | {met} |")
    return rows


def markdown_table(result: dict[str, Any]) -> str:
    """One row per measurement: quantized, float, ratio (quantized/float time) and the target."""
    rows = ["| model | measurement | quantized | float | ratio | target | met |",
            "| --- | --- | ---: | ---: | ---: | ---: | :---: |"]
    for name, m in result["models"].items():
        arch = m["model"]["arch"]
        label = f"{name} ({arch['num_layers']}L)" if m["model"].get("reduced_depth") else name
        ev = m["eval"]
        for key, title in (("fp_ops", "eval W8A8 fp ops"), ("ivit", "eval W8A8 ivit")):
            r = ev[key]["ratio_to_float"]
            t = TARGETS[f"eval_{key}"]
            rows.append(f"| {label} | {title}, batch {ev['batch']} (img/s) | {ev[key]['images_per_s']:.1f} | "
                        f"{ev['float']['images_per_s']:.1f} | {r:.2f}x | <= {t:g}x | {_ok(r, t)} |")
        cal = m["calibration"]
        rows.append(f"| {label} | calibration, observe mode (img/s) | {cal['images_per_s']:.1f} | "
                    f"{cal['float_images_per_s']:.1f} | {cal['ratio_to_float']:.2f}x | | |")
        if name in result.get("onnx", {}).get("models", {}):
            rows += _ort_rows(label, result["onnx"]["models"][name])
        rows += [_adaround_row(label, backend, ada, kind, u)
                 for backend, ada in m["adaround"].items() for kind, u in ada["units"].items()]
        mem = m["cache_memory"]
        ana, meas = mem["analytic"], mem["measured"]
        target = TARGETS["cache_bytes_vit_b_16_1024"] if name == "vit_b_16" else None
        tcol = f"<= {_gb(target)}" if target else ""
        met = _ok(ana["capture_peak_bytes"], target) if target else ""
        rows.append(f"| {name} | block caches @{CACHE_IMAGES} img, analytic (steady / capture peak) | "
                    f"{_gb(ana['steady_bytes'])} / {_gb(ana['capture_peak_bytes'])} | | | {tcol} | {met} |")
        rows.append(f"| {name} | block caches @{CACHE_IMAGES} img, measured & scaled (stored / RSS peak) | "
                    f"{_gb(meas['measured_steady_bytes_at_1024'])} / "
                    f"{_gb(meas['measured_capture_peak_bytes_at_1024'])} | | | {tcol} | "
                    f"{_ok(meas['measured_capture_peak_bytes_at_1024'], target) if target else ''} |")
        if "host_total_estimate_bytes" in mem:
            rows.append(f"| {name} | reconstruction host total @{CACHE_IMAGES} img (images + caches + models) | "
                        f"{_gb(mem['host_total_estimate_bytes'])} | | | | |")
    return "\n".join(rows)


def render_readme_section(result: dict[str, Any], page: Path | None = None, onnx_page: Path | None = None) -> str:
    """The "Performance" section (markers excluded) for a benchmark result, to be written to ``page``
    (default: its own, ``ptq.atomic.BLOCK_PAGES``), linking to the onnx block on ``onnx_page``."""
    page = Path(page) if page is not None else block_page(PERF_BLOCK)
    onnx_page = Path(onnx_page) if onnx_page is not None else block_page(ONNX_BLOCK)
    onnx_link = "" if onnx_page == page else Path(os.path.relpath(onnx_page, page.parent)).as_posix()
    write = "--write" if page == block_page(PERF_BLOCK) and onnx_page == block_page(ONNX_BLOCK) else f"--write {page}"
    mach = result["machine"]
    r = result["ratios"]
    notes = []
    for name, m in result["models"].items():
        arch = m["model"]["arch"]
        desc = f"`{name}`: {m['model']['weights']} weights, {arch['num_layers']} layers x {arch['hidden_dim']} wide"
        if m["model"].get("reduced_depth"):
            desc += " (vit_b_16 width at reduced depth, quick mode)"
        notes.append(desc)
    summary = ", ".join(f"{k} {r[k]:.2f}x" for k in (*RATIO_KEYS, *sorted(k for k in r if k.startswith("ort_")))
                        if k in r)
    malloc = " glibc malloc thresholds raised (`--tune-malloc`)." if mach.get("malloc_tuned") else ""
    lines = [
        "## Performance",
        "",
        f"Measured by `python -m ptq.bench{' --quick' if result['quick'] else ''}` on {result['created'][:10]}: "
        f"device `{result['device']}` ({mach['device_name']}), {mach['cpu_usable']} usable of {mach['cpu_count']} "
        f"CPUs ({mach['torch_threads']} torch threads), torch {mach['torch']}, {mach['platform']}. "
        f"Random-weight `vit_b_16`; the tiny model is the "
        f"embedded digits ViT ({'; '.join(notes)}). Ratios are quantized time / float time, measured interleaved "
        f"in one process (median over repeats); AdaRound iterations are timed inside `train_unit` against one "
        f"plain forward+backward of the float unit on the same batch; an `adaround_*` ratio is the worst unit of its "
        f"kind.{malloc}",
        *(["", f"The `ort_*` rows are `python -m ptq.bench --onnx`'s comparison, run as the last part of this "
               f"benchmark: the float model exported by `torch.onnx.export` against the W8A8 and W4A8 ivit integer "
               f"models of `ptq.intexec` on {result['onnx']['runtime']} (CPU execution provider, "
               f"{result['onnx']['threads']} threads), timed interleaved in one process. The integer model's "
               f"profile by role is in [Deploying the integer model]({onnx_link}#deploying-the-integer-model), the levers "
               f"in `docs/performance.md`."] if "onnx" in result else []),
        "",
        f"Headline ratios ({result['ratios_model']}): {summary}.",
        "",
        markdown_table(result),
        "",
        f"Regenerate: `python -m ptq.bench --out outputs/bench.json {write}`.",
    ]
    return "\n".join(lines)


def _no_markers(exc: ValueError) -> ValueError:
    return ValueError(f"{exc}; add both markers where the Performance section should go")


def replace_marked_block(text: str, section: str) -> str:
    """``text`` with its perf block replaced by ``section`` (``ptq.atomic.replace_block``); ValueError
    naming the markers when they are missing."""
    try:
        return replace_block(text, PERF_BLOCK, section)
    except ValueError as exc:
        raise _no_markers(exc) from None


def update_readme(path: Path, result: dict[str, Any], onnx_page: Path | None = None) -> None:
    """Rewrite the marked Performance block of ``path`` in place (``ptq.atomic.write_block``, as ``ptq.table``);
    its link to the onnx block points at ``onnx_page`` (default: ``path`` itself)."""
    try:
        write_block(path, PERF_BLOCK, render_readme_section(result, path, path if onnx_page is None else onnx_page))
    except ValueError as exc:
        raise _no_markers(exc) from None
