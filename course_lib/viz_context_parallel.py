"""Figures of chapter 05b (context parallelism): the ring's schedule over the causal mask,
work per rank, and ring vs Ulysses traffic time. Plain data in, a figure out."""

from __future__ import annotations

from typing import TYPE_CHECKING

from matplotlib.figure import Figure
from matplotlib.patches import Patch, Polygon, Rectangle

from course_lib.viz import CourseFigure, _bare, rank_color

if TYPE_CHECKING:
    from collections.abc import Sequence


def _owner(chunks: dict) -> dict:
    """chunk -> the rank that holds it, from rank -> its chunks."""
    return {c: r for r, cs in chunks.items() for c in cs}


def _draw_mask(ax, chunks: dict, n: int, title: str) -> None:
    owner = _owner(chunks)
    m = len(owner)
    for cq in range(m):
        for ck in range(m):
            x, y = ck, m - 1 - cq
            rank = owner[cq]
            if ck > cq:  # entirely above the diagonal: never computed
                ax.add_patch(Rectangle((x, y), 1, 1, facecolor="0.93", edgecolor="white", hatch="///"))
                continue
            color = rank_color(rank, n)
            if ck == cq:  # the diagonal block: only its lower triangle counts
                ax.add_patch(Rectangle((x, y), 1, 1, facecolor="0.93", edgecolor="white"))
                ax.add_patch(Polygon([(x, y + 1), (x, y), (x + 1, y)], facecolor=color, alpha=0.85))
            else:
                ax.add_patch(Rectangle((x, y), 1, 1, facecolor=color, alpha=0.85, edgecolor="white"))
            step = (rank - owner[ck]) % n
            ax.text(
                x + 0.5 if ck < cq else x + 0.3,
                y + 0.5 if ck < cq else y + 0.3,
                str(step),
                ha="center",
                va="center",
                fontsize=9,
                color="white",
                weight="bold",
            )
    ax.set_xlim(0, m)
    ax.set_ylim(0, m)
    ax.set_aspect("equal")
    ax.set_xticks([c + 0.5 for c in range(m)], [str(c) for c in range(m)], fontsize=9)
    ax.set_yticks([m - 1 - c + 0.5 for c in range(m)], [f"{c} (r{owner[c]})" for c in range(m)], fontsize=9)
    ax.set_xlabel("k/v chunk", fontsize=9)
    ax.set_ylabel("q chunk (rank)", fontsize=9)
    ax.set_title(title, fontsize=10)
    _bare(ax)


def plot_ring_schedule(n: int, contiguous: dict, zigzag: dict) -> Figure:
    """Left: which rank's k/v block each rank holds at each ring step. Middle and right: the
    causal mask in chunks, each computed block coloured by the rank that computes it, with
    the ring step at which it does; hatched blocks are skipped (entirely masked)."""
    fig = CourseFigure(figsize=(9.5, 4.2), layout="constrained")
    table, left, right = fig.subplots(1, 3, width_ratios=[1, 1, 1.25])
    for rank in range(n):
        for step in range(n):
            src = (rank - step) % n
            y = n - 1 - rank
            table.add_patch(
                Rectangle((step, y), 1, 1, facecolor=rank_color(src, n), alpha=0.85, edgecolor="white")
            )
            table.text(
                step + 0.5,
                y + 0.5,
                f"kv{src}",
                ha="center",
                va="center",
                fontsize=9,
                color="white",
                weight="bold",
            )
    table.set_xlim(0, n)
    table.set_ylim(0, n)
    table.set_aspect("equal")
    table.set_xticks([s + 0.5 for s in range(n)], [str(s) for s in range(n)], fontsize=9)
    table.set_yticks([n - 1 - r + 0.5 for r in range(n)], [f"rank {r}" for r in range(n)], fontsize=9)
    table.set_xlabel("ring step", fontsize=9)
    table.set_title("k/v block held at each step\n(passed to the right after it)", fontsize=10)
    _bare(table)
    _draw_mask(left, contiguous, n, "contiguous: N chunks\n(number = ring step)")
    _draw_mask(right, zigzag, n, "zig-zag: 2N chunks, r and 2N−1−r\n(number = ring step)")
    fig.legend(
        handles=[Patch(facecolor=rank_color(r, n), alpha=0.85, label=f"rank {r}") for r in range(n)]
        + [Patch(facecolor="0.93", hatch="///", label="skipped: all masked")],
        loc="outside lower center",
        ncol=n + 1,
        fontsize=9,
    )
    return fig


def plot_work_balance(work: dict, formula: dict, title: str) -> Figure:
    """Bars: unmasked score entries each rank computed, per layout (``work[layout][rank]``);
    a black tick marks ``formula[layout][rank]``, a dashed line the mean."""
    fig = CourseFigure(figsize=(8.5, 3.6), layout="constrained")
    ax = fig.subplots()
    layouts = list(work)
    n = len(work[layouts[0]])
    width = 0.8 / len(layouts)
    for i, layout in enumerate(layouts):
        xs = [r + (i - (len(layouts) - 1) / 2) * width for r in range(n)]
        ax.bar(xs, work[layout], width * 0.95, label=layout, color=f"C{i}", alpha=0.85)
        ax.scatter(xs, formula[layout], marker="_", s=300, color="black", zorder=3)
    mean = sum(work[layouts[0]]) / n
    ax.axhline(mean, color="0.3", linestyle="--", linewidth=1)
    ax.text(n - 0.5, mean, " mean", va="bottom", ha="right", fontsize=9, color="0.3")
    ax.set_xticks(range(n), [f"rank {r}" for r in range(n)], fontsize=9)
    ax.set_ylabel("unmasked score entries\nper (batch, head)", fontsize=9)
    ax.tick_params(labelsize=9)
    ax.legend(fontsize=9, loc="upper left")
    ax.set_title(title, fontsize=10)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig


def plot_ring_vs_ulysses(
    world_sizes: Sequence[int],
    ring_seconds: Sequence[float],
    ulysses_seconds: Sequence[float],
    heads: int,
    title: str,
) -> Figure:
    """Predicted communication time of one forward attention, ring vs Ulysses, over N; the
    N where heads % N ≠ 0 (Ulysses cannot run) are marked with a cross."""
    fig = CourseFigure(figsize=(8.5, 3.8), layout="constrained")
    ax = fig.subplots()
    ax.plot(
        world_sizes, [t * 1e3 for t in ring_seconds], "o-", label="ring: (N−1) messages of 2·B", color="C0"
    )
    ok = [(n, t) for n, t in zip(world_sizes, ulysses_seconds) if heads % n == 0]
    bad = [(n, t) for n, t in zip(world_sizes, ulysses_seconds) if heads % n]
    ax.plot(
        *zip(*[(n, t * 1e3) for n, t in ok]), "s-", color="C1", label="Ulysses: 4 all-to-alls of (N−1)/N·B"
    )
    if bad:
        ax.scatter(
            [n for n, _ in bad],
            [t * 1e3 for _, t in bad],
            marker="x",
            s=60,
            color="C3",
            zorder=3,
            label=f"Ulysses impossible: {heads} heads % N ≠ 0",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(world_sizes), [str(n) for n in world_sizes], fontsize=9)
    ax.set_xlabel("N (context-parallel ranks)", fontsize=9)
    ax.set_ylabel("predicted ms (α–β model)", fontsize=9)
    ax.tick_params(labelsize=9)
    ax.legend(fontsize=9)
    ax.set_title(title, fontsize=10)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig
