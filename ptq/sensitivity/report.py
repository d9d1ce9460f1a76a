"""What a researcher reads of a sensitivity scan: the Markdown table and the bar chart."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ptq.atomic import atomic_path


def _f(v: float | None, digits: int = 2, sign: bool = False) -> str:
    if v is None:
        return ""
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _rounding_note(metrics: Mapping[str, Any]) -> str:
    """``, nearest rounding: no AdaRound`` (or GPTQ) where the config's weight reconstruction was not run."""
    if not metrics.get("rounding"):
        return ""
    return ", nearest rounding: no GPTQ" if "(no GPTQ)" in metrics["rounding"] else ", nearest rounding: no AdaRound"


def baseline_label(metrics: Mapping[str, Any]) -> str:
    """``baseline (<row name>)``, and that AdaRound / GPTQ was not run where the config asks for it."""
    note = _rounding_note(metrics)
    return f"baseline ({metrics['name']}{note})"


def markdown(metrics: Mapping[str, Any]) -> str:
    """One Markdown table: the float model, the baseline, then every group by cost (largest first)."""
    b = int(metrics["high_bits"])
    base = metrics["baseline"]
    lines = [
        f"| group | kind | quantizers | top-1, group float | cost | KL, group float | top-1, group at {b} bits "
        f"| gain at {b} bits | KL, group at {b} bits |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| float model | | | {_f(metrics['float']['acc1'])} | | 0 | | | |",
        f"| {baseline_label(metrics)} | | all | {_f(base['acc1'])} | | {_f(base['kl'], 4)} | | | |",
    ]
    for r in metrics["groups"]:
        head = f"| {r['group']} | {r['kind']} | {r['members']} |"
        if r.get("skipped"):
            lines.append(f"{head} skipped: {r['skipped']} | | | | | |")
            continue
        if r["high_acc1"] is None:
            high = "not measured (finished run) | |"
        elif r["raised"]:
            high = f"{_f(r['high_acc1'])} | {_f(r['cost_high'], sign=True)} | {_f(r['high_kl'], 4)}"
        else:
            high = f"already at {b} bits or wider | |"
        lines.append(f"{head} {_f(r['float_acc1'])} | {_f(r['cost_float'], sign=True)} | {_f(r['float_kl'], 4)} | "
                     f"{high} |")
    return "\n".join(lines)


def plot(metrics: Mapping[str, Any], path: Path) -> Path:
    """Horizontal bars per group (largest cost on top): top-1 with the group float and at ``high_bits``,
    each drawn from the baseline; the baseline and the float model as vertical lines. Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in metrics["groups"] if not r.get("skipped")]
    base, fp, b = metrics["baseline"]["acc1"], metrics["float"]["acc1"], int(metrics["high_bits"])
    n = len(rows)
    fig = Figure(figsize=(8.0, 1.6 + 0.34 * n), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    y = [n - 1 - i for i in range(n)]  # first row (largest cost) at the top
    h = 0.38
    ax.barh([v + h / 2 for v in y], [r["float_acc1"] - base for r in rows], height=h, left=base,
            color="tab:blue", label="group left float")
    high = [(v, r) for v, r in zip(y, rows, strict=True) if r["high_acc1"] is not None]
    if high:
        ax.barh([v - h / 2 for v, _ in high], [r["high_acc1"] - base for _, r in high], height=h, left=base,
                color="tab:orange", label=f"group at {b} bits")
    ax.axvline(base, color="black", linestyle="--", linewidth=1, label=f"baseline {base:.2f}")
    ax.axvline(fp, color="tab:green", linestyle=":", linewidth=1.5, label=f"float model {fp:.2f}")
    for v, r in zip(y, rows, strict=True):
        if not r["raised"] and r["high_acc1"] is not None:
            ax.annotate(f"already at {b} bits or wider", (base, v - h / 2), xytext=(4, 0), textcoords="offset points",
                        va="center", fontsize=7, color="tab:orange")
    ax.set_yticks(y, [f"{r['group']} ({r['kind']}, {r['members']})" for r in rows], fontsize=8)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel("top-1 (%) on the eval subset")
    note = _rounding_note(metrics)
    skipped = [r["group"] for r in metrics["groups"] if r.get("skipped")]
    what = "left float" if not high else f"left float / at {b} bits"
    source = f" (finished run {metrics['source_run']})" if metrics.get("source_run") else ""
    title = (f"{metrics['name']}{note}{source}\none quantizer group at a time {what}, "
             f"the rest as configured (n_eval={metrics['n_eval']})")
    if skipped:
        title += f"\nskipped (disabled in this config): {', '.join(skipped)}"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="x", alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path
