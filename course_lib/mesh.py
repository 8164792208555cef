"""Chapter 09: 3D parallelism — every rank sits on a grid of data × tensor × pipeline parallel.

    layout = GridLayout(dp=2, tp=2, pp=2)       # pure arithmetic, no processes needed
    layout.coordinates(5)                       # Coord(dp=0, tp=1, pp=1)
    layout.groups("tp")                         # [[0, 1], [2, 3], [4, 5], [6, 7]]
    grid = RankGrid(dp=2, tp=2, pp=2)           # inside each of 8 ranks: also the process groups
    grid.tp_group, grid.dp_group, grid.pp_group

Rank order (Megatron-LM's): **tp varies fastest, then dp, then pp**:

    rank = pp_index · (dp · tp) + dp_index · tp + tp_index

Why this order: tensor parallelism talks most (two all-reduces per layer, forward and
backward), so its ranks are neighbours — on a real cluster, GPUs of one node behind
NVLink. Data parallelism talks once per step; pipeline stages only pass activations to
the next stage, the least traffic, so they may sit furthest apart (across nodes).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

#: Axes from the fastest-varying to the slowest.
AXES = ("tp", "dp", "pp")


@dataclass(frozen=True)
class Coord:
    dp: int
    tp: int
    pp: int


class GridLayout:
    """Where each rank sits on a dp × tp × pp grid, and which ranks share a group."""

    def __init__(self, dp: int = 1, tp: int = 1, pp: int = 1):
        for name, size in (("dp", dp), ("tp", tp), ("pp", pp)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be a positive integer, got {size!r}")
        self.dp, self.tp, self.pp = dp, tp, pp
        self.world_size = dp * tp * pp

    def size(self, axis: str) -> int:
        if axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
        return getattr(self, axis)

    def coordinates(self, rank: int) -> Coord:
        """(dp, tp, pp) indices of ``rank``: tp = rank mod tp, then dp, then pp."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in 0..{self.world_size - 1}, got {rank}")
        return Coord(dp=rank // self.tp % self.dp, tp=rank % self.tp, pp=rank // (self.tp * self.dp))

    def rank_at(self, dp: int = 0, tp: int = 0, pp: int = 0) -> int:
        for name, index in (("dp", dp), ("tp", tp), ("pp", pp)):
            if not 0 <= index < self.size(name):
                raise ValueError(f"{name} index must be in 0..{self.size(name) - 1}, got {index}")
        return pp * self.dp * self.tp + dp * self.tp + tp

    def groups(self, axis: str) -> list[list[int]]:
        """The ranks of every group along ``axis``: ranks that differ only in that coordinate."""
        self.size(axis)
        others = [a for a in ("dp", "tp", "pp") if a != axis]
        found = {}
        for rank in range(self.world_size):
            c = self.coordinates(rank)
            key = tuple(getattr(c, a) for a in others)
            found.setdefault(key, []).append(rank)  # ranks ascend, so each group is sorted
        return sorted(found.values())

    def __repr__(self):
        return f"{type(self).__name__}(dp={self.dp}, tp={self.tp}, pp={self.pp})"

    def draw(self, highlight: int | None = None):
        """Three panels, one per axis: every rank as a box, colored by its group on that axis."""
        return _draw_grid(self, highlight)


class RankGrid(GridLayout):
    """A :class:`GridLayout` plus this rank's process group along each axis.

    Every rank must construct it, with the same sizes: ``new_group`` is a collective,
    so all ranks create every group, in the same order (tp, dp, pp), and keep their own.
    """

    def __init__(self, dp: int = 1, tp: int = 1, pp: int = 1):
        super().__init__(dp, tp, pp)
        world = dist.get_world_size()
        if self.world_size != world:
            raise ValueError(f"dp·tp·pp = {dp}·{tp}·{pp} = {self.world_size} must equal the world size "
                             f"{world}: every rank needs exactly one place on the grid")
        self.rank = dist.get_rank()
        self.coord = self.coordinates(self.rank)
        for axis in AXES:
            mine, _ = dist.new_subgroups_by_enumeration(self.groups(axis))
            setattr(self, f"{axis}_group", mine)

    @property
    def dp_rank(self) -> int:
        return self.coord.dp

    @property
    def tp_rank(self) -> int:
        return self.coord.tp

    @property
    def pp_rank(self) -> int:
        return self.coord.pp


def _draw_grid(layout: GridLayout, highlight: int | None):
    from matplotlib.patches import Rectangle

    from course_lib.viz import CourseFigure, rank_color

    dp, tp, pp = layout.dp, layout.tp, layout.pp
    gap = 0.6  # between pipeline stages
    width = pp * tp + (pp - 1) * gap
    panel_width = max(2.2, 0.9 * width + 0.6)
    stacked = panel_width > 6  # wide grids: one panel per row, so boxes stay legible
    rows, cols = (3, 1) if stacked else (1, 3)
    fig = CourseFigure(figsize=(panel_width * cols, (0.75 * dp + 1.4) * rows + 0.3), layout="constrained")
    titles = {"tp": "tensor-parallel groups (all-reduce every layer)",
              "dp": "data-parallel groups (gradients, once a step)",
              "pp": "pipeline groups (activations to the next stage)"}
    for ax, axis in zip(fig.subplots(rows, cols).ravel(), ("tp", "dp", "pp")):
        groups = layout.groups(axis)
        group_of = {r: i for i, g in enumerate(groups) for r in g}
        for rank in range(layout.world_size):
            c = layout.coordinates(rank)
            x, y = c.pp * (tp + gap) + c.tp, dp - 1 - c.dp
            color = rank_color(group_of[rank], len(groups)) if len(groups[0]) > 1 else "0.85"
            ax.add_patch(Rectangle((x + 0.05, y + 0.05), 0.9, 0.9, facecolor=color, alpha=0.85,
                                   edgecolor="black" if rank == highlight else "white",
                                   linewidth=2.5 if rank == highlight else 1))
            ax.text(x + 0.5, y + 0.5, str(rank), ha="center", va="center", fontsize=11, weight="bold")
        for s in range(pp):
            ax.text(s * (tp + gap) + tp / 2, dp + 0.1, f"stage {s}", ha="center", va="bottom", fontsize=9)
        ax.set_xlim(-0.1, width + 0.1)
        ax.set_ylim(-0.45, dp + 0.55)
        ax.set_aspect("equal")
        for s in range(pp):
            for t in range(tp):
                ax.text(s * (tp + gap) + t + 0.5, -0.08, f"tp{t}", ha="center", va="top", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([dp - 1 - d + 0.5 for d in range(dp)], [f"dp{d}" for d in range(dp)], fontsize=8)
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
        ax.set_title(f"{titles[axis]}\n{len(groups)} group(s) of {len(groups[0])}"
                     + (" (size 1: no communication)" if len(groups[0]) == 1 else ""), fontsize=9)
    fig.suptitle(f"{layout.world_size} ranks on a dp={dp} × tp={tp} × pp={pp} grid "
                 "(rank = pp_index·dp·tp + dp_index·tp + tp_index; same color = same group)"
                 + ("" if highlight is None else f"; rank {highlight} outlined"), fontsize=10)
    return fig


# ----------------------------------------------------------------------------
# training a stack of MLPs with all three at once, from the chapters' own pieces


def build_3d_stage(grid: RankGrid, model: nn.Sequential) -> nn.Sequential:
    """This rank's part of ``model``: its pipeline stage's layers, each tensor-parallel over tp.

    The layer names keep their global index (``"3.fc1.weight"``), so they match the model's.
    """
    from course_lib import pp, tp
    stage = pp.partition(model, grid.pp_rank, grid.pp)
    return nn.Sequential(OrderedDict(
        (name, tp.TensorParallelMLP.from_dense(layer, group=grid.tp_group))
        for name, layer in stage.named_children()))


def tp_block(name: str, dense: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The block of a dense MLP parameter that tensor-parallel rank ``tp_rank`` holds."""
    step_rows, step_cols = dense.shape[0] // tp_size, dense.shape[-1] // tp_size
    if name.endswith(("fc1.weight", "fc1.bias")):  # column-parallel: a block of output features
        return dense[tp_rank * step_rows:(tp_rank + 1) * step_rows]
    if name.endswith("fc2.weight"):  # row-parallel: a block of input features
        return dense[:, tp_rank * step_cols:(tp_rank + 1) * step_cols]
    return dense  # fc2's bias is replicated


def train_3d(dp: int, tp: int, pp: int, batches, model_fn, microbatches: int = 2,
             zero_stage: int | None = None, lr: float = 0.1, average_gradients=None) -> dict:
    """Train ``model_fn()`` (an ``nn.Sequential`` of MLPs, the same on every rank) on a grid.

    Per step: rank takes its dp shard of the batch; its pipeline stage (``pp.train_step``,
    GPipe, ``microbatches`` micro-batches) runs tensor-parallel layers; then the gradients
    are averaged over the **dp group only** — tp ranks hold different blocks, pp ranks
    different layers, so neither may be mixed in. ``zero_stage=None``: SGD with momentum
    (chapter 02's) and ``average_gradients(model, dp_group)`` (default: all-reduce and
    divide); a number: chapter 07's ZeroAdam over the dp group, which averages itself.
    Returns ``{"coord", "losses" (last stage only, mean over the whole batch), "params",
    "memory" (ZeroAdam's report of the model states after the last update, or None)}``.
    """
    from course_lib import dp as data_parallel
    from course_lib import pp as pipeline
    from course_lib.models import shard
    from course_lib.zero import ZeroAdam

    grid = RankGrid(dp, tp, pp)
    stage = build_3d_stage(grid, model_fn())
    if zero_stage is None:
        optimizer = data_parallel.SGD(stage.parameters(), lr)
        average_gradients = average_gradients or data_parallel.average_gradients_allreduce
    else:
        optimizer = ZeroAdam(stage, zero_stage, lr=lr, group=grid.dp_group)
    last = grid.pp_rank == pp - 1
    losses, memory = [], None
    for x, y in batches:
        x, y = shard(x, grid.dp_rank, dp), shard(y, grid.dp_rank, dp)
        loss = pipeline.train_step(stage, x, y, F.mse_loss, microbatches, group=grid.pp_group)
        if zero_stage is None:
            average_gradients(stage, grid.dp_group)
        optimizer.step()
        # What the rank holds at its fullest: after the update, before the gradients go.
        memory = optimizer.memory_report() if zero_stage is not None else None
        optimizer.zero_grad()
        if last:  # this replica's mean loss; the batch's is the mean over replicas
            dist.all_reduce(loss, group=grid.dp_group)
            losses.append(loss.item() / dp)
    params = optimizer.full_parameters() if zero_stage is not None else data_parallel.parameters(stage)
    return {"coord": grid.coord, "losses": losses if last else None, "params": params, "memory": memory}


def train_dense(model, batches, zero_stage: int | None = None, lr: float = 0.1) -> list[float]:
    """The single-process reference for :func:`train_3d`: same optimizer, whole batches."""
    from course_lib import dp as data_parallel
    if zero_stage is None:
        return data_parallel.train_single_process(model, batches, lr)
    adamw = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)  # ZeroAdam's defaults
    return data_parallel.train_single_process(model, batches, optimizer=adamw)


def compare_with_dense(results: list, dense_params: dict, tp_size: int, rtol=1e-5, atol=1e-5) -> int:
    """Check every rank's parameters against its block of the dense model's; return how many."""
    compared = 0
    for rank, result in enumerate(results):
        for name, got in result["params"].items():
            expected = tp_block(name, dense_params[name], result["coord"].tp, tp_size)
            torch.testing.assert_close(got, expected, rtol=rtol, atol=atol,
                                       msg=lambda m, n=name, r=rank: f"rank {r}, {n}: {m}")
            compared += 1
    return compared
