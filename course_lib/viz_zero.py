"""Figures and widgets of chapter 07: what each ZeRO stage holds, memory and traffic."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

if TYPE_CHECKING:
    import ipywidgets


from course_lib.figures import CourseFigure, bare

# chapter 07 (ZeRO) and chapter 09 (3D parallelism, the cost model)
#
# Figures at most 9.5 inches wide (950 px at the default 100 dpi), so JupyterLab shows them at
# full size and no text is below 9 pt.

ZERO_STAGE_NAMES = {0: "plain DP", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3"}
ZERO_KIND_COLORS = {"params": "tab:blue", "grads": "tab:orange", "optimizer": "tab:green"}
ZERO_KIND_LABELS = {"params": "parameters", "grads": "gradients", "optimizer": "Adam states"}


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
        bare(ax)
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
