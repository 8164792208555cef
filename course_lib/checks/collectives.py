"""Checks for chapter 01: collectives built from point-to-point send/recv.

Each check runs the learner's function on N = 1, 2, 3 and 4 ranks (3 is not a
power of two, which catches tree code that assumes one), for every root rank,
on integer-valued float tensors, and compares it exactly with torch's
built-in collective run on the same data. Inside the ranks the built-in
collectives are swapped for functions that raise, so only send/recv/isend/irecv
(and barrier) can be used.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from course_lib import collectives, launch
from course_lib.checks import Mismatch, compare, exercise, learner_in_rank, run_learner, send_recv_only
from course_lib.checks.ring_allreduce import COURSE_RINGS

if TYPE_CHECKING:
    from collections.abc import Callable

WORLD_SIZES = (1, 2, 3, 4)
#: Seconds one launch may take; a learner's deadlock is reported after about this long.
TIMEOUT = 10.0
SHAPE = (2, 5)


def _rank_data(salt: int) -> torch.Tensor:
    """Integer-valued floats, different on every rank, world size and root: sums are exact."""
    rank, n = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1000 * n + 31 * rank + salt)
    return torch.randint(-50, 50, SHAPE, generator=g).float().to(launch.device())


def _launch(n: int, rank_fn, learner_fn, *args):
    return run_learner(n, rank_fn, learner_fn, *args, timeout=TIMEOUT)


def _compare(prefix: str, got, expected, what: str, rank: int, returned_new: bool = False) -> None:
    try:
        compare(got, expected, what, rank=rank, exact=True)
    except Mismatch as exc:
        hint = " — change the tensor in place; your function returned a new one" if returned_new else ""
        raise Mismatch(f"{prefix}: {exc}{hint}") from None


def _in_place(learner, tensor, *args) -> bool:
    """Call ``learner(tensor, *args)``; True when it returned a new tensor instead of changing ``tensor``."""
    returned = learner(tensor, *args)
    return isinstance(returned, torch.Tensor) and returned is not tensor


# ----------------------------------------------------------------------------
# running the learner's function and the built-in reference
#
# They run in separate launches, so that a deadlock report lists only the
# learner's own communication calls. References are cached: a learner re-running
# a check cell pays only for their own code.


def _roots(kind: str, n: int) -> list:
    return list(range(n)) if kind in ("broadcast", "reduce") else [0]


def _learner_rank(payload, ex_id, kind):
    learner = learner_in_rank(payload)
    results = []  # per root: (this rank's result, returned a new tensor instead of in place?)
    with send_recv_only(ex_id, learner):
        for root in _roots(kind, dist.get_world_size()):
            tensor = _rank_data(root)
            if kind == "all_gather":  # a ring: record who sends to whom
                with collectives.trace_point_to_point() as events:
                    gathered = learner(tensor)
                results.append(
                    (list(gathered) if isinstance(gathered, tuple) else gathered, False, list(events))
                )
            elif kind == "reduce":  # its shape counts too: record who sends to whom, in order
                with collectives.trace_point_to_point() as events:
                    returned_new = _in_place(learner, tensor, root)
                results.append((tensor, returned_new, list(events)))
            else:
                args = (root,) if kind == "broadcast" else ()
                results.append((tensor, _in_place(learner, tensor, *args)))
    return results


def _reference_rank(kind):
    results = []
    for root in _roots(kind, dist.get_world_size()):
        tensor = _rank_data(root)
        if kind == "broadcast":
            dist.broadcast(tensor, root)
        elif kind == "reduce":
            dist.reduce(tensor, root)
        elif kind == "all_reduce":
            dist.all_reduce(tensor)
        else:
            gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, tensor)
            tensor = gathered
        results.append(tensor)
    return results


@functools.cache
def _reference(kind: str, n: int) -> list:
    return launch.run(_reference_rank, n, kind, timeout=TIMEOUT)


def _check(ex_id: str, kind: str, learner_fn, what: str = "tensor") -> None:
    """Run the learner's ``kind`` on every world size and root; raise Mismatch on the first difference."""
    for n in WORLD_SIZES:
        got = _launch(n, _learner_rank, learner_fn, ex_id, kind)
        expected = _reference(kind, n)
        for case, root in enumerate(_roots(kind, n)):
            prefix = f"N={n}" + {"broadcast": f", src={root}", "reduce": f", dst={root}"}.get(kind, "")
            # A reduce defines the result on dst only; the others may use their tensor as scratch.
            ranks = [root] if kind == "reduce" else range(n)
            for rank in ranks:
                result, returned_new = got[rank][case][:2]
                try:
                    _compare(prefix, result, expected[rank][case], what, rank, returned_new)
                except Mismatch as exc:
                    if kind == "all_reduce":
                        raise Mismatch(f"{exc}{_sum_not_spread(n, rank, got, expected, case)}") from None
                    raise
            if kind == "reduce":
                _check_tree_shape(prefix, n, [got[rank][case][2] for rank in range(n)])
            if kind == "all_gather":
                _check_ring_shape(prefix, n, [got[rank][case][2] for rank in range(n)])


def _sum_not_spread(n: int, rank: int, got: list, expected: list, case: int) -> str:
    """The hint for an all-reduce that stopped after its reduce: another rank holds the sum."""
    holders = [r for r in range(n) if r != rank and torch.equal(got[r][case][0], expected[r][case])]
    if not holders:
        return ""
    return (
        f" — rank {holders[0]} holds the sum, rank {rank} does not: broadcast it from the reduce's dst "
        "to every rank (all-reduce = reduce, then broadcast)"
    )


def _check_ring_shape(prefix: str, n: int, traces: list) -> None:
    """In a ring every rank sends only to one neighbour, the same side for all (N > 2: with two
    ranks every pattern is a ring). A right result whose sends were not traced is not judged."""
    sent_to = [{peer for op, peer, _ in trace if op in ("send", "isend")} for trace in traces]
    if n <= 2 or not any(sent_to):
        return
    for side in (1, -1):
        if all(peers <= {(rank + side) % n} for rank, peers in enumerate(sent_to)):
            return
    mixed = (r for r, peers in enumerate(sent_to) if len(peers) > 1 or peers - {(r + 1) % n, (r - 1) % n})
    rank = next(mixed, 0)
    raise Mismatch(
        f"{prefix}: the result is right, but it is not a ring: rank {rank} sent to ranks "
        f"{sorted(sent_to[rank])}; in a ring every rank sends only to its neighbour (rank + 1) and "
        f"passes on what it received, N−1 times"
    )


def _check_tree_shape(prefix: str, n: int, traces: list) -> None:
    """A tree reduce takes ⌈log₂N⌉ rounds of messages; a chain or a star into dst takes N−1.

    Judged only where both differ (N = 4 here) and the trace is whole (every send has its recv:
    a send or recv made under another name is not traced, and a right sum is never blamed)."""
    tree = math.ceil(math.log2(n)) if n > 1 else 0
    sends = sum(op in ("send", "isend") for trace in traces for op, _, _ in trace)
    recvs = sum(op in ("recv", "irecv") for trace in traces for op, _, _ in trace)
    if n - 1 <= tree or sends == 0 or sends != recvs:
        return
    rounds = collectives.count_rounds(traces)
    if rounds > tree:
        shape = "a chain" if rounds == n - 1 and sends == n - 1 else "not a tree"
        raise Mismatch(
            f"{prefix}: the sum is right, but its messages take {rounds} rounds one after another "
            f"({shape}: every rank's partial sum waits for the previous one); a tree reduce needs "
            f"⌈log₂N⌉ = {tree}: in round step = 1, 2, 4, … pair ranks `step` apart, so half the senders drop out"
        )


@exercise(
    "1.1",
    "broadcast from send/recv",
    refuses=(
        "course_lib.collectives:flat_broadcast",
        "course_lib.collectives:tree_broadcast",
    ),
)
def broadcast(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(tensor, src)``: afterwards every rank's tensor equals src's."""
    _check("1.1", "broadcast", learner_fn)


@exercise(
    "1.2",
    "ring all-gather from send/recv",
    refuses=COURSE_RINGS,
)
def all_gather(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(tensor) -> list``: item j of every rank's list is rank j's tensor."""
    _check("1.2", "all_gather", learner_fn, what="gathered")


@exercise(
    "1.3",
    "tree reduce from send/recv",
    refuses=COURSE_RINGS,
)
def reduce(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(tensor, dst)``: afterwards dst's tensor is the sum over all ranks."""
    _check("1.3", "reduce", learner_fn)


@exercise(
    "1.4",
    "all-reduce as reduce + broadcast",
    builds_on=("1.1", "1.3"),
    refuses=(
        *COURSE_RINGS,
        "course_lib.collectives:flat_broadcast",
        "course_lib.collectives:tree_broadcast",
    ),
)
def all_reduce(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(tensor)``: afterwards every rank's tensor is the sum over all ranks."""
    _check("1.4", "all_reduce", learner_fn)
