"""Checks for chapter 10: four broken distributed programs, fixed by the learner, and the
arithmetic of a multi-node launch.

10.1–10.4 run the learner's fixed function on several world sizes, compare
every rank's result with what one process computes, and say in one line what
went wrong: a deadlock (which ranks waited where), a crash (which rank, which
exception), or wrong numbers with the tell-tale pattern (a sum over the wrong
group, gradients that were never averaged). :func:`show` runs a *broken*
version through the same harness and prints what the launcher reports,
without recording a result.

10.5 and 10.6 are arithmetic (no processes): where a global rank runs, and how
many accumulation steps a global batch needs. Their references are
``course_lib.torchrun.placement`` and ``accumulation_steps``, which are switched
off while the learner's function runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from course_lib import launch
from course_lib import torchrun as torchrun_lib
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

if TYPE_CHECKING:
    from collections.abc import Callable

#: Seconds one launch may take: a deadlock is reported after about this long.
TIMEOUT = 8.0
D_MODEL, D_HIDDEN, SEED = 8, 16, 3
MICRO = 3  # micro-batches per rank in 10.4
_SHOWING = []  # non-empty while show() runs: launcher reports pass through whole, sooner


def _launch(n, rank_fn, learner_fn, *args):
    """Run on n ranks; a deadlock becomes a one-line Mismatch, a crash a RankError. While
    show() runs, the launcher's own report passes through whole, sooner."""
    if _SHOWING:
        return launch.run(rank_fn, n, launch.dumps_by_value((learner_fn,)), *args, timeout=4.0)
    return run_learner(n, rank_fn, learner_fn, *args, timeout=TIMEOUT)


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
def global_mean(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(losses) -> float``: the mean over every rank's samples, even with empty shards."""
    for n in (2, 3, 4):
        got = _launch(n, _mean_rank, learner_fn, n)
        everything = torch.cat(_samples(n))
        expected = everything.mean().item()
        for rank, value in enumerate(got):
            value = float(value) if isinstance(value, (int, float, torch.Tensor)) else value
            if not isinstance(value, float) or not abs(value - expected) <= 1e-5:  # NaN fails too
                hint = ""
                if value == float(_samples(n)[rank].mean()) or value != value:
                    hint = " (this rank's own mean: nothing was combined across ranks)"
                elif isinstance(value, float) and _a_mean_of_means(value, n):
                    hint = (
                        " (a mean of the ranks' means: the shards differ in size, so add up the "
                        "losses and the counts over the ranks, then divide)"
                    )
                raise Mismatch(
                    f"N={n}, rank {rank}: expected the global mean {expected:g}, got {value}{hint}"
                )


def _a_mean_of_means(value: float, n: int) -> bool:
    """``value`` is the ranks' means summed over N, or averaged over the ranks that have samples."""
    means = [float(s.mean()) for s in _samples(n) if len(s)]
    return any(abs(value - m) <= 1e-5 for m in (sum(means) / n, sum(means) / len(means)))


# ----------------------------------------------------------------------------
# 10.2 the last rank crashes


def _right_rank(payload):
    learner = learner_in_rank(payload)
    return learner(torch.full((3,), float(dist.get_rank())))


@exercise("10.2", "the ring wraps around: no rank off the end")
def pass_right(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(t) -> tensor``: every rank returns its left neighbour's t (rank 0 gets N-1's)."""
    for n in (2, 3, 4):  # gloo cannot send a rank a message from itself: N=1 is left out
        got = _launch(n, _right_rank, learner_fn)
        for rank, value in enumerate(got):
            left, right = (rank - 1) % n, (rank + 1) % n
            try:
                compare(value, torch.full((3,), float(left)), f"N={n}: the tensor from rank {left}", rank)
            except Mismatch as exc:
                hint = ""
                if isinstance(value, torch.Tensor) and torch.equal(value, torch.full((3,), float(right))):
                    hint = (
                        f" — that is rank {right}'s tensor, the RIGHT neighbour's: send to (r + 1) mod N "
                        "and receive from (r − 1) mod N"
                    )
                elif isinstance(value, torch.Tensor) and torch.equal(value, torch.full((3,), float(rank))):
                    hint = " — that is this rank's own t: return what arrived from the left neighbour"
                raise Mismatch(f"{exc}{hint}") from None


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
    return torch.randn(4, 2 * width, generator=g), torch.randn(
        5, 2 * width, generator=torch.Generator().manual_seed(7)
    )


@exercise("10.3", "all-reduce over the tensor-parallel group")
def row_parallel_output(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(x_shard, w_shard, tp_group) -> y``: y = x @ w.T summed over the TP group only."""
    for replicas, width in GRIDS:
        n = replicas * width
        got = _launch(n, _group_rank, learner_fn, replicas, width)
        full = [x @ w.T for x, w in (_row_parallel_data(d, width) for d in range(replicas))]
        for rank, value in enumerate(got):
            expected = full[rank // width]
            if (
                isinstance(value, torch.Tensor)
                and value.shape == expected.shape
                and replicas > 1
                and torch.allclose(value, sum(full), atol=1e-5)
            ):
                raise Mismatch(
                    f"N={n} ({replicas} replicas × TP {width}), rank {rank}: got the sum over "
                    f"ALL {n} ranks — other replicas' outputs leaked in: pass group=tp_group"
                )
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
def accumulate_with_no_sync(learner_fn: Callable[..., Any]) -> None:
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
                    raise Mismatch(
                        f"N={n}, rank {rank}: {name}.grad is None: run backward on every micro-batch"
                    )
                if n > 1 and syncs == 0 and torch.allclose(g, local[name], atol=1e-5):
                    raise Mismatch(
                        f"N={n}, rank {rank}: gradients were never averaged (DDP synced 0 times): "
                        f"the last micro-batch's backward must run outside no_sync()"
                    )
                if torch.allclose(g, MICRO * want, atol=1e-5):
                    raise Mismatch(
                        f"N={n}, rank {rank}: {name}.grad is {MICRO}× too large: divide each "
                        f"micro-batch's loss by the number of micro-batches"
                    )
                compare(g, want, f"N={n}: {name}.grad", rank)
            if syncs > 1:
                raise Mismatch(
                    f"N={n}, rank {rank}: right gradients, but DDP all-reduced {syncs} times: "
                    f"wrap all but the last micro-batch in no_sync() — one sync per step"
                )


# ----------------------------------------------------------------------------
# 10.5 and 10.6: the arithmetic of a multi-node launch (no processes)


def _call_own(ex_id: str, learner_fn, *args):
    """Call the learner's function with the library's answer switched off."""
    try:
        with builtins_switched_off(
            learner_fn,
            ("placement", "accumulation_steps"),
            f"exercise {ex_id} asks you to work this out yourself",
            namespaces=(torchrun_lib,),
            shown_as="course_lib.torchrun",
        ):
            return learner_fn(*args)
    except BuiltinUsed as exc:
        raise Mismatch(str(exc)) from None


def _expect_value_error(ex_id: str, learner_fn, args, what: str, why: str) -> None:
    try:
        got = _call_own(ex_id, learner_fn, *args)
    except ValueError:
        return
    except (NotImplementedError, Mismatch):
        raise
    except Exception as exc:  # noqa: BLE001 - say what was raised instead
        raise Mismatch(f"{what}: expected ValueError ({why}), got {type(exc).__name__}: {exc}") from None
    raise Mismatch(f"{what}: expected ValueError ({why}), got {got!r}")


#: (nproc_per_node, cuda_visible_devices): even and uneven nodes, with and without CUDA_VISIBLE_DEVICES.
PLACEMENTS = (
    ([2, 2], None),
    ([2, 2], ["0,1", "2,3"]),
    ([4, 2, 2], None),
    ([8, 8], ["7,6,5,4,3,2,1,0", None]),
    ([3, 1], ["1,2,5", "3"]),
)
#: (rank, nproc_per_node, cuda_visible_devices, why it must raise)
BAD_PLACEMENTS = (
    (4, [2, 2], None, "2 + 2 processes have ranks 0 ... 3"),
    (-1, [2, 2], None, "ranks start at 0"),
    (2, [3, 3], ["0,1", "0,1,2"], "node 0 runs 3 processes but lists 2 GPUs"),
    (0, [1], [""], "an empty CUDA_VISIBLE_DEVICES hides every GPU"),
)


def _placement_hint(got, rank, counts, visible, expected) -> str:
    node, local_rank, gpu = expected
    if not (isinstance(got, (tuple, list)) and len(got) == 3):
        return ""
    g_node, g_local, g_gpu = got
    if (
        (g_node, g_local) != (node, local_rank)
        and len(set(counts)) > 1
        and (g_node, g_local) == (rank // counts[0], rank % counts[0])
    ):
        return (
            " — nodes may run different numbers of processes: torchrun numbers the ranks node after "
            "node, so a node's first rank is the sum of the processes of the nodes before it"
        )
    if (g_node, g_local) == (node, local_rank) and g_gpu == rank != gpu:
        return " — that GPU is the global RANK: torch.cuda.set_device takes LOCAL_RANK, the index on its own node"
    if (g_node, g_local) == (node, local_rank) and g_gpu == local_rank != gpu:
        return (
            " — CUDA_VISIBLE_DEVICES renumbers the GPUs a process sees: cuda:i is the i-th GPU in "
            "that node's list"
        )
    return ""


@exercise("10.5", "where a rank runs: node, local rank, GPU")
def placement(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(rank, nproc_per_node, cuda_visible_devices) -> (node, local_rank, gpu)``."""
    for counts, visible in PLACEMENTS:
        for rank in range(sum(counts)):
            expected = torchrun_lib.placement(rank, counts, visible)
            got = _call_own(
                "10.5", learner_fn, rank, list(counts), None if visible is None else list(visible)
            )
            ok = (
                isinstance(got, (tuple, list))
                and len(got) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) for v in got)
            )
            if not ok or tuple(got) != expected:
                where = f"rank {rank}, nproc_per_node={counts}, cuda_visible_devices={visible}"
                shape = "" if ok else " (return three ints: node, local_rank, gpu)"
                raise Mismatch(
                    f"{where}: expected (node, local_rank, gpu) = {expected}, got {got!r}{shape}"
                    f"{_placement_hint(got, rank, counts, visible, expected)}"
                )
    for rank, counts, visible, why in BAD_PLACEMENTS:
        _expect_value_error(
            "10.5",
            learner_fn,
            (rank, list(counts), visible),
            f"rank {rank}, nproc_per_node={counts}, cuda_visible_devices={visible}",
            why,
        )


#: (global_batch, micro_batch, world_size, tp, pp)
BATCHES = (
    (32, 2, 4, 1, 1),
    (32, 4, 8, 1, 1),
    (16, 16, 1, 1, 1),
    (48, 3, 16, 2, 1),
    (1024, 4, 64, 2, 4),
    (512, 1, 8, 1, 8),
)
BAD_BATCHES = (
    ((30, 4, 4, 1, 1), "30 is not a multiple of 4 × 4 = 16"),
    ((8, 4, 4, 1, 1), "8 samples cannot fill one micro-batch of 4 on each of 4 ranks"),
    ((100, 2, 16, 1, 4), "100 is not a multiple of 2 × 16/4 = 8"),
    ((32, 2, 6, 4, 1), "6 ranks cannot be split into TP groups of 4"),
)


@exercise("10.6", "accumulation steps for a global batch")
def accumulation_steps(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(global_batch, micro_batch, world_size, tp, pp) -> M`` (ValueError when it does not fit)."""
    for b_global, micro, world, tp, pp in BATCHES:
        expected = torchrun_lib.accumulation_steps(b_global, micro, world, tp, pp)
        got = _call_own("10.6", learner_fn, b_global, micro, world, tp, pp)
        if isinstance(got, int) and not isinstance(got, bool) and got == expected:
            continue
        where = f"global {b_global}, micro {micro}, world {world}, tp {tp}, pp {pp}"
        hint = ""
        if isinstance(got, float):
            hint = " — return an int (a number of micro-batches)"
        if got == b_global / (micro * world) and (tp, pp) != (1, 1):
            hint = (
                f" — you divided by all {world} ranks: only world/(tp·pp) = {world // (tp * pp)} are "
                f"data-parallel (the TP and PP ranks of one replica share its samples)"
            )
        elif got == b_global / micro:
            hint = " — the data-parallel ranks each take their own micro-batches: divide by them too"
        raise Mismatch(f"{where}: expected {expected} accumulation steps, got {got!r}{hint}")
    for args, why in BAD_BATCHES:
        b_global, micro, world, tp, pp = args
        _expect_value_error(
            "10.6",
            learner_fn,
            args,
            f"global {b_global}, micro {micro}, world {world}, tp {tp}, pp {pp}",
            why,
        )


# ----------------------------------------------------------------------------
# for the lesson: what a broken version does


def show(check: Callable[..., Any], broken_fn: Callable[..., Any]) -> None:
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
