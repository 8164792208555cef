"""Figures and widgets of chapter 08: experts' buffers, load, drops, routing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import matplotlib
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

if TYPE_CHECKING:
    import ipywidgets
    import torch

    from course_lib.moe import Routing

from course_lib.figures import CourseFigure

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
