"""Figures of chapter 07b (FSDP): the memory timeline of one step, the step's timeline per rank,
and what bf16 does to a long sum and to training. Imports nothing of the course's training code."""

from __future__ import annotations

from matplotlib.figure import Figure

from course_lib.viz import CourseFigure

COLORS = {
    "sharded params": "#4c72b0",
    "sharded grads": "#55a868",
    "optimizer": "#8172b2",
    "gathered params": "#dd8452",
    "unsharded grads": "#c44e52",
    "activations": "#937860",
    "all-gather": "#dd8452",
    "compute": "#4c72b0",
    "reduce-scatter": "#c44e52",
}


def plot_memory_timeline(runs: dict, unit_bytes: float | None = None) -> Figure:
    """One panel per run ({title: [(label, {kind: bytes})]}): the bytes a rank holds, stacked by
    kind, at every hook of one step; a dashed line per gathered unit above the sharded states."""
    fig = CourseFigure(figsize=(12, 3.6 * len(runs)))
    axes = fig.subplots(len(runs), 1, squeeze=False)[:, 0]
    for ax, (title, samples) in zip(axes, runs.items()):
        kinds = list(samples[0][1])
        xs = range(len(samples))
        bottom = [0.0] * len(samples)
        for kind in kinds:
            values = [s[kind] / 2**20 for _, s in samples]
            top = [b + v for b, v in zip(bottom, values)]
            ax.fill_between(xs, bottom, top, step="mid", color=COLORS.get(kind), label=kind, alpha=0.85)
            bottom = top
        ax.set_xticks(list(xs))
        ax.set_xticklabels([label for label, _ in samples], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("MiB held by rank 0")
        ax.set_title(title)
        ax.set_xlim(-0.5, len(samples) - 0.5)
    axes[0].legend(loc="upper left", fontsize=8, ncols=3)
    fig.tight_layout()
    return fig


def plot_step_timelines(runs: dict) -> Figure:
    """One panel per run ({title: [events per rank]}); each rank a row of three lanes: all-gathers,
    compute and reduce-scatters, each bar labelled with its unit (events: kind, unit, start, end)."""
    lanes = ("all-gather", "compute", "reduce-scatter")
    fig = CourseFigure(figsize=(12, 1.2 + 1.6 * sum(len(r) for r in runs.values())))
    axes = fig.subplots(len(runs), 1, squeeze=False)[:, 0]
    end = max(e.end or e.start for r in runs.values() for events in r for e in events) * 1e3
    for ax, (title, per_rank) in zip(axes, runs.items()):
        ticks, labels = [], []
        for rank, events in enumerate(per_rank):
            for i, lane in enumerate(lanes):
                y = rank * (len(lanes) + 1) + i
                ticks.append(y)
                labels.append(f"rank {rank} {lane}")
                for e in events:
                    if e.kind != lane or e.end is None:
                        continue
                    start, width = e.start * 1e3, (e.end - e.start) * 1e3
                    hatch = "//" if e.phase == "backward" else None
                    ax.barh(y, width, left=start, color=COLORS[lane], edgecolor="black", lw=0.4, hatch=hatch)
                    ax.text(start + width / 2, y, e.unit, ha="center", va="center", fontsize=7, color="white")
        ax.set_yticks(ticks)
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, end * 1.02)
        ax.set_title(f"{title} (hatched: backward)")
    axes[-1].set_xlabel("ms since the step began")
    fig.tight_layout()
    return fig


def plot_precision(sums: dict, losses: dict) -> Figure:
    """Left: a running sum in several precisions ({name: values}); right: loss curves ({name: losses})."""
    fig = CourseFigure(figsize=(12, 4))
    left, right = fig.subplots(1, 2)
    for name, values in sums.items():
        left.plot(values, label=name)
    left.set_xlabel("terms added")
    left.set_ylabel("running sum")
    left.set_title("adding 0.01 again and again")
    left.legend()
    for name, values in losses.items():
        right.plot(values, label=name)
    right.set_yscale("log")
    right.set_xlabel("step")
    right.set_ylabel("loss")
    right.set_title("training with weights kept in ...")
    right.legend()
    fig.tight_layout()
    return fig
