"""Export a calibrated, fully integer ``QuantModel`` as a standard ONNX model.

The graph is derived from the model itself: :func:`build_onnx` runs ``QuantModel.forward`` on a
symbolic image (``ptq.quant.symbolic.Sym``). Every module hands its integer operation to the
graph with the constants it computes for the simulation (``QLinear.int_bias``,
``requant.multiplier``, ``ivit.layernorm_bias``, ``ActQuantizer.fold``), and the reshapes,
splits and padding of the forward become graph nodes, so there is no second description of
the model to drift from the first. ``ptq.intexec.graph`` spells each operation in ONNX.

The model: input ``image`` (float32 ``[N, 3, H, W]``, normalised as the eval transform gives
it), outputs ``logits`` (float32) and ``logits_int`` (the head's int32 accumulator). Between
the input quantizer and the final dequantization every tensor is integer-typed.
"""

from __future__ import annotations

import json
from typing import Any

import onnx
import torch

from ptq.intexec.graph import OnnxGraph
from ptq.quant.vit import QuantModel

FORMAT = "ptq-integer-onnx"
VERSION = 1
INPUT, OUTPUT, OUTPUT_INT = "image", "logits", "logits_int"
HEAD_ACC = "head.fc.acc"
#: the ``matmul`` label of each linear/matmul (widths summary): q @ k^T is "scores", probs @ v "context"
MATMUL_KINDS = ("patch_embed", "qkv", "scores", "context", "attn_out", "fc1", "fc2", "merge", "head")


def _check(qmodel: QuantModel) -> None:
    """The program exists only for a fully integer model: say what is missing otherwise."""
    problems = []
    if not qmodel.settings.backend.integer:
        problems.append(f"backend is {qmodel.settings.backend.name!r}, not 'ivit'")
    for q in qmodel.act_quantizers():
        if not q.enabled or q.mode != "quant":
            problems.append(f"{q.name} is {'disabled' if not q.enabled else q.mode}")
        elif q.lsq:
            problems.append(f"{q.name} step size is still being learned")
    for lin in qmodel.linears():
        if lin.wq is None or not lin.wq.integer:
            problems.append(f"{lin.name} has no integer weight quantizer")
    if problems:
        raise ValueError("not an integer-only QuantModel: " + "; ".join(problems[:8]))


def image_size(qmodel: QuantModel) -> int:
    """Side of the square input image the model was built for."""
    return int(qmodel.image_size)


@torch.no_grad()
def build_onnx(qmodel: QuantModel, input_spec: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
               debug: bool = False) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The integer ONNX model of ``qmodel`` and its value declarations (name -> bits, signed, kind).

    ``debug``: every named integer value (the simulation's audit names) is an extra output,
    so that a mismatch can be traced to the first diverging tensor. ``input_spec`` (the
    normalisation) and ``meta`` (e.g. the run's config) go into the model's metadata.
    """
    _check(qmodel)
    g = OnnxGraph()
    size = image_size(qmodel)
    image = g.input(INPUT, (1, 3, size, size))
    logits = qmodel(image)
    if HEAD_ACC not in g.named:
        raise ValueError(f"the forward did not produce {HEAD_ACC!r}")
    st = qmodel.settings
    be = st.backend
    info = {
        "format": FORMAT, "version": VERSION,
        "input": {"name": INPUT, "dtype": "float32", "shape": ["N", 3, size, size], **(input_spec or {})},
        "outputs": {OUTPUT: "float32 logits = float32(logits_int) * per-class scale",
                    OUTPUT_INT: "the head's int32 accumulator"},
        "settings": {"wbits": st.wbits, "abits": st.abits, "idadd_bits": st.idadd_bits,
                     "kernel_in_bits": st.kernel_in_bits, "image_bits": st.image_bits,
                     "softmax": {"n": be.softmax_n, "out_bits": be.softmax_out_bits, "log2": be.softmax_log2},
                     "gelu": {"n": be.gelu_n, "sig_bits": be.gelu_sig_bits}},
    }
    codes = {k: v for k, v in (("probs", be.probs_codes), ("gelu_out", st.gelu_out), ("scores", st.scores))
             if v != "uniform"}
    if codes:  # the non-uniform activation codes (docs/act-quantizers.md)
        info["settings"]["codes"] = codes
    metadata = {"ptq": json.dumps(info), "ptq.meta": json.dumps(meta or {}, default=str)}
    extra = [n for n in g.named if n != HEAD_ACC] if debug else []
    model = g.model(image, {OUTPUT: logits, OUTPUT_INT: g.named[HEAD_ACC]}, extra,
                    doc="integer-only ViT exported by ptq: every tensor between the input quantizer and the "
                        "final dequantization is integer-typed", metadata=metadata)
    return model, {"values": g.values, "constants": g.constants}
