"""The rank grid (chapter 09): every rank's place on data × tensor × pipeline (× context) parallel axes, and its groups.

    layout = GridLayout(dp=2, tp=2, pp=2)       # pure arithmetic, no processes needed
    layout.coordinates(5)                       # Coord(dp=0, tp=1, pp=1)
    layout.groups("tp")                         # [[0, 1], [2, 3], [4, 5], [6, 7]]
    grid = RankGrid(dp=2, tp=2, pp=2)           # inside each of 8 ranks: also the process groups
    grid.tp_group, grid.dp_group, grid.pp_group

Rank order (Megatron-LM's): **tp varies fastest, then dp, then pp**:

    rank = pp_index · (dp · tp) + dp_index · tp + tp_index

A context-parallel axis (chapter 05b) sits between tp and dp, as in Megatron-LM's
order tp-cp-(ep)-dp-pp: ``GridLayout(dp=2, cp=2)``. Its default cp=1 leaves every
rank's place and every group above unchanged:

    rank = ((pp_index · dp + dp_index) · cp + cp_index) · tp + tp_index

An expert-parallel axis (chapter 09b) sits between cp and dp, Megatron-LM's place for
it: ``GridLayout(dp=2, ep=2)``. Its default ep=1 again leaves every existing grid as it was:

    rank = (((pp_index · dp + dp_index) · ep + ep_index) · cp + cp_index) · tp + tp_index

The grid's arithmetic runs over :data:`AXES`, so a further axis is one more entry there.
``layout.groups(("dp", "ep"))`` lists the groups of ranks that differ only along several
axes at once (the data-parallel group of a parameter that ep ranks replicate).

Why this order: tensor parallelism talks most (two all-reduces per layer, forward and
backward), so its ranks are neighbours — on a real cluster, GPUs of one node behind
NVLink. Data parallelism talks once per step; pipeline stages only pass activations to
the next stage, the least traffic, so they may sit furthest apart (across nodes).

The 3D trainer built on the grid lives in :mod:`course_lib.parallel_3d`; its names are
importable from here too, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.distributed as dist

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Axes from the fastest-varying to the slowest.
AXES = ("tp", "cp", "ep", "dp", "pp")


@dataclass(frozen=True)
class Coord:
    dp: int
    tp: int
    pp: int
    cp: int = 0
    ep: int = 0


class GridLayout:
    """Where each rank sits on a dp × tp × pp (× cp) grid, and which ranks share a group."""

    def __init__(self, dp: int = 1, tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1):
        for name, size in (("dp", dp), ("tp", tp), ("pp", pp), ("cp", cp), ("ep", ep)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be a positive integer, got {size!r}")
        self.dp, self.tp, self.pp, self.cp, self.ep = dp, tp, pp, cp, ep
        self.world_size = dp * tp * pp * cp * ep

    def size(self, axis: str) -> int:
        if axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
        return getattr(self, axis)

    def coordinates(self, rank: int) -> Coord:
        """(dp, tp, pp, cp, ep) indices of ``rank``: tp = rank mod tp, then cp, ep, dp, pp."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in 0..{self.world_size - 1}, got {rank}")
        index = {}
        for axis in AXES:  # fastest first: peel one axis off at a time
            rank, index[axis] = divmod(rank, self.size(axis))
        return Coord(**index)

    def rank_at(self, dp: int = 0, tp: int = 0, pp: int = 0, cp: int = 0, ep: int = 0) -> int:
        index = {"dp": dp, "tp": tp, "pp": pp, "cp": cp, "ep": ep}
        for name in AXES:
            if not 0 <= index[name] < self.size(name):
                raise ValueError(f"{name} index must be in 0..{self.size(name) - 1}, got {index[name]}")
        rank = 0
        for axis in reversed(AXES):  # slowest first
            rank = rank * self.size(axis) + index[axis]
        return rank

    def groups(self, axis: str | tuple[str, ...]) -> list[list[int]]:
        """The ranks of every group along ``axis``: ranks that differ only in that coordinate.

        A tuple of axes, e.g. ``("dp", "ep")``: ranks that differ only in those coordinates."""
        along = (axis,) if isinstance(axis, str) else tuple(axis)
        for a in along:
            self.size(a)
        others = [a for a in AXES if a not in along]
        found = {}
        for rank in range(self.world_size):
            c = self.coordinates(rank)
            key = tuple(getattr(c, a) for a in others)
            found.setdefault(key, []).append(rank)  # ranks ascend, so each group is sorted
        return sorted(found.values())

    def __repr__(self):
        cp = f", cp={self.cp}" if self.cp > 1 else ""
        ep = f", ep={self.ep}" if self.ep > 1 else ""
        return f"{type(self).__name__}(dp={self.dp}, tp={self.tp}, pp={self.pp}{cp}{ep})"

    def draw(self, highlight: int | None = None) -> Figure:
        """Three panels, one per axis: every rank as a box, colored by its group on that axis."""
        if self.cp > 1 or self.ep > 1:
            raise ValueError(f"draw() shows dp × tp × pp grids; this one also has cp={self.cp}, ep={self.ep}")
        from course_lib.viz import draw_rank_grid

        return draw_rank_grid(self, highlight)


class RankGrid(GridLayout):
    """A :class:`GridLayout` plus this rank's process group along each axis.

    Every rank must construct it, with the same sizes: ``new_group`` is a collective,
    so all ranks create every group, in the same order (:data:`AXES`), and keep their own.
    """

    def __init__(self, dp: int = 1, tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1):
        super().__init__(dp, tp, pp, cp, ep)
        world = dist.get_world_size()
        if self.world_size != world:
            names, sizes = ("dp·tp·pp", f"{dp}·{tp}·{pp}")
            for name, size in (("cp", cp), ("ep", ep)):
                if size > 1:
                    names, sizes = f"{names}·{name}", f"{sizes}·{size}"
            raise ValueError(
                f"{names} = {sizes} = {self.world_size} must equal the world size "
                f"{world}: every rank needs exactly one place on the grid"
            )
        self.rank = dist.get_rank()
        self.coord = self.coordinates(self.rank)
        for axis in AXES:
            mine, _ = dist.new_subgroups_by_enumeration(self.groups(axis))
            setattr(self, f"{axis}_group", mine)

    def new_group(self, axes: tuple[str, ...]) -> dist.ProcessGroup:
        """This rank's group along several axes at once (a collective: every rank calls it)."""
        mine, _ = dist.new_subgroups_by_enumeration(self.groups(axes))
        return mine

    @property
    def dp_rank(self) -> int:
        return self.coord.dp

    @property
    def tp_rank(self) -> int:
        return self.coord.tp

    @property
    def pp_rank(self) -> int:
        return self.coord.pp

    @property
    def cp_rank(self) -> int:
        return self.coord.cp

    @property
    def ep_rank(self) -> int:
        return self.coord.ep


def __getattr__(name: str):
    # The trainer moved to parallel_3d, which imports this module: resolve its names lazily.
    if name in _MOVED:
        from course_lib import parallel_3d

        return getattr(parallel_3d, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_MOVED = {
    "build_3d_stage",
    "tp_block",
    "train_3d",
    "train_dense",
    "compare_with_dense",
    "StepMessages",
    "step_messages",
    "time_step_messages",
}
