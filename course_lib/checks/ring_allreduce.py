"""Checks for chapter 03: the ring all-reduce from send/recv, and DDP's buckets.

The ring checks run the learner's function on N = 1, 2, 3 and 4 ranks, each
time on three tensors of whole numbers (sums are exact, so results are compared
exactly): K = 10 as int64 and K = 7 as float32, which most N do not divide
(unequal chunks), and K = 2, fewer elements than ranks (empty chunks). The
expected values are computed here from every rank's data. As in chapter 01,
the built-in collectives raise inside the ranks; and each rank's bytes sent
(counted by ``course_lib.traffic.count_traffic``) must be what a ring sends, so
an algorithm that gets the sums right by sending more is caught too.

Chunk c of a tensor is ``tensor.view(-1).tensor_split(N)[c]``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from course_lib import ddp, launch
from course_lib.checks import Mismatch, exercise, learner_in_rank, run_learner, send_recv_only
from course_lib.traffic import count_traffic

if TYPE_CHECKING:
    from collections.abc import Callable

WORLD_SIZES = (1, 2, 3, 4)
#: (shape, dtype) of the tensors every check runs on.
CASES = (((2, 5), torch.int64), ((7,), torch.float32), ((2,), torch.int64))
#: What the all-gather check puts in the chunks a rank does not own yet.
UNSET = -99

#: Seconds one launch may take; a learner's deadlock is reported after about this long.
TIMEOUT = 10.0


def rank_data(case: int, rank: int, n: int) -> torch.Tensor:
    """Rank ``rank``'s input for case ``case`` on ``n`` ranks: whole numbers, different per rank."""
    shape, dtype = CASES[case]
    g = torch.Generator().manual_seed(1000 * n + 31 * rank + case)
    return torch.randint(-50, 50, shape, generator=g).to(dtype)


def chunk_sizes(numel: int, n: int) -> list[int]:
    """Elements in each of the N chunks: the first K mod N chunks hold one more."""
    return [numel // n + (c < numel % n) for c in range(n)]


def chunk_of(flat_index: int, numel: int, n: int) -> int:
    """Which of the N chunks holds element ``flat_index`` of a K-element tensor."""
    for c, size in enumerate(chunk_sizes(numel, n)):
        if flat_index < size:
            return c
        flat_index -= size
    raise IndexError(flat_index)


def ring_bytes_sent(kind: str, numel: int, element_size: int, rank: int, n: int) -> int:
    """Bytes rank ``rank`` sends in a ring: every chunk but one per phase.

    Reduce-scatter sends every chunk except its own (chunk r); all-gather every
    chunk except the one it receives last (chunk r+1). With N | K each phase is
    (N−1)/N·K elements, and an all-reduce 2(N−1)/N·K.
    """
    sizes = chunk_sizes(numel, n)
    reduce_scatter = numel - sizes[rank]
    all_gather = numel - sizes[(rank + 1) % n]
    elements = {
        "reduce_scatter": reduce_scatter,
        "all_gather": all_gather,
        "all_reduce": reduce_scatter + all_gather,
    }[kind]
    return 0 if n == 1 else elements * element_size


def _input(kind: str, case: int, rank: int, n: int) -> torch.Tensor:
    tensor = rank_data(case, rank, n)
    if kind == "all_gather":  # only this rank's own chunk is its input
        flat, own = tensor.view(-1), tensor.view(-1).tensor_split(n)[rank].clone()
        flat.fill_(UNSET)
        flat.tensor_split(n)[rank].copy_(own)
    return tensor


def expected(kind: str, case: int, rank: int, n: int) -> torch.Tensor:
    """What rank ``rank``'s tensor must hold afterwards (reduce-scatter: only its own chunk counts)."""
    total = sum(rank_data(case, r, n) for r in range(n))
    if kind == "all_gather":
        return torch.cat([rank_data(case, c, n).view(-1).tensor_split(n)[c] for c in range(n)]).view_as(total)
    return total


def _learner_rank(payload, ex_id, kind):
    learner = learner_in_rank(payload)
    rank, n = dist.get_rank(), dist.get_world_size()
    results = []  # per case: (tensor after, returned a new tensor?, bytes sent)
    with send_recv_only(ex_id, learner):
        for case in range(len(CASES)):
            tensor = _input(kind, case, rank, n)
            dist.barrier()  # the previous case's messages are all delivered
            with count_traffic() as traffic:
                returned = learner(tensor)
            returned_new = isinstance(returned, torch.Tensor) and returned is not tensor
            results.append((tensor, returned_new, traffic.payload_sent))
    return results


def _compare(prefix, kind, got, want, given, rank, n, returned_new):
    flat_got, flat_want, flat_given = got.view(-1), want.view(-1), given.view(-1)
    positions = range(got.numel())
    if kind == "reduce_scatter":  # only chunk `rank` is defined afterwards
        sizes = chunk_sizes(got.numel(), n)
        positions = range(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    bad = [i for i in positions if flat_got[i] != flat_want[i]]
    if not bad:
        return
    i = bad[0]
    chunk = chunk_of(i, got.numel(), n)
    hint = " — change the tensor in place; your function returned a new one" if returned_new else ""
    if kind == "all_gather" and flat_got[i] == UNSET:
        hint = hint or f" (chunk {chunk} never arrived)"
    elif flat_got[i] == flat_given[i]:
        hint = hint or f" (rank {rank}'s own value: nothing was added into chunk {chunk})"
    raise Mismatch(
        f"{prefix}, rank {rank}: chunk {chunk}, element [{i}] expected {flat_want[i].item():g}, "
        f"got {flat_got[i].item():g} ({len(bad)} of {len(positions)} elements differ){hint}"
    )


# gloo's words when a recv's tensor is smaller than the message that arrives (the rank aborts).
_SIZE_MISMATCH = re.compile(r"(\d+) vs (\d+)\. Received data size doesn't match expected size")


def _run(n: int, ex_id: str, kind: str, learner_fn):
    try:
        return run_learner(n, _learner_rank, learner_fn, ex_id, kind, timeout=TIMEOUT)
    except launch.RankError as exc:
        sizes = _SIZE_MISMATCH.search(str(exc))
        if sizes is None:
            raise
        raise Mismatch(
            f"N={n}, rank {exc.rank}: a message of {sizes[1]} B arrived in a recv of {sizes[2]} B — "
            "sender and receiver disagree on which chunk moves at some step (check your chunk "
            "indices; chunks differ in size when N does not divide K)"
        ) from None


def _check(ex_id: str, kind: str, learner_fn) -> None:
    for n in WORLD_SIZES:
        got = _run(n, ex_id, kind, learner_fn)
        for case, (shape, dtype) in enumerate(CASES):
            numel = torch.Size(shape).numel()
            prefix = f"N={n}, K={numel} {str(dtype).replace('torch.', '')}"
            for rank in range(n):
                tensor, returned_new, sent = got[rank][case]
                if tensor.shape != torch.Size(shape) or tensor.dtype != dtype:
                    raise Mismatch(
                        f"{prefix}, rank {rank}: the tensor became {tuple(tensor.shape)} "
                        f"{tensor.dtype}; keep its shape and dtype"
                    )
                _compare(
                    prefix,
                    kind,
                    tensor,
                    expected(kind, case, rank, n),
                    _input(kind, case, rank, n),
                    rank,
                    n,
                    returned_new,
                )
                should = ring_bytes_sent(kind, numel, tensor.element_size(), rank, n)
                if sent != should:
                    raise Mismatch(
                        f"{prefix}, rank {rank}: right result, but it sent {sent} B; a ring "
                        f"{kind.replace('_', '-')} sends {should} B (each chunk once per phase)"
                    )


#: The course's own all-reduce building blocks: no send/recv exercise may call them.
COURSE_RINGS = (
    "course_lib.ring_allreduce:ring_reduce_scatter",
    "course_lib.ring_allreduce:ring_all_gather",
    "course_lib.ring_allreduce:ring_all_reduce",
    "course_lib.ring_allreduce:unchunked_ring_all_reduce",
    "course_lib.ring_allreduce:naive_all_reduce",
    "course_lib.ring_allreduce:tree_all_reduce",
    "course_lib.ring_allreduce:ring_step",
    "course_lib.ring_allreduce:_reduce_scatter",
    "course_lib.ring_allreduce:_all_gather",
    "course_lib.zero:reduce_scatter",
)


@exercise(
    "3.1",
    "ring reduce-scatter",
    refuses=COURSE_RINGS,
)
def ring_reduce_scatter(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(tensor)``: afterwards chunk r of rank r's tensor is the sum of every rank's chunk r."""
    _check("3.1", "reduce_scatter", learner_fn)


@exercise(
    "3.2",
    "ring all-gather",
    refuses=COURSE_RINGS,
)
def ring_all_gather(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(tensor)``: rank r's chunk r ends up in chunk r of every rank's tensor."""
    _check("3.2", "all_gather", learner_fn)


@exercise(
    "3.3",
    "ring all-reduce",
    builds_on=("3.1", "3.2"),
    refuses=COURSE_RINGS,
)
def ring_all_reduce(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(tensor)``: every rank's tensor becomes the sum, sending 2(N−1)/N·K."""
    _check("3.3", "all_reduce", learner_fn)


# ----------------------------------------------------------------------------
# buckets: plain Python, checked in this process

#: (parameter sizes in bytes in registration order, cap in bytes) -> expected buckets.
BUCKET_CASES = (
    ([4, 4, 4, 4], 8, [[3, 2], [1, 0]]),
    ([4, 4, 4], 8, [[2, 1], [0]]),
    ([16, 4, 4, 4], 10, [[3, 2, 1], [0]]),
    ([4, 100, 4], 10, [[2, 1], [0]]),
    ([40, 4, 4], 1, [[2], [1], [0]]),
    ([4, 4, 4], 1000, [[2, 1, 0]]),
    ([7], 3, [[0]]),
    ([], 8, []),
)


@exercise(
    "3.4",
    "buckets in reverse order under a size cap",
    refuses=(
        "course_lib.ddp:assign_buckets",
        "course_lib.ddp:BucketedDDP",
    ),
)
def assign_buckets(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(sizes, cap_bytes) -> list of lists of parameter indices``."""
    g = torch.Generator().manual_seed(3)
    random_cases = [
        (torch.randint(1, 50, (int(k),), generator=g).tolist(), int(cap), None)
        for k, cap in zip(torch.randint(1, 12, (20,), generator=g), torch.randint(1, 120, (20,), generator=g))
    ]
    for sizes, cap, want in [*BUCKET_CASES, *random_cases]:
        want = ddp.assign_buckets(sizes, cap) if want is None else want
        got = learner_fn(list(sizes), cap)
        try:
            got = [[int(i) for i in bucket] for bucket in got]
        except TypeError:
            raise Mismatch(
                f"sizes={sizes}, cap={cap}: return a list of buckets, each a list of "
                f"parameter indices; got {got!r}"
            ) from None
        if got != want:
            where = next(
                (b for b in range(min(len(got), len(want))) if got[b] != want[b]), min(len(got), len(want))
            )
            detail = (
                f"bucket {where} should be {want[where]}, got {got[where]}"
                if where < min(len(got), len(want))
                else f"{len(want)} buckets expected, got {len(got)}"
            )
            raise Mismatch(
                f"sizes={sizes}, cap={cap}: {detail} (expected {want}, got {got}){_bucket_hint(sizes, cap, got)}"
            )


def _greedy_buckets(order, sizes: list, cap: float, never_over: bool) -> list[list[int]]:
    """Buckets filled walking ``order``; closed at ``cap`` or more, or (never_over) before going over it."""
    buckets, current, filled = [], [], 0
    for i in order:
        if never_over and current and filled + sizes[i] > cap:
            buckets.append(current)
            current, filled = [], 0
        current.append(i)
        filled += sizes[i]
        if not never_over and filled >= cap:
            buckets.append(current)
            current, filled = [], 0
    return [*buckets, current] if current else buckets


def _bucket_hint(sizes: list, cap: float, got: list) -> str:
    """Name the rule a wrong answer followed, when it is a typical one."""
    if len(sizes) > 1 and got == _greedy_buckets(range(len(sizes)), sizes, cap, never_over=False):
        return (
            " — you filled them from the first parameter: fill from the LAST one, the order in which "
            "backward produces the gradients"
        )
    if got == _greedy_buckets(reversed(range(len(sizes))), sizes, cap, never_over=True):
        return (
            " — no bucket of yours goes over the cap: a bucket closes only once it holds cap bytes or "
            "more, so its last parameter may take it over (as in torch's DDP)"
        )
    return ""
