"""Pictures for chapter 04b: who holds which block on the grid, SUMMA's steps, costs over N.

Like :mod:`course_lib.viz`, every function returns a Figure and imports none of the course's
training code: the lesson computes the data (``tp_nd.owner_maps``, ``tp_nd.predicted``,
measurements) and hands it in.
"""

from __future__ import annotations

from matplotlib.patches import FancyArrowPatch, Rectangle

from course_lib.viz import CourseFigure, rank_color

MODE_STYLE = {
    "1d": ("tab:gray", "o"),
    "2d": ("tab:blue", "s"),
    "2.5d": ("tab:green", "D"),
    "3d": ("tab:red", "^"),
}


def _draw_owners(ax, owner, title, n, label_blocks=True):
    rows, cols = owner.shape
    for r in range(rows):
        for c in range(cols):
            ax.add_patch(Rectangle((c, r), 1, 1, color=rank_color(int(owner[r, c]), n), ec="white", lw=0.3))
    if label_blocks:  # one label per contiguous block: at its centre
        seen = {}
        for r in range(rows):
            for c in range(cols):
                seen.setdefault(int(owner[r, c]), []).append((r, c))
        for rank, cells in seen.items():
            rs, cs = [p[0] for p in cells], [p[1] for p in cells]
            ax.text(
                (min(cs) + max(cs) + 1) / 2,
                (min(rs) + max(rs) + 1) / 2,
                str(rank),
                ha="center",
                va="center",
                fontsize=9,
            )
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)


def plot_blocks(panels: list, n: int) -> CourseFigure:
    """``panels``: (title, owner tensor) pairs, each cell coloured (and each block numbered) by its rank."""
    fig = CourseFigure(figsize=(3.0 * len(panels), 3.6), layout="constrained")
    for ax, (title, owner) in zip(fig.subplots(1, len(panels)), panels):
        _draw_owners(ax, owner, title, n)
    fig.suptitle("Which rank holds which block (numbers: ranks)", fontsize=11)
    return fig


def plot_summa_steps(q: int) -> CourseFigure:
    """SUMMA on a q×q grid, one column per step k: the blocks that move and where they go."""
    fig = CourseFigure(figsize=(3.4 * q, 6.6), layout="constrained")
    axes = fig.subplots(2, q, squeeze=False)
    n = q * q
    for k in range(q):
        for row, (name, moving, arrow) in enumerate(
            (("X", lambda i, j: j == k, "row"), ("B", lambda i, j: i == k, "col"))
        ):
            ax = axes[row][k]
            for i in range(q):
                for j in range(q):
                    source = moving(i, j)
                    color = rank_color(i * q + j, n)
                    ax.add_patch(
                        Rectangle(
                            (j, i), 1, 1, color=color, alpha=1.0 if source else 0.18, ec="black", lw=0.6
                        )
                    )
                    ax.text(j + 0.5, i + 0.28, f"${name}_{{{i}{j}}}$", ha="center", va="center", fontsize=10)
            for t in range(q):  # arrows from the source block to every other rank of its row / column
                for u in range(q):
                    if u == k:
                        continue
                    bend = 0.3 if u > k else -0.3
                    if arrow == "row":
                        start, end = (k + 0.5, t + 0.62), (u + 0.5, t + 0.62)
                    else:
                        start, end = (t + 0.62, k + 0.5), (t + 0.62, u + 0.5)
                    ax.add_patch(
                        FancyArrowPatch(
                            start,
                            end,
                            arrowstyle="-|>",
                            mutation_scale=11,
                            color="black",
                            lw=1.1,
                            shrinkA=6,
                            shrinkB=6,
                            connectionstyle=f"arc3,rad={bend if abs(u - k) > 1 else 0}",
                        )
                    )
            ax.set_xlim(-0.05, q + 0.05)
            ax.set_ylim(q + 0.05, -0.05)
            ax.set_aspect("equal")
            ax.axis("off")
            along = (
                "along each grid row i (from rank (i, k))"
                if name == "X"
                else "along each grid column j (from rank (k, j))"
            )
            block_name = f"$X_{{i{k}}}$" if name == "X" else f"$B_{{{k}j}}$"
            ax.set_title(f"step k={k}: broadcast {block_name}\n{along}", fontsize=9)
    fig.suptitle(
        f"SUMMA on a {q}×{q} grid: in step k, rank (i, j) receives $X_{{ik}}$ and $B_{{kj}}$ "
        "and adds $X_{ik} B_{kj}$ to its block $C_{ij}$ (bright: the blocks that are sent)",
        fontsize=11,
    )
    return fig


def plot_costs(curves: dict, measured: dict, title: str) -> CourseFigure:
    """Per-rank bytes received (left) and collective calls (right), one forward + backward, over N.

    ``curves``: mode -> (Ns, bytes, calls) from the formulas; ``measured``: mode -> list of
    (N, bytes, calls) from the traffic counter.
    """
    fig = CourseFigure(figsize=(11, 4.2), layout="constrained")
    ax_bytes, ax_calls = fig.subplots(1, 2)
    for mode, (ns, nbytes, calls) in curves.items():
        color, marker = MODE_STYLE[mode]
        ax_bytes.plot(ns, nbytes, color=color, lw=1.5, label=f"{mode} formula")
        ax_calls.plot(ns, calls, color=color, lw=1.5, label=f"{mode} formula")
        for n, b, c in measured.get(mode, []):
            ax_bytes.plot(n, b, marker, color=color, ms=9, mfc="none", mew=2)
            ax_calls.plot(n, c, marker, color=color, ms=9, mfc="none", mew=2)
    for mode in measured:
        color, marker = MODE_STYLE[mode]
        ax_bytes.plot([], [], marker, color=color, mfc="none", mew=2, label=f"{mode} measured")
    for ax, ylabel in (
        (ax_bytes, "bytes received per rank (forward + backward)"),
        (ax_calls, "collective calls per rank"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N ranks")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_bytes.legend(fontsize=8, ncols=2)
    fig.suptitle(title, fontsize=11)
    return fig
