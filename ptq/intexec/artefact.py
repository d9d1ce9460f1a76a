"""The exported integer model on disk, and onnxruntime sessions over it.

``RUN_DIR/intexec`` holds

* ``model.onnx``: the integer-only ViT (``ptq.intexec.build``), a standard ONNX model that
  onnxruntime runs with only ``numpy`` beside it;
* ``manifest.json``: its sha256 (checked before every use, so a damaged file is refused
  instead of verified), the onnxruntime version it was verified with, and the declared width
  and role of every named integer value (what ``widths.json`` is measured against);
* ``widths.json``: the largest integers each value reached on the eval set (``ptq.intexec.widths``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from ptq.atomic import atomic_path
from ptq.cache import file_digest as file_sha256

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
THREADS = 2


class ArtefactError(ValueError):
    """An exported model that cannot be used (missing, unreadable, or not the bytes that were exported)."""


def runtime() -> str:
    """The runtime the model is verified on, e.g. ``onnxruntime 1.32.0``."""
    return f"onnxruntime {ort.__version__}"


def save_model(model: onnx.ModelProto, decl: dict[str, Any], out_dir: Path | str) -> Path:
    """Write ``model.onnx`` then ``manifest.json`` (both atomically; the manifest last, so a crash in
    between leaves a model whose checksum is missing: refused, not trusted). Returns the model's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / MODEL_FILE
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
    manifest = {"model": MODEL_FILE, "sha256": file_sha256(path), "bytes": path.stat().st_size,
                "runtime": runtime(), "values": decl["values"], "constants": decl["constants"]}
    with atomic_path(out / MANIFEST_FILE) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    log.info("integer ONNX model (%d nodes, %.1f kB) written to %s", len(model.graph.node),
             path.stat().st_size / 1024, path)
    return path


def load_manifest(art_dir: Path | str) -> dict[str, Any]:
    """The manifest of ``art_dir``, after checking ``model.onnx`` against its sha256 (:class:`ArtefactError`)."""
    d = Path(art_dir)
    path = d / MODEL_FILE
    if not path.is_file():
        raise ArtefactError(f"{path}: missing; rerun with --reexport to write it")
    try:
        manifest = json.loads((d / MANIFEST_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtefactError(f"{d / MANIFEST_FILE}: unreadable ({exc.__class__.__name__}); "
                            "rerun with --reexport to write the model again") from exc
    digest = file_sha256(path)
    if digest != manifest.get("sha256"):
        raise ArtefactError(f"{path}: damaged (sha256 {digest[:12]}... is not the exported "
                            f"{str(manifest.get('sha256'))[:12]}...); rerun with --reexport to write it again")
    return manifest


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose named intermediate values are outputs too (the debug export).

    Derived from the model being checked, not rebuilt, so a trace of a wrong file shows where it is wrong.
    """
    dbg = onnx.ModelProto()
    dbg.CopyFrom(model)
    produced = {o for n in dbg.graph.node for o in n.output}
    have = {o.name for o in dbg.graph.output}
    for name in names:
        if name in produced and name not in have:
            dbg.graph.output.append(onnx.ValueInfoProto(name=name))
    return dbg


def session(model: Path | str | bytes, threads: int = THREADS, spin: bool = False) -> ort.InferenceSession:
    """A CPU onnxruntime session over a model file or serialized model bytes.

    ``spin=False`` (verification): onnxruntime's pool threads sleep between runs instead of
    spinning; spinning threads starve torch's own threads when the simulation runs in between,
    which slowed verification and the tests many times over on two cores.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only: unused-initializer notes are not news
    src = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        raise ArtefactError(f"{model if not isinstance(model, bytes) else 'model'}: onnxruntime cannot load it "
                            f"({str(exc).splitlines()[0][:200]})") from exc
