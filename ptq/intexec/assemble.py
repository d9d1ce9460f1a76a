"""The finished ONNX model of an :class:`~ptq.intexec.graph.OnnxGraph`: the live nodes, inputs, outputs.

Split from ``ptq.intexec.graph``, which spells each operation; this module only assembles what the
model's forward emitted: it drops the nodes no output depends on (a value folded into the next
operation, an int32 accumulator whose bias went into its requantizer's constant) and declares the
outputs, the initializers still read and the metadata.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import onnx
from onnx import TensorProto, helper

from ptq.intexec.kernels import IR_VERSION, OPSET
from ptq.quant.symbolic import Sym

if TYPE_CHECKING:
    from ptq.intexec.graph import OnnxGraph

_ELEM = {"float32": TensorProto.FLOAT, "int32": TensorProto.INT32, "int64": TensorProto.INT64}


def live(g: OnnxGraph, nodes: list[onnx.NodeProto], needed: list[str]) -> list[onnx.NodeProto]:
    """The nodes that ``needed`` values depend on, in order; named values no node produces any
    more (a table Gather's output folded into the next one) leave ``g.values`` too, unless
    their uint8 twin carries them (an activation only ``MatMulInteger`` reads)."""
    want, keep = set(needed), []
    for node in reversed(nodes):
        if any(o in want for o in node.output):
            keep.append(node)
            want.update(node.input)
    keep.reverse()
    produced = {o for n in keep for o in n.output}
    for name in [v for v in g.values if v not in produced and g.u8_name(v) not in produced]:
        del g.values[name]
        g.named.pop(name, None)
    return keep


def assemble(g: OnnxGraph, image: Sym, outputs: dict[str, Sym], extra: list[str], doc: str,
             metadata: dict[str, Any] | None) -> onnx.ModelProto:
    """``image`` in, ``outputs`` (name -> value) out, plus the named values in ``extra``."""
    em = g.em
    nodes = live(g, em.nodes, [s.name for s in outputs.values()] + list(extra))
    outs = []
    for out_name, sym in outputs.items():
        nodes.append(helper.make_node("Identity", [sym.name], [out_name], name=f"out.{out_name}"))
        outs.append(helper.make_tensor_value_info(out_name, _ELEM[sym.dtype], ["N", *sym.shape[1:]]))
    for name in extra:
        sym = g.named[name]
        outs.append(helper.make_tensor_value_info(name, _ELEM[sym.dtype], ["N", *sym.shape[1:]]))
    inp = helper.make_tensor_value_info(image.name, TensorProto.FLOAT, ["N", *image.shape[1:]])
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(nodes, "ptq_integer_vit", [inp], outs,
                              initializer=[t for k, t in em.inits.items() if k in used])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ptq",
                              doc_string=doc)
    model.ir_version = IR_VERSION
    for k, v in (metadata or {}).items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    return model
