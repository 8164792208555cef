"""Figures and widgets of chapter 09: the rank grid, plans' memory, the plan calculator."""

from __future__ import annotations

from typing import TYPE_CHECKING

from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

if TYPE_CHECKING:
    import ipywidgets

    from course_lib.mesh import GridLayout

from course_lib.figures import CourseFigure, bare, rank_color


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
        bare(ax)
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
