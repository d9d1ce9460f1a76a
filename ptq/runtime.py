"""Process-level settings that make CPU runs faster without changing any result."""

from __future__ import annotations

import ctypes
import logging

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
