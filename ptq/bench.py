"""Performance benchmark: quantized evaluation, AdaRound iterations, calibration and cache memory.

``python -m ptq.bench [--quick] [--device auto|cpu|cuda] [--models tiny,vit_b_16] [--out FILE.json]``
(``--threads 1`` for steadier CPU timings on a shared machine, ``--tune-malloc`` to raise glibc's
mmap threshold) measures, on the embedded tiny model and on a randomly initialised vit_b_16-shaped model:

* evaluation throughput of the float torchvision model, the calibrated W8A8 ``QuantViT``
  with float nonlinear ops (``fp``) and with the integer I-ViT backend (``ivit``);
* the time of one AdaRound iteration (the loop body of ``ptq.recon.adaround.train_unit``,
  timed inside the real function, so compiled as in a run) for layer,
  block and encoder units, next to one plain eager
  forward+backward of the same float unit on the same batch;
* calibration throughput (observe mode) and its peak memory;
* the host memory of the block-granularity reconstruction caches of vit_b_16 at 1024
  calibration images, analytically (from what ``Cached.pack`` stores) and measured at
  two smaller image counts, extrapolated linearly.

Every quantized time is measured interleaved with its float counterpart in the same
process and reported as a ratio (median over repeats), since absolute timings on a
shared machine are noisy. Results go to a JSON file (top-level ``ratios``) and a
Markdown table on stdout; ``--readme README.md`` renders a "Performance" section
between ``<!-- perf:start -->`` and ``<!-- perf:end -->`` in that file.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime as _dt
import gc
import itertools
import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import vit_b_16
from torchvision.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm

from ptq.config import AdaRoundConfig, LSQConfig
from ptq.pipeline import calibrate, resolve_device
from ptq.quant.nonlinear import Backend
from ptq.quant.vit import QuantSettings, QuantViT
from ptq.recon import adaround
from ptq.recon.adaround import Cached, capture, install_adaround, recon_loss
from ptq.runtime import tune_malloc

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("outputs/bench.json")
MARK_START = "<!-- perf:start -->"
MARK_END = "<!-- perf:end -->"
RATIO_KEYS = ("eval_fp_ops", "eval_ivit", "adaround_layer", "adaround_block", "adaround_encoder")
#: What the project aims for (reported, never asserted).
TARGETS = {
    "eval_fp_ops": 2.0,
    "eval_ivit": 3.0,
    "adaround_layer": 1.5,
    "adaround_block": 1.5,
    "adaround_encoder": 1.5,
    "cache_bytes_vit_b_16_1024": 4 * 10**9,
}
CACHE_IMAGES = 1024  # the calibration-set size of the cache-memory estimate
VIT_B_16_ARCH: dict[str, int] = {"image_size": 224, "patch_size": 16, "num_layers": 12, "num_heads": 12,
                                 "hidden_dim": 768, "mlp_dim": 3072, "num_classes": 1000}


# ----------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Plan:
    """How much of everything to run for one model."""

    num_layers: int | None  # reduced depth (same width) or None for the model's own
    eval_batch: int
    eval_repeats: int
    calib_images: int
    calib_batch: int
    calib_repeats: int
    ada_batch: int
    ada_iters: int  # timed iterations per repeat (one more is run and dropped as warm-up)
    ada_repeats: int
    ada_cache_images: int
    mem_images: tuple[int, int]  # two image counts for the linear fit of the cache memory
    mem_batch: int


PLANS: dict[tuple[str, bool], Plan] = {
    ("tiny", True): Plan(None, 64, 5, 128, 64, 2, 32, 6, 2, 64, (128, 512), 32),
    ("tiny", False): Plan(None, 256, 9, 1024, 128, 3, 32, 30, 5, 256, (256, 512), 128),
    ("vit_b_16", True): Plan(2, 2, 2, 2, 2, 1, 2, 2, 1, 2, (32, 96), 4),
    ("vit_b_16", False): Plan(None, 8, 3, 32, 8, 2, 32, 4, 2, 32, (64, 192), 8),
}


# ----------------------------------------------------------------------------- timing / memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock seconds of ``fn()``, synchronising CUDA before and after."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _proc_status_kib(key: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else None


def _rss_bytes() -> int:
    """Current resident set size (``/proc/self/status`` VmRSS, else ``getrusage`` peak)."""
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS so that RSS deltas count new allocations only."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


@dataclass
class Peak:
    """Peak memory of a block: host RSS above its start, and CUDA allocated (bytes)."""

    host_start: int = 0
    host_peak: int = 0
    cuda_peak: int | None = None
    method: str = ""

    @property
    def host_delta(self) -> int:
        return max(0, self.host_peak - self.host_start)

    def as_dict(self) -> dict[str, Any]:
        return {"host_peak_bytes": self.host_peak, "host_delta_bytes": self.host_delta,
                "cuda_peak_bytes": self.cuda_peak, "method": self.method}


@contextmanager
def peak_memory(device: torch.device) -> Iterator[Peak]:
    """Measure peak host RSS (VmHWM after a reset, else a 2 ms sampler thread) and CUDA peak."""
    gc.collect()
    _malloc_trim()
    peak = Peak(host_start=_rss_bytes())
    stop = threading.Event()
    sampler: threading.Thread | None = None
    if _reset_hwm():
        peak.method = "VmHWM"
    else:
        peak.method = "sampled"
        samples = [peak.host_start]

        def sample() -> None:
            while not stop.wait(0.002):
                samples.append(_rss_bytes())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield peak
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak.cuda_peak = int(torch.cuda.max_memory_allocated(device))
        if sampler is not None:
            stop.set()
            sampler.join()
            peak.host_peak = max(samples + [_rss_bytes()])
        else:
            peak.host_peak = (_proc_status_kib("VmHWM") or 0) * 1024


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


@contextmanager
def _iteration_clock(stamps: list[float], device: torch.device) -> Iterator[None]:
    """Replace ``adaround.tqdm`` by an iterator that timestamps every loop iteration of ``train_unit``.

    The stamp before item ``i`` and the one before item ``i+1`` bound exactly one
    execution of the loop body, so nothing of ``train_unit`` is re-implemented here.
    """

    class Clock:
        def __init__(self, iterable: Any, *args: Any, **kwargs: Any) -> None:
            self.iterable = iterable

        def __iter__(self) -> Iterator[Any]:
            for item in self.iterable:
                _sync(device)
                stamps.append(time.perf_counter())
                yield item
            _sync(device)
            stamps.append(time.perf_counter())

        def set_postfix(self, *args: Any, **kwargs: Any) -> None:
            pass

        def close(self) -> None:
            pass

    saved = adaround.tqdm
    adaround.tqdm = Clock  # type: ignore[assignment]
    try:
        yield
    finally:
        adaround.tqdm = saved


# ----------------------------------------------------------------------------- models and data


def machine_info(device: torch.device) -> dict[str, Any]:
    """Platform, CPU, torch version and the device's name."""
    cpu_name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if m:
            cpu_name = m.group(1).strip()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name,
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name,
    }
    return info


def build_model(name: str, plan: Plan) -> tuple[VisionTransformer, dict[str, Any]]:
    """The float model to benchmark and a description of it (weights, depth)."""
    if name == "tiny":
        from ptq.models.tiny import build_tiny_vit, load_tiny_digits

        try:
            return load_tiny_digits(), {"weights": "checkpoint"}
        except (FileNotFoundError, ValueError) as exc:
            log.warning("tiny checkpoint unavailable (%s); random weights (timing does not care)", exc)
            torch.manual_seed(0)
            return build_tiny_vit().eval(), {"weights": "random"}
    if name == "vit_b_16":
        torch.manual_seed(0)
        if plan.num_layers is None:
            return vit_b_16(weights=None).eval(), {"weights": "random", "num_layers": 12, "reduced_depth": False}
        arch = {**VIT_B_16_ARCH, "num_layers": plan.num_layers}
        return VisionTransformer(**arch).eval(), {"weights": "random", "num_layers": plan.num_layers,
                                                  "reduced_depth": True, "note": "vit_b_16 width, reduced depth"}
    raise ValueError(f"unknown model {name!r}; expected tiny or vit_b_16")


def images_for(name: str, model: VisionTransformer, count: int, split: str = "test") -> Tensor:
    """``count`` input images: augmented digits for the tiny model, standard normal otherwise."""
    if name == "tiny":
        try:
            from ptq.data.digits import digits_splits

            pool = digits_splits(image_size=model.image_size, seed=0)[split].tensors[0]
            reps = math.ceil(count / pool.shape[0])
            return pool.repeat(reps, 1, 1, 1)[:count].clone()
        except Exception as exc:  # the data module is optional for timing
            log.warning("digits data unavailable (%s); random images", exc)
    gen = torch.Generator().manual_seed(1 if split == "test" else 2)
    return torch.randn(count, 3, model.image_size, model.image_size, generator=gen)


def _batches(images: Tensor, batch: int) -> list[tuple[Tensor, Tensor]]:
    return [(images[i:i + batch], torch.zeros(0)) for i in range(0, images.shape[0], batch)]


def calibrated(model: VisionTransformer, st: QuantSettings, images: Tensor, batch: int,
               device: torch.device) -> QuantViT:
    """A QuantViT of ``model`` calibrated on ``images`` (moving-average absmax), in quant mode."""
    q = QuantViT(model, st).to(device)
    calibrate(q, _batches(images, batch), device)
    return q


# ----------------------------------------------------------------------------- evaluation


def bench_eval(model: VisionTransformer, calib: Tensor, images: Tensor, plan: Plan,
               device: torch.device) -> tuple[dict[str, Any], QuantViT]:
    """Throughput of float, W8A8 fp-ops and W8A8 ivit, interleaved; also calibration throughput."""
    fp = model.to(device)
    q_fp = QuantViT(model, QuantSettings(wbits=8, abits=8)).to(device)
    batches = _batches(calib, plan.calib_batch)

    # calibration: observe-mode passes of q_fp, each next to a float pass over the same images
    calib_t: list[float] = []
    float_t: list[float] = []
    peak: Peak | None = None
    with torch.no_grad():
        fp(batches[0][0].to(device))  # warm-up
        for r in tqdm(range(plan.calib_repeats), desc="calibration", leave=False):
            float_t.append(time_call(lambda: [fp(x.to(device)) for x, _ in batches], device))
            if r == 0:
                with peak_memory(device) as peak:
                    calib_t.append(time_call(lambda: calibrate(q_fp, batches, device), device))
            else:
                calib_t.append(time_call(lambda: calibrate(q_fp, batches, device), device))
    assert peak is not None
    n_calib = calib.shape[0]
    calibration = {
        "images": n_calib, "batch": plan.calib_batch, "repeats": plan.calib_repeats,
        "images_per_s": n_calib / _median(calib_t), "float_images_per_s": n_calib / _median(float_t),
        "ratio_to_float": _median([c / f for c, f in zip(calib_t, float_t, strict=True)]),
        "seconds": calib_t, "float_seconds": float_t, "memory": peak.as_dict(),
    }

    q_iv = QuantViT(model, QuantSettings(wbits=8, abits=8, backend=Backend("ivit"))).to(device)
    q_iv.load_state_dict(q_fp.state_dict())
    q_iv.freeze()
    variants: dict[str, nn.Module] = {"float": fp, "fp_ops": q_fp, "ivit": q_iv}
    x = images[:plan.eval_batch].to(device)
    times: dict[str, list[float]] = {k: [] for k in variants}
    peaks: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for name, m in variants.items():  # warm-up, with the peak memory of one batch
            with peak_memory(device) as pk:
                m(x)
            peaks[name] = pk.as_dict()
        names = list(variants)
        for r in tqdm(range(plan.eval_repeats), desc="eval", leave=False):
            for name in names[r % 3:] + names[:r % 3]:  # rotate the order against position bias
                times[name].append(time_call(lambda m=variants[name]: m(x), device))
    result: dict[str, Any] = {"batch": plan.eval_batch, "repeats": plan.eval_repeats, "settings": "W8A8"}
    for name in variants:
        result[name] = {"images_per_s": plan.eval_batch / _median(times[name]), "seconds": times[name],
                        "memory": peaks[name]}
        if name != "float":
            result[name]["ratio_to_float"] = _median([t / f for t, f in zip(times[name], times["float"], strict=True)])
    return {"eval": result, "calibration": calibration}, q_fp


# ----------------------------------------------------------------------------- AdaRound


class _FloatAttn(nn.Module):
    """torchvision EncoderBlock's first half: ln_1 -> self_attention -> + residual."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.ln_1, self.self_attention = block.ln_1, block.self_attention

    def forward(self, x: Tensor) -> Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        return x + y


class _FloatMLP(nn.Module):
    """torchvision EncoderBlock's second half: ln_2 -> mlp -> + residual."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.ln_2, self.mlp = block.ln_2, block.mlp

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.ln_2(x))


def float_units(block: nn.Module) -> dict[str, nn.Module]:
    """Trainable float copies of one torchvision EncoderBlock's units (same names as the quantized ones)."""
    blk = copy.deepcopy(block)
    mha = blk.self_attention
    qkv = nn.Linear(mha.embed_dim, 3 * mha.embed_dim)
    with torch.no_grad():
        qkv.weight.copy_(mha.in_proj_weight)
        qkv.bias.copy_(mha.in_proj_bias)
    units = {"layer_qkv": qkv, "layer_fc1": blk.mlp[0], "block_attn": _FloatAttn(blk),
             "block_mlp": _FloatMLP(blk), "encoder": blk}
    for u in units.values():
        u.requires_grad_(True)
    return units


def quant_units(q: QuantViT, b: int) -> dict[str, tuple[str, nn.Module]]:
    """The quantized units of block ``b`` by kind: (name as in units_of, module)."""
    blk = q.blocks[b]
    return {"layer_qkv": (f"blocks.{b}.attn.qkv", blk.attn.qkv), "layer_fc1": (f"blocks.{b}.mlp.fc1", blk.mlp.fc1),
            "block_attn": (f"blocks.{b}.attn", blk.attn), "block_mlp": (f"blocks.{b}.mlp", blk.mlp),
            "encoder": (f"blocks.{b}", blk)}


def _adaround_cfg(plan: Plan, backend: str, compile_step: bool = True) -> SimpleNamespace:
    """The run config ``train_unit`` reads: defaults (so the step is compiled, as in a run)
    but for iterations and batch size."""
    ada = AdaRoundConfig(iters=plan.ada_iters + 1, batch_size=plan.ada_batch, early_stop=0.0, compile=compile_step)
    return SimpleNamespace(adaround=ada, lsq=LSQConfig(enabled=True), nonlinear=SimpleNamespace(name=backend))


def time_adaround_iters(name: str, unit: nn.Module, inputs: Cached, targets: Cached, plan: Plan,
                        device: torch.device, seed: int, run_cfg: SimpleNamespace) -> tuple[list[float], float]:
    """Per-iteration seconds of ``train_unit`` on this unit (first dropped) and the whole call's seconds."""
    stamps: list[float] = []
    with _iteration_clock(stamps, device):
        total = time_call(lambda: adaround.train_unit(name, unit, inputs, targets, run_cfg, device,
                                                      seed), device)
    gaps = [b - a for a, b in itertools.pairwise(stamps)][1:]
    if not gaps:  # train_unit no longer iterates through adaround.tqdm: fall back to the whole call
        log.warning("no per-iteration stamps from train_unit; using the whole call / iterations (includes setup)")
        gaps = [total / (plan.ada_iters + 1)]
    return gaps, total


def time_float_steps(unit: nn.Module, x: Tensor, y: Tensor, n: int, device: torch.device) -> list[float]:
    """Seconds of ``n`` plain forward+backward passes (recon loss, weight gradients) of a float unit."""
    params = [p for p in unit.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        recon_loss(unit(x), y).backward()

    step()  # warm-up
    return [time_call(step, device) for _ in range(n)]


def _bench_unit(kind: str, named: tuple[str, nn.Module], twin_unit: nn.Module, float_unit: nn.Module, q: QuantViT,
                twin: QuantViT, imgs: Tensor, plan: Plan, device: torch.device,
                run_cfg: SimpleNamespace) -> dict[str, Any]:
    """Median AdaRound iteration and float forward+backward seconds of one unit, over ``plan.ada_repeats``."""
    name, unit = named
    inputs = capture(q, unit, imgs, device, "input", plan.calib_batch)
    targets = capture(twin, twin_unit, imgs, device, "output", plan.calib_batch)
    idx = torch.arange(plan.ada_batch)
    x, y = inputs.take_real(idx, device), targets.take_real(idx, device)
    ada_med: list[float] = []
    flt_med: list[float] = []
    totals: list[float] = []
    for r in range(plan.ada_repeats):
        gaps, total = time_adaround_iters(name, unit, inputs, targets, plan, device, seed=r, run_cfg=run_cfg)
        flt = time_float_steps(float_unit, x, y, plan.ada_iters, device)
        ada_med.append(_median(gaps))
        flt_med.append(_median(flt))
        totals.append(total)
    res = {
        "unit": name, "adaround_iter_s": _median(ada_med), "float_fwd_bwd_s": _median(flt_med),
        "ratio": _median([a / f for a, f in zip(ada_med, flt_med, strict=True)]),
        "adaround_iter_s_per_repeat": ada_med, "float_fwd_bwd_s_per_repeat": flt_med,
        "train_unit_call_s": totals,
    }
    log.info("adaround %s (%s): %.2f ms/iter vs float fwd+bwd %.2f ms -> %.2fx", kind, name,
             1e3 * res["adaround_iter_s"], 1e3 * res["float_fwd_bwd_s"], res["ratio"])
    return res


def bench_adaround(model: VisionTransformer, calib: Tensor, plan: Plan, device: torch.device,
                   backend: str, compile_step: bool = True) -> dict[str, Any]:
    """AdaRound iteration vs float forward+backward for layer, block and encoder units of the middle block."""
    st = QuantSettings(wbits=4, abits=8, backend=Backend(backend))
    q = calibrated(model, st, calib, plan.calib_batch, device)
    install_adaround(q)
    q.to(device)
    twin = QuantViT(model, QuantSettings(wbits=None, abits=None)).to(device)
    twin.set_mode("off")
    b = len(q.blocks) // 2
    qu, tu = quant_units(q, b), quant_units(twin, b)
    fu = {k: u.to(device) for k, u in float_units(model.encoder.layers[b]).items()}
    imgs = calib[:plan.ada_cache_images]
    if imgs.shape[0] < plan.ada_batch:
        imgs = imgs.repeat(math.ceil(plan.ada_batch / imgs.shape[0]), 1, 1, 1)[:max(plan.ada_batch, imgs.shape[0])]
    out: dict[str, Any] = {
        "settings": f"W4A8 {backend}, LSQ, {'compiled' if compile_step else 'eager'}", "block": b, "batch": plan.ada_batch, "iters": plan.ada_iters,
        "repeats": plan.ada_repeats, "cache_images": imgs.shape[0], "units": {},
    }
    for kind in tqdm(qu, desc="adaround units", leave=False):
        with adaround.flush_denormals():  # as reconstruct_model runs it
            out["units"][kind] = _bench_unit(kind, qu[kind], tu[kind][1], fu[kind], q, twin, imgs, plan, device,
                                             _adaround_cfg(plan, backend, compile_step))
    t0 = time.perf_counter()
    out["memory"] = bench_cache_memory(q, twin, calib, plan, device)
    log.info("cache memory measured in %.1fs", time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------- cache memory


def cache_bytes_analytic(tokens: int, dim: int, images: int, device_type: str = "cpu") -> dict[str, Any]:
    """Host bytes of one block unit's caches at ``images`` images, from what ``Cached.pack`` stores.

    Inputs (the INT16 residual stream) are packed as int16; targets (float) as float32, or
    float16 once they pass ``FLOAT16_ABOVE_BYTES``. While packing, ``capture`` still holds
    the per-batch outputs: on the CPU that is float32 inputs (4 B) next to their int16 copies
    and the concatenation (2 + 2 B); for targets float32 outputs, their dequantized copies and
    the concatenation (3 x 4 B), with the packed inputs alive (2 B). On CUDA the per-batch
    outputs stay on the device and only the copies and concatenations are on the host.
    """
    n = images * tokens * dim
    target_elem = 4 if n * 4 <= adaround.FLOAT16_ABOVE_BYTES else 2
    inputs, targets = n * 2, n * target_elem
    if device_type == "cuda":
        peak_in = n * (2 + 2)
        peak_tg = inputs + n * (4 + 4) + (n * 2 if target_elem == 2 else 0)
    else:
        peak_in = n * (4 + 2 + 2)
        peak_tg = inputs + n * (4 + 4 + 4) + (n * 2 if target_elem == 2 else 0)
    return {"images": images, "tokens": tokens, "dim": dim, "inputs_bytes": inputs, "targets_bytes": targets,
            "inputs_dtype": "int16", "targets_dtype": "float32" if target_elem == 4 else "float16",
            "steady_bytes": inputs + targets, "capture_peak_bytes": max(peak_in, peak_tg)}


def _module_bytes(*mods: nn.Module) -> int:
    return sum(t.nbytes for m in mods for t in [*m.parameters(), *m.buffers()])


def model_bytes_vit_b_16() -> dict[str, int]:
    """Host bytes of the three models reconstruction keeps (float, AdaRound QuantViT, float twin), on meta."""
    with torch.device("meta"):
        m = vit_b_16(weights=None)
        q = QuantViT(m, QuantSettings(wbits=4, abits=8))
        install_adaround(q)
        twin = QuantViT(m, QuantSettings(wbits=None, abits=None))
    return {"float": _module_bytes(m), "quant_adaround": _module_bytes(q), "twin": _module_bytes(twin)}


def bench_cache_memory(q: QuantViT, twin: QuantViT, calib: Tensor, plan: Plan,
                       device: torch.device) -> dict[str, Any]:
    """Measured host memory of a block unit's caches at two image counts, fitted linearly to CACHE_IMAGES.

    The unit is ``blocks.0.attn`` (every block unit's caches have the same shape; this one
    needs the least computing). The stored size is exactly linear in the image count; the
    RSS peak of capturing also has a fixed part (one batch's activations), which the
    two-point fit separates from the per-image part.
    """
    unit, twin_unit = q.blocks[0].attn, twin.blocks[0].attn
    points = []
    for n in plan.mem_images:
        imgs = calib.repeat(math.ceil(n / calib.shape[0]), 1, 1, 1)[:n].contiguous()
        with peak_memory(device) as pk:
            inputs = capture(q, unit, imgs, device, "input", plan.mem_batch)
            targets = capture(twin, twin_unit, imgs, device, "output", plan.mem_batch)
        stored = inputs.v.nbytes + targets.v.nbytes + (inputs.s.nbytes if inputs.s is not None else 0)
        points.append({"images": n, "stored_bytes": stored, "peak": pk.as_dict(),
                       "inputs_dtype": str(inputs.v.dtype), "targets_dtype": str(targets.v.dtype)})
        del inputs, targets, imgs
    (n1, n2), (p1, p2) = plan.mem_images, points
    d1, d2 = p1["peak"]["host_delta_bytes"], p2["peak"]["host_delta_bytes"]
    slope_stored = (p2["stored_bytes"] - p1["stored_bytes"]) / (n2 - n1)
    slope = (d2 - d1) / (n2 - n1)
    if slope > 0:
        fixed = max(0.0, d2 - slope * n2)
        fit = "two-point"
    else:  # noise swamped the difference: charge the whole peak to the images (an upper bound)
        slope, fixed, fit = d2 / n2, 0.0, "upper bound (peak / images)"
    elems = unit.ln.normalized_shape[0] * ((calib.shape[-1] // q.embed.patch) ** 2 + 1)
    return {
        "unit": "blocks.0.attn", "batch": plan.mem_batch, "points": points, "fit": fit,
        "peak_bytes_per_image": slope, "peak_fixed_bytes": fixed,
        "peak_bytes_per_element": slope / elems,
        "measured_steady_bytes_at_1024": slope_stored * CACHE_IMAGES,
        "measured_capture_peak_bytes_at_1024": fixed + slope * CACHE_IMAGES,
    }


def cache_report(name: str, model: VisionTransformer, measured: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Analytic and measured cache memory at CACHE_IMAGES images, and the reconstruction stage's host total."""
    tokens = (model.image_size // model.patch_size) ** 2 + 1
    ana = cache_bytes_analytic(tokens, model.hidden_dim, CACHE_IMAGES, device.type)
    images_bytes = CACHE_IMAGES * 3 * model.image_size ** 2 * 4
    report: dict[str, Any] = {"analytic": ana, "measured": measured, "calib_images_bytes": images_bytes}
    if name == "vit_b_16":
        models = model_bytes_vit_b_16()
        host_models = sum(models.values()) if device.type == "cpu" else models["float"]
        report["models_bytes"] = models
        report["host_total_estimate_bytes"] = images_bytes + ana["capture_peak_bytes"] + host_models
    return report


# ----------------------------------------------------------------------------- driver


def bench_model(name: str, quick: bool, device: torch.device, backend: str, compile_step: bool = True) -> dict[str, Any]:
    """Every measurement for one model."""
    plan = PLANS[(name, quick)]
    model, meta = build_model(name, plan)
    log.info("benchmarking %s (%s) on %s", name, meta, device)
    calib = images_for(name, model, max(plan.calib_images, plan.ada_cache_images, plan.ada_batch), "train")
    images = images_for(name, model, plan.eval_batch, "test")
    t0 = time.perf_counter()
    res, _ = bench_eval(model, calib[:plan.calib_images], images, plan, device)
    log.info("%s: calibration and eval measured in %.1fs", name, time.perf_counter() - t0)
    t1 = time.perf_counter()
    ada = bench_adaround(model, calib, plan, device, backend, compile_step)
    log.info("%s: AdaRound and caches measured in %.1fs", name, time.perf_counter() - t1)
    units = ada["units"]
    ratios = {
        "eval_fp_ops": res["eval"]["fp_ops"]["ratio_to_float"],
        "eval_ivit": res["eval"]["ivit"]["ratio_to_float"],
        "adaround_layer": (units["layer_qkv"]["ratio"] + units["layer_fc1"]["ratio"]) / 2,
        "adaround_block": (units["block_attn"]["ratio"] + units["block_mlp"]["ratio"]) / 2,
        "adaround_encoder": units["encoder"]["ratio"],
    }
    memory = cache_report(name, model, ada.pop("memory"), device)
    return {"model": meta | {"name": name, "arch": _arch(model)}, "plan": asdict(plan), "ratios": ratios,
            **res, "adaround": ada, "cache_memory": memory, "seconds": round(time.perf_counter() - t0, 2)}


def _arch(model: VisionTransformer) -> dict[str, int]:
    return {"image_size": model.image_size, "patch_size": model.patch_size, "num_layers": len(model.encoder.layers),
            "hidden_dim": model.hidden_dim, "mlp_dim": model.mlp_dim, "num_classes": model.num_classes}


def run_bench(models: Sequence[str], quick: bool, device_name: str = "auto", backend: str = "fp",
              compile_step: bool = True) -> dict[str, Any]:
    """Run the benchmark; the JSON-ready result."""
    device = resolve_device(device_name)
    result: dict[str, Any] = {
        "created": _dt.datetime.now().isoformat(timespec="seconds"), "quick": quick, "device": device.type,
        "machine": machine_info(device), "targets": TARGETS, "models": {},
    }
    for name in models:
        result["models"][name] = bench_model(name, quick, device, backend, compile_step)
    primary = "vit_b_16" if "vit_b_16" in result["models"] else models[0]
    result["ratios_model"] = primary
    result["ratios"] = dict(result["models"][primary]["ratios"])
    result["ratios_by_model"] = {k: v["ratios"] for k, v in result["models"].items()}
    result["targets_met"] = {k: bool(v <= TARGETS[k]) for k, v in result["ratios"].items()}
    if "vit_b_16" in result["models"]:
        peak = result["models"]["vit_b_16"]["cache_memory"]["analytic"]["capture_peak_bytes"]
        result["targets_met"]["cache_bytes_vit_b_16_1024"] = bool(peak <= TARGETS["cache_bytes_vit_b_16_1024"])
    return result


# ----------------------------------------------------------------------------- reporting


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def _ok(value: float, target: float) -> str:
    return "yes" if value <= target else "no"


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
        ada = m["adaround"]
        for kind, u in ada["units"].items():
            t = TARGETS["adaround_" + kind.split("_")[0]]
            rows.append(f"| {label} | AdaRound {kind} `{u['unit']}`, {ada['settings']}, batch {ada['batch']} "
                        f"(ms/iter vs fwd+bwd) | "
                        f"{1e3 * u['adaround_iter_s']:.2f} | {1e3 * u['float_fwd_bwd_s']:.2f} | {u['ratio']:.2f}x | "
                        f"<= {t:g}x | {_ok(u['ratio'], t)} |")
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


def render_readme_section(result: dict[str, Any]) -> str:
    """The README "Performance" section (markers excluded) for a benchmark result."""
    mach = result["machine"]
    r = result["ratios"]
    notes = []
    for name, m in result["models"].items():
        arch = m["model"]["arch"]
        desc = f"`{name}`: {m['model']['weights']} weights, {arch['num_layers']} layers x {arch['hidden_dim']} wide"
        if m["model"].get("reduced_depth"):
            desc += " (vit_b_16 width at reduced depth, quick mode)"
        notes.append(desc)
    summary = ", ".join(f"{k} {r[k]:.2f}x" for k in RATIO_KEYS)
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
        f"plain forward+backward of the float unit on the same batch.{malloc}",
        "",
        f"Headline ratios ({result['ratios_model']}): {summary}.",
        "",
        markdown_table(result),
        "",
        "Regenerate: `python -m ptq.bench --out outputs/bench.json --readme README.md`.",
    ]
    return "\n".join(lines)


def replace_marked_block(text: str, section: str) -> str:
    """``text`` with everything between the perf markers replaced by ``section``; ValueError without markers."""
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"README has no '{MARK_START}' ... '{MARK_END}' block; add both markers where the "
                         "Performance section should go")
    if text.count(MARK_START) != 1 or text.count(MARK_END) != 1:
        raise ValueError("README must contain exactly one perf:start and one perf:end marker")
    return text[:start + len(MARK_START)] + "\n" + section.strip("\n") + "\n" + text[end:]


def update_readme(path: Path, result: dict[str, Any]) -> None:
    """Rewrite the marked Performance block of ``path`` in place."""
    path.write_text(replace_marked_block(path.read_text(), render_readme_section(result)))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m ptq.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: the whole run takes under a minute on 2 cores")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--models", default="tiny,vit_b_16", help="comma-separated subset of tiny,vit_b_16")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    p.add_argument("--adaround-backend", default="fp", choices=("fp", "ivit"),
                   help="nonlinear backend of the AdaRound units (fp: what `wquant=adaround wbits=4` runs; "
                        "ivit: the integer table rows)")
    p.add_argument("--adaround-compile", action=argparse.BooleanOptionalAction, default=True,
                   help="time the compiled AdaRound step, as runs do (adaround.compile); --no-adaround-compile: eager")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 gives steadier timings on a busy machine)")
    p.add_argument("--tune-malloc", action="store_true",
                   help="raise glibc's mmap/trim thresholds first (large CPU temporaries stop page-faulting)")
    p.add_argument("--readme", type=Path, default=None, help="rewrite this file's perf:start/perf:end block")
    p.add_argument("--from-json", type=Path, default=None,
                   help="render --readme / the table from this JSON instead of benchmarking")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in ("tiny", "vit_b_16")]
    if bad or not models:
        p.error(f"--models: unknown {bad or 'empty list'}; choose from tiny,vit_b_16")
    if args.readme is not None:  # fail before minutes of benchmarking
        try:
            replace_marked_block(args.readme.read_text(), "")
        except (OSError, ValueError) as exc:
            p.error(f"--readme {args.readme}: {exc}")
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
    else:
        threads = torch.get_num_threads()
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        malloc_tuned = tune_malloc() if args.tune_malloc else False
        try:
            result = run_bench(models, args.quick, args.device, args.adaround_backend, args.adaround_compile)
        finally:
            torch.set_num_threads(threads)
        result["machine"]["malloc_tuned"] = malloc_tuned
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=_json_default))
        log.info("wrote %s", args.out)
    print(markdown_table(result))
    if args.readme is not None:
        update_readme(args.readme, result)
        log.info("updated the Performance section of %s", args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
