"""The integer model's fast variant: INT8 weights as int8, for CPUs whose uint8 x int8 kernel is exact.

The portable ``model.onnx`` stores an INT8 weight as uint8 ``w + 128`` with zero point 128
wherever ``|w| > 64``: onnxruntime's uint8 x uint8 kernel is exact on every CPU. Its uint8 x
int8 kernel is two to three times faster, but on x86 CPUs without VNNI (AVX2 alone) it sums
pairs of products in int16 (``vpmaddubsw``), which saturates once ``255 * |w| * 2 > 32767``.
With AVX-512 VNNI, AVX-VNNI or AMX (and on ARM) the products accumulate in int32: exact.

The design (issue 38): the artefact holds both files, and the loader picks.

* ``model_vnni.onnx`` (:func:`int8_weights`) is the portable graph with every uint8 weight
  rewritten as int8 without a zero point; nothing else changes, so it computes the same
  integers wherever its kernel is exact.
* It carries its own guard: a probe ``MatMulInteger`` over constants (255 x -128, whose
  pair sums saturate an int16) compared with the exact product. Where they differ, ``logits``
  are NaN and ``logits_int`` is INT32_MIN, so a deployer who runs the file on a saturating CPU
  sees it at once instead of a wrong class. (onnxruntime folds the probe when the session is
  built, with the same kernel the model's GEMMs use.)
* :func:`u8s8_exact` runs the same probe alone; :func:`ptq.intexec.artefact.pick` uses it to
  choose the file for this CPU.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: probe shape: enough rows and columns for onnxruntime's packed kernel, K even (pairs of products)
PROBE_M, PROBE_K, PROBE_N = 16, 64, 16
GUARD = "vnni_guard"


def _probe(prefix: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """Nodes and constants computing a bool scalar ``<prefix>.ok``: the uint8 x int8 product is exact here."""
    a = np.full((PROBE_M, PROBE_K), 255, np.uint8)
    b = np.full((PROBE_K, PROBE_N), -128, np.int8)
    b[:, ::2] = 127  # both signs of the pair-sum overflow
    want = (a.astype(np.int64) @ b.astype(np.int64)).astype(np.int32)
    inits = [numpy_helper.from_array(a, f"{prefix}.a"), numpy_helper.from_array(b, f"{prefix}.b"),
             numpy_helper.from_array(want, f"{prefix}.expected"), numpy_helper.from_array(np.int32(0), f"{prefix}.zero")]
    p = prefix
    nodes = [
        helper.make_node("MatMulInteger", [f"{p}.a", f"{p}.b"], [f"{p}.product"], name=f"{p}/product"),
        helper.make_node("Sub", [f"{p}.product", f"{p}.expected"], [f"{p}.diff"], name=f"{p}/diff"),
        helper.make_node("Abs", [f"{p}.diff"], [f"{p}.abs"], name=f"{p}/abs"),
        helper.make_node("ReduceMax", [f"{p}.abs"], [f"{p}.worst"], keepdims=0, name=f"{p}/worst"),
        helper.make_node("Equal", [f"{p}.worst", f"{p}.zero"], [f"{p}.ok"], name=f"{p}/ok"),
    ]
    return nodes, inits, f"{p}.ok"


@functools.cache
def u8s8_exact() -> bool:
    """Whether this CPU's onnxruntime uint8 x int8 ``MatMulInteger`` is exact where int16 pair sums would saturate."""
    from ptq.intexec.artefact import session
    from ptq.intexec.kernels import IR_VERSION, OPSET

    nodes, inits, ok = _probe("probe")
    graph = helper.make_graph(nodes, "u8s8_probe", [], [helper.make_tensor_value_info(ok, TensorProto.BOOL, [])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return bool(session(model.SerializeToString(), threads=1).run(None, {})[0])


def _zero_point_128(init: onnx.TensorProto | None) -> bool:
    return init is not None and init.data_type == TensorProto.UINT8 and int(numpy_helper.to_array(init)) == 128


def int8_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``model_vnni.onnx`` from the portable model: each uint8 weight (``w + 128``, zero point 128) of a
    ``MatMulInteger`` stored as int8 ``w`` with no zero point, and the outputs guarded; (model, rewritten)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    new: dict[str, onnx.TensorProto] = {}
    rewritten = 0
    for node in g.node:
        if node.op_type != "MatMulInteger" or len(node.input) != 4:
            continue
        w, zp = inits.get(node.input[1]), inits.get(node.input[3])
        if w is None or w.data_type != TensorProto.UINT8 or not _zero_point_128(zp):
            continue
        name = f"{w.name}.s8"
        if name not in new:
            new[name] = numpy_helper.from_array((numpy_helper.to_array(w).astype(np.int16) - 128).astype(np.int8), name)
        node.input[1] = name
        del node.input[3]
        rewritten += 1
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used] + list(new.values())
    del g.initializer[:]
    g.initializer.extend(keep)
    _guard(g)
    return out, rewritten


def _guard(g: onnx.GraphProto) -> None:
    """Every output NaN (float) or INT32_MIN (int32) unless the probe product is exact on this CPU."""
    nodes, inits, ok = _probe(GUARD)
    g.initializer.extend(inits)
    bad = {TensorProto.FLOAT: numpy_helper.from_array(np.float32(np.nan), f"{GUARD}.nan"),
           TensorProto.INT32: numpy_helper.from_array(np.int32(np.iinfo(np.int32).min), f"{GUARD}.int_min")}
    g.initializer.extend(bad.values())
    for out in g.output:
        for node in g.node:  # the producer and any reader of the output now use the unguarded value
            for field in (node.output, node.input):
                for i, name in enumerate(field):
                    if name == out.name:
                        field[i] = f"{out.name}.unguarded"
        nodes.append(helper.make_node("Where", [ok, f"{out.name}.unguarded", bad[out.type.tensor_type.elem_type].name],
                                      [out.name], name=f"{GUARD}/{out.name}"))
    g.node.extend(nodes)
