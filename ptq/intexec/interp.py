"""The integer program: its artefact format and a small interpreter over it.

An exported program is a directory holding

* ``program.json``: the graph. ``ops`` in execution order, each
  ``{"op", "in": [names], "out": name, ...params}``; ``values`` (every tensor an op
  produces: declared ``bits``/``signed``, ``kind``, real-value ``scale`` where one is
  defined); ``constants`` (dtype, shape, declared width of each stored integer tensor);
  ``input`` (shape and the normalisation the float image must already have);
  ``output`` (names of the float logits and of the integer accumulator they come from);
* ``tensors.safetensors``: the integer constants (INT8/INT4 weights stored in int8,
  INT32 biases, the folded class-token/position constant, I-LayerNorm bias terms);
  its sha256 is recorded in ``program.json`` and checked on load.

The interpreter needs only torch integer ops and the kernels of ``ptq.quant.ivit``
(no torchvision, no ``ptq.quant.vit``): every value between the ``quantize`` op
(float image -> integers) and the ``dequantize`` op (head accumulator -> float
logits) is an int64 tensor. Dyadic requantization applies the stored ``(m, e)`` with
``ivit``'s own integer-only paths.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ptq.atomic import atomic_path
from ptq.quant import ivit, requant
from ptq.quant.qtensor import qrange

log = logging.getLogger(__name__)

FORMAT = "ptq-intexec"
VERSION = 1
GRAPH_FILE = "program.json"
TENSORS_FILE = "tensors.safetensors"
INT_DTYPES = (torch.int32, torch.int64)

Hook = Callable[[dict[str, Any], Tensor], None]


class ArtefactError(ValueError):
    """An exported program that cannot be loaded (missing file, wrong format, tampered tensors)."""


@dataclass
class Program:
    """A graph (JSON-able dict) and its integer constants."""

    graph: dict[str, Any]
    tensors: dict[str, Tensor] = field(default_factory=dict)

    @property
    def ops(self) -> list[dict[str, Any]]:
        return self.graph["ops"]


# ----------------------------------------------------------------------------- artefact


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dump_graph(graph: dict[str, Any]) -> str:
    """The graph as JSON: small sections indented, one line per op / value / constant (diff- and grep-friendly)."""
    big = ("constants", "values", "ops")
    head = json.dumps({k: v for k, v in graph.items() if k not in big}, indent=1)[:-2]
    parts = [head]
    for key in big:
        items = graph[key]
        if isinstance(items, dict):
            lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in items.items()]
            parts.append(f' {json.dumps(key)}: {{\n' + ",\n".join(lines) + "\n }")
        else:
            lines = [f"  {json.dumps(v)}" for v in items]
            parts.append(f' {json.dumps(key)}: [\n' + ",\n".join(lines) + "\n ]")
    return ",\n".join(parts) + "\n}\n"


def save_program(program: Program, out_dir: Path | str) -> Path:
    """Write ``program.json`` and ``tensors.safetensors`` into ``out_dir``; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in program.tensors.items()}
    save_file(tensors, str(out / TENSORS_FILE))
    graph = dict(program.graph)
    graph["tensors_file"] = TENSORS_FILE
    graph["tensors_sha256"] = _sha256(out / TENSORS_FILE)
    with atomic_path(out / GRAPH_FILE) as tmp:
        tmp.write_text(dump_graph(graph))
    log.info("integer program (%d ops, %d constants) written to %s", len(graph["ops"]), len(tensors), out)
    return out


def load_program(art_dir: Path | str) -> Program:
    """Read an artefact written by :func:`save_program`; :class:`ArtefactError` when it is unusable."""
    d = Path(art_dir)
    try:
        graph = json.loads((d / GRAPH_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtefactError(f"{d / GRAPH_FILE}: cannot read the graph ({exc})") from exc
    if graph.get("format") != FORMAT or graph.get("version") != VERSION:
        raise ArtefactError(f"{d / GRAPH_FILE}: not a {FORMAT} v{VERSION} graph")
    tpath = d / graph.get("tensors_file", TENSORS_FILE)
    if not tpath.is_file():
        raise ArtefactError(f"{tpath}: missing")
    digest = _sha256(tpath)
    if digest != graph.get("tensors_sha256"):
        raise ArtefactError(f"{tpath}: sha256 {digest} differs from the graph's {graph.get('tensors_sha256')}")
    tensors = load_file(str(tpath))
    for name, spec in graph["constants"].items():
        t = tensors.get(name)
        if t is None or str(t.dtype).removeprefix("torch.") != spec["dtype"] or list(t.shape) != spec["shape"]:
            raise ArtefactError(f"{tpath}: constant {name!r} missing or not {spec['dtype']}{spec['shape']}")
    validate_graph(graph)
    return Program(graph, tensors)


def validate_graph(graph: dict[str, Any]) -> None:
    """Every op known, every input defined before use, the outputs produced (:class:`ArtefactError` otherwise)."""
    defined = {graph["input"]["name"], *graph["constants"]}
    for i, op in enumerate(graph["ops"]):
        if op.get("op") not in _OPS:
            raise ArtefactError(f"op {i}: unknown op {op.get('op')!r}; known: {', '.join(_OPS)}")
        missing = [n for n in op["in"] if n not in defined]
        if missing:
            raise ArtefactError(f"op {i} ({op['op']} -> {op['out']}): inputs {missing} are not defined before it")
        if op["op"] == "requantize" and (isinstance(op["m"], list) != isinstance(op["e"], list)):
            raise ArtefactError(f"op {i} ({op['out']}): m and e must both be scalars or both lists")
        defined.add(op["out"])
    for key in ("name", "accumulator"):
        if graph["output"][key] not in defined:
            raise ArtefactError(f"output {graph['output'][key]!r} is never produced")


# ----------------------------------------------------------------------------- interpreter


def _param(x: int | list[int], device: torch.device) -> Tensor:
    """A multiplier/shift from the graph as an int64 tensor (0-d or per channel)."""
    return torch.tensor(x, dtype=torch.int64, device=device)


def apply_dyadic(q: Tensor, m: Tensor, e: Tensor, bits: int, signed: bool, clamp: bool) -> Tensor:
    """``round_half_to_even(q * m / 2**e)`` (clamped to ``bits`` when ``clamp``) on integers only.

    Delegates to ``ptq.quant.requant``'s dyadic application and forces one of its integer paths:
    ``int`` (one int64 product and a rounding shift) when ``|q| * 2**31 < 2**62`` and
    ``e >= 1``, else ``general`` (exact for ``|q| <= 2**59``); never its float64 path.
    """
    lo, hi = qrange(bits, signed)
    qmin, qmax = torch.aminmax(q)
    q_abs = max(-int(qmin), int(qmax)) if q.numel() else 0
    path = "int" if int(e.min()) >= 1 and q_abs < 2**31 else "general"
    return requant.apply_dyadic(q, m, e, lo, hi, clamp, path=path)


class Interpreter:
    """Runs a :class:`Program` on float images; integer tensors only from ``quantize`` to ``dequantize``.

    ``hook(op, value)`` is called with every op's output (tests check dtypes; the
    widths report collects ranges through it). Constants are moved to int64 once.
    Runs on the CPU by default: CUDA has no int64 matmul.
    """

    def __init__(self, program: Program, device: torch.device | str = "cpu") -> None:
        self.program = program
        self.device = torch.device(device)
        g = program.graph
        self.consts = {k: v.to(self.device, torch.int64) for k, v in program.tensors.items()}
        self.params: list[dict[str, Tensor]] = []
        for op in g["ops"]:
            p: dict[str, Tensor] = {}
            if op["op"] == "requantize":
                p["m"], p["e"] = _param(op["m"], self.device), _param(op["e"], self.device)
            elif op["op"] == "dequantize":
                p["scale"] = torch.tensor(op["scale"], dtype=torch.float32, device=self.device)
            elif op["op"] == "layernorm":
                c = int(op["channels"])
                # unit gamma, zero beta: the kernel's float64 bias term is exactly 0, and the
                # folded integer bias (the same kernel's own b, see build) is added below
                p["one"] = torch.ones(c, dtype=torch.float32, device=self.device)
                p["zero"] = torch.zeros(c, dtype=torch.float32, device=self.device)
            self.params.append(p)
        self.last_use = {n: i for i, op in enumerate(g["ops"]) for n in op["in"]}

    def run(self, image: Tensor, hook: Hook | None = None, keep: bool = False) -> dict[str, Tensor]:
        """Run the program; returns the output values (``logits`` and its accumulator), or every value when ``keep``."""
        g = self.program.graph
        env: dict[str, Tensor] = {g["input"]["name"]: image.to(self.device, torch.float32)}
        outputs = {g["output"]["name"], g["output"]["accumulator"]}
        for i, (op, p) in enumerate(zip(g["ops"], self.params, strict=True)):
            args = [env[n] if n in env else self.consts[n] for n in op["in"]]
            out = _OPS[op["op"]](op, p, *args)
            env[op["out"]] = out
            if hook is not None:
                hook(op, out)
            if not keep:
                for n in op["in"]:
                    if self.last_use.get(n) == i and n not in outputs:
                        env.pop(n, None)
        return env if keep else {k: env[k] for k in outputs}

    def logits(self, image: Tensor) -> Tensor:
        return self.run(image)[self.program.graph["output"]["name"]]


# ----------------------------------------------------------------------------- ops


def _quantize(op: dict, p: dict, x: Tensor) -> Tensor:
    """Float image -> integers: clamp(round_half_even(x / s)) in float32, the one float op before the integers."""
    lo, hi = qrange(op["bits"], op["signed"])
    s = torch.tensor(op["scale"], dtype=torch.float32, device=x.device)
    return torch.clamp(torch.round(x / s), lo, hi).to(torch.int64)


def _patchify(op: dict, p: dict, x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, H/p * W/p, C*p*p] (row-major patches, channel-major within a patch)."""
    b, c, h, w = x.shape
    k = op["patch"]
    return x.reshape(b, c, h // k, k, w // k, k).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * k * k)


def _linear(op: dict, p: dict, x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    acc = torch.matmul(x, w.t())
    return acc + bias if bias is not None else acc


def _pad_tokens(op: dict, p: dict, x: Tensor) -> Tensor:
    return torch.nn.functional.pad(x, (0, 0, op["before"], 0))


def _requantize(op: dict, p: dict, x: Tensor) -> Tensor:
    return apply_dyadic(x, p["m"], p["e"], op["clamp_bits"], op["signed"], op["clamp"])


def _add(op: dict, p: dict, a: Tensor, b: Tensor) -> Tensor:
    return requant.clamp_int(a + b, op["bits"], op["signed"])


def _slice(op: dict, p: dict, x: Tensor) -> Tensor:
    return x[..., op["start"]:op["stop"]]


def _split_heads(op: dict, p: dict, x: Tensor) -> Tensor:
    b, t, e = x.shape
    h = op["heads"]
    return x.reshape(b, t, h, e // h).transpose(1, 2)


def _merge_heads(op: dict, p: dict, x: Tensor) -> Tensor:
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def _transpose(op: dict, p: dict, x: Tensor) -> Tensor:
    return x.transpose(op["dim0"], op["dim1"])


def _matmul(op: dict, p: dict, a: Tensor, b: Tensor) -> Tensor:
    return torch.matmul(a, b)


def _layernorm(op: dict, p: dict, x: Tensor, bias: Tensor) -> Tensor:
    y, _ = ivit.int_layernorm(x, 1.0, p["one"], p["zero"])
    return y + bias


def _shiftmax(op: dict, p: dict, x: Tensor) -> Tensor:
    return ivit.shiftmax(x, op["scale"], op["n"], op["out_bits"])[0]


def _log2_probs(op: dict, p: dict, x: Tensor) -> Tensor:
    return ivit.log2_probs(x)[0]


def _shift_gelu(op: dict, p: dict, x: Tensor) -> Tensor:
    return ivit.shift_gelu(x, op["scale"], op["n"], op["sig_bits"])[0]


def _take_token(op: dict, p: dict, x: Tensor) -> Tensor:
    return x[:, op["index"]]


def _dequantize(op: dict, p: dict, x: Tensor) -> Tensor:
    """Head accumulator -> float32 logits: ``float32(acc) * s_acc`` (the simulation's ``QTensor.real``)."""
    return x.to(torch.float32) * p["scale"]


_OPS: dict[str, Callable[..., Tensor]] = {
    "quantize": _quantize,
    "patchify": _patchify,
    "linear": _linear,
    "pad_tokens": _pad_tokens,
    "requantize": _requantize,
    "add": _add,
    "slice": _slice,
    "split_heads": _split_heads,
    "merge_heads": _merge_heads,
    "transpose": _transpose,
    "matmul": _matmul,
    "layernorm": _layernorm,
    "shiftmax": _shiftmax,
    "log2_probs": _log2_probs,
    "shift_gelu": _shift_gelu,
    "take_token": _take_token,
    "dequantize": _dequantize,
}
OPS = tuple(_OPS)
