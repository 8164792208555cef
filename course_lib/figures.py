"""The course's figures: a Figure that shows itself in a notebook, a color per rank, and rows
of per-rank values. Imports nothing of the course, so every chapter's figure module can use it.

Functions return a matplotlib Figure and draw nothing on screen themselves; a
notebook shows a Figure that is the last value of a cell. They use the
object-oriented API (``Figure``, not ``pyplot``), so no global figure is left
open (a widget redrawing 100 times leaks nothing) and nothing needs a display.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import matplotlib
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes


class CourseFigure(Figure):
    """A Figure that shows itself as a PNG in a notebook, whatever the matplotlib backend.

    Without pyplot, Jupyter only knows how to draw a plain Figure once the inline
    backend has been activated; otherwise it would print "<Figure size ...>".
    """

    def _repr_png_(self):
        buffer = io.BytesIO()
        self.savefig(buffer, format="png")
        return buffer.getvalue()


def rank_color(rank: int, world_size: int = 10) -> tuple[float, float, float, float]:
    """One distinct color per rank (tab10 up to 10 ranks, tab20 up to 20, then a rainbow)."""
    if world_size <= 10:
        return matplotlib.colormaps["tab10"](rank % 10)
    if world_size <= 20:
        return matplotlib.colormaps["tab20"](rank % 20)
    return matplotlib.colormaps["hsv"](rank / world_size)


def bare(ax: Axes) -> None:
    """An axes with no ticks and no frame: a table or a diagram drawn with patches."""
    ax.tick_params(left=False, bottom=False)
    for side in ax.spines.values():
        side.set_visible(False)
