"""Figures and widgets of chapter 03: the ring step by step, bytes per rank, bucket timelines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import matplotlib
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from course_lib.collectives import format_bytes

if TYPE_CHECKING:
    import ipywidgets

    from course_lib.ring_allreduce import RingSteps

from course_lib.figures import CourseFigure, rank_color
from course_lib.viz_collectives import draw_rank_rows

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
