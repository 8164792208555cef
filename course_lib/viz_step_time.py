"""Figures of chapter 09d: predicted against measured step time, and GPU plans' step times."""

from __future__ import annotations

from matplotlib.figure import Figure

from course_lib.figures import CourseFigure

PART_COLORS = {
    "compute": "#4C78A8",
    "memory": "#72B7B2",
    "overhead": "#B279A2",
    "comm": "#F58518",
    "bubble": "#BAB0AC",
}
PART_LABELS = {
    "compute": "matrix products",
    "memory": "element-wise bytes / B",
    "overhead": "ops × t_op",
    "comm": "messages (α–β)",
    "bubble": "pipeline bubble",
}


def predicted_vs_measured(rows: dict, band: float = 0.3) -> Figure:
    """Left: per configuration, the predicted step split into its parts (stacked) above the
    measured step (black). Right: predicted against measured, with y = x and a band of
    ±``band``.

    ``rows``: name -> {"compute", "memory", "overhead", "comm", "bubble", "measured"} in seconds."""
    fig = CourseFigure(figsize=(11, 0.55 * len(rows) + 2.8), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1.6, 1])
    names = list(rows)
    for i, name in enumerate(reversed(names)):
        y = 2 * i
        start = 0.0
        for part, color in PART_COLORS.items():
            width = rows[name][part] * 1e3
            left.barh(
                y + 0.45,
                width,
                left=start,
                height=0.8,
                color=color,
                label=PART_LABELS[part] if i == 0 else None,
            )
            start += width
        left.barh(
            y - 0.45,
            rows[name]["measured"] * 1e3,
            height=0.8,
            color="black",
            label="measured" if i == 0 else None,
        )
    left.set_yticks([2 * i for i in range(len(names))], list(reversed(names)), fontsize=8)
    left.set(xlabel="ms per step", title="predicted (upper bar) and measured (lower bar)")
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    measured = [rows[n]["measured"] * 1e3 for n in names]
    predicted = [sum(rows[n][p] for p in PART_COLORS) * 1e3 for n in names]
    line = [0.0, 1.15 * max(measured + predicted)]
    right.plot(line, line, color="black", lw=0.8)
    right.fill_between(line, [x * (1 - band) for x in line], [x * (1 + band) for x in line], color="0.9")
    right.scatter(measured, predicted, color="#4C78A8", zorder=3)
    for name, x, y in zip(names, measured, predicted):
        right.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    right.set(
        xlim=line,
        ylim=line,
        xlabel="measured ms",
        ylabel="predicted ms",
        title=f"y = x, grey band ±{band:.0%}",
    )
    return fig


def plan_times(rows: dict, title: str) -> Figure:
    """Stacked bars of one step's seconds per GPU plan: compute, bubble, then each axis's
    communication (no overlap), one bar per plan. ``rows``: label -> cluster_step's dict."""
    fig = CourseFigure(figsize=(9, 0.5 * len(rows) + 1.6), layout="constrained")
    ax = fig.subplots()
    colors = {"compute": "#4C78A8", "bubble": "#BAB0AC", "dp": "#E45756", "tp": "#F58518", "pp": "#54A24B"}
    labels = {
        "compute": "compute",
        "bubble": "bubble",
        "dp": "dp traffic",
        "tp": "tp traffic",
        "pp": "pp traffic",
    }
    names = list(rows)
    for i, name in enumerate(reversed(names)):
        start = 0.0
        for part, color in colors.items():
            ax.barh(i, rows[name][part], left=start, color=color, label=labels[part] if i == 0 else None)
            start += rows[name][part]
    ax.set_yticks(range(len(names)), list(reversed(names)), fontsize=8)
    ax.set(xlabel="seconds per step (nothing overlapped)", title=title)
    ax.legend(fontsize=7, loc="lower right")
    return fig
