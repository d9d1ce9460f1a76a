"""A run's quantized model as a standard QDQ ONNX model, for onnxruntime's own quantized kernels.

The integer-only program (``ptq.intexec.build``) is bit-exact but carries every requantization,
Shiftmax, ShiftGELU and I-LayerNorm as integer ONNX ops. The QDQ model is the deployer's other
choice: ``QuantizeLinear`` / ``DequantizeLinear`` pairs that carry the run's own activation steps
(calibrated, searched or LSQ-learned) and its own integer weights (AdaRound's rounding included),
around float ``MatMul`` s, with Softmax, GELU and LayerNorm in float as in the ``fp`` backend.
onnxruntime fuses the pairs into its integer kernels at session creation, as it does for
``onnxruntime.quantization.quantize_static``'s output. It cannot be bit-exact to the simulation:
onnxruntime requantizes in float; its accuracy is measured instead (:func:`export_and_measure`).

How: a copy of the quantized model runs its ordinary forward in the ``qdq`` state
(:func:`qdq_view`): every activation quantizer of at most 8 bits becomes
``torch.fake_quantize_per_tensor_affine`` at its own step (a ``Clip`` first where the width is below
8 bits, so that int8 codes hold it), wider ones (the 16-bit residual stream) stay float; every
linear reads its integer weights through ``fake_quantize_per_channel_affine`` at their own steps
(the codes come back exactly), its bias in float; the nonlinear ops are the ``fp`` backend's.
``torch.onnx.export`` writes those as QDQ pairs; :func:`fold_weights` then stores each weight as
its int8 codes with a single ``DequantizeLinear``, as onnxruntime's quantizer does.
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ptq.quant.nonlinear import Backend
from ptq.quant.quantizers import ActQuantizer
from ptq.quant.vit import QLinear, QuantModel

OPSET = 18
QDQ_MAX_BITS = 8  # activations wider than this (the INT16 residual stream) stay float in the QDQ model


def qdq_view(qmodel: QuantModel) -> QuantModel:
    """A copy of ``qmodel`` (CPU, eval) whose forward is the QDQ model's float function."""
    view = copy.deepcopy(qmodel).cpu().eval()
    fp = Backend("fp")
    for mod in view.modules():
        if hasattr(mod, "backend"):
            mod.backend = fp
        if isinstance(mod, ActQuantizer) and mod.mode == "quant":
            mod.mode = "qdq" if mod.bits <= QDQ_MAX_BITS else "off"
        if isinstance(mod, QLinear):
            mod.qdq = True  # QLinear.forward: x @ DQ(W_int)^T + b
            # buffers, so the exporter writes them as initializers (its constant propagation would fold
            # the quantize-dequantize of a traced constant into a float weight) and AdaRound's rounding
            # is not traced as ops
            for key, t in zip(("qdq_w", "qdq_s", "qdq_zp"), weight_codes(mod), strict=True):
                mod.register_buffer(key, t)
    return view


@torch.no_grad()
def weight_codes(lin: QLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes * steps as ``[in, out]``, per-channel steps, zero points 0) of a linear's weights: constants whose
    quantization gives its own integer codes (AdaRound's rounding included) back exactly."""
    w, s_w, _ = lin.quantized_weight()
    s = s_w.detach().float().reshape(-1).expand(w.shape[0]).contiguous()
    return (w.detach() * s[:, None]).t().contiguous(), s, torch.zeros(s.shape, dtype=torch.int32)


def fold_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each ``QuantizeLinear`` of a constant (a weight) replaced by its int8 codes: one ``DequantizeLinear`` left."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    casts = {n.output[0]: n for n in g.node if n.op_type == "Cast"}

    def const(name: str) -> np.ndarray | None:
        """A constant's value: an initializer, a Constant node, or a Cast of one."""
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        if name in casts:
            v = const(casts[name].input[0])
            to = onnx.helper.tensor_dtype_to_np_dtype(casts[name].attribute[0].i)
            return None if v is None else v.astype(to)
        return None

    keep, new_inits = [], []
    for node in g.node:
        w = const(node.input[0]) if node.op_type == "QuantizeLinear" else None
        if w is None:
            keep.append(node)
            continue
        scale = const(node.input[1])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        if scale.ndim:
            shape[axis] = -1
        codes = np.clip(np.rint(w / scale.reshape(shape)), -128, 127)  # symmetric weights: zero point 0
        new_inits.append(numpy_helper.from_array(codes.astype(np.int8), node.output[0]))
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in keep for i in n.input}
    kept_inits = [t for t in g.initializer if t.name in used]  # the float weights the codes replaced go
    del g.initializer[:]
    g.initializer.extend(kept_inits + new_inits)
    return model


@torch.no_grad()
def build_qdq(qmodel: QuantModel) -> onnx.ModelProto:
    """The QDQ ONNX model of a calibrated (and reconstructed) ``qmodel``: ``image`` in, float ``logits`` out."""
    for q in qmodel.act_quantizers():
        if q.enabled and q.mode != "quant":
            raise ValueError(f"{q.name} is in mode {q.mode!r}: export a calibrated model (quant mode)")
    view = qdq_view(qmodel)
    size = qmodel.image_size
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(view, (torch.zeros(1, 3, size, size),), f, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, opset_version=OPSET, dynamo=False,
                          do_constant_folding=False)  # folding would turn DQ(Q(weight)) back into a float weight
    model = fold_weights(onnx.load_from_string(f.getvalue()))
    onnx.checker.check_model(model)
    return model


def describe_fusion(model_bytes: bytes, threads: int = 2) -> dict[str, Any]:
    """Op counts of onnxruntime's optimized graph (which QDQ pairs it fused into integer kernels)."""
    import tempfile
    from collections import Counter
    from pathlib import Path

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.optimized_model_filepath = str(path)
        opts.log_severity_level = 3
        ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    return dict(sorted(ops.items()))


QDQ_DIR, QDQ_FILE = "qdq", "model.onnx"


def run_qdq(model_bytes: bytes, images: Any, batch_size: int = 64) -> torch.Tensor:
    """A float-output ONNX model's logits over ``images`` (a tensor, a dataset or batches) on onnxruntime."""
    from tqdm.auto import tqdm

    from ptq.intexec.artefact import session
    from ptq.intexec.verify import _batches

    sess = session(model_bytes)
    outs = [torch.from_numpy(sess.run(None, {"image": x.float().contiguous().numpy()})[0])
            for x in tqdm(_batches(images, batch_size), desc="qdq (onnxruntime)", unit="batch", leave=False)]
    return torch.cat(outs)


def export_and_measure(qmodel: QuantModel, run_dir: Any, images: Any, labels: torch.Tensor, sim_logits: torch.Tensor,
                       fp_logits: torch.Tensor) -> dict[str, Any]:
    """Write ``run_dir/qdq/model.onnx``; its top-1 and its agreement / KL against the simulation and the float model.

    Returns the ``metrics["qdq"]`` record, with the op counts of onnxruntime's optimized graph
    (``fused``: how many MatMuls became integer kernels).
    """
    from pathlib import Path

    from ptq.atomic import atomic_path
    from ptq.evaluate import fidelity, topk_accuracy

    model = build_qdq(qmodel)
    blob = model.SerializeToString()
    out = Path(run_dir) / QDQ_DIR / QDQ_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_bytes(blob)
    logits = run_qdq(blob, images)
    acc1, acc5 = topk_accuracy(logits, labels)
    vs_sim, vs_fp = fidelity(logits, sim_logits), fidelity(logits, fp_logits)
    ops = describe_fusion(blob)
    integer_ops = ("QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "MatMulInteger", "QLinearConv")
    return {"artefact": str(out), "bytes": len(blob), "acc1": acc1, "acc5": acc5,
            "agreement_sim": vs_sim["agreement"], "kl_sim": vs_sim["kl"],
            "agreement": vs_fp["agreement"], "kl": vs_fp["kl"], "n": int(labels.numel()),
            "fused": {k: v for k, v in ops.items() if k in integer_ops},
            "float_matmuls": int(ops.get("MatMul", 0) + ops.get("Gemm", 0))}


def qdq_run(run_dir: Any, images: int | None = None, batch_size: int = 128) -> dict[str, Any]:
    """``python -m ptq.intexec --format qdq RUN_DIR``: a finished run's QDQ model, written and measured.

    The run's model is rebuilt from ``quant_state.pt`` (any backend; checked against the run's own
    logits first), exported to ``RUN_DIR/qdq/model.onnx`` and measured on the run's eval split as
    ``export_qdq=true`` does; the record goes into the run's ``metrics.json`` under ``"qdq"``
    (on the whole split only: a prefix measures, but leaves the run's record as it was).
    """
    import logging
    from pathlib import Path

    from ptq.atomic import write_json
    from ptq.data.build import loader
    from ptq.evaluate import predict
    from ptq.intexec.rebuild import check_fingerprint, load_run_model
    from ptq.intexec.verify import eval_images
    from ptq.models.zoo import load_model
    from ptq.rundir import METRICS_FILE, read_metrics

    run_dir = Path(run_dir)
    qmodel, cfg, check = load_run_model(run_dir, integer=False)
    data = eval_images(cfg, images)
    cpu = torch.device("cpu")
    with torch.no_grad():
        sim, labels = predict(qmodel, loader(data, batch_size, 0, cpu), cpu, "simulation")
        fp_logits, _ = predict(load_model(cfg).eval(), loader(data, batch_size, 0, cpu), cpu, "float model")
    check_fingerprint(sim, check, run_dir)
    rec = export_and_measure(qmodel, run_dir, data, labels, sim, fp_logits)
    if (images is None or images >= check["n"]) and (run_dir / METRICS_FILE).is_file():  # the whole split only
        write_json(run_dir / METRICS_FILE, read_metrics(run_dir) | {"qdq": rec})
    logging.getLogger(__name__).info("QDQ model %s: acc1=%.2f, agreement with the simulation %.2f%%, kl %.4g",
                                     rec["artefact"], rec["acc1"], rec["agreement_sim"], rec["kl_sim"])
    return rec
