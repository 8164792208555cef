"""Figures and widgets of chapter 06: pipeline schedules as Gantt charts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from matplotlib.figure import Figure
from matplotlib.patches import Patch

if TYPE_CHECKING:
    import ipywidgets


from course_lib.figures import CourseFigure

# chapter 06: pipeline schedules as Gantt charts, and a widget to play with them

PIPELINE_COLORS = {"F": "#4C78A8", "B": "#F58518"}


def plot_pipeline(
    timeline: Sequence[Sequence[tuple]],
    title: str,
    peaks: Sequence[int] | None = None,
    note: str | None = None,
    time_unit: str = "t_f",
    width: float = 12,
) -> Figure:
    """Gantt chart of ``timeline`` (per stage: ((kind, i), start, end)), stage 0 on top.

    Blue boxes are forwards, orange ones backwards (numbered by micro-batch when the
    number fits); grey hatching is idle time, the bubble. ``peaks`` (one number per
    stage) adds a panel of the most micro-batches alive at once on each stage.
    """
    p = len(timeline)
    start = min(a[1] for row in timeline for a in row)
    end = max(a[2] for row in timeline for a in row)
    fig = CourseFigure(figsize=(width, 0.55 * p + 2.0), layout="constrained")
    if peaks is None:
        ax = fig.subplots()
    else:
        ax, ax_mem = fig.subplots(1, 2, width_ratios=[6, 1], sharey=True)
    boxes = sum(len(row) for row in timeline) / p
    edge = 0.8 if boxes <= 24 else 0.3 if boxes <= 64 else 0  # thin boxes must stay coloured
    points_per_unit = 72 * width * (0.75 if peaks is None else 0.68) / (end - start)
    digits = len(str(max(i for row in timeline for (_, i), _, _ in row)))
    labelled = {
        kind
        for kind in "FB"  # number a kind's boxes only if its narrowest fits the number
        if min((b - a for row in timeline for (k, _), a, b in row if k == kind), default=0) * points_per_unit
        >= 6 * digits + 4
    }
    for s, row in enumerate(timeline):
        y = p - 1 - s
        ax.broken_barh(
            [(0, end - start)], (y + 0.08, 0.84), facecolor="0.88", hatch="///", edgecolor="0.75", linewidth=0
        )
        for (kind, i), a, b in row:
            ax.broken_barh(
                [(a - start, b - a)],
                (y + 0.08, 0.84),
                facecolor=PIPELINE_COLORS[kind],
                edgecolor="white",
                linewidth=edge,
            )
            if kind in labelled:
                ax.text(
                    (a + b) / 2 - start,
                    y + 0.5,
                    str(i),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white",
                    fontweight="bold",
                )
    ax.set_yticks([p - 1 - s + 0.5 for s in range(p)], [f"stage {s}" for s in range(p)])
    ax.set_ylim(0, p)
    ax.set_xlim(0, end - start)
    ax.set_xlabel(f"time ({time_unit})")
    ax.set_title(title, fontsize=11, loc="left")
    legend = [
        Patch(color=PIPELINE_COLORS["F"], label="forward (micro-batch no.)"),
        Patch(color=PIPELINE_COLORS["B"], label="backward"),
        Patch(facecolor="0.88", hatch="///", edgecolor="0.75", label="idle (bubble)"),
    ]
    fig.legend(handles=legend, loc="outside lower center", ncols=3, fontsize=9, frameon=False)
    if peaks is not None:
        ax_mem.barh([p - 1 - s + 0.5 for s in range(p)], peaks, height=0.6, color="#54A24B")
        for s, value in enumerate(peaks):
            ax_mem.text(value, p - 1 - s + 0.5, f" {value}", va="center", fontsize=9)
        ax_mem.set_xlim(0, max(peaks) * 1.35 + 0.5)
        ax_mem.set_title("live micro-batches\n(peak)", fontsize=9)
        ax_mem.tick_params(left=False)
        ax_mem.set_xticks([])
    if note:
        ax.text(1.0, 1.02, note, transform=ax.transAxes, ha="right", va="bottom", fontsize=10)
    return fig


def plot_schedule(name: str, p: int, m: int, t_f: float = 1.0, t_b: float = 2.0, width: float = 12) -> Figure:
    """Simulate schedule ``name`` ("gpipe" or "1f1b") on p stages with m micro-batches and draw it."""
    from course_lib import pp

    sim = pp.simulate(pp.SCHEDULES[name](p, m), t_f, t_b)
    label = {"gpipe": "GPipe", "1f1b": "1F1B"}[name]
    note = f"bubble {sim.bubble_fraction:.1%}   formula (p−1)/(m+p−1) = {pp.bubble_formula(p, m):.1%}"
    return plot_pipeline(
        sim.timeline,
        f"{label}, p = {p}, m = {m}, t_b = {t_b / t_f:g}·t_f",
        sim.peak_activations,
        note,
        width=width,
    )


def plot_measured_pipeline(
    timelines: Sequence[Sequence[tuple]], title: str, note: str | None = None, width: float = 12
) -> Figure:
    """:func:`plot_pipeline` of timelines measured by ``pp.train_step(..., timeline=...)``, in ms."""
    t0 = min(row[0][1] for row in timelines)
    in_ms = [[(a, (s - t0) * 1e3, (e - t0) * 1e3) for a, s, e in row] for row in timelines]
    return plot_pipeline(in_ms, title, note=note, time_unit="ms", width=width)


def pipeline_explorer(p: int = 4, m: int = 8, ratio: float = 2.0, schedule: str = "gpipe") -> ipywidgets.VBox:
    """Sliders for p, m and t_b/t_f and a schedule picker, the Gantt chart and the formulas.

    Everything the callback uses lives inside this function, so no later cell can
    change what a slider move draws. Returns the widget (display it, or leave it last).
    """
    import ipywidgets as widgets
    from IPython.display import display

    from course_lib import pp

    slider = dict(style={"description_width": "initial"}, layout=widgets.Layout(width="420px"))
    stages = widgets.IntSlider(value=p, min=1, max=8, description="p (stages)", **slider)
    micro = widgets.IntSlider(value=m, min=1, max=32, description="m (micro-batches)", **slider)
    ratio_slider = widgets.FloatSlider(
        value=ratio, min=0.5, max=4.0, step=0.5, description="t_b / t_f", **slider
    )
    picker = widgets.Dropdown(
        options=[("GPipe", "gpipe"), ("1F1B", "1f1b")],
        value=schedule,
        description="schedule",
        style={"description_width": "initial"},
        layout=widgets.Layout(width="220px"),
    )
    readout = widgets.HTML(layout=widgets.Layout(width="320px"))

    def redraw(p, m, ratio, name):
        sim = pp.simulate(pp.SCHEDULES[name](p, m), 1.0, ratio)
        peak = "m" if name == "gpipe" else "min(p−s, m)"
        ideal = m * (1 + ratio)
        readout.value = (
            f"<b>bubble</b> = (p−1)/(m+p−1) = {p - 1}/{m + p - 1} = <b>{pp.bubble_formula(p, m):.1%}</b>"
            f"<br>simulated: {sim.bubble_fraction:.1%}"
            f"<br><br><b>step</b> = (m+p−1)(t_f+t_b) = {(m + p - 1) * (1 + ratio):g}·t_f"
            f"<br>simulated: {sim.total_time:g}·t_f"
            f"<br><b>ideal</b> = m(t_f+t_b) = {ideal:g}·t_f"
            f"<br>(step − ideal)/ideal = (p−1)/m = <b>{(p - 1) / m:.3f}</b>"
            f"<br><br><b>peak live micro-batches</b> per stage<br>{peak}: {sim.peak_activations}"
        )
        display(plot_schedule(name, p, m, 1.0, ratio, width=9))

    picture = widgets.interactive_output(redraw, dict(p=stages, m=micro, ratio=ratio_slider, name=picker))
    controls = widgets.VBox([stages, micro, ratio_slider, picker])
    return widgets.VBox([widgets.HBox([controls, readout]), picture])
