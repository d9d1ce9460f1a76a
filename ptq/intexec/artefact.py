"""The exported integer model on disk, and onnxruntime sessions over it.

``RUN_DIR/intexec`` holds

* ``model.onnx``: the integer-only ViT (``ptq.intexec.build``), a standard ONNX model that
  onnxruntime runs with only ``numpy`` beside it;
* ``model_vnni.onnx``: the same program with INT8 weights as int8, for CPUs whose uint8 x int8
  kernel is exact (``ptq.intexec.variants``; guarded: NaN logits elsewhere). :func:`pick` gives
  the file this CPU should run;
* ``manifest.json``: their sha256 (checked before every use, so a damaged file is refused
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


VARIANT_FILES = {"vnni": "model_vnni.onnx"}
VARIANT_NEEDS = {"vnni": "a CPU whose onnxruntime uint8 x int8 kernel is exact (AVX-512 VNNI, AVX-VNNI, AMX, ARM); "
                         "elsewhere its outputs are NaN / INT32_MIN"}


def _write(model: onnx.ModelProto, path: Path) -> dict[str, Any]:
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
    return {"model": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size}


def save_model(model: onnx.ModelProto, decl: dict[str, Any], out_dir: Path | str,
               variants: dict[str, onnx.ModelProto] | None = None) -> Path:
    """Write ``model.onnx`` (and each variant's file) then ``manifest.json`` (all atomically; the manifest
    last, so a crash in between leaves a model whose checksum is missing: refused, not trusted).
    Returns the portable model's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / MODEL_FILE
    manifest = {**_write(model, path), "runtime": runtime(), "values": decl["values"], "constants": decl["constants"],
                "variants": {k: {**_write(v, out / VARIANT_FILES[k]), "needs": VARIANT_NEEDS[k]}
                             for k, v in (variants or {}).items()}}
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
    for entry in [manifest, *manifest.get("variants", {}).values()]:
        _check_file(d / entry["model"], entry.get("sha256"))
    return manifest


def _check_file(path: Path, sha256: str | None) -> None:
    if not path.is_file():
        raise ArtefactError(f"{path}: missing; rerun with --reexport to write it")
    digest = file_sha256(path)
    if digest != sha256:
        raise ArtefactError(f"{path}: damaged (sha256 {digest[:12]}... is not the exported "
                            f"{str(sha256)[:12]}...); rerun with --reexport to write it again")


def pick(art_dir: Path | str) -> Path:
    """The file this CPU should run: ``model_vnni.onnx`` where its uint8 x int8 kernel is exact and the
    artefact has one, else the portable ``model.onnx`` (both checked against the manifest first)."""
    from ptq.intexec.variants import u8s8_exact

    d = Path(art_dir)
    manifest = load_manifest(d)
    fast = manifest.get("variants", {}).get("vnni")
    return d / fast["model"] if fast and u8s8_exact() else d / MODEL_FILE


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
