"""Figures of chapters 04 and 05: who holds which weight and activation, saved bytes, all-reduce times."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import matplotlib
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from course_lib.collectives import format_bytes

if TYPE_CHECKING:
    pass

from course_lib.figures import CourseFigure, rank_color

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
