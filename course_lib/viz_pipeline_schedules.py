"""Chapter 06b's figures: every pipeline schedule as a Gantt chart, side by side, and a widget."""

from __future__ import annotations

from typing import TYPE_CHECKING

from matplotlib.patches import Patch

from course_lib.figures import CourseFigure

if TYPE_CHECKING:
    from collections.abc import Sequence

    import ipywidgets

KIND_COLORS = {"F": "#4C78A8", "B": "#F58518", "I": "#E45756", "W": "#54A24B"}
KIND_LABELS = {"F": "forward F", "B": "full backward B", "I": "input gradient I", "W": "weight gradient W"}
TITLES = {
    "gpipe": "GPipe",
    "1f1b": "1F1B",
    "interleaved-1f1b": "interleaved 1F1B",
    "zb-h1": "ZB-H1",
    "dualpipe-v": "DualPipe-V",
}


def plot_schedules(
    rows: Sequence[tuple[str, Sequence[Sequence[tuple]], str]], width: float = 9.5
) -> CourseFigure:
    """One Gantt panel per ``(title, timeline, note)`` in ``rows``, on a shared time axis.

    ``timeline`` is per rank ``[((kind, i, stage), start, end), ...]``; a box's shade tells the
    stage when a rank holds several (the later stage darker), its number the micro-batch.
    """
    end = max(e for _, timeline, _ in rows for row in timeline for _, _, e in row)
    heights = [len(timeline) for _, timeline, _ in rows]
    height = sum(0.32 * h + 0.75 for h in heights) + 0.6
    fig = CourseFigure(figsize=(width, height))  # fixed margins: a layout engine doubles the drawing time
    fig.subplots_adjust(left=0.08, right=0.98, top=1 - 0.35 / height, bottom=0.75 / height, hspace=0.4)
    axes = fig.subplots(len(rows), 1, sharex=True, height_ratios=heights, squeeze=False)[:, 0]
    for ax, (title, timeline, note) in zip(axes, rows):
        p = len(timeline)
        first_stage = {r: min(a[2] for a, _, _ in row) for r, row in enumerate(timeline)}
        for r, row in enumerate(timeline):
            y = p - 1 - r
            ax.broken_barh(
                [(0, end)], (y + 0.1, 0.8), facecolor="0.9", hatch="///", edgecolor="0.78", linewidth=0
            )
            boxes = {}  # one collection per colour: hundreds of single boxes draw slowly
            for (kind, i, stage), a, b in row:
                boxes.setdefault((kind, stage != first_stage[r]), []).append((a, b - a))
                if (b - a) * 72 * width / end > 9:
                    ax.text((a + b) / 2, y + 0.5, str(i), ha="center", va="center", fontsize=7, color="black")
            for (kind, later), spans in boxes.items():
                ax.broken_barh(
                    spans,
                    (y + 0.1, 0.8),
                    facecolor=KIND_COLORS[kind],
                    alpha=0.55 if later else 1.0,
                    edgecolor="white",
                    linewidth=0.4,
                )
        ax.set_yticks([p - 1 - r + 0.5 for r in range(p)], [f"rank {r}" for r in range(p)], fontsize=8)
        ax.set_ylim(0, p)
        ax.set_title(title, fontsize=10, loc="left")
        ax.text(1.0, 1.02, note, transform=ax.transAxes, ha="right", va="bottom", fontsize=9)
    axes[-1].set_xlim(0, end)
    axes[-1].set_xlabel("time (t_f of one 1F1B stage = 1)")
    handles = [Patch(color=c, label=KIND_LABELS[k]) for k, c in KIND_COLORS.items()]
    handles.append(Patch(facecolor="0.9", hatch="///", edgecolor="0.78", label="idle (bubble)"))
    fig.legend(handles=handles, loc="lower center", ncols=5, fontsize=8, frameon=False)
    return fig


def schedules_explorer(
    p: int = 4, m: int = 8, v: int = 2, ratio_b: float = 2.0, ratio_w: float = 1.0
) -> ipywidgets.VBox:
    """Sliders for p, m, v and t_B : t_W (t_F = 1); every schedule's Gantt chart, its bubble and
    its memory printed under it. Returns the widget."""
    import ipywidgets as widgets
    from IPython.display import display

    from course_lib import pipeline_schedules as ps

    style = dict(style={"description_width": "initial"}, layout=widgets.Layout(width="300px"))
    ranks = widgets.IntSlider(value=p, min=2, max=8, description="p (ranks)", **style)
    micro = widgets.IntSlider(value=m, min=2, max=32, description="m (micro-batches)", **style)
    virtual = widgets.IntSlider(value=v, min=2, max=4, description="v (interleaved)", **style)
    t_b = widgets.FloatSlider(value=ratio_b, min=1.0, max=4.0, step=0.5, description="t_B / t_F", **style)
    t_w = widgets.FloatSlider(value=ratio_w, min=0.0, max=2.0, step=0.25, description="t_W / t_F", **style)
    readout = widgets.HTML()

    def redraw(p, m, v, t_b, t_w):
        rows, lines = [], []
        t_w = min(t_w, t_b)
        for name in ps.NAMES:
            nv = v if name == "interleaved-1f1b" else 2 if name == "dualpipe-v" else 1
            try:
                actions = ps.schedule(name, p, m, nv)
            except ValueError as exc:
                lines.append(f"<b>{TITLES[name]}</b>: {exc}")
                continue
            pairs = name == "dualpipe-v"
            sim = ps.simulate(actions, 1 / nv, t_b / nv, t_w / nv, fb_pairs_together=pairs)
            formula = ps.bubble_formula(name, p, 1 / nv, t_b / nv, t_w / nv)
            memory = max(sim.peak_activations) / nv
            note = f"bubble {sim.bubble_time:.2f} (formula {formula:.2f}), peak {memory:g} micro-batches"
            rows.append((TITLES[name], sim.timeline, note))
            lines.append(
                f"<b>{TITLES[name]}</b>: step {sim.total_time:.2f}, idle per rank {sim.bubble_time:.2f} "
                f"(formula {formula:.2f}), peak live activations {memory:g} micro-batches of a 1F1B stage, "
                f"{max(sim.messages)} messages sent per rank"
            )
        readout.value = "<br>".join(lines)
        if rows:
            display(plot_schedules(rows))

    picture = widgets.interactive_output(redraw, dict(p=ranks, m=micro, v=virtual, t_b=t_b, t_w=t_w))
    controls = widgets.HBox([widgets.VBox([ranks, micro, virtual]), widgets.VBox([t_b, t_w])])
    return widgets.VBox([controls, picture, readout])
