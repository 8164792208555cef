"""Figures of chapter 09b: loss curves of many configurations overlaid, and their deviation."""

from __future__ import annotations

from matplotlib.figure import Figure

from course_lib.figures import CourseFigure, rank_color


def loss_curves(curves: dict, references: dict, bf16_tolerance: float | None = None) -> Figure:
    """Left: every configuration's loss per step, the one-process curves thick and grey beneath.
    Right: each configuration's relative deviation |loss − reference| / reference per step (log).

    ``curves``: name -> losses; ``references``: name -> the name of its one-process curve;
    ``bf16_tolerance``: a second dashed line, the tolerance of the bf16 curves."""
    fig = CourseFigure(figsize=(10, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    names = [n for n in curves if references.get(n, n) != n]
    for name in {references[n] for n in names}:
        left.plot(curves[name], color="0.6", lw=6, alpha=0.5, label=f"{name} (one process)")
    styles = ["-", "--", ":", "-."]
    for i, name in enumerate(names):
        color = rank_color(i)
        left.plot(curves[name], color=color, lw=1.4, ls=styles[i % len(styles)], label=name)
        reference = curves[references[name]]
        deviation = [max(abs(a - b) / abs(b), 1e-10) for a, b in zip(curves[name], reference)]
        right.semilogy(deviation, color=color, lw=1.2, label=name)
    left.set(xlabel="step", ylabel="loss (cross-entropy, nats per character)", title="loss curves")
    left.legend(fontsize=8)
    right.set(xlabel="step", ylabel="|loss − one process| / one process", title="relative deviation")
    right.axhline(1e-4, color="black", lw=0.8, ls="--")
    right.text(0, 1.2e-4, "tolerance 1e-4 (fp32)", fontsize=8)
    if bf16_tolerance is not None:
        right.axhline(bf16_tolerance, color="black", lw=0.8, ls=":")
        right.text(0, bf16_tolerance * 1.2, f"tolerance {bf16_tolerance:.1e} (bf16)", fontsize=8)
    right.set_ylim(1e-10, 1e-2)
    return fig
