"""Timing and memory measurement: synchronised wall clock, peak host RSS and CUDA memory, machine info."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import platform
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


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


def machine_info(device: torch.device) -> dict[str, Any]:
    """Platform, CPU, torch version and the device's name."""
    cpu_name = platform.processor() or platform.machine()
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        if m:
            cpu_name = m.group(1).strip()
        f = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        flags = set(f.group(1).split()) if f else set()
    # onnxruntime's uint8 x int8 kernels: exact and fast with VNNI / AMX, pairwise int16 sums without
    vnni = bool(flags & {"avx512_vnni", "avx_vnni"})
    amx = bool(flags & {"amx_int8"})
    cpu_name = f"{cpu_name}, {'with' if vnni else 'without'} AVX-512 VNNI{', with AMX' if amx else ''}"
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
