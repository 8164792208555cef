"""Chapter 09: 3D parallelism — train one model with data, tensor and pipeline parallel at once.

Every rank takes its place on a :class:`course_lib.mesh.RankGrid`; ``train_3d`` builds this
rank's pipeline stage from tensor-parallel layers, trains it with ZeRO over the data axis,
and ``compare_with_dense`` checks the result against one process. ``step_messages`` lists the
messages one step sends on each axis, for the α–β predictions of the lesson.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from course_lib import data_parallel, tensor_parallel
from course_lib import pipeline_parallel as pipeline
from course_lib.mesh import Coord, GridLayout, RankGrid
from course_lib.models import shard
from course_lib.p2p import global_rank
from course_lib.tensor_parallel import block_of
from course_lib.zero import ZeroAdam

if TYPE_CHECKING:
    from course_lib.alpha_beta import AlphaBeta

# ----------------------------------------------------------------------------
# training a stack of MLPs with all three at once, from the chapters' own pieces


def build_3d_stage(grid: RankGrid, model: nn.Sequential) -> nn.Sequential:
    """This rank's part of ``model``: its pipeline stage's layers, each tensor-parallel over tp.

    The layer names keep their global index (``"3.fc1.weight"``), so they match the model's.
    """
    stage = pipeline.partition(model, grid.pp_rank, grid.pp)
    return nn.Sequential(
        OrderedDict(
            (name, tensor_parallel.TensorParallelMLP.from_dense(layer, group=grid.tp_group))
            for name, layer in stage.named_children()
        )
    )


def tp_block(name: str, dense: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The block of a dense MLP parameter that tensor-parallel rank ``tp_rank`` holds."""
    if name.endswith(("fc1.weight", "fc1.bias")):  # column-parallel: a block of output features
        return dense[block_of(dense.shape[0], tp_size, tp_rank, name)]
    if name.endswith("fc2.weight"):  # row-parallel: a block of input features
        return dense[:, block_of(dense.shape[-1], tp_size, tp_rank, name)]
    return dense  # fc2's bias is replicated


def train_3d(
    dp: int,
    tp: int,
    pp: int,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    model_fn: Callable[[], nn.Sequential],
    microbatches: int = 2,
    zero_stage: int | None = None,
    lr: float = 0.1,
    average_gradients: Callable[[nn.Module, dist.ProcessGroup | None], None] | None = None,
) -> dict:
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


def train_dense(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    zero_stage: int | None = None,
    lr: float = 0.1,
) -> list[float]:
    """The single-process reference for :func:`train_3d`: same optimizer, whole batches."""

    if zero_stage is None:
        return data_parallel.train_single_process(model, batches, lr)
    adamw = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)  # ZeroAdam's defaults
    return data_parallel.train_single_process(model, batches, optimizer=adamw)


def compare_with_dense(
    results: list, dense_params: dict, tp_size: int, rtol: float = 1e-5, atol: float = 1e-5
) -> int:
    """Check every rank's parameters against its block of the dense model's; return how many."""
    compared = 0
    for rank, result in enumerate(results):
        for name, got in result["params"].items():
            expected = tp_block(name, dense_params[name], result["coord"].tp, tp_size)
            torch.testing.assert_close(
                got, expected, rtol=rtol, atol=atol, msg=lambda m, n=name, r=rank: f"rank {r}, {n}: {m}"
            )
            compared += 1
    return compared


# ----------------------------------------------------------------------------
# the messages of one step, and their time: predicted by the α–β model, measured by replaying them


@dataclass
class StepMessages:
    """What one rank sends in one 3D training step of a stack of MLPs, per axis.

    ``dp``: bytes of each gradient all-reduce over the dp group (one per parameter tensor,
    as chapter 02's ``average_gradients_allreduce``); ``tp``: bytes of each activation
    all-reduce over the tp group (f and g, chapter 04); ``pp``: bytes of each message this
    stage sends to or receives from the next stage, one after another (chapter 06).
    """

    dp: list
    tp: list
    pp: list

    def seconds(self, model: AlphaBeta, dp: int, tp: int) -> dict:
        """Predicted seconds per axis from an :class:`~course_lib.alpha_beta.AlphaBeta` ``model``:
        a ring all-reduce 2(N−1)α + 2(N−1)/N·S/β for each dp and tp message, α + S/β for each
        pipeline message."""
        return {
            "dp": sum(model.ring_all_reduce(dp, s) for s in self.dp),
            "tp": sum(model.ring_all_reduce(tp, s) for s in self.tp),
            "pp": sum(model.message(s) for s in self.pp),
        }


def step_messages(
    grid: GridLayout,
    coord: Coord,
    stage: nn.Module,
    tokens: int,
    hidden: int,
    microbatches: int,
    element_bytes: int = 4,
) -> StepMessages:
    """The messages of one step on the rank at ``coord``, ``stage`` its (tensor-parallel) layers,
    ``tokens`` rows of width ``hidden`` per micro-batch. An MLP layer all-reduces its output
    in the forward (g) and its input's gradient in the backward (f), except the first stage's
    first layer: its input needs no gradient."""
    activation = tokens * hidden * element_bytes
    m = microbatches
    dp = [p.numel() * element_bytes for p in stage.parameters()] if grid.dp > 1 else []
    tp_count = 2 * len(stage) * m - (m if coord.pp == 0 else 0)
    tp = [activation] * tp_count if grid.tp > 1 else []
    neighbours = (coord.pp > 0) + (coord.pp < grid.pp - 1)  # a middle stage talks both ways
    pp = [activation] * (2 * m * neighbours) if grid.pp > 1 else []
    return StepMessages(dp, tp, pp)


def _fastest(fn, repeats: int) -> float:
    """The least disturbed of ``repeats`` runs of ``fn`` on every rank (each starts together)."""
    import time

    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def time_step_messages(
    dp: int,
    tp: int,
    pp: int,
    model_fn: Callable[[], nn.Sequential],
    tokens_per_rank: int,
    microbatches: int,
    repeats: int = 5,
) -> dict:
    """Inside each rank: one real 3D step, then its messages replayed on their own, per axis.

    Replayed without the compute between them, so what is timed is communication only: the dp
    gradient all-reduces (on the real gradients), the tp all-reduces of one micro-batch's
    activation, and the pipeline's sends and receives between neighbouring stages (forward
    then back). Returns ``{"coord", "messages" (StepMessages), "seconds" (per axis, the
    fastest of ``repeats``)}``.
    """

    grid = RankGrid(dp, tp, pp)
    stage = build_3d_stage(grid, model_fn())
    hidden = stage[0].fc1.weight.shape[1]
    x = torch.randn(tokens_per_rank, hidden)
    pipeline.train_step(stage, x, x, F.mse_loss, microbatches, group=grid.pp_group)  # real gradients
    rows = tokens_per_rank // microbatches
    messages = step_messages(grid, grid.coord, stage, rows, hidden, microbatches)
    activation = torch.zeros(rows, hidden)
    s = grid.pp_rank
    before = global_rank(grid.pp_group, s - 1) if s > 0 else None
    after = global_rank(grid.pp_group, s + 1) if s < pp - 1 else None

    def tp_replay():
        for _ in messages.tp:
            dist.all_reduce(activation, group=grid.tp_group)

    def pp_replay():
        for _ in range(microbatches):  # forward: activations to the next stage
            if before is not None:
                dist.recv(activation, before, group=grid.pp_group)
            if after is not None:
                dist.send(activation, after, group=grid.pp_group)
        for _ in range(microbatches):  # backward: gradients to the previous stage
            if after is not None:
                dist.recv(activation, after, group=grid.pp_group)
            if before is not None:
                dist.send(activation, before, group=grid.pp_group)

    seconds = {
        "dp": _fastest(lambda: data_parallel.average_gradients_allreduce(stage, grid.dp_group), repeats)
        if dp > 1
        else 0.0,
        "tp": _fastest(tp_replay, repeats) if tp > 1 else 0.0,
        "pp": _fastest(pp_replay, repeats) if pp > 1 else 0.0,
    }
    return {"coord": grid.coord, "messages": messages, "seconds": seconds}
