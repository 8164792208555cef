"""Figures and widgets of chapter 01: collectives, timings, the α–β model, rounds of messages."""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import matplotlib
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from course_lib.collectives import ROOTED, bandwidth, bus_factor, format_bytes, run_collective, sources
from course_lib.figures import CourseFigure, rank_color

if TYPE_CHECKING:
    import ipywidgets
    import torch
    from matplotlib.axes import Axes

    from course_lib.alpha_beta import AlphaBeta, PointToPoint
    from course_lib.collectives import CollectiveDemo, Timing


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
