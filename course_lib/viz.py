"""Pictures for the course: every rank's data around a collective, and timings.

Functions return a matplotlib Figure and draw nothing on screen themselves; a
notebook shows a Figure that is the last value of a cell. They use the
object-oriented API (``Figure``, not ``pyplot``), so no global figure is left
open (a widget redrawing 100 times leaks nothing) and nothing needs a display.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import matplotlib
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from course_lib.collectives import ROOTED, bandwidth, bus_factor, format_bytes, run_collective, sources

if TYPE_CHECKING:
    import ipywidgets
    import torch
    from matplotlib.axes import Axes

    from course_lib.alpha_beta import AlphaBeta, PointToPoint
    from course_lib.collectives import CollectiveDemo, Timing
    from course_lib.mesh import GridLayout
    from course_lib.moe import Routing
    from course_lib.ring_allreduce import RingSteps


class CourseFigure(Figure):
    """A Figure that shows itself as a PNG in a notebook, whatever the matplotlib backend.

    Without pyplot, Jupyter only knows how to draw a plain Figure once the inline
    backend has been activated; otherwise it would print "<Figure size ...>".
    """

    def _repr_png_(self):
        buffer = io.BytesIO()
        self.savefig(buffer, format="png")
        return buffer.getvalue()


def rank_color(rank: int, world_size: int = 10) -> tuple[float, float, float, float]:
    """One distinct color per rank (tab10 up to 10 ranks, tab20 up to 20, then a rainbow)."""
    if world_size <= 10:
        return matplotlib.colormaps["tab10"](rank % 10)
    if world_size <= 20:
        return matplotlib.colormaps["tab20"](rank % 20)
    return matplotlib.colormaps["hsv"](rank / world_size)


def draw_rank_rows(
    ax: Axes,
    values: Sequence[torch.Tensor | None],
    masks: Sequence[torch.Tensor | None],
    n: int,
    title: str,
    root_label: Callable[[int], str],
) -> None:
    """One row per rank; each cell striped with the colors of the ranks it came from."""
    width = max((len(v) for v in values if v is not None), default=1)
    for rank, (row, mask_row) in enumerate(zip(values, masks)):
        y = n - 1 - rank  # rank 0 on top
        if row is None:
            ax.add_patch(Rectangle((0, y + 0.05), width, 0.9, fill=False, linestyle="--", edgecolor="0.6"))
            ax.text(
                width / 2,
                y + 0.5,
                "no result",
                ha="center",
                va="center",
                color="0.45",
                fontsize=9,
                style="italic",
            )
            continue
        for i, (value, mask) in enumerate(zip(row.tolist(), mask_row.tolist())):
            contributors = sources(mask) or [None]
            stripe = 1.0 / len(contributors)
            for s, src in enumerate(contributors):
                color = "0.85" if src is None else rank_color(src, n)
                ax.add_patch(Rectangle((i + s * stripe, y + 0.05), stripe, 0.9, color=color, linewidth=0))
            ax.add_patch(Rectangle((i, y + 0.05), 1, 0.9, fill=False, edgecolor="white", linewidth=1.5))
            ax.text(
                i + 0.5,
                y + 0.5,
                f"{value:g}",
                ha="center",
                va="center",
                fontsize=9,
                bbox=dict(boxstyle="round,pad=0.15", facecolor="white", alpha=0.75, linewidth=0),
            )
    ax.set_xlim(0, width)
    ax.set_ylim(0, n)
    ax.set_yticks([n - 1 - r + 0.5 for r in range(n)])
    ax.set_yticklabels([root_label(r) for r in range(n)])
    ax.set_xticks([])
    ax.set_title(title, fontsize=10)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(left=False)


def plot_collective(demo: CollectiveDemo) -> Figure:
    """Every rank's data before and after ``demo`` (a :class:`~course_lib.collectives.CollectiveDemo`).

    Two axes, "before" and "after", one row per rank. A cell's color says which
    rank its value came from; a cell holding a sum is striped with the colors
    of every rank that was added into it.
    """
    n = demo.world_size
    k_before = max(len(v) for v in demo.before)
    k_after = max((len(v) for v in demo.after if v is not None), default=k_before)
    rooted = demo.name in ROOTED

    def label(rank):
        return f"rank {rank} (root)" if rooted and rank == demo.root else f"rank {rank}"

    width = 0.55 * (k_before + k_after) + 2.6
    fig = CourseFigure(figsize=(width, 0.5 * n + 1.3), layout="constrained")
    ax_before, ax_after = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[k_before, k_after]))
    draw_rank_rows(ax_before, demo.before, demo.before_sources, n, "before", label)
    draw_rank_rows(ax_after, demo.after, demo.after_sources, n, "after", label)
    title = f"{demo.name} on N = {n} rank{'s' if n > 1 else ''}"
    if rooted:
        title += f", {'src' if demo.name == 'broadcast' else 'dst'} = rank {demo.root}"
    fig.suptitle(title, fontsize=11)
    fig.legend(
        handles=[Patch(color=rank_color(r, n), label=f"from rank {r}") for r in range(n)],
        loc="outside lower center",
        ncols=max(1, min(n, int(width / 1.3))),
        fontsize=8,
        frameon=False,
    )
    return fig


def show_collective(name: str, world_size: int, root: int = 0, k: int | None = None) -> Figure:
    """Run collective ``name`` on ``world_size`` ranks and picture every rank's data."""
    return plot_collective(run_collective(name, world_size, k=k, root=root))


def plot_timing(
    timings: Sequence[Timing], predict: Callable[[Timing], Sequence[float] | None] | None = None
) -> Figure:
    """Time per call (left) and bus bandwidth (right) against the array size S.

    ``timings`` is a list of :class:`~course_lib.collectives.Timing`; one line per collective
    and world size: the median batch, with a band from the best to the worst batch where the
    timing has them. ``predict(timing)``, when given, returns predicted seconds per size (or
    None), drawn dashed in the same colour: a model beside the measurement.
    """
    fig = CourseFigure(figsize=(10, 3.8), layout="constrained")
    ax_time, ax_bw = fig.subplots(1, 2)
    sizes = sorted({s for t in timings for s in t.nbytes})
    for i, t in enumerate(timings):
        label = f"{t.name}, N = {t.world_size} (busbw = algbw × {bus_factor(t.name, t.world_size):.3g})"
        color = matplotlib.colormaps["tab10"](i % 10)
        ax_time.plot(t.nbytes, [s * 1e3 for s in t.seconds], "o-", color=color, label=label)
        busbw = [bandwidth(t.name, s, sec, t.world_size)[1] / 1e9 for s, sec in zip(t.nbytes, t.seconds)]
        ax_bw.plot(t.nbytes, busbw, "o-", color=color, label=label)
        if getattr(t, "fastest", None) and getattr(t, "slowest", None):
            ax_time.fill_between(
                t.nbytes,
                [s * 1e3 for s in t.fastest],
                [s * 1e3 for s in t.slowest],
                color=color,
                alpha=0.15,
                linewidth=0,
            )
            ax_bw.fill_between(
                t.nbytes,
                *(
                    [bandwidth(t.name, s, sec, t.world_size)[1] / 1e9 for s, sec in zip(t.nbytes, edge)]
                    for edge in (t.slowest, t.fastest)
                ),
                color=color,
                alpha=0.15,
                linewidth=0,
            )
    if predict is not None:  # after every measured line: callers may restyle lines in order
        for i, t in enumerate(timings):
            predicted = predict(t)
            if predicted is not None:
                ax_time.plot(
                    t.nbytes,
                    [s * 1e3 for s in predicted],
                    "--",
                    linewidth=1.2,
                    color=matplotlib.colormaps["tab10"](i % 10),
                )
    for ax in (ax_time, ax_bw):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [format_bytes(s) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("S, the full array (bytes)")
        ax.grid(True, alpha=0.3)
    ax_time.set_yscale("log")
    # Labels at 1, 2, 5, 10, ... written plainly, rather than 2×10⁰.
    ax_time.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax_time.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax_time.yaxis.set_minor_formatter(NullFormatter())
    ax_time.set_ylabel("time per call (ms)")
    banded = any(getattr(t, "fastest", None) for t in timings)
    ax_time.set_title(
        "time per call: median batch" + (", band = best to worst batch" if banded else ""), fontsize=10
    )
    if predict is not None:
        ax_time.legend(
            handles=[Line2D([], [], linestyle="--", color="0.4", label="α–β prediction")],
            fontsize=8,
            loc="lower right",
        )
    ax_bw.set_ylabel("bus bandwidth (GB/s)")
    ax_bw.set_title("busbw = S/t × factor (nccl-tests)", fontsize=10)
    ax_bw.legend(fontsize=8, loc="upper left")
    backend = ", ".join(sorted({t.backend for t in timings}))
    fig.suptitle(f"Measured on this machine ({backend})", fontsize=11)
    return fig


# ----------------------------------------------------------------------------
# chapter 01: the α–β model, rounds of a traced program, and the collective explorer


def plot_alpha_beta(pp: PointToPoint, model: AlphaBeta) -> Figure:
    """Measured one-way time of one message against its size, beside the fitted t(S) = α + S/β.

    ``pp`` is an :class:`~course_lib.alpha_beta.PointToPoint`: dots are the median batch, bars
    run from the best to the worst batch, crosses mark the best batch (what ``model`` was fitted
    to, when fitted to ``pp.fastest``).
    """
    fig = CourseFigure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    us = [t * 1e6 for t in pp.seconds]
    ax.errorbar(
        pp.nbytes,
        us,
        yerr=[
            [m - lo * 1e6 for m, lo in zip(us, pp.fastest)],
            [hi * 1e6 - m for m, hi in zip(us, pp.slowest)],
        ],
        fmt="o",
        color="tab:blue",
        capsize=3,
        label="measured: median batch, bar = best to worst",
    )
    ax.plot(pp.nbytes, [t * 1e6 for t in pp.fastest], "x", color="black", markersize=8, label="best batch")
    lo, hi = min(pp.nbytes), max(pp.nbytes)
    grid = [lo * (hi / lo) ** (i / 60) for i in range(61)]
    ax.plot(
        grid,
        [model.message(s) * 1e6 for s in grid],
        "-",
        color="tab:red",
        linewidth=2,
        label=f"fit: t(S) = α + S/β  ({model.describe()})",
    )
    ax.plot(grid, [model.alpha * 1e6] * len(grid), ":", color="tab:red", linewidth=1, label="α alone")
    ax.plot(grid, [s / model.beta * 1e6 for s in grid], "--", color="tab:red", linewidth=1, label="S/β alone")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(pp.nbytes, [format_bytes(s) for s in pp.nbytes])
    ax.minorticks_off()
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.set_ylim(bottom=min(min(pp.fastest) * 1e6, model.alpha * 1e6) / 3)
    ax.set_xlabel("S, bytes in one message")
    ax.set_ylabel("one-way time (µs)")
    ax.set_title("One message, rank 0 to rank 1: measured, and the fitted t(S) = α + S/β", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.legend(fontsize=8, loc="outside lower center", ncols=2, frameon=False)
    return fig


def plot_rounds(traces_by_name: dict) -> Figure:
    """Each traced program's messages, one panel each: ranks top to bottom, rounds left to right.

    ``traces_by_name`` maps a title to per-rank traces (:func:`~course_lib.collectives.trace_point_to_point`);
    an arrow is one message, drawn in the round it arrives in (:func:`~course_lib.collectives.message_rounds`).
    """
    from course_lib.collectives import message_rounds

    panels = {name: message_rounds(traces) for name, traces in traces_by_name.items()}
    n = max(len(traces) for traces in traces_by_name.values())
    rounds = max((m[3] for msgs in panels.values() for m in msgs), default=1)
    fig = CourseFigure(
        figsize=(min(11, 2 + 0.9 * rounds * len(panels)), 0.42 * n + 1.4), layout="constrained"
    )
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (name, msgs) in zip(axes, panels.items()):
        last = max((m[3] for m in msgs), default=0)
        for src, dst, _, arrival in msgs:
            ax.annotate(
                "",
                xy=(arrival, dst),
                xytext=(arrival - 1, src),
                arrowprops=dict(
                    arrowstyle="-|>", color=rank_color(src, n), linewidth=1.6, shrinkA=4, shrinkB=4
                ),
            )
        ax.set_xticks(range(rounds + 1), ["start"] + [str(r) for r in range(1, rounds + 1)])
        ax.set_xlim(-0.3, rounds + 0.3)
        ax.set_ylim(n - 0.5, -0.5)
        ax.set_yticks(range(n), [f"rank {r}" for r in range(n)])
        ax.set_xlabel("round")
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{name}: {last} round{'s' if last != 1 else ''}, {len(msgs)} messages", fontsize=10)
    fig.suptitle(
        "Traced send/recv on real ranks: one arrow per message, in the round it arrives", fontsize=11
    )
    return fig


def collective_explorer(name: str = "all-to-all", world_size: int = 4, max_ranks: int = 8) -> ipywidgets.VBox:
    """A widget: pick a collective, N and (for broadcast and reduce only) the root; see the picture.

    The root slider's maximum follows N, and it is hidden for collectives without a root. Every
    change launches N fresh ranks. Everything the callbacks use is local to this call.
    """
    import ipywidgets as widgets

    from course_lib.collectives import COLLECTIVES

    wide = dict(style={"description_width": "initial"}, layout=widgets.Layout(width="320px"))
    picker = widgets.Dropdown(options=COLLECTIVES, value=name, description="collective", **wide)
    ranks = widgets.IntSlider(value=world_size, min=1, max=max_ranks, description="N ranks", **wide)
    root = widgets.IntSlider(value=0, min=0, max=world_size - 1, description="root", **wide)
    picture = widgets.Output()
    busy = [False]  # changing root.max below may change root.value: draw once, not twice

    def redraw(change=None):
        if busy[0]:
            return
        busy[0] = True
        try:
            root.max = ranks.value - 1  # the slider clamps its value to the new maximum
            rooted = picker.value in ROOTED
            root.disabled = not rooted
            root.layout.display = None if rooted else "none"
            figure = show_collective(picker.value, ranks.value, root=root.value if rooted else 0)
            # Replace the picture with one PNG output, as a notebook stores it (base64 text):
            # the same with or without a kernel, and nothing piles up.
            png = base64.b64encode(figure._repr_png_()).decode("ascii")
            picture.outputs = (
                {
                    "output_type": "display_data",
                    "metadata": {},
                    "data": {"image/png": png, "text/plain": f"<{figure.get_suptitle()}>"},
                },
            )
        finally:
            busy[0] = False

    for control in (picker, ranks, root):
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([picker, ranks, root]), picture])


# ----------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------
# chapter 07 (ZeRO) and chapter 09 (3D parallelism, the cost model)
#
# Figures at most 9.5 inches wide (950 px at the default 100 dpi), so JupyterLab shows them at
# full size and no text is below 9 pt.

ZERO_STAGE_NAMES = {0: "plain DP", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3"}
ZERO_KIND_COLORS = {"params": "tab:blue", "grads": "tab:orange", "optimizer": "tab:green"}
ZERO_KIND_LABELS = {"params": "parameters", "grads": "gradients", "optimizer": "Adam states"}


def _bare(ax):
    ax.tick_params(left=False, bottom=False)
    for side in ax.spines.values():
        side.set_visible(False)


def plot_zero_holdings(n: int = 4, precision: str = "fp32") -> Figure:
    """Which part of each tensor each of ``n`` ranks holds, per ZeRO stage (bytes to scale)."""
    from course_lib import zero

    sizes = dict(zip(ZERO_KIND_COLORS, zero.PRECISIONS[precision]))
    fig = CourseFigure(figsize=(9.5, 4.2), layout="constrained")
    for stage, ax in zip(zero.STAGES, fig.subplots(2, 2).ravel()):
        sharded = {"params": stage >= 3, "grads": stage >= 2, "optimizer": stage >= 1}
        for rank in range(n):
            x, y = 0, n - 1 - rank
            for kind, width in sizes.items():
                for part in range(n):
                    held = not sharded[kind] or part == rank
                    ax.add_patch(
                        Rectangle(
                            (x + part * width / n, y + 0.1),
                            width / n,
                            0.8,
                            facecolor=ZERO_KIND_COLORS[kind] if held else "0.88",
                            edgecolor="white",
                            linewidth=1,
                        )
                    )
                x += width + 0.6
        per_rank = sum(zero.formula_bytes(stage, 1, n, precision).values())
        ax.set_title(f"{ZERO_STAGE_NAMES[stage]}: {per_rank:g}Ψ bytes per rank", fontsize=10)
        ax.set_xlim(0, sum(sizes.values()) + 1.2)
        ax.set_ylim(0, n)
        ax.set_xticks([])
        ax.set_yticks([n - 1 - r + 0.5 for r in range(n)], [f"rank {r}" for r in range(n)], fontsize=9)
        _bare(ax)
    fig.legend(
        handles=[
            Patch(color=c, label=f"{ZERO_KIND_LABELS[k]} ({sizes[k]} B/parameter)")
            for k, c in ZERO_KIND_COLORS.items()
        ]
        + [Patch(color="0.88", label="not held")],
        loc="outside lower center",
        ncols=4,
        frameon=False,
        fontsize=9,
    )
    fig.suptitle(
        f"What each of N = {n} ranks holds ({precision}; shard r of each tensor is rank r's)", fontsize=11
    )
    return fig


def plot_zero_memory(measured: dict, psi: int, formula: Callable[[int, int], float] | None = None) -> Figure:
    """Model-state bytes per rank (÷ Ψ), measured (bars by kind) against the formula (black).

    ``measured[n][stage]`` holds ``{"params", "grads", "optimizer": bytes}`` for each N.
    """
    from course_lib import zero

    formula = formula or (lambda stage, n: sum(zero.formula_bytes(stage, psi, n).values()))
    sizes = sorted(measured)
    names = {0: "16Ψ", 1: "8Ψ + 8Ψ/N", 2: "4Ψ + 12Ψ/N", 3: "16Ψ/N"}
    fig = CourseFigure(figsize=(9.5, 4.0), layout="constrained")
    axes = fig.subplots(1, 4, sharey=True)
    xs = range(len(sizes))
    for stage, ax in zip(zero.STAGES, axes):
        bottom = [0.0] * len(sizes)
        for kind, color in ZERO_KIND_COLORS.items():
            heights = [measured[n][stage][kind] / psi for n in sizes]
            ax.bar(xs, heights, 0.6, bottom=bottom, color=color, label=f"{ZERO_KIND_LABELS[kind]} (measured)")
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.plot(
            xs,
            [formula(stage, n) / psi for n in sizes],
            "k_",
            markersize=22,
            markeredgewidth=2.5,
            label="formula",
        )
        ax.set_xticks(list(xs), [str(n) for n in sizes], fontsize=9)
        ax.set_xlabel("N ranks", fontsize=9)
        ax.set_title(f"{ZERO_STAGE_NAMES[stage]}\n{names[stage]}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("bytes per parameter on a rank\n(model states ÷ Ψ, fp32)", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=4, frameon=False, fontsize=9)
    fig.suptitle(
        f"Memory per rank after step(): bars measured, black lines the formula (Ψ = {psi:,})", fontsize=11
    )
    return fig


def plot_zero_traffic(received: dict, psi: int) -> Figure:
    """Bytes a rank received in one step (÷ 4Ψ), measured bars against the formula, per stage and N.

    ``received[n][stage]`` is the measured number of bytes.
    """
    from course_lib import zero

    fig = CourseFigure(figsize=(8, 3.9), layout="constrained")
    ax = fig.subplots()
    sizes = sorted(received)
    width = 0.8 / len(sizes)
    for i, n in enumerate(sizes):
        xs = [s + (i - (len(sizes) - 1) / 2) * width for s in zero.STAGES]
        ax.bar(
            xs,
            [received[n][s] / (4 * psi) for s in zero.STAGES],
            width * 0.9,
            color=f"C{i}",
            label=f"N = {n}, measured",
        )
        ax.plot(
            xs,
            [zero.formula_traffic(s, psi, n) / (4 * psi) for s in zero.STAGES],
            "k_",
            markersize=16,
            markeredgewidth=2.5,
            label="formula" if i == 0 else None,
        )
    ax.set_xticks(
        list(zero.STAGES),
        [f"{ZERO_STAGE_NAMES[s]}\n{'3' if s == 3 else '2'}Ψ·(N−1)/N" for s in zero.STAGES],
        fontsize=9,
    )
    ax.set_ylabel("received per step (× Ψ·4 bytes)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9, loc="upper left")
    ax.set_title(f"Traffic per rank and training step (Ψ = {psi:,}, fp32, gloo)", fontsize=11)
    return fig


def plot_zero_calculator(
    psi_billions: float = 7.0, n: int = 8, stage: int = 2, precision: str = "mixed", device_gb: float = 80.0
) -> Figure:
    """Model-state memory per rank for a real model: every rank's bars, and every stage's total."""
    from course_lib import zero

    psi = psi_billions * 1e9
    per_rank = {k: v / 1e9 for k, v in zero.formula_bytes(stage, psi, n, precision).items()}
    total = sum(per_rank.values())
    totals = [sum(zero.formula_bytes(s, psi, n, precision).values()) / 1e9 for s in zero.STAGES]
    fig = CourseFigure(figsize=(9.5, 4.3), layout="constrained")
    ax_ranks, ax_stages = fig.subplots(1, 2, width_ratios=[3, 2])
    shown = min(n, 16)
    bottom = [0.0] * shown
    names = {
        "params": "parameters",
        "grads": "gradients",
        "optimizer": "Adam: fp32 master + m + v" if precision == "mixed" else "Adam: m + v",
    }
    for kind, color in ZERO_KIND_COLORS.items():
        ax_ranks.bar(
            range(shown),
            [per_rank[kind]] * shown,
            0.7,
            bottom=bottom,
            color=color,
            label=f"{names[kind]}: {per_rank[kind]:.1f} GB",
        )
        bottom = [b + per_rank[kind] for b in bottom]
    ax_ranks.set_xticks(range(shown), [str(r) for r in range(shown)], fontsize=9)
    ax_ranks.set_xlabel("rank" + (f" (ranks 16…{n - 1} hold the same)" if n > shown else ""), fontsize=9)
    ax_ranks.set_ylabel("GB of model states per rank", fontsize=9)
    verdict = "" if device_gb <= 0 else (" — fits" if total <= device_gb else " — does NOT fit")
    ax_ranks.set_title(
        f"{ZERO_STAGE_NAMES[stage]}, {precision}, Ψ = {psi_billions:g}B, N = {n}:\n"
        f"{total:.1f} GB per rank{verdict}",
        fontsize=10,
    )
    ax_ranks.set_ylim(0, max(total, device_gb) * 1.15)
    bars = ax_stages.bar(range(4), totals, 0.6, color=["0.35" if s == stage else "0.75" for s in zero.STAGES])
    ax_stages.bar_label(bars, [f"{t:.1f}" for t in totals], fontsize=9, padding=2)
    ax_stages.set_xticks(range(4), [ZERO_STAGE_NAMES[s] for s in zero.STAGES], fontsize=9)
    ax_stages.set_title("every stage, same Ψ and N\n(GB per rank)", fontsize=10)
    ax_stages.set_ylim(0, max(totals + [device_gb]) * 1.15)
    for ax in (ax_ranks, ax_stages):
        if device_gb > 0:
            ax.axhline(
                device_gb,
                color="crimson",
                linestyle="--",
                linewidth=1.5,
                label=f"device memory: {device_gb:g} GB",
            )
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(labelsize=9)
    fig.legend(
        *ax_ranks.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=9, frameon=False
    )
    return fig


def zero_memory_calculator(
    psi_billions: float = 7.0, n: int = 8, stage: int = 2, precision: str = "mixed", device_gb: float = 80.0
) -> ipywidgets.VBox:
    """A widget: pick Ψ, N, the stage, the precision and a device's memory; the figure redraws."""
    import ipywidgets as widgets
    from IPython.display import display

    from course_lib import zero

    wide, box = {"description_width": "initial"}, widgets.Layout(width="200px")
    controls = dict(
        psi_billions=widgets.BoundedFloatText(
            value=psi_billions,
            min=0.001,
            max=10_000,
            step=0.5,
            description="Ψ (billions)",
            style=wide,
            layout=box,
        ),
        n=widgets.Dropdown(
            options=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024],
            value=n,
            description="N ranks",
            style=wide,
            layout=box,
        ),
        device_gb=widgets.BoundedFloatText(
            value=device_gb, min=0, max=10_000, description="device GB", style=wide, layout=box
        ),
        stage=widgets.ToggleButtons(
            options=[(ZERO_STAGE_NAMES[s], s) for s in zero.STAGES],
            value=stage,
            description="stage",
            style=wide,
        ),
        precision=widgets.ToggleButtons(
            options=[("mixed: 2+2+12", "mixed"), ("fp32: 4+4+8", "fp32")],
            value=precision,
            description="precision",
            style=wide,
        ),
    )
    picture = widgets.interactive_output(lambda **kw: display(plot_zero_calculator(**kw)), controls)
    return widgets.VBox(
        [
            widgets.HBox([controls["psi_billions"], controls["n"], controls["device_gb"]]),
            controls["stage"],
            controls["precision"],
            picture,
        ]
    )


def draw_rank_grid(layout: GridLayout, highlight: int | None = None) -> Figure:
    """Three panels, one per axis of a dp × tp × pp ``layout``: every rank a box, coloured by its
    group on that axis (tp varies fastest, then dp, then pp)."""
    dp, tp, pp = layout.dp, layout.tp, layout.pp
    gap = 0.6  # between pipeline stages
    width = pp * tp + (pp - 1) * gap
    # Boxes of at least 0.45 inch; three panels side by side while they fit in 9.5 inches.
    panel = max(2.9, 0.45 * width + 0.5)
    rows, cols = (1, 3) if 3 * panel <= 9.5 else (3, 1)
    fig_width = min(9.5, max(panel * cols, 8.7 if cols == 3 else 6.5))  # 6.5: room for the title
    box = min(fig_width / cols - 0.5, 0.6 * width) / width  # inches per box
    fig = CourseFigure(figsize=(fig_width, (box * (dp + 1.1) + 0.8) * rows + 0.5), layout="constrained")
    titles = {
        "tp": ("tensor-parallel", "all-reduce every layer"),
        "dp": ("data-parallel", "gradients, once a step"),
        "pp": ("pipeline", "activations to the next stage"),
    }
    for ax, axis in zip(fig.subplots(rows, cols).ravel(), ("tp", "dp", "pp")):
        groups = layout.groups(axis)
        group_of = {r: i for i, g in enumerate(groups) for r in g}
        for rank in range(layout.world_size):
            c = layout.coordinates(rank)
            x, y = c.pp * (tp + gap) + c.tp, dp - 1 - c.dp
            color = rank_color(group_of[rank], len(groups)) if len(groups[0]) > 1 else "0.85"
            ax.add_patch(
                Rectangle(
                    (x + 0.05, y + 0.05),
                    0.9,
                    0.9,
                    facecolor=color,
                    alpha=0.85,
                    edgecolor="black" if rank == highlight else "white",
                    linewidth=2.5 if rank == highlight else 1,
                )
            )
            ax.text(x + 0.5, y + 0.5, str(rank), ha="center", va="center", fontsize=11, weight="bold")
        for s in range(pp):
            ax.text(s * (tp + gap) + tp / 2, dp + 0.1, f"stage {s}", ha="center", va="bottom", fontsize=9)
            for t in range(tp):
                ax.text(s * (tp + gap) + t + 0.5, -0.08, f"tp{t}", ha="center", va="top", fontsize=9)
        ax.set_xlim(-0.1, width + 0.1)
        ax.set_ylim(-0.5, dp + 0.6)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([dp - 1 - d + 0.5 for d in range(dp)], [f"dp{d}" for d in range(dp)], fontsize=9)
        _bare(ax)
        name, talk = titles[axis]
        size = len(groups[0])
        ax.set_title(
            f"{name}: {len(groups)} group{'s' if len(groups) > 1 else ''} of {size}\n("
            + ("size 1: no communication" if size == 1 else talk)
            + ")",
            fontsize=9,
        )
    fig.suptitle(
        f"{layout.world_size} ranks on a dp={dp} × tp={tp} × pp={pp} grid: same colour = same group"
        + ("" if highlight is None else f"; rank {highlight} outlined")
        + "\nrank = pp_index·dp·tp + dp_index·tp + tp_index",
        fontsize=10,
    )
    return fig


PLAN_PART_COLORS = {
    "params": "tab:blue",
    "grads": "tab:orange",
    "optimizer": "tab:green",
    "activations": "tab:red",
}


def plot_plan_memory(memories: dict, gpu_bytes: float = 80e9, title: str = "") -> Figure:
    """Stacked bars of memory per GPU, one per ``{label: {part: bytes}}``, against one GPU's memory."""
    fig = CourseFigure(figsize=(8, 3.9), layout="constrained")
    ax = fig.subplots()
    labels = list(memories)
    for i, label in enumerate(labels):
        bottom = 0.0
        for part, color in PLAN_PART_COLORS.items():
            value = memories[label].get(part, 0.0) / 1e9
            ax.bar(i, value, bottom=bottom, color=color, width=0.6, label=part if i == 0 else None)
            bottom += value
        ax.text(i, bottom, f"{bottom:.3g} GB", ha="center", va="bottom", fontsize=9)
    ax.axhline(gpu_bytes / 1e9, color="black", linestyle="--", linewidth=1)
    ax.text(
        -0.45,
        gpu_bytes / 1e9,
        f"one GPU: {gpu_bytes / 1e9:.0f} GB",
        va="bottom",
        ha="left",
        fontsize=9,
        bbox=dict(facecolor="white", alpha=0.8, linewidth=0, pad=1),
    )
    ax.set_xticks(range(len(labels)), labels, fontsize=9)
    ax.tick_params(labelsize=9)
    ax.set_ylabel("memory per GPU (GB)", fontsize=9)
    ax.set_ylim(0, max(ax.get_ylim()[1], gpu_bytes / 1e9) * 1.2)  # room for the labels
    ax.legend(fontsize=9, loc="upper right", ncols=4)
    ax.set_title(title, fontsize=10)
    return fig


def plan_calculator(
    model: str = "7B",
    gpus: int = 64,
    dp: int = 8,
    tp: int = 4,
    pp: int = 2,
    zero: int = 1,
    sp: bool = True,
    recompute: bool = False,
    attention: str = "materialised",
    microbatches: int = 8,
    gpu_gb: float = 80.0,
) -> ipywidgets.VBox:
    """Chapter 09's calculator: a plan's memory per GPU beside plain DP and ZeRO-3, its traffic and
    bubble (``course_lib.cost``), redrawn on every change. Everything it uses is its own."""
    import ipywidgets as widgets
    from IPython.display import display

    from course_lib import cost

    wide = {"description_width": "initial"}
    narrow, medium = widgets.Layout(width="130px"), widgets.Layout(width="190px")
    powers = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    controls = dict(
        model=widgets.Dropdown(
            options=list(cost.PRESETS), value=model, description="model", style=wide, layout=medium
        ),
        gpus=widgets.Dropdown(options=powers[3:], value=gpus, description="GPUs", style=wide, layout=medium),
        gpu_gb=widgets.Dropdown(
            options=[40.0, 80.0, 141.0, 192.0],
            value=gpu_gb,
            description="GB per GPU",
            style=wide,
            layout=medium,
        ),
        dp=widgets.Dropdown(options=powers, value=dp, description="dp", style=wide, layout=narrow),
        tp=widgets.Dropdown(options=powers[:5], value=tp, description="tp", style=wide, layout=narrow),
        pp=widgets.Dropdown(options=powers[:5], value=pp, description="pp", style=wide, layout=narrow),
        zero=widgets.Dropdown(
            options=[0, 1, 2, 3], value=zero, description="ZeRO stage", style=wide, layout=medium
        ),
        microbatches=widgets.IntSlider(
            value=microbatches,
            min=1,
            max=64,
            description="micro-batches m",
            style=wide,
            layout=widgets.Layout(width="400px"),
        ),
        attention=widgets.ToggleButtons(
            options=[("materialised scores", "materialised"), ("FlashAttention", "flash")],
            value=attention,
            description="attention",
            style=wide,
        ),
        sp=widgets.Checkbox(value=sp, description="sequence parallel", style=wide),
        recompute=widgets.Checkbox(value=recompute, description="full recomputation", style=wide),
    )

    def redraw(model, gpus, gpu_gb, dp, tp, pp, zero, microbatches, attention, sp, recompute):
        chosen = cost.PRESETS[model]
        plan = cost.Strategy(
            dp=dp,
            tp=tp,
            pp=pp,
            zero=zero,
            sp=sp,
            recompute=recompute,
            microbatches=microbatches,
            attention=attention,
        )
        est = cost.estimate(chosen, plan, gpus)
        if est.problems:
            print("✘ this mix cannot run:\n  - " + "\n  - ".join(est.problems))
            return
        traffic = ", ".join(f"{k} {cost.format_bytes(v)}" for k, v in est.traffic.items())
        fits = "fits" if est.memory_total <= gpu_gb * 1e9 else "does NOT fit"
        print(
            f"memory per GPU {cost.format_bytes(est.memory_total)} ({fits} in {gpu_gb:g} GB)\n"
            f"traffic per GPU per step: {traffic}\nbubble {est.bubble:.1%}"
        )
        for note in est.notes:
            print("note:", note)
        same = dict(recompute=recompute, attention=attention)
        plans = {
            "your plan": plan,
            f"DP × {gpus}": cost.Strategy(dp=gpus, **same),
            f"ZeRO-3 × {gpus}": cost.Strategy(dp=gpus, zero=3, **same),
        }
        display(cost.draw_plans(chosen, plans, gpu_gb * 1e9))

    picture = widgets.interactive_output(redraw, controls)
    c = controls
    return widgets.VBox(
        [
            widgets.HBox([c["model"], c["gpus"], c["gpu_gb"]]),
            widgets.HBox([c["dp"], c["tp"], c["pp"], c["zero"]]),
            c["microbatches"],
            c["attention"],
            widgets.HBox([c["sp"], c["recompute"]]),
            picture,
        ]
    )


# ----------------------------------------------------------------------------
# chapter 03: the ring step by step, bytes per rank, a bucketed backward pass


def _draw_ring_step(ax, steps, step: int, notes: bool = True):
    """Every rank's chunks after ``step`` of the ring's 2(N−1) steps; the chunks just received outlined.

    ``steps`` is a :class:`~course_lib.comm.RingSteps`.
    """
    n = steps.world_size
    values = [steps.values[r][step] for r in range(n)]
    masks = [steps.masks[r][step] for r in range(n)]
    phase = "start" if step == 0 else "reduce-scatter" if step <= n - 1 else "all-gather"
    title = f"after step {step} of {2 * (n - 1)}: {phase}" if step else "before step 1"
    draw_rank_rows(ax, values, masks, n, title, lambda r: f"rank {r}")
    if step:
        for rank in range(n):
            left = (rank - 1) % n
            chunk = steps.sent[left][step - 1]  # what the left neighbour sent in this step
            y = n - 1 - rank
            ax.add_patch(Rectangle((chunk, y + 0.05), 1, 0.9, fill=False, edgecolor="black", linewidth=2.5))
            if notes:
                verb = "+=" if step <= n - 1 else "="
                ax.text(n + 0.15, y + 0.5, f"chunk {chunk} {verb} rank {left}'s", va="center", fontsize=9)
    if notes:  # the title over the chunks, not over the notes beside them
        ax.set_title("")
        ax.set_title(title, loc="left", fontsize=10)
    ax.set_xlim(0, n + (2.6 if notes else 0))
    ax.set_xticks([c + 0.5 for c in range(n)], [f"chunk {c}" for c in range(n)], fontsize=8)
    ax.tick_params(bottom=False)


def _rank_legend(fig, n):
    fig.legend(
        handles=[Patch(color=rank_color(r, n), label=f"from rank {r}") for r in range(n)],
        loc="outside lower center",
        ncols=n,
        fontsize=8,
        frameon=False,
    )


def plot_ring_step(steps: RingSteps, step: int) -> Figure:
    """One step of a recorded ring all-reduce (:func:`course_lib.comm.record_ring_steps`)."""
    n = steps.world_size
    fig = CourseFigure(figsize=(0.9 * n + 4.2, 0.5 * n + 1.7), layout="constrained")
    _draw_ring_step(fig.subplots(), steps, min(step, 2 * (n - 1)))
    _rank_legend(fig, n)
    return fig


def plot_ring_steps(steps: RingSteps) -> Figure:
    """Small multiples: the state before a recorded ring all-reduce and after each of its 2(N−1) steps."""
    n = steps.world_size
    count = 2 * (n - 1) + 1
    fig = CourseFigure(figsize=(2.3 * count, 0.5 * n + 1.5), layout="constrained")
    for step, ax in enumerate(fig.subplots(1, count)):
        _draw_ring_step(ax, steps, step, notes=False)
        ax.set_title(ax.get_title().replace(": ", "\n"), fontsize=9)
        if step:
            ax.set_yticks([])
    fig.suptitle(
        f"ring all-reduce on N = {n}: outlined = the chunk each rank just received "
        "(added in reduce-scatter, copied in all-gather)",
        fontsize=10,
    )
    _rank_legend(fig, n)
    return fig


def ring_explorer(world_size: int = 4, max_ranks: int = 6) -> ipywidgets.VBox:
    """A widget: choose N, then step through (or play) a real ring all-reduce on N ranks.

    Each N is launched once and recorded (:func:`course_lib.comm.record_ring_steps`);
    everything the callbacks use is local to this call.
    """
    import ipywidgets as widgets
    from IPython.display import display

    from course_lib.comm import record_ring_steps

    recorded = {}
    wide = dict(layout=widgets.Layout(width="320px"), style={"description_width": "initial"})
    n_slider = widgets.IntSlider(value=world_size, min=2, max=max_ranks, description="N ranks", **wide)
    last = 2 * (world_size - 1)
    step_slider = widgets.IntSlider(value=0, min=0, max=last, description="step", **wide)
    play = widgets.Play(value=0, min=0, max=last, interval=900, description="play")
    widgets.jslink((play, "value"), (step_slider, "value"))

    def new_world_size(change):
        step_slider.max = play.max = 2 * (change["new"] - 1)

    def redraw(n, step):
        if n not in recorded:
            recorded[n] = record_ring_steps(n)
        display(plot_ring_step(recorded[n], step))

    n_slider.observe(new_world_size, names="value")
    picture = widgets.interactive_output(redraw, dict(n=n_slider, step=step_slider))
    return widgets.VBox([widgets.HBox([n_slider, play, step_slider]), picture])


def plot_bytes_per_rank(world_sizes: Sequence[int], nbytes: float, series: dict) -> Figure:
    """Bytes each all-reduce sends per rank against N: formula lines, measured dots and crosses.

    ``series[(algorithm, who)]`` = dict(formula=[…], payload=[…], wire=[…]) per N, in bytes
    (``wire`` may be None); ``nbytes`` is S, the array's size, used as the unit.
    """
    from matplotlib.lines import Line2D

    fig = CourseFigure(figsize=(8.5, 4.6), layout="constrained")
    ax = fig.subplots()
    colors = ["tab:green", "tab:red", "tab:purple", "tab:gray", "tab:blue", "tab:orange"]
    handles = []
    for i, ((name, who), data) in enumerate(series.items()):
        color = colors[i % len(colors)]
        dx = (i - (len(series) - 1) / 2) * 0.06  # side by side where lines coincide
        xs = [n + dx for n in world_sizes]
        ax.plot(
            world_sizes,
            [f / nbytes for f in data["formula"]],
            "-" if i % 2 == 0 else "--",
            color=color,
            alpha=0.7,
        )
        ax.plot(xs, [p / nbytes for p in data["payload"]], "o", color=color)
        if data.get("wire") is not None:
            ax.plot(xs, [w / nbytes for w in data["wire"]], "x", color=color, markersize=9)
        handles.append(
            Line2D([], [], color=color, linestyle="-" if i % 2 == 0 else "--", label=f"{name}, {who}")
        )
    kinds = [
        Line2D([], [], color="0.3", label="formula"),
        Line2D([], [], color="0.3", marker="o", linestyle="", label="payload sent, measured"),
        Line2D(
            [], [], color="0.3", marker="x", markersize=9, linestyle="", label="wire bytes received, measured"
        ),
    ]
    ax.add_artist(
        ax.legend(handles=handles, loc="upper left", fontsize=8.5, title="algorithm", title_fontsize=8.5)
    )
    ax.legend(handles=kinds, loc="center left", fontsize=8.5)
    ax.set_xlabel("N ranks")
    ax.set_ylabel("bytes per rank / S")
    ax.set_title(
        f"one all-reduce of S = {format_bytes(nbytes)}; ring: 2(N−1)/N·S, unchunked ring and naive "
        "root: (N−1)·S,\nnaive others: S, tree's rank 0: ⌈log₂N⌉·S",
        fontsize=10,
    )
    ax.grid(True, alpha=0.3)
    return fig


def plot_bucket_timelines(timelines: dict, rank: int = 0) -> Figure:
    """One backward pass of :class:`course_lib.ddp.BucketedDDP` per cap: autograd, and each bucket's all-reduce.

    ``timelines`` maps ``bucket_cap_mb`` to a :class:`course_lib.ddp.Timeline` (one rank's).
    """
    caps = list(timelines)
    rows = [len(timelines[c].buckets) + 1 for c in caps]
    fig = CourseFigure(figsize=(10, 0.32 * sum(rows) + 1.8), layout="constrained")
    axes = fig.subplots(len(caps), 1, sharex=True, gridspec_kw=dict(height_ratios=rows), squeeze=False)[:, 0]
    ms = 1e3
    for ax, cap in zip(axes, caps):
        t = timelines[cap]
        ax.barh(0, t.backward_done * ms, left=0, height=0.6, color="0.75")
        for _, when in t.grads:
            ax.plot([when * ms] * 2, [-0.3, 0.3], color="0.35", linewidth=1)
        for b in t.buckets:
            y = 1 + b.index
            ax.barh(
                y,
                (b.finished - b.launched) * ms,
                left=b.launched * ms,
                height=0.6,
                color=matplotlib.colormaps["tab10"](b.index % 10),
            )
            ax.plot(b.ready * ms, y, "k|", markersize=10)
        ax.axvline(t.synced * ms, color="black", linestyle="--", linewidth=1)
        ax.text(t.synced * ms, -0.75, " backward() returns", fontsize=8, va="top")
        ax.set_yticks(
            range(len(t.buckets) + 1),
            ["backward"] + [f"bucket {b.index} ({b.nbytes / 2**20:.1f} MiB)" for b in t.buckets],
            fontsize=8,
        )
        ax.set_ylim(len(t.buckets) + 0.6, -1.1)
        ax.set_title(
            f"bucket_cap_mb = {cap:g}, {len(t.buckets)} bucket{'s' * (len(t.buckets) > 1)}: autograd "
            f"computes for {t.backward_done * ms:.0f} ms, backward() returns "
            f"{(t.synced - t.backward_done) * ms:.0f} ms later",
            fontsize=9,
        )
        ax.grid(True, axis="x", alpha=0.3)
    axes[-1].set_xlabel(
        f"ms since backward started (rank {rank}); ticks: a gradient computed; "
        "|: bucket ready; bar: its all-reduce"
    )
    return fig


# ----------------------------------------------------------------------------
# chapter 04: who holds which weight; chapter 05: who holds which activation, and saved bytes


def _draw_owner_matrix(ax, x0, owner, n, title, split_every=None):
    """One cell per element, coloured by its owner rank; gray where every rank holds it."""
    rows, cols = owner.shape
    image = [
        [rank_color(int(o), n) if o >= 0 else (0.75, 0.75, 0.75, 1.0) for o in row] for row in owner.tolist()
    ]
    ax.imshow(image, extent=(x0, x0 + cols, rows, 0), interpolation="nearest")
    for y in range(1, rows):  # faint lines between elements
        ax.plot([x0, x0 + cols], [y, y], color="white", linewidth=0.3)
    for x in range(1, cols):
        ax.plot([x0 + x, x0 + x], [0, rows], color="white", linewidth=0.3)
    ax.add_patch(Rectangle((x0, 0), cols, rows, fill=False, edgecolor="black", linewidth=0.8))
    for y in range(split_every or rows, rows, split_every or rows):
        ax.plot([x0, x0 + cols], [y, y], color="black", linewidth=1.2)
    ax.text(x0 + cols / 2, -1.0, title, ha="center", va="bottom", fontsize=9)


def plot_tp_layout(owners: dict, n: int, d_model: int, d_hidden: int, n_heads: int) -> Figure:
    """Every weight of an MLP and an attention block, one cell per element, coloured by the rank holding it.

    ``owners`` is :func:`course_lib.tp.who_holds_what`'s result: name -> a tensor of the
    weight's shape (biases as columns) holding the owner rank, or −1 where every rank does.
    """
    fig = CourseFigure(figsize=(11, 6.2), layout="constrained")
    ax_mlp, ax_attn = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[58, 32]))
    panels = [
        (ax_mlp, "mlp.fc1.weight", "fc1.weight (H×h)\nrows split\n(= A's columns)", None),
        (ax_mlp, "mlp.fc1.bias", "fc1.bias\n\n", None),
        (ax_mlp, "mlp.fc2.weight", "fc2.weight (h×H)\ncolumns split\n(= B's rows)", None),
        (ax_mlp, "mlp.fc2.bias", "fc2.bias\n(whole)\n", None),
        (ax_attn, "attn.qkv.weight", "qkv.weight (3h×h)\nq, k, v stacked:\nheads split", d_model),
        (ax_attn, "attn.qkv.bias", "qkv.bias\n\n", d_model),
        (ax_attn, "attn.proj.weight", "proj.weight (h×h)\ncolumns split\n", None),
        (ax_attn, "attn.proj.bias", "proj.bias\n(whole)\n", None),
    ]
    x0 = 0
    for ax, name, title, split in panels:
        x0 = 0 if name in ("mlp.fc1.weight", "attn.qkv.weight") else x0
        owner = owners[name]
        _draw_owner_matrix(ax, x0, owner, n, title, split)
        x0 += owner.shape[1] + 4
    for ax, label in ((ax_mlp, "MLP"), (ax_attn, f"attention (a = {n_heads} heads)")):
        ax.set_xlim(-1, ax.get_xlim()[1] + 1)
        ax.set_ylim(max(d_hidden, 3 * d_model) + 0.5, -8)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(label, fontsize=11)
    for i, part in enumerate("qkv"):
        ax_attn.text(-0.6, d_model * (i + 0.5), part, ha="right", va="center", fontsize=10)
    handles = [Patch(color=rank_color(r, n), label=f"rank {r}") for r in range(n)]
    handles.append(Patch(color=(0.75, 0.75, 0.75), label="every rank (replicated)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=n + 1, fontsize=9, frameon=False)
    fig.suptitle(
        f"Who holds which weight, N = {n}, h = {d_model}, H = {d_hidden}: one cell per element", fontsize=11
    )
    return fig


def plot_sequence_parallel_holdings(n: int = 4, s: int = 8, h: int = 6, hidden: int = 12) -> Figure:
    """One MLP sublayer's activations, stage by stage, under TP alone and under TP + SP.

    Positions down, features across; a cell's colour is the rank holding it, gray a
    copy on every rank, stripes a partial sum every rank holds a part of.
    """
    from matplotlib.patches import FancyArrowPatch

    stages = {
        "tensor parallel": [
            ("LayerNorm, residual:\nwhole on every rank", "whole", h),
            ("f (identity):\nstill whole", "whole", h),
            ("fc1, GELU:\nmy columns", "columns", hidden),
            ("fc2: my partial sum\nof everything", "partial", h),
            ("g (all-reduce):\nwhole on every rank", "whole", h),
        ],
        "tensor + sequence parallel": [
            ("LayerNorm, residual:\nmy positions", "rows", h),
            ("all-gather:\nwhole sequence", "whole", h),
            ("fc1, GELU:\nmy columns", "columns", hidden),
            ("fc2: my partial sum\nof everything", "partial", h),
            ("reduce-scatter:\nmy positions of the sum", "rows", h),
        ],
    }
    gray = (0.75, 0.75, 0.75)
    fig = CourseFigure(figsize=(12, 6.2), layout="constrained")
    for ax, (label, row) in zip(fig.subplots(2, 1), stages.items()):
        x0 = 0
        for i, (title, kind, width) in enumerate(row):
            for y in range(s):
                for x in range(width):
                    owners = {
                        "rows": [y * n // s],
                        "columns": [x * n // width],
                        "partial": list(range(n)),
                    }.get(kind)
                    if owners is None:
                        ax.add_patch(Rectangle((x0 + x, y), 1, 1, color=gray, linewidth=0))
                    for k, r in enumerate(owners or []):
                        ax.add_patch(
                            Rectangle(
                                (x0 + x + k / len(owners), y),
                                1 / len(owners),
                                1,
                                color=rank_color(r, n),
                                linewidth=0,
                            )
                        )
                    ax.add_patch(Rectangle((x0 + x, y), 1, 1, fill=False, edgecolor="white", linewidth=0.6))
            ax.text(x0 + width / 2, -0.6, title, ha="center", va="bottom", fontsize=9)
            if i:
                ax.add_patch(
                    FancyArrowPatch(
                        (x0 - 3.2, s / 2), (x0 - 0.5, s / 2), arrowstyle="-|>", mutation_scale=14, color="0.3"
                    )
                )
            x0 += width + 4
        ax.set_xlim(-0.5, x0 - 3.5)
        ax.set_ylim(s + 0.5, -4.2)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(label, fontsize=11, loc="left")
    handles = [Patch(color=rank_color(r, n), label=f"rank {r}") for r in range(n)]
    handles.append(Patch(color=gray, label="every rank (a copy)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=n + 1, fontsize=9, frameon=False)
    fig.suptitle(f"One MLP sublayer on N = {n} ranks: positions down, features across", fontsize=11)
    return fig


def plot_saved_activations(measured: dict, formula: dict, title: str) -> Figure:
    """Saved-activation bytes per rank, stacked by region, with a formula's value as a black tick.

    ``measured[(kind, t)]`` = {region: bytes}; ``formula[(kind, t)]`` = bytes.
    """
    fig = CourseFigure(figsize=(10, 4.2), layout="constrained")
    ax = fig.subplots()
    labels = [f"{kind}\nt = {t}" if kind != "dense" else "dense\n(one rank)" for kind, t in measured]
    regions = list(next(iter(measured.values())))
    bottoms = [0.0] * len(measured)
    colors = ["tab:purple", "tab:olive", "tab:cyan", "tab:brown", "tab:pink"]
    for color, region in zip(colors, regions):
        values = [by_region[region] / 1024 for by_region in measured.values()]
        ax.bar(labels, values, bottom=bottoms, color=color, label=region, width=0.6)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.scatter(
        labels,
        [formula[key] / 1024 for key in measured],
        marker="_",
        s=900,
        color="black",
        linewidths=2,
        label="formula",
        zorder=3,
    )
    ax.set_ylabel("saved activations per rank (KiB)")
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, markerscale=0.4)
    ax.set_title(title, fontsize=10)
    return fig


def plot_all_reduce_times(
    timings: dict, predict: Callable[[str, int, int], float | None] | None = None
) -> Figure:
    """One panel per N: each all-reduce's time per call against S — the median batch, a bar from
    the best to the worst batch, and (crosses, dashed) the α–β prediction.

    ``timings[n][name]`` is a :class:`course_lib.comm.SpreadTiming`; ``predict(name, n, S)``
    returns predicted seconds, or None for an algorithm without a prediction.
    """
    ns = list(timings)
    widths = [max(2, len(next(iter(timings[n].values())).nbytes)) for n in ns]
    fig = CourseFigure(figsize=(0.95 * sum(widths) + 1.3 * len(ns), 4.2), layout="constrained")
    axes = fig.subplots(1, len(ns), squeeze=False, gridspec_kw=dict(width_ratios=widths))[0]
    names = list(dict.fromkeys(name for by_name in timings.values() for name in by_name))
    colors = {name: matplotlib.colormaps["tab10"](i) for i, name in enumerate(names)}
    for ax, n in zip(axes, ns):
        sizes = sorted({s for t in timings[n].values() for s in t.nbytes})
        for i, (name, t) in enumerate(timings[n].items()):
            color, shift = colors[name], 1.12 ** (i - (len(timings[n]) - 1) / 2)  # side by side
            xs = [s * shift for s in t.nbytes]
            median = [s * 1e3 for s in t.seconds]
            ax.plot(xs, median, "o-", color=color, label=f"{name}: median, bar = best to worst")
            if getattr(t, "fastest", None):
                ax.errorbar(
                    xs,
                    median,
                    yerr=[
                        [m - lo * 1e3 for m, lo in zip(median, t.fastest)],
                        [hi * 1e3 - m for m, hi in zip(median, t.slowest)],
                    ],
                    fmt="none",
                    ecolor=color,
                    capsize=3,
                    alpha=0.6,
                )
            predicted = None if predict is None else [predict(name, n, s) for s in t.nbytes]
            if predicted and all(p is not None for p in predicted):
                ax.plot(
                    xs,
                    [p * 1e3 for p in predicted],
                    "x--",
                    color=color,
                    markersize=8,
                    linewidth=1.1,
                    label=f"{name}: α–β prediction",
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [format_bytes(s) for s in sizes])
        ax.set_xlim(min(sizes) / 1.6, max(sizes) * 1.6)
        ax.minorticks_off()
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("S, the full array")
        ax.set_title(f"N = {n}", fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("time per call (ms)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    backend = ", ".join(sorted({t.backend for by_name in timings.values() for t in by_name.values()}))
    fig.suptitle(f"All-reduce time per call on this machine ({backend})", fontsize=11)
    return fig


# ----------------------------------------------------------------------------
# chapter 08: experts' buffers, load per expert and rank, drops, the aux loss in training


def plot_expert_buffers(routing: Routing, title: str) -> Figure:
    """One row per expert, one box per slot, filled by token (blue: first choices, orange:
    second, ...); on the right, in red, the assignments that arrived after the buffer was full."""
    num_experts, capacity = routing.tokens_per_expert.numel(), routing.capacity
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    dropped = {e: [] for e in range(num_experts)}
    width = capacity + 1 + max(1, int(routing.tokens_per_expert.max()) - capacity)
    fig = CourseFigure(figsize=(1.0 * width + 1.5, 0.6 * num_experts + 1.2), layout="constrained")
    ax = fig.subplots()
    for e in range(num_experts):
        y = num_experts - 1 - e
        for s in range(capacity):
            ax.add_patch(Rectangle((s, y + 0.1), 0.9, 0.8, fill=False, edgecolor="0.6", linestyle="--"))
    for j in range(routing.expert_index.shape[1]):  # in priority order: drops listed as they happened
        for t in range(routing.expert_index.shape[0]):
            e, s = int(routing.expert_index[t, j]), int(routing.slot[t, j])
            y = num_experts - 1 - e
            if s >= 0:
                ax.add_patch(Rectangle((s, y + 0.1), 0.9, 0.8, color=colors[j % 4], alpha=0.85))
                ax.text(
                    s + 0.45,
                    y + 0.5,
                    f"t{t}",
                    ha="center",
                    va="center",
                    color="white",
                    fontsize=11,
                    fontweight="bold",
                )
            else:
                x = capacity + 0.3 + len(dropped[e])
                dropped[e].append(t)
                ax.add_patch(Rectangle((x, y + 0.1), 0.9, 0.8, fill=False, edgecolor="tab:red", hatch="//"))
                ax.text(
                    x + 0.45,
                    y + 0.5,
                    f"t{t} ({('1st', '2nd', '3rd', '4th')[j % 4]})",
                    ha="center",
                    va="center",
                    color="tab:red",
                    fontsize=10,
                    fontweight="bold",
                    bbox=dict(boxstyle="round,pad=0.1", facecolor="white", linewidth=0),
                )
    ax.axvline(capacity + 0.15, color="tab:red", linewidth=1.5)
    ax.text(capacity + 0.2, num_experts + 0.05, "dropped →", color="tab:red", fontsize=10, va="bottom")
    ax.set_xlim(-0.2, width + 0.3)
    ax.set_ylim(0, num_experts + 0.5)
    ax.set_yticks(
        [num_experts - 1 - e + 0.5 for e in range(num_experts)], [f"expert {e}" for e in range(num_experts)]
    )
    ax.set_xticks([s + 0.45 for s in range(capacity)], [f"slot {s}" for s in range(capacity)])
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(length=0)
    handles = [Patch(color=colors[j], label=f"choice {j + 1}") for j in range(routing.expert_index.shape[1])]
    handles.append(Patch(fill=False, edgecolor="tab:red", hatch="//", label="dropped: buffer full"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    fig.suptitle(title, fontsize=11)
    return fig


def plot_expert_load(assigned: torch.Tensor, kept: torch.Tensor, capacity: int, n: int) -> Figure:
    """Left: assignments per expert over all n ranks, kept and dropped, beside the n·C slots.
    Right: the rows each rank's experts process (experts split evenly over the ranks)."""
    num_experts = assigned.numel()
    fig = CourseFigure(figsize=(11, 3.8), layout="constrained")
    ax_e, ax_r = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[2, 1]))
    experts = range(num_experts)
    ax_e.bar(experts, kept.tolist(), color="tab:blue", label="kept")  # lists: matplotlib warns on tensors
    ax_e.bar(
        experts,
        (assigned - kept).tolist(),
        bottom=kept.tolist(),
        color="tab:red",
        alpha=0.6,
        hatch="//",
        label="dropped",
    )
    ax_e.axhline(n * capacity, color="black", linestyle="--", label=f"slots: N·C = {n}·{capacity}")
    ax_e.axhline(float(assigned.sum()) / num_experts, color="0.5", linestyle=":", label="even share k·N·T/E")
    ax_e.set_xticks(list(experts), [f"e{e}" for e in experts])
    ax_e.set_xlabel("expert")
    ax_e.set_ylabel("tokens (all ranks)")
    ax_e.set_title(
        f"tokens per expert — {int((assigned - kept).sum())} of {int(assigned.sum())} assignments dropped",
        fontsize=10,
    )
    ax_e.legend(fontsize=9, loc="upper left")
    per_rank = num_experts // n
    rows = kept.view(n, per_rank).sum(dim=1)
    ax_r.bar(range(n), rows.tolist(), color=[f"C{r}" for r in range(n)])
    ax_r.axhline(float(rows.float().mean()), color="0.5", linestyle=":", label="mean")
    ax_r.set_xticks(range(n), [f"rank {r}\ne{r * per_rank}–e{(r + 1) * per_rank - 1}" for r in range(n)])
    ax_r.set_ylabel("rows processed")
    ax_r.set_title(
        f"work per rank: slowest / mean = {float(rows.max() / rows.float().mean()):.2f}", fontsize=10
    )
    ax_r.legend(fontsize=9)
    return fig


def plot_drop_curves(
    factors: Sequence[float],
    curves: dict[tuple[str, int], Sequence[float]],
    num_experts: int,
    num_tokens: int,
) -> Figure:
    """Share of assignments dropped against the capacity factor, one panel per k.

    ``curves`` maps (router label, k) to one share per factor; the black line is the
    floor max(0, 1 − cf) that no router can beat and a perfectly even one reaches.
    """
    ks = sorted({k for _, k in curves})
    labels = list(dict.fromkeys(label for label, _ in curves))
    fig = CourseFigure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, len(ks), sharey=True, squeeze=False)[0]
    for ax, k in zip(axes, ks):
        for i, label in enumerate(labels):
            if (label, k) in curves:
                ax.plot(
                    factors,
                    [100 * d for d in curves[label, k]],
                    "os^vD"[i % 5] + "-",
                    color=matplotlib.colormaps["tab10"](i),
                    markersize=4,
                    label=label,
                )
        ax.plot(
            factors,
            [100 * max(0.0, 1 - cf) for cf in factors],
            color="black",
            linestyle=":",
            linewidth=2,
            label="max(0, 1 − cf)",
        )
        ax.set_xlabel("capacity factor cf   (C = ceil(k·cf·T/E))")
        ax.set_title(f"k = {k}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("assignments dropped (%)")
    axes[0].legend(fontsize=9)
    fig.suptitle(f"Drops against capacity, E = {num_experts}, T = {num_tokens}", fontsize=11)
    return fig


def plot_balance_training(runs: dict[str, dict[str, list[float]]], window: int = 10) -> Figure:
    """Per run (name -> history of "imbalance", "dropped", "task loss"): each step thin,
    the mean of the last ``window`` steps thick."""

    def smooth(values):
        return [
            sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
            for i in range(len(values))
        ]

    fig = CourseFigure(figsize=(12, 3.6), layout="constrained")
    for ax, (metric, label) in zip(
        fig.subplots(1, 3),
        [
            ("imbalance", "max / mean tokens per expert"),
            ("dropped", "assignments dropped (%)"),
            ("task loss", "task loss (MSE)"),
        ],
    ):
        for (name, history), color in zip(runs.items(), ("tab:red", "tab:blue", "tab:green")):
            ax.plot(history[metric], color=color, alpha=0.25, linewidth=1)
            ax.plot(smooth(history[metric]), color=color, linewidth=2, label=name)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=9, loc="lower left")
    fig.suptitle(
        f"the gate without and with the Switch load-balancing loss (thick: mean of the last {window} steps)",
        fontsize=11,
    )
    return fig


def plot_routing(
    capacity_factor: float, k: int, num_experts: int, skew: float, num_tokens: int = 512
) -> Figure:
    """Random gate logits plus a bias toward low-numbered experts (``skew``): assignments per
    expert, kept and dropped, against the capacity C."""
    import torch

    from course_lib import moe

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(num_tokens, num_experts, generator=g) + skew * torch.linspace(1.5, -1.5, num_experts)
    r = moe.route(logits, min(k, num_experts), capacity_factor)
    kept = torch.bincount(r.expert_index[r.slot >= 0], minlength=num_experts)
    fig = CourseFigure(figsize=(8, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(num_experts), kept.tolist(), color="tab:blue", label="kept")
    ax.bar(
        range(num_experts),
        (r.tokens_per_expert - kept).tolist(),
        bottom=kept.tolist(),
        color="tab:red",
        alpha=0.6,
        hatch="//",
        label="dropped",
    )
    ax.axhline(r.capacity, color="black", linestyle="--", label=f"C = {r.capacity}")
    ax.set_xticks(range(num_experts), [str(e) for e in range(num_experts)])
    ax.set_xlabel("expert")
    ax.set_ylabel("assignments")
    total = num_tokens * r.expert_index.shape[1]
    load = r.tokens_per_expert.float()
    ax.set_title(
        f"k = {r.expert_index.shape[1]}, E = {num_experts}, cf = {capacity_factor:g}, skew = {skew:g}: "
        f"{100 * r.num_dropped / total:.1f} % dropped, max/mean load {load.max() / load.mean():.2f}, "
        f"aux = {r.aux_loss:.2f}",
        fontsize=10,
    )
    ax.legend(fontsize=9, loc="upper right")
    return fig


def routing_explorer(
    capacity_factor: float = 1.25, k: int = 2, num_experts: int = 8, skew: float = 0.5
) -> ipywidgets.VBox:
    """Sliders for cf, k, E and skew above :func:`plot_routing`. Everything the callback uses
    lives inside this function, so no later cell can change what a move draws."""
    import ipywidgets as widgets
    from IPython.display import display

    slider = dict(style={"description_width": "initial"}, layout=widgets.Layout(width="420px"))
    controls = dict(
        capacity_factor=widgets.FloatSlider(
            value=capacity_factor, min=0.25, max=3.0, step=0.25, description="capacity factor cf", **slider
        ),
        k=widgets.IntSlider(value=k, min=1, max=4, description="k (experts per token)", **slider),
        num_experts=widgets.IntSlider(value=num_experts, min=2, max=16, description="E (experts)", **slider),
        skew=widgets.FloatSlider(value=skew, min=0.0, max=3.0, step=0.25, description="skew", **slider),
    )

    def redraw(**values):
        display(plot_routing(**values))

    picture = widgets.interactive_output(redraw, controls)
    return widgets.VBox([widgets.VBox(list(controls.values())), picture])
