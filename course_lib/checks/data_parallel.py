"""Checks for chapter 02: data parallelism.

Each check runs the learner's function on N = 1, 2, 3 and 4 ranks. Every rank
holds a replica of the same small seeded MLP and its shard of a global batch;
what every rank ends with (its shard, its gradients, its parameters after a
few momentum-SGD steps) is compared with one process training on the whole
batch, to rtol = atol = 1e-5. torch's DistributedDataParallel is switched off
inside the ranks: it is the reference, not the answer.

A wrong answer gets one line: N, rank, step, parameter and element, expected
vs got, and, where the numbers give it away, what happened (the sum instead
of the mean, this rank's own gradient, parameters the server never sent back).
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from course_lib import dp
from course_lib.checks import (
    BuiltinUsed,
    Mismatch,
    builtins_switched_off,
    compare,
    exercise,
    learner_in_rank,
    run_learner,
)
from course_lib.models import make_mlp, shard
from course_lib.traffic import count_traffic

if TYPE_CHECKING:
    from collections.abc import Callable

WORLD_SIZES = (1, 2, 3, 4)
#: Seconds one launch may take; a learner's deadlock is reported after about this long.
TIMEOUT = 20.0
D_MODEL, D_HIDDEN, SEED = 8, 16, 3
BATCH = 12  # divisible by every N above
STEPS = 3  # several steps, so the momentum (optimizer state) matters
MICRO_BATCHES = 3  # exercise 2.4: M micro-batches per rank and step
# A parameter server's workers talk to the server only: collectives that give
# every rank the sum are switched off in 2.3.
ALL_TO_ALL_KIND = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
)


# ----------------------------------------------------------------------------
# inside the ranks


@contextlib.contextmanager
def _switched_off(ex_id: str, learner_fn, collectives=()):
    """torch's DDP, and the named collectives, raise BuiltinUsed while the learner's code runs."""

    def refuse(self, *args, **kwargs):
        raise BuiltinUsed(
            f"exercise {ex_id} builds data parallelism itself: you used torch's "
            "DistributedDataParallel (switched off here)"
        )

    ddp_init = DistributedDataParallel.__init__
    DistributedDataParallel.__init__ = refuse
    try:
        why = f"exercise {ex_id} is a parameter server: workers talk to the server only"
        with builtins_switched_off(learner_fn, collectives, why):
            yield
    finally:
        DistributedDataParallel.__init__ = ddp_init


def _batch(step: int, size: int = BATCH):
    return dp.make_batches(step + 1, size, D_MODEL, seed=SEED)[step]


def _local_backward(model, step: int, size: int = BATCH) -> None:
    """This rank's gradient on its shard of global batch ``step``."""
    x, y = _batch(step, size)
    rank, n = dist.get_rank(), dist.get_world_size()
    model.zero_grad(set_to_none=True)
    F.mse_loss(model(shard(x, rank, n)), shard(y, rank, n)).backward()


def _grads(model) -> dict:
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def _shard_rank(payload):
    learner = learner_in_rank(payload)
    got = {}
    with _switched_off("2.1", learner):
        for size in (BATCH, 2 * BATCH):
            batch = torch.arange(size, dtype=torch.float32).unsqueeze(1).repeat(1, 3)  # row i holds i
            got[size] = learner(batch)
    return got


def _gradient_rank(payload):
    learner = learner_in_rank(payload)
    model = make_mlp(D_MODEL, D_HIDDEN, SEED)
    _local_backward(model, 0)
    with _switched_off("2.2", learner):
        learner(model)
    return _grads(model)


def _server_rank(payload):
    learner = learner_in_rank(payload)
    model = make_mlp(D_MODEL, D_HIDDEN, SEED)
    optimizer = dp.SGD(model.parameters()) if dist.get_rank() == dp.ROOT else None
    history = []
    with _switched_off("2.3", learner, ALL_TO_ALL_KIND):
        for step in range(STEPS):
            _local_backward(model, step)
            learner(model, optimizer)
            history.append(dp.parameters(model))
    return history


def _accumulate_rank(payload):
    learner = learner_in_rank(payload)
    rank, n, m = dist.get_rank(), dist.get_world_size(), MICRO_BATCHES
    model = make_mlp(D_MODEL, D_HIDDEN, SEED)
    optimizer = dp.SGD(model.parameters())
    history, early = [], []
    with count_traffic() as traffic, _switched_off("2.4", learner):
        calls_at_forward = []  # communication calls made so far, at each forward
        model.register_forward_pre_hook(lambda *_: calls_at_forward.append(len(traffic.calls)))
        for step in range(STEPS):
            x, y = _batch(step, BATCH * m)
            x, y = shard(x, rank, n), shard(y, rank, n)
            micro_batches = [(shard(x, i, m), shard(y, i, m)) for i in range(m)]
            calls_at_forward.clear()
            before = len(traffic.calls)
            learner(model, optimizer, micro_batches)
            history.append(dp.parameters(model))
            # Communication before the last forward happened on an accumulation step.
            if len(calls_at_forward) == m and calls_at_forward[-1] > before:
                early.append(
                    (
                        step,
                        calls_at_forward.index(next(c for c in calls_at_forward if c > before)),
                        traffic.calls[before].op,
                    )
                )
    return history, early


# ----------------------------------------------------------------------------
# in the notebook: the single-process references and the diagnosis


def _launch(n: int, rank_fn, learner_fn):
    return run_learner(n, rank_fn, learner_fn, timeout=TIMEOUT)


@functools.cache
def _simulate(n: int, mode: str, steps: int, scale: float = 1.0, batch: int = BATCH) -> tuple:
    """Parameters of every rank after each step when rank r updates with ...

    mode "mean": the mean of all ranks' shard gradients (the right answer),
    "without-root": the same sum without rank 0's gradient, still divided by N,
    "local": its own shard gradient only; all times ``scale`` (N for a sum).
    Returns history[step][rank] -> {name: tensor}; replicas are plain models here.
    """
    replicas = [make_mlp(D_MODEL, D_HIDDEN, SEED) for _ in range(n)]
    optimizers = [dp.SGD(m.parameters()) for m in replicas]
    history = []
    for step in range(steps):
        x, y = dp.make_batches(step + 1, batch, D_MODEL, seed=SEED)[step]
        for r, model in enumerate(replicas):
            F.mse_loss(model(shard(x, r, n)), shard(y, r, n)).backward()
        if mode != "local":
            for params in zip(*(m.parameters() for m in replicas)):
                mean = torch.stack([p.grad for p in params][mode == "without-root" :]).sum(0) / n
                for p in params:
                    p.grad = mean.clone()
        for model, optimizer in zip(replicas, optimizers):
            for p in model.parameters():
                p.grad *= scale
            optimizer.step()
            optimizer.zero_grad()
        history.append(tuple(dp.parameters(m) for m in replicas))
    return tuple(history)


def _local_gradients(n: int) -> list:
    """Every rank's own shard gradient (before any averaging), at the initial weights."""
    x, y = _batch(0)
    result = []
    for r in range(n):
        model = make_mlp(D_MODEL, D_HIDDEN, SEED)
        F.mse_loss(model(shard(x, r, n)), shard(y, r, n)).backward()
        result.append(_grads(model))
    return result


def _matches(got: dict, expected: dict) -> bool:
    return all(
        g is not None and g.shape == e.shape and torch.allclose(g, e, rtol=1e-5, atol=1e-5)
        for g, e in ((got.get(k), v) for k, v in expected.items())
    )


def _first_difference(where: str, got: dict, expected: dict, hint: str = "", what: str = "") -> None:
    """Raise a Mismatch: ``where``, then the hint (what went wrong, first, so it survives a
    shortened line), then the first parameter and element that differ."""
    lead = f"{where}{hint}; " if hint else where
    for name, want in expected.items():
        if name not in got or got[name] is None:
            raise Mismatch(f"{lead}{name}{what} is None")
        try:
            compare(got[name], want, name + what)
        except Mismatch as exc:
            raise Mismatch(f"{lead}{exc}") from None


def _rows(t: torch.Tensor) -> str:
    rows = [int(v) for v in t[:, 0].tolist()] if t.dim() == 2 and t.shape[1] == 3 else None
    if rows is None:
        return f"a tensor of shape {tuple(t.shape)}"
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return f"rows {rows[0]}–{rows[-1]}" if len(rows) > 1 else f"row {rows[0]}"
    return f"rows {rows}"


@exercise("2.1", "shard the batch: this rank's slice", refuses=("course_lib.models:shard",))
def shard_batch(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(batch) -> tensor``: rank r's contiguous block of B/N rows, in rank order."""
    for n in WORLD_SIZES:
        got = _launch(n, _shard_rank, learner_fn)
        for size in (BATCH, 2 * BATCH):
            rows = size // n
            for rank in range(n):
                result = got[rank][size]
                if not isinstance(result, torch.Tensor):
                    raise Mismatch(
                        f"N={n}, batch of {size}: rank {rank} returned "
                        f"{type(result).__name__}, expected a tensor"
                    )
                expected = torch.arange(rank * rows, (rank + 1) * rows, dtype=torch.float32)
                if result.shape == (rows, 3) and torch.equal(result[:, 0], expected):
                    continue
                hint = ""
                everything = (
                    torch.cat([got[r][size] for r in range(n)])
                    if all(
                        isinstance(got[r][size], torch.Tensor) and got[r][size].dim() == 2 for r in range(n)
                    )
                    else None
                )
                if (
                    everything is not None
                    and everything.shape == (size, 3)
                    and sorted(everything[:, 0].tolist()) == list(range(size))
                ):
                    hint = (
                        " (together the shards cover every row once, but rank r must get the "
                        "contiguous block r·B/N … (r+1)·B/N − 1)"
                    )
                raise Mismatch(
                    f"N={n}, batch of {size}: rank {rank} got {_rows(result)}, "
                    f"expected rows {rank * rows}–{(rank + 1) * rows - 1}{hint}"
                )


@exercise(
    "2.2",
    "average gradients with all-reduce",
    refuses=(
        "course_lib.data_parallel:average_gradients_allreduce",
        "course_lib.data_parallel:data_parallel_step",
    ),
)
def average_gradients(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(model)``: afterwards every rank's gradients are the full-batch gradient."""
    for n in WORLD_SIZES:
        got = _launch(n, _gradient_rank, learner_fn)
        full = _local_gradients(1)[0]
        local = _local_gradients(n)
        for rank, grads in enumerate(got):
            if _matches(grads, full):
                continue
            hint = ""
            if _matches(grads, {k: n * v for k, v in full.items()}):
                hint = f"that is the SUM over the {n} ranks, not the mean: divide by N"
            elif _matches(grads, local[rank]):
                hint = "still this rank's own gradient: nothing was averaged across ranks"
            _first_difference(f"N={n}, rank {rank}: ", grads, full, hint, ".grad")


@exercise(
    "2.3",
    "parameter-server step",
    refuses=(
        "course_lib.data_parallel:parameter_server_step",
        "course_lib.data_parallel:sharded_parameter_server_step",
    ),
)
def parameter_server_step(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(model, optimizer)``, optimizer only on rank 0: every rank ends with the
    parameters of full-batch training, step after step."""
    for n in WORLD_SIZES:
        got = _launch(n, _server_rank, learner_fn)
        expected = _simulate(n, "mean", STEPS)
        initial = dp.parameters(make_mlp(D_MODEL, D_HIDDEN, SEED))
        for step in range(STEPS):
            for rank in range(n):
                params = got[rank][step]
                if _matches(params, expected[step][rank]):
                    continue
                before = initial if step == 0 else got[rank][step - 1]
                hint = ""
                if rank != dp.ROOT and _matches(params, before):
                    hint = (
                        "this worker's parameters did not change: the server (rank 0) must "
                        "send the updated parameters back to every worker"
                    )
                elif _matches(params, _simulate(n, "mean", STEPS, scale=n)[step][rank]):
                    hint = f"the server used the SUM of the {n} gradients, not the mean: divide by N"
                elif _matches(params, _simulate(n, "local", STEPS)[step][dp.ROOT]):
                    hint = (
                        "the server stepped with its own gradient only: receive every "
                        "worker's gradient and average them first"
                    )
                elif _matches(params, _simulate(n, "without-root", STEPS)[step][dp.ROOT]):
                    hint = (
                        "the server's own gradient is missing from the average: add each "
                        "worker's gradient to it (+=) rather than overwrite it"
                    )
                where = f"N={n}, step {step + 1}, rank {rank}: "
                _first_difference(where, params, expected[step][rank], hint)


@exercise(
    "2.4",
    "gradient accumulation, one sync per step",
    refuses=(
        "course_lib.data_parallel:data_parallel_step",
        "course_lib.data_parallel:train_data_parallel",
        "course_lib.data_parallel:average_gradients_allreduce",
    ),
)
def accumulate_and_step(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(model, optimizer, micro_batches)``: full-batch parameters after every
    step, and no communication before the last micro-batch."""
    m = MICRO_BATCHES
    for n in WORLD_SIZES:
        got = _launch(n, _accumulate_rank, learner_fn)
        expected = _simulate(n, "mean", STEPS, batch=BATCH * m)
        for step in range(STEPS):
            for rank in range(n):
                params = got[rank][0][step]
                if _matches(params, expected[step][rank]):
                    continue
                hint = ""
                if _matches(params, _simulate(n, "mean", STEPS, m, BATCH * m)[step][rank]):
                    hint = (
                        f"the gradient is {m}× too large: divide each micro-batch's loss by "
                        f"the number of micro-batches ({m})"
                    )
                elif n > 1 and _matches(params, _simulate(n, "mean", STEPS, n, BATCH * m)[step][rank]):
                    hint = f"the update used the SUM of the {n} ranks' gradients, not the mean: divide by N"
                elif n > 1 and _matches(params, _simulate(n, "local", STEPS, 1.0, BATCH * m)[step][rank]):
                    hint = (
                        "this rank trained on its own shard only: average the gradients "
                        "across ranks after the last micro-batch"
                    )
                elif step > 0:
                    hint = (
                        f"step {step} was right, this one is not: are last step's gradients still "
                        "there? Call optimizer.zero_grad() after the step"
                    )
                where = f"N={n}, step {step + 1}, rank {rank}: "
                _first_difference(where, params, expected[step][rank], hint)
        for rank in range(n):
            if got[rank][1]:
                step, micro, op = got[rank][1][0]
                raise Mismatch(
                    f"N={n}, step {step + 1}: rank {rank} communicated (dist.{op}) after "
                    f"micro-batch {micro} of {m}: accumulate locally and sync once, after "
                    f"the last backward — every extra sync costs the whole traffic again"
                )
