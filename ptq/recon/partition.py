"""How the compiled AdaRound step splits into forward and backward: transcendental results are saved.

torch.compile's min-cut partitioner recomputes cheap-looking pointwise ops in the backward
graph instead of saving them, and counts ``exp`` and ``erf`` as cheap. On the CPU they are not:
in an fp-backend MLP unit the backward recomputed the GELU's ``erf`` three times (for its own
derivative, for the next quantizer's straight-through mask and for its LSQ sum), and the attention
unit recomputed its softmax. :class:`SaveTranscendentals` marks their outputs MUST_SAVE and leaves
every other decision to the min-cut partitioner. On this project's units the loss and gradients
keep their bits (tests/test_recon_speed.py); that is measured, not a law: where a saved value
changes how a reduction is fused, a sum can move by an ulp (a toy softmax-of-GELU sum did).

Measured on the embedded default (ms per iteration, interleaved runs, fp backend): attention block
3.01 -> 2.85, MLP block 1.95 -> 1.78, encoder block 4.45 -> 4.09; ivit backend unchanged within the noise
(its forward values come from the integer kernels). Trained states bit-identical (6 units, 301 iterations).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config

try:  # inductor's extension point for a custom partitioner (torch >= 2.6)
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.custom_graph_pass import CustomPartitionerFn, get_hash_for_files
    from torch.utils.checkpoint import CheckpointPolicy
except ImportError:  # pragma: no cover - older torch: the default partitioner
    CustomPartitionerFn = object  # type: ignore[misc,assignment]
    AVAILABLE = False
else:
    AVAILABLE = True


def _saved_ops() -> frozenset[Any]:
    aten = torch.ops.aten
    return frozenset({aten.exp.default, aten.erf.default, aten.gelu.default, aten._softmax.default})


class SaveTranscendentals(CustomPartitionerFn):  # type: ignore[misc,valid-type]
    """The min-cut partitioner, with exp / erf / GELU / softmax outputs saved for the backward."""

    def __init__(self) -> None:
        self.tagged = 0  # nodes marked so far (tests read it)

    def __call__(self, gm: torch.fx.GraphModule, joint_inputs: Sequence[object],
                 **kwargs: Any) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
        saved = _saved_ops()
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in saved:
                node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
                self.tagged += 1
        return min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)

    def uuid(self) -> Any:
        """Part of inductor's cache key: a change to this file recompiles."""
        return get_hash_for_files((str(Path(__file__).resolve()),))


def install() -> None:
    """Make :class:`SaveTranscendentals` inductor's partitioner for this process, unless one is set.

    Process-wide, as ``loss_function`` sets dynamo's recompile limit; inference graphs (the
    evaluation kernels) have no backward and are not partitioned. Set through the global config
    rather than ``torch.compile(options=...)``: passed as an option, the same partitioner changed
    the trained units' results (measured, not explained), while the global setting keeps them
    bit-identical. A partitioner the caller installed is left in place.
    """
    config = torch._inductor.config
    if AVAILABLE and config.custom_partitioner_fn is None:
        config.custom_partitioner_fn = SaveTranscendentals()
