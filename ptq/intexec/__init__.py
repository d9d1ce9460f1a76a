"""Integer-only execution of a quantized ViT: a standard ONNX model, verified on onnxruntime.

* :func:`build_onnx` (``ptq.intexec.build``): a calibrated ``QuantViT`` with the ``ivit``
  backend -> an ONNX model whose graph the model's own forward produces (``ptq.quant.symbolic``),
  each integer operation spelled in standard ONNX integer ops (``ptq.intexec.graph``,
  ``ptq.intexec.kernels``);
* :func:`save_model` / :func:`load_manifest` / :func:`session` (``ptq.intexec.artefact``):
  ``model.onnx`` with its checksummed manifest, and onnxruntime sessions over it;
* :func:`save_run_state`, :func:`load_run_model` (``ptq.intexec.rebuild``): every
  ``nonlinear=ivit`` run keeps its compact quantized state, so it can be rebuilt;
* :func:`export_and_verify`, :func:`verify_run` (``ptq.intexec.verify``): the pipeline's
  hook and the CLI ``python -m ptq.intexec RUN_DIR | --runs DIR`` (prints ``mismatches=K/N``).

Names are imported lazily, so ``import ptq.intexec`` costs nothing until one is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "build_onnx": "build", "save_model": "artefact", "load_manifest": "artefact", "session": "artefact",
    "ArtefactError": "artefact", "WidthRecorder": "widths",
    "export_and_verify": "verify", "verify_run": "verify", "save_run_state": "rebuild",
    "load_run_model": "rebuild", "NotVerifiable": "rebuild",
    "verify_program": "verify", "diff_trace": "verify", "main": "verify", "check_exportable": "verify",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"ptq.intexec.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'ptq.intexec' has no attribute {name!r}")
