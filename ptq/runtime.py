"""Process-level settings: threads, seeds, and allocator tuning that makes CPU runs faster without changing any result."""

from __future__ import annotations

import ctypes
import logging
import os
import random
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc(threshold: int = 1 << 30) -> bool:
    """Keep large CPU tensors on glibc's heap instead of a fresh mmap per allocation.

    Above its mmap threshold (32 MiB at most by default) glibc maps every allocation anew, so
    each large temporary pays page faults on first touch (measured here: an addcmul on
    [8, 197, 3072] 27 ms by default, 2 ms with the threshold raised). Raising the mmap and
    trim thresholds lets freed blocks be reused. Returns False where glibc's mallopt is absent.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold))
    except (OSError, AttributeError):
        return False
    log.debug("glibc malloc thresholds raised: %s", ok)
    return ok


COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def use_compile_cache(cache_dir: str | Path | None) -> str | None:
    """Keep torch.compile's on-disk caches (inductor's compiled graphs, AOTAutograd's) in ``<cache_dir>/inductor``.

    Each AdaRound unit class is compiled once per process; with the cache a later run or
    sweep job loads the compiled graphs instead (the embedded default's headline command
    measured cold and warm: see docs/performance.md). Inductor's own default is
    ``/tmp``, which is per node on a cluster; next to the stage caches every SLURM job of a
    sweep shares it. A ``$TORCHINDUCTOR_CACHE_DIR`` the user set wins (``ptq.USER_COMPILE_CACHE``:
    by the time this runs, importing inductor has written its own default into the variable, so
    the variable alone cannot say). Returns the directory used.
    """
    import ptq

    if cache_dir is not None and ptq.USER_COMPILE_CACHE is None:
        os.environ[COMPILE_CACHE_ENV] = str(Path(cache_dir).resolve() / "inductor")
    return os.environ.get(COMPILE_CACHE_ENV)


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
    """Seed Python's and torch's global generators."""
    random.seed(seed)
    torch.manual_seed(seed)
