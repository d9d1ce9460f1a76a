"""Integer-only execution of a quantized ViT: export, interpret, verify (issue 8).

* :func:`build_program` (``ptq.intexec.build``): a calibrated ``QuantViT`` with the
  ``ivit`` backend -> :class:`Program` (integer graph + INT8/INT4 weights, INT32 biases,
  dyadic multipliers, I-ViT kernel parameters);
* :func:`save_program` / :func:`load_program` / :class:`Interpreter`
  (``ptq.intexec.interp``): the artefact (JSON graph + safetensors) and its interpreter,
  which needs only torch integer ops and ``ptq.quant.ivit``;
* :func:`save_run_state`, :func:`load_run_model` (``ptq.intexec.rebuild``): every
  ``nonlinear=ivit`` run keeps its compact quantized state, so it can be rebuilt;
* :func:`export_and_verify`, :func:`verify_run` (``ptq.intexec.verify``): the pipeline's
  hook and the CLI ``python -m ptq.intexec RUN_DIR | --runs DIR`` (prints ``mismatches=K/N``).

Names are imported lazily so that loading the interpreter never imports the
simulation (``ptq.quant.vit``) or torchvision.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Program": "interp", "Interpreter": "interp", "save_program": "interp", "load_program": "interp",
    "ArtefactError": "interp", "build_program": "build", "WidthRecorder": "widths",
    "export_and_verify": "verify", "verify_run": "verify", "save_run_state": "rebuild",
    "load_run_model": "rebuild", "NotVerifiable": "rebuild",
    "verify_program": "verify", "diff_trace": "verify", "main": "verify", "check_exportable": "verify",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"ptq.intexec.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'ptq.intexec' has no attribute {name!r}")
