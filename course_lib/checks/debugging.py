"""Checks for chapter 10: four broken distributed programs, fixed by the learner.

Each check runs the learner's fixed function on several world sizes, compares
every rank's result with what one process computes, and says in one line what
went wrong: a deadlock (which ranks waited where), a crash (which rank, which
exception), or wrong numbers with the tell-tale pattern (a sum over the wrong
group, gradients that were never averaged). :func:`show` runs a *broken*
version through the same harness and prints what the launcher reports,
without recording a result.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from course_lib import launch
from course_lib.checks import Mismatch, compare, exercise, learner_in_rank
from course_lib.models import make_mlp, shard

#: Seconds one launch may take: a deadlock is reported after about this long.
TIMEOUT = 8.0
D_MODEL, D_HIDDEN, SEED = 8, 16, 3
MICRO = 3  # micro-batches per rank in 10.4
_SHOWING = []  # non-empty while show() runs: launcher reports pass through whole, sooner


def _launch(n, rank_fn, learner_fn, *args):
    """Run on n ranks; a deadlock becomes a one-line Mismatch, a crash a RankError."""
    payload = launch.dumps_by_value((learner_fn,))
    try:
        return launch.run(rank_fn, n, payload, *args, timeout=4.0 if _SHOWING else TIMEOUT)
    except launch.LaunchTimeout as exc:
        if _SHOWING:
            raise
        first = str(exc).splitlines()[0]
        raise Mismatch(f"N={n}: deadlock — {first}") from None


# ----------------------------------------------------------------------------
# 10.1 a collective that one rank skips


def _samples(n):
    """Rank r's per-sample losses: uneven shards, the last rank gets none."""
    sizes = [3 + r for r in range(n - 1)] + [0]
    return [torch.arange(s, dtype=torch.float32) + 10 * r for r, s in enumerate(sizes)]


def _mean_rank(payload, n):
    learner = learner_in_rank(payload)
    return learner(_samples(n)[dist.get_rank()])


@exercise("10.1", "a collective every rank must join")
def global_mean(learner_fn):
    """Check ``learner_fn(losses) -> float``: the mean over every rank's samples, even with empty shards."""
    for n in (2, 3, 4):
        got = _launch(n, _mean_rank, learner_fn, n)
        everything = torch.cat(_samples(n))
        expected = everything.mean().item()
        for rank, value in enumerate(got):
            value = float(value) if isinstance(value, (int, float, torch.Tensor)) else value
            if not isinstance(value, float) or abs(value - expected) > 1e-5:
                hint = ""
                if value == float(_samples(n)[rank].mean()) or value != value:
                    hint = " (this rank's own mean: nothing was combined across ranks)"
                raise Mismatch(f"N={n}, rank {rank}: expected the global mean {expected:g}, got {value}{hint}")


# ----------------------------------------------------------------------------
# 10.2 the last rank crashes


def _right_rank(payload):
    learner = learner_in_rank(payload)
    return learner(torch.full((3,), float(dist.get_rank())))


@exercise("10.2", "the ring wraps around: no rank off the end")
def pass_right(learner_fn):
    """Check ``learner_fn(t) -> tensor``: every rank returns its left neighbour's t (rank 0 gets N-1's)."""
    for n in (2, 3, 4):  # gloo cannot send a rank a message from itself: N=1 is left out
        got = _launch(n, _right_rank, learner_fn)
        for rank, value in enumerate(got):
            left = (rank - 1) % n
            compare(value, torch.full((3,), float(left)), f"N={n}: the tensor from rank {left}", rank)


# ----------------------------------------------------------------------------
# 10.3 the right process group


GRIDS = ((2, 2), (2, 3), (1, 4))  # (replicas, TP ranks per replica)


def _group_rank(payload, replicas, width):
    learner = learner_in_rank(payload)
    groups = [list(range(d * width, (d + 1) * width)) for d in range(replicas)]
    tp_group, _ = dist.new_subgroups_by_enumeration(groups)
    x, w = _row_parallel_data(dist.get_rank() // width, width)
    t = dist.get_rank() % width
    cols = slice(2 * t, 2 * t + 2)
    return learner(x[:, cols], w[:, cols], tp_group)


def _row_parallel_data(replica, width):
    g = torch.Generator().manual_seed(100 + replica)  # each replica its own batch
    return torch.randn(4, 2 * width, generator=g), torch.randn(5, 2 * width, generator=torch.Generator().manual_seed(7))


@exercise("10.3", "all-reduce over the tensor-parallel group")
def row_parallel_output(learner_fn):
    """Check ``learner_fn(x_shard, w_shard, tp_group) -> y``: y = x @ w.T summed over the TP group only."""
    for replicas, width in GRIDS:
        n = replicas * width
        got = _launch(n, _group_rank, learner_fn, replicas, width)
        full = [x @ w.T for x, w in (_row_parallel_data(d, width) for d in range(replicas))]
        for rank, value in enumerate(got):
            expected = full[rank // width]
            if isinstance(value, torch.Tensor) and value.shape == expected.shape and replicas > 1 \
                    and torch.allclose(value, sum(full), atol=1e-5):
                raise Mismatch(f"N={n} ({replicas} replicas × TP {width}), rank {rank}: got the sum over "
                               f"ALL {n} ranks — other replicas' outputs leaked in: pass group=tp_group")
            compare(value, expected, f"N={n} ({replicas} replicas × TP {width}): y", rank)


# ----------------------------------------------------------------------------
# 10.4 no_sync on every micro-batch


def _batch(n):
    g = torch.Generator().manual_seed(SEED)
    return torch.randn(2 * MICRO * n, D_MODEL, generator=g), torch.randn(2 * MICRO * n, D_MODEL, generator=g)


def _accumulate_rank(payload):
    learner = learner_in_rank(payload)
    rank, n = dist.get_rank(), dist.get_world_size()
    model = make_mlp(D_MODEL, D_HIDDEN, SEED)
    ddp = DistributedDataParallel(model)
    syncs = []

    def counting_hook(state, bucket):  # DDP calls it once per bucket it all-reduces
        syncs.append(bucket.index())
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(dist.group.WORLD, counting_hook)
    x, y = (shard(t, rank, n) for t in _batch(n))
    micro = [(shard(x, i, MICRO), shard(y, i, MICRO)) for i in range(MICRO)]
    learner(ddp, micro)
    grads = {k: p.grad.clone() if p.grad is not None else None for k, p in model.named_parameters()}
    del ddp  # a live DDP wrapper at teardown can hang
    return grads, len(syncs)


def _reference_grads(x, y) -> dict:
    model = make_mlp(D_MODEL, D_HIDDEN, SEED)
    F.mse_loss(model(x), y).backward()
    return {k: p.grad for k, p in model.named_parameters()}


@exercise("10.4", "no_sync on all but the last micro-batch")
def accumulate_with_no_sync(learner_fn):
    """Check ``learner_fn(ddp_model, micro_batches)``: full-batch mean gradients on every rank, one sync."""
    for n in (1, 2, 3):
        got = _launch(n, _accumulate_rank, learner_fn)
        x, y = _batch(n)
        expected = _reference_grads(x, y)
        for rank, (grads, syncs) in enumerate(got):
            local = _reference_grads(shard(x, rank, n), shard(y, rank, n))
            for name, want in expected.items():
                g = grads.get(name)
                if g is None:
                    raise Mismatch(f"N={n}, rank {rank}: {name}.grad is None: run backward on every micro-batch")
                if n > 1 and syncs == 0 and torch.allclose(g, local[name], atol=1e-5):
                    raise Mismatch(f"N={n}, rank {rank}: gradients were never averaged (DDP synced 0 times): "
                                   f"the last micro-batch's backward must run outside no_sync()")
                if torch.allclose(g, MICRO * want, atol=1e-5):
                    raise Mismatch(f"N={n}, rank {rank}: {name}.grad is {MICRO}× too large: divide each "
                                   f"micro-batch's loss by the number of micro-batches")
                compare(g, want, f"N={n}: {name}.grad", rank)
            if syncs > 1:
                raise Mismatch(f"N={n}, rank {rank}: right gradients, but DDP all-reduced {syncs} times: "
                               f"wrap all but the last micro-batch in no_sync() — one sync per step")


# ----------------------------------------------------------------------------
# for the lesson: what a broken version does


def show(check, broken_fn) -> None:
    """Run ``check``'s harness on a broken function and print what comes back; never raises."""
    body = check.__wrapped__
    _SHOWING.append(True)
    try:
        body(broken_fn)
    except launch.RankError as exc:
        print(f"{type(exc).__name__} (rank {exc.rank}):\n{exc}")
    except Mismatch as exc:
        print(f"wrong result: {exc}")
    except Exception as exc:  # noqa: BLE001 - a demonstration must not stop the notebook
        print(f"{type(exc).__name__}: {exc}")
    else:
        print("no problem found: this version is correct")
    finally:
        _SHOWING.clear()
