"""Symbolic integer tensors: how a ``QuantViT`` describes its own integer program.

The integer-only model is exported by running the quantized ViT's ordinary ``forward`` on a
:class:`Sym` instead of an image tensor (``ptq.intexec.export``). A ``Sym`` holds no data: a
value name in a graph under construction, its static shape (the batch dimension symbolic),
its storage dtype and a static bound on its integers. The shape operations the forward
applies to tensors (``reshape``, ``transpose``, ``split``, ``F.pad``, indexing, ``float()``)
are recorded as graph nodes; each integer operation (quantize, requantize, the residual add,
linear layers, attention matmuls, Shiftmax, ShiftGELU, I-LayerNorm) is handed to the graph by
the module that performs it, with the constants that module computes for the simulation
(integer weights and biases, dyadic multipliers, kernel parameters). So the exported graph
has one source, the model itself, and the graph builder (``ptq.intexec.onnx``) only spells
each operation in ONNX.

This module defines the value and the interface the quantized modules call; it imports no
graph library.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class IntGraph(Protocol):
    """What the quantized modules call on the graph of a :class:`Sym` (see ``ptq.intexec.onnx``)."""

    def node(self, op: str, inputs: list[Any], shape: tuple[int, ...], dtype: str, lo: int, hi: int,
             **attrs: Any) -> Sym: ...

    def quantize(self, x: Sym, s: Tensor, lo: int, hi: int, name: str) -> Sym: ...

    def requantize(self, x: Sym, m: Tensor, e: Tensor, lo: int, hi: int, clamp: bool, name: str) -> Sym: ...

    def add(self, a: Sym, ra: tuple[Tensor, Tensor], b: Sym | Tensor, rb: tuple[Tensor, Tensor] | None, lo: int,
            hi: int, name: str) -> Sym: ...

    def linear(self, x: Sym, w: Tensor, b: Tensor | None, name: str, kind: str) -> Sym: ...

    def matmul(self, a: Sym, b: Sym, name: str, kind: str) -> Sym: ...

    def shiftmax(self, x: Sym, s: Tensor, n: int, out_bits: int, name: str, keep: Tensor | None = None) -> Sym: ...

    def log2_probs(self, p: Sym, name: str) -> Sym: ...

    def logsqrt2_probs(self, p: Sym, name: str) -> Sym: ...

    def twin(self, x: Sym, rf: tuple[Tensor, Tensor], rc: tuple[Tensor, Tensor], k: int, lo1: int, hi1: int,
             top: int, name: str) -> Sym: ...

    def shift_gelu(self, x: Sym, s: Tensor, n: int, sig_bits: int, name: str) -> Sym: ...

    def layernorm(self, x: Sym, b: Tensor, name: str) -> Sym: ...

    def dequantize(self, x: Sym, s: Tensor) -> Sym: ...


class Sym:
    """A value of an integer graph under construction: name, shape (dim 0 is the batch), dtype, range.

    ``[lo, hi]`` is a static bound on the integers (0, 0 for float values), from the
    quantizers' ranges and the operations' worst cases.
    """

    def __init__(self, graph: IntGraph, name: str, shape: tuple[int, ...], dtype: str, lo: int, hi: int) -> None:
        self.graph, self.name, self._shape, self.dtype = graph, name, tuple(shape), dtype
        self.lo, self.hi = int(lo), int(hi)

    @property
    def bound(self) -> int:
        """The largest ``|integer|`` the value can hold."""
        return max(-self.lo, self.hi)

    # -- tensor-like attributes the forward reads ------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._shape)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def requires_grad(self) -> bool:
        return False

    def dim(self) -> int:
        return len(self._shape)

    def detach(self) -> Sym:
        return self

    def __repr__(self) -> str:
        return f"Sym({self.name}, {list(self._shape)}, {self.dtype}, [{self.lo}, {self.hi}])"

    def _like(self, op: str, inputs: list[Any], shape: tuple[int, ...], **attrs: Any) -> Sym:
        return self.graph.node(op, [self, *inputs], shape, self.dtype, self.lo, self.hi, **attrs)

    # -- shape operations -----------------------------------------------------------------------
    def reshape(self, *shape: int | tuple[int, ...]) -> Sym:
        target = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else tuple(shape)
        if target[0] != self._shape[0]:
            raise ValueError(f"reshape of {self.name} must keep the batch dimension first, got {target}")
        known = [d for d in target[1:] if d != -1]
        total = 1
        for d in self._shape[1:]:
            total *= d
        rest = 1
        for d in known:
            rest *= d
        out = tuple(d if d != -1 else total // rest for d in target)
        return self._like("Reshape", [], out, target=(0, *target[1:]))

    view = reshape

    def permute(self, *dims: int) -> Sym:
        perm = tuple(d % self.dim() for d in dims)
        if perm[0] != 0:
            raise ValueError(f"permutation {perm} of {self.name} would move the batch dimension")
        return self._like("Transpose", [], tuple(self._shape[d] for d in perm), perm=perm)

    def transpose(self, d0: int, d1: int) -> Sym:
        perm = list(range(self.dim()))
        d0, d1 = d0 % self.dim(), d1 % self.dim()
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return self.permute(*perm)

    def split(self, size: int, dim: int = 0) -> tuple[Sym, ...]:
        dim = dim % self.dim()
        if dim == 0:
            raise ValueError(f"cannot split {self.name} along the batch dimension")
        parts = []
        for start in range(0, self._shape[dim], size):
            stop = min(start + size, self._shape[dim])
            shape = tuple(stop - start if i == dim else d for i, d in enumerate(self._shape))
            parts.append(self._like("Slice", [], shape, axis=dim, start=start, stop=stop))
        return tuple(parts)

    def __getitem__(self, index: Any) -> Sym:
        """``x[:, i]`` (one token: the class token) or ``x[:, a:b]`` (leading tokens) along dim 1."""
        ok = isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None)
        if ok and isinstance(index[1], slice) and index[1].step in (None, 1):
            start, stop, _ = index[1].indices(self._shape[1])
            return self._like("Slice", [], (self._shape[0], stop - start, *self._shape[2:]), axis=1, start=start,
                              stop=stop)
        if not (ok and isinstance(index[1], int)):
            raise ValueError(f"only x[:, i] and x[:, a:b] are supported on {self.name}, got {index!r}")
        i = index[1] % self._shape[1]
        return self._like("Gather", [], (self._shape[0], *self._shape[2:]), axis=1, index=i)

    def float(self) -> Sym:
        """The dequantization's cast: integers to float32."""
        return self.graph.node("Cast", [self], self._shape, "float32", 0, 0, to="float32")

    def __mul__(self, other: Any) -> Sym:
        if self.dtype != "float32" or not isinstance(other, Tensor):
            raise ValueError(f"only float values times a constant scale are supported on {self.name}")
        return self.graph.dequantize(self, other)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.pad:
            x, pad = args[0], tuple(args[1])
            if kwargs.get("value", 0) not in (0, None) or len(args) > 2:
                raise ValueError("only zero padding is supported on symbolic tensors")
            return x.pad(pad)
        if func is Tensor.detach:
            return args[0]
        if func in (torch.roll, Tensor.roll):
            rest = list(args[1:])
            shifts = rest[0] if rest else kwargs["shifts"]
            dims = rest[1] if len(rest) > 1 else kwargs.get("dims")
            return args[0].roll(shifts, dims)
        raise TypeError(f"{getattr(func, '__name__', func)} is not supported on symbolic tensors")

    def roll(self, shifts: int | tuple[int, ...], dims: int | tuple[int, ...]) -> Sym:
        """``torch.roll``: each rolled axis is two ``Slice`` nodes and a ``Concat`` (values moved, not changed)."""
        shifts = (shifts,) if isinstance(shifts, int) else tuple(shifts)
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        out = self
        for shift, dim in zip(shifts, dims, strict=True):
            dim = dim % self.dim()
            if dim == 0:
                raise ValueError(f"cannot roll {self.name} along the batch dimension")
            shift = shift % self._shape[dim]
            if shift:
                out = out._like("Roll", [], out._shape, axis=dim, shift=shift, size=out._shape[dim])
        return out

    def sum(self, dim: int) -> Sym:
        """The exact integer sum over ``dim`` (``ReduceSum``, int32: the bound grows by the axis length)."""
        dim = dim % self.dim()
        if dim == 0:
            raise ValueError(f"cannot sum {self.name} over the batch dimension")
        n = self._shape[dim]
        if n * self.bound >= 2**31:
            raise ValueError(f"the sum of {n} values of {self.name} may overflow int32")
        shape = tuple(d for i, d in enumerate(self._shape) if i != dim)
        return self.graph.node("ReduceSum", [self], shape, self.dtype, n * self.lo, n * self.hi, axis=dim)

    def __add__(self, other: Any) -> Sym:
        """Plus an integer constant (broadcast over the batch): an int32 ``Add`` (relative position bias)."""
        if self.dtype != "int32" or not isinstance(other, Tensor):
            raise ValueError(f"only an int32 value plus an integer constant is supported on {self.name}")
        c = other.detach().cpu()
        if not bool((c == c.round()).all()):
            raise ValueError(f"the constant added to {self.name} is not integer")
        lo, hi = self.lo + int(c.min()), self.hi + int(c.max())
        if max(-lo, hi) >= 2**31:
            raise ValueError(f"{self.name} plus its constant may overflow int32")
        return self.graph.node("AddConst", [self], self._shape, self.dtype, lo, hi, const=c)

    def pad(self, pad: tuple[int, ...]) -> Sym:
        """``F.pad`` semantics: pairs (before, after) from the last dimension backwards."""
        begins, ends = [0] * self.dim(), [0] * self.dim()
        for i in range(len(pad) // 2):
            begins[self.dim() - 1 - i], ends[self.dim() - 1 - i] = pad[2 * i], pad[2 * i + 1]
        if begins[0] or ends[0]:
            raise ValueError("cannot pad the batch dimension")
        shape = tuple(d + b + e for d, b, e in zip(self._shape, begins, ends, strict=True))
        return self._like("Pad", [], shape, pads=(*begins, *ends))


def graph_of(t: Any) -> IntGraph | None:
    """The graph a value belongs to when it is symbolic, else None (the simulation's tensors).

    Inside a compiled graph (AdaRound's step) values are never symbolic; returning early there
    keeps dynamo from tracing the check.
    """
    if torch.compiler.is_compiling():
        return None
    return t.graph if isinstance(t, Sym) else None
