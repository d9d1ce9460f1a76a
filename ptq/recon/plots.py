"""A picture of one AdaRound reconstruction: what each unit's loss and regularizer did.

Three panels: every unit's batch reconstruction loss against its iteration (divided
by the unit's loss with nearest rounding, so units of different scale share an axis),
the rounding regularizer against the iteration (it falls to 0 as every h(V) reaches
0 or 1), and each unit's loss with nearest rounding next to its loss after training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ptq.atomic import atomic_path

MAX_LEGEND_UNITS = 12


def plot_reconstruction(records: Sequence[Mapping[str, Any]], curves: Mapping[str, Mapping[str, Sequence[float]]],
                        path: Path) -> Path:
    """Write the PNG to ``path`` (atomically: a crash leaves no half-written picture)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    names = [r["unit"] for r in records]
    colors = colormaps["viridis"]
    fig = Figure(figsize=(15, 4.6), layout="constrained")
    ax_loss, ax_reg, ax_bar = fig.subplots(1, 3)
    for i, rec in enumerate(records):
        curve = curves.get(rec["unit"])
        if not curve or not curve.get("step"):
            continue
        color = colors(i / max(1, len(records) - 1))
        base = rec["loss_before"] if rec["loss_before"] > 0 else 1.0
        ax_loss.plot(curve["step"], [v / base for v in curve["loss"]], color=color, lw=0.8, alpha=0.8,
                     label=rec["unit"])
        ax_reg.plot(curve["step"], curve["reg"], color=color, lw=0.8, alpha=0.8)
    ax_loss.axhline(1.0, color="grey", ls="--", lw=0.8)
    ax_loss.set(yscale="log", xlabel="iteration", ylabel="batch loss / loss with nearest rounding",
                title="Reconstruction loss")
    ax_reg.set(yscale="symlog", xlabel="iteration", ylabel="sum(1 - |2h - 1|^beta)", title="Rounding regularizer")
    if len(records) <= MAX_LEGEND_UNITS:
        ax_loss.legend(fontsize=7, ncols=2)
    xs = range(len(records))
    ax_bar.bar([x - 0.2 for x in xs], [r["loss_before"] for r in records], width=0.4, label="nearest")
    ax_bar.bar([x + 0.2 for x in xs], [r["loss_after"] for r in records], width=0.4, label="AdaRound")
    ax_bar.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=6 if len(records) > MAX_LEGEND_UNITS else 8)
    ax_bar.set(yscale="log", ylabel="reconstruction loss (check batch)", title="Per unit: before and after")
    ax_bar.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path
