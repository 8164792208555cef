"""Pictures for the course: every rank's data around a collective, and timings.

Functions return a matplotlib Figure and draw nothing on screen themselves; a
notebook shows a Figure that is the last value of a cell. They use the
object-oriented API (``Figure``, not ``pyplot``), so no global figure is left
open (a widget redrawing 100 times leaks nothing) and nothing needs a display.
"""
from __future__ import annotations

import io

import matplotlib
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from course_lib.collectives import ROOTED, bandwidth, bus_factor, format_bytes, run_collective, sources


class CourseFigure(Figure):
    """A Figure that shows itself as a PNG in a notebook, whatever the matplotlib backend.

    Without pyplot, Jupyter only knows how to draw a plain Figure once the inline
    backend has been activated; otherwise it would print "<Figure size ...>".
    """

    def _repr_png_(self):
        buffer = io.BytesIO()
        self.savefig(buffer, format="png")
        return buffer.getvalue()


def rank_color(rank: int, world_size: int = 10):
    """One distinct color per rank (tab10 up to 10 ranks, tab20 up to 20, then a rainbow)."""
    if world_size <= 10:
        return matplotlib.colormaps["tab10"](rank % 10)
    if world_size <= 20:
        return matplotlib.colormaps["tab20"](rank % 20)
    return matplotlib.colormaps["hsv"](rank / world_size)


def draw_rank_rows(ax, values, masks, n, title, root_label):
    """One row per rank; each cell striped with the colors of the ranks it came from."""
    width = max((len(v) for v in values if v is not None), default=1)
    for rank, (row, mask_row) in enumerate(zip(values, masks)):
        y = n - 1 - rank  # rank 0 on top
        if row is None:
            ax.add_patch(Rectangle((0, y + 0.05), width, 0.9, fill=False, linestyle="--",
                                   edgecolor="0.6"))
            ax.text(width / 2, y + 0.5, "no result", ha="center", va="center", color="0.45",
                    fontsize=9, style="italic")
            continue
        for i, (value, mask) in enumerate(zip(row.tolist(), mask_row.tolist())):
            contributors = sources(mask) or [None]
            stripe = 1.0 / len(contributors)
            for s, src in enumerate(contributors):
                color = "0.85" if src is None else rank_color(src, n)
                ax.add_patch(Rectangle((i + s * stripe, y + 0.05), stripe, 0.9, color=color, linewidth=0))
            ax.add_patch(Rectangle((i, y + 0.05), 1, 0.9, fill=False, edgecolor="white", linewidth=1.5))
            ax.text(i + 0.5, y + 0.5, f"{value:g}", ha="center", va="center", fontsize=9,
                    bbox=dict(boxstyle="round,pad=0.15", facecolor="white", alpha=0.75, linewidth=0))
    ax.set_xlim(0, width)
    ax.set_ylim(0, n)
    ax.set_yticks([n - 1 - r + 0.5 for r in range(n)])
    ax.set_yticklabels([root_label(r) for r in range(n)])
    ax.set_xticks([])
    ax.set_title(title, fontsize=10)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(left=False)


def plot_collective(demo) -> Figure:
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
    fig.legend(handles=[Patch(color=rank_color(r, n), label=f"from rank {r}") for r in range(n)],
               loc="outside lower center", ncols=max(1, min(n, int(width / 1.3))), fontsize=8, frameon=False)
    return fig


def show_collective(name: str, world_size: int, root: int = 0, k: int | None = None) -> Figure:
    """Run collective ``name`` on ``world_size`` ranks and picture every rank's data."""
    return plot_collective(run_collective(name, world_size, k=k, root=root))


def plot_timing(timings) -> Figure:
    """Time per call (left) and bus bandwidth (right) against the array size S.

    ``timings`` is a list of :class:`~course_lib.collectives.Timing`; one line
    per collective and world size.
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
    ax_time.set_title("time: flat = latency-bound, rising = bandwidth-bound", fontsize=10)
    ax_bw.set_ylabel("bus bandwidth (GB/s)")
    ax_bw.set_title("busbw = S/t × factor (nccl-tests)", fontsize=10)
    ax_bw.legend(fontsize=8, loc="upper left")
    backend = ", ".join(sorted({t.backend for t in timings}))
    fig.suptitle(f"Measured on this machine ({backend})", fontsize=11)
    return fig
