"""Content-addressed cache of pipeline stages (float baseline, calibration statistics).

An entry is keyed by a hash of everything that affects it. It is written to
a temporary file and renamed into place, with a sidecar JSON holding the
payload's SHA-256 written last; an entry whose sidecar is missing or whose
digest does not match is treated as absent (and removed), never trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ptq.atomic import atomic_path

log = logging.getLogger(__name__)


def spec_key(spec: dict[str, Any]) -> str:
    """Stable short hash of a JSON-able spec."""
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (identifies weights in cache keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class StageCache:
    """Load/save a stage's tensors under ``root/<stage>/<key>.pt``."""

    def __init__(self, root: str | Path, enabled: bool = True) -> None:
        self.root = Path(root)
        self.enabled = enabled

    def _paths(self, stage: str, spec: dict[str, Any]) -> tuple[Path, Path]:
        base = self.root / stage / spec_key(spec)
        return base.with_suffix(".pt"), base.with_suffix(".json")

    def load(self, stage: str, spec: dict[str, Any]) -> Any | None:
        """The cached object, or None when absent, partial or corrupt."""
        if not self.enabled:
            return None
        data_path, meta_path = self._paths(stage, spec)
        if not data_path.exists() and not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            payload = data_path.read_bytes()
            if hashlib.sha256(payload).hexdigest() != meta["sha256"]:
                raise ValueError("checksum mismatch")
            return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except Exception as exc:
            log.warning("cache entry %s is corrupt or partial (%s); rebuilding it", data_path, exc)
            for p in (data_path, meta_path):
                p.unlink(missing_ok=True)
            return None

    def save(self, stage: str, spec: dict[str, Any], obj: Any) -> None:
        """Write atomically: payload first, then the sidecar that vouches for it."""
        if not self.enabled:
            return
        data_path, meta_path = self._paths(stage, spec)
        data_path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(obj, buf)
        payload = buf.getvalue()
        meta_path.unlink(missing_ok=True)
        with atomic_path(data_path) as tmp:
            tmp.write_bytes(payload)
        meta = {"sha256": hashlib.sha256(payload).hexdigest(), "stage": stage, "spec": spec}
        with atomic_path(meta_path) as tmp:
            tmp.write_text(json.dumps(meta, sort_keys=True, default=str))
