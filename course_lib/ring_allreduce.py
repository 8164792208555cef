"""Chapter 03: all-reduce built from point-to-point calls only, to count and time.

``ring_all_reduce`` (= ``ring_reduce_scatter`` + ``ring_all_gather``), and for contrast
``unchunked_ring_all_reduce``, ``naive_all_reduce`` and ``tree_all_reduce``, and
``ring_step``, the one step they repeat (all of them wait as ``_waiting_as_batch`` says);
``record_ring_steps`` records every step of the ring for its pictures, ``count_rounds``
counts the rounds of messages each needs (the α term), and ``time_all_reduce`` times them
against ``dist.all_reduce``, with the spread.

The traffic counter (``count_traffic``) lives in :mod:`course_lib.traffic` and the shared
point-to-point helpers (``Ring``, ``global_rank``, headers) in :mod:`course_lib.p2p`; both are
importable from here too, as before.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from course_lib import dist_calls, launch
from course_lib.collectives import Timing, time_algorithms
from course_lib.p2p import (  # noqa: F401 - public here before the split
    HEADER_BYTES,
    Ring,
    _describe,
    _header,
    global_rank,
    recv_header,
    ring_of,
    send_header,
)
from course_lib.traffic import Traffic, count_traffic, tcp_bytes  # noqa: F401 - public here too

# ----------------------------------------------------------------------------
# all-reduce built from point-to-point calls (chapter 03)
#
# Chunk c of a tensor of K elements on N ranks is ``tensor.view(-1).tensor_split(N)[c]``:
# the first K mod N chunks hold one element more than the others.


def _check_tensor(tensor, name: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} needs a tensor, got {type(tensor).__name__}")
    if not tensor.is_contiguous():
        raise ValueError(
            f"{name} works in place on a contiguous tensor; this one is a strided view "
            "(call it on tensor.contiguous() and copy the result back)"
        )


def _checked_ring(tensor, group, name: str) -> Ring:
    """Validate ``tensor`` and agree on its shape and dtype with the left neighbour."""
    _check_tensor(tensor, name)
    ring = ring_of(group)
    if ring.size == 1:
        return ring
    # A ring only ever talks to its neighbours, so comparing with the left one is
    # enough: any difference anywhere makes some rank's left neighbour differ.
    # (gloo itself would silently produce wrong sums for different sizes.)
    mine = _header(tensor)
    theirs = torch.empty_like(mine)
    _exchange(mine, theirs, ring)
    if not torch.equal(mine, theirs):
        raise ValueError(
            f"{name}: rank {ring.rank} holds a tensor of {_describe(mine)} but its left "
            f"neighbour (rank {(ring.rank - 1) % ring.size}) holds {_describe(theirs)}; "
            "every rank must pass the same shape and dtype"
        )
    return ring


def _waiting_as_batch(tensor) -> contextlib.AbstractContextManager:
    """How our all-reduces wait: on CPU, every thread of this rank runs as SCHED_BATCH for the
    call (:func:`launch.threads_as_batch`), and as before after it.

    Our Python thread takes the connection's lock inside every ``isend``/``irecv``; with the
    default policy, gloo's I/O thread, woken by an arriving message, may preempt it while it
    holds that lock, then spin on the lock for the rest of its time slice (measured in chapter
    03). gloo's own all-reduce never meets this: its Python thread only waits. A SCHED_BATCH
    thread that wakes does not preempt; it runs when the running one blocks. Switching costs
    about 25 µs a call (measured with a rank's four threads: Python's and gloo's three)."""
    if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
        return launch.threads_as_batch()
    return contextlib.nullcontext()


def _exchange(send: torch.Tensor, recv: torch.Tensor, ring: Ring) -> None:
    """Send ``send`` to the right neighbour while receiving ``recv`` from the left one."""
    # isend first: two blocking sends facing each other could wait forever.
    request = dist.isend(send, ring.right, group=ring.group)
    dist.recv(recv, ring.left, group=ring.group)
    request.wait()


_scratch_buffers = {}


def _scratch(numel: int, like: torch.Tensor) -> torch.Tensor:
    """A receive buffer kept between calls: a fresh multi-MiB tensor on every call costs
    page faults, which made the ring use ~1.5x the CPU time of gloo's all-reduce."""
    key = (like.dtype, like.device)
    buffer = _scratch_buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _scratch_buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buffer[:numel]


#: Largest message the ring sends: a longer chunk goes as pieces of this size, so that the
#: first piece is added while the next ones are still arriving (and no single write holds the
#: connection for long). Small tensors send each chunk whole.
PIECE_BYTES = 4 << 20

_signatures = {}


def _signature(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(header, tag) for this shape and dtype, made once and kept: the tag, a number from 1 to
    2**31 − 2 computed from the header, marks every chunk message of the ring."""
    key = (tensor.shape, tensor.dtype, tensor.device)
    found = _signatures.get(key)
    if found is None:
        header = _header(tensor)
        tag = 1 + zlib.crc32(header.cpu().numpy().tobytes()) % (2**31 - 2)
        found = _signatures[key] = (header, tag)
    return found


class _RingCall:
    """One call of the ring: this rank's neighbours, and the shape check riding along.

    The header goes to the right neighbour *beside* the first chunk, not a round trip
    before it. What keeps a neighbour holding another tensor from writing into our
    chunks meanwhile is the **tag**: every chunk message carries one computed from the
    shape and dtype, and a receive only takes a message with its own tag. ``check()``,
    called before the first wait for a chunk, compares the left neighbour's header.
    """

    def __init__(self, tensor: torch.Tensor, group: dist.ProcessGroup | None, name: str):
        _check_tensor(tensor, name)
        ring = ring_of(group)
        self.name, self.rank, self.size, self.group = name, ring.rank, ring.size, ring.group
        self.left, self.right = ring.left, ring.right
        self.piece = max(1, PIECE_BYTES // tensor.element_size())
        self.header, self.tag = _signature(tensor)
        self._arriving = None
        if ring.size > 1:
            self._exchange_headers()

    def _exchange_headers(self) -> None:
        """Start sending our header right and receiving the left neighbour's (see :meth:`check`)."""
        self._theirs = torch.empty_like(self.header)
        self._arriving = dist.irecv(self._theirs, self.left, group=self.group)
        self._leaving = dist.isend(self.header, self.right, group=self.group)

    def pieces(self, tensor: torch.Tensor) -> Sequence[torch.Tensor]:
        return tensor.split(self.piece) if tensor.numel() > self.piece else (tensor,)

    def send(self, tensor: torch.Tensor) -> list:
        """Start sending ``tensor`` (in pieces when large) to the right neighbour."""
        return [dist.isend(p, self.right, group=self.group, tag=self.tag) for p in self.pieces(tensor)]

    def recv(self, tensor: torch.Tensor) -> list:
        """Start receiving ``tensor`` (in the same pieces) from the left neighbour."""
        return [dist.irecv(p, self.left, group=self.group, tag=self.tag) for p in self.pieces(tensor)]

    def check(self) -> None:
        """Wait for the left neighbour's header (once per call) and compare it with ours."""
        if self._arriving is None:
            return
        self._arriving.wait()
        self._arriving = None
        self._leaving.wait()
        if not torch.equal(self.header, self._theirs):
            # A ring only ever talks to its neighbours, so comparing with the left one is
            # enough: any difference anywhere makes some rank's left neighbour differ.
            # (gloo itself would silently produce wrong sums for different sizes.)
            raise ValueError(
                f"{self.name}: rank {self.rank} holds a tensor of {_describe(self.header)} but its "
                f"left neighbour (rank {(self.rank - 1) % self.size}) holds {_describe(self._theirs)}; "
                "every rank must pass the same shape and dtype"
            )


def _reduce_scatter(flat: torch.Tensor, ring: _RingCall) -> torch.Tensor:
    r, n = ring.rank, ring.size
    parts = flat.tensor_split(n)
    if n == 1:
        return flat
    # Chunk c starts at rank c+1 and travels right, each rank adding its own
    # part, so after N-1 steps it is complete on rank c. At step s this rank
    # sends chunk r-s-1 and adds the arriving chunk r-s-2.
    # Receives run two steps ahead, in two scratch slots taken in turn (as gloo's
    # ring does): the left neighbour's next chunk can arrive while this rank is
    # still adding, and the scratch stays two chunks however large N is (N-1 slots
    # cost ~5 % more CPU per call at N = 4, 16 MiB: more memory to bring to cache).
    width = parts[0].numel()
    slots = _scratch(2 * width, flat)

    def receive(step):
        start = (step % 2) * width
        slot = slots[start : start + parts[(r - step - 2) % n].numel()]
        return slot, ring.recv(slot)

    ahead = {step: receive(step) for step in range(min(2, n - 1))}
    sends = ring.send(parts[(r - 1) % n])
    ring.check()  # before the first wait: a neighbour holding another tensor raises here
    for step in range(n - 1):
        chunk = parts[(r - step - 2) % n]
        slot, receives = ahead.pop(step)
        for piece, arrived, request in zip(ring.pieces(chunk), ring.pieces(slot), receives):
            request.wait()
            piece += arrived  # in place, straight from the scratch slot
            if step < n - 2:  # the partial sum moves on: the right neighbour adds to it next
                sends += ring.send(piece)
        if step + 2 < n - 1:  # this slot is free again: the receive two steps on lands in it
            ahead[step + 2] = receive(step + 2)
    for request in sends:
        request.wait()
    return parts[r]


def _all_gather(flat: torch.Tensor, ring: _RingCall) -> None:
    r, n = ring.rank, ring.size
    parts = flat.tensor_split(n)
    if n == 1:
        return
    # At step s this rank sends chunk r-s (its own, then the one it received
    # last) and receives chunk r-s-1 straight into place. Each chunk arrives
    # once, so all receives can be posted up front.
    receives = [ring.recv(parts[(r - s - 1) % n]) for s in range(n - 1)]
    sends = ring.send(parts[r])
    ring.check()
    for step in range(n - 1):
        for piece, request in zip(ring.pieces(parts[(r - step - 1) % n]), receives[step]):
            request.wait()
            if step < n - 2:
                sends += ring.send(piece)
    for request in sends:
        request.wait()


def ring_reduce_scatter(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum chunk r of every rank's ``tensor`` into chunk r of rank r's ``tensor``, over a ring.

    In place; returns that chunk (a view). The other chunks are left holding
    partial sums. N-1 steps; each rank sends (N-1)/N·K elements (plus a
    HEADER_BYTES header).
    """
    with _waiting_as_batch(tensor):
        ring = _RingCall(tensor, group, "ring_reduce_scatter")
        return _reduce_scatter(tensor.view(-1), ring)


def ring_all_gather(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Fill every chunk c of every rank's ``tensor`` with chunk c of rank c's, over a ring.

    In place (chunk r of rank r is the input); returns ``tensor``. N-1 steps;
    each rank sends (N-1)/N·K elements (plus a HEADER_BYTES header).
    """
    with _waiting_as_batch(tensor):
        ring = _RingCall(tensor, group, "ring_all_gather")
        _all_gather(tensor.view(-1), ring)
        return tensor


def ring_all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group``, in place, from send/recv only; returns it.

    A reduce-scatter then an all-gather around the ring, 2(N-1) steps; each rank
    sends 2(N-1)/N·K elements (plus a HEADER_BYTES header), however large N is.
    """
    with _waiting_as_batch(tensor):
        ring = _RingCall(tensor, group, "ring_all_reduce")
        flat = tensor.view(-1)
        _reduce_scatter(flat, ring)
        _all_gather(flat, ring)
        return tensor


def unchunked_ring_all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum ``tensor`` in place by passing whole tensors around the ring (for contrast).

    N-1 steps, each moving all K elements: every rank sends (N-1)·K.
    """
    with _waiting_as_batch(tensor):
        ring = _checked_ring(tensor, group, "unchunked_ring_all_reduce")
        passing, incoming = tensor.clone(), torch.empty_like(tensor)
        for _ in range(ring.size - 1):
            _exchange(passing.view(-1), incoming.view(-1), ring)
            tensor += incoming
            passing, incoming = incoming, passing  # forward what arrived: a neighbour's original
        return tensor


def naive_all_reduce(
    tensor: torch.Tensor, group: dist.ProcessGroup | None = None, root: int = 0
) -> torch.Tensor:
    """Sum ``tensor`` in place: everyone sends to ``root``, which adds and sends the sum back.

    The root receives (N-1)·K elements and sends (N-1)·K; the others send and
    receive K each. ``root`` is a rank of ``group``.
    """
    with _waiting_as_batch(tensor):
        ring = _checked_ring(tensor, group, "naive_all_reduce")
        if not 0 <= root < ring.size:
            raise ValueError(f"root must be a rank of the group, 0..{ring.size - 1}; got {root}")
        if ring.size == 1:
            return tensor
        if ring.rank == root:
            incoming = torch.empty_like(tensor)
            for r in range(ring.size):
                if r != root:
                    dist.recv(incoming, ring.global_rank(r), group=group)
                    tensor += incoming
            requests = [
                dist.isend(tensor, ring.global_rank(r), group=group) for r in range(ring.size) if r != root
            ]
            for request in requests:
                request.wait()
        else:
            dist.send(tensor, ring.global_rank(root), group=group)
            dist.recv(tensor, ring.global_rank(root), group=group)
        return tensor


def tree_all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum ``tensor`` in place over a binomial tree: reduce to rank 0, then broadcast back.

    Each half takes ⌈log₂N⌉ rounds and every round moves the whole tensor, so
    the tree needs 2⌈log₂N⌉ rounds of K elements where the ring needs 2(N−1)
    rounds of K/N: fewer messages (latency), more bytes (bandwidth). Like the
    ring it first checks shape and dtype with its left neighbour (one round).
    """
    with _waiting_as_batch(tensor):
        ring = _checked_ring(tensor, group, "tree_all_reduce")
        r, n = ring.rank, ring.size
        rounds = math.ceil(math.log2(n)) if n > 1 else 0
        incoming = _scratch(tensor.numel(), tensor).view_as(tensor)
        # Reduce: in round k, every rank whose bit k is set (and no lower bit) hands its
        # partial sum to the rank 2^k below it and drops out; rank 0 ends with the sum.
        for k in range(rounds):
            step = 1 << k
            if r % (2 * step) == step:
                dist.send(tensor, ring.global_rank(r - step), group=ring.group)
                break
            if r % (2 * step) == 0 and r + step < n:
                dist.recv(incoming, ring.global_rank(r + step), group=ring.group)
                tensor += incoming
        # Broadcast: the same tree walked back down, from rank 0.
        for k in reversed(range(rounds)):
            step = 1 << k
            if r % (2 * step) == 0 and r + step < n:
                dist.send(tensor, ring.global_rank(r + step), group=ring.group)
            elif r % (2 * step) == step:
                dist.recv(tensor, ring.global_rank(r - step), group=ring.group)
        return tensor


def ring_step(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """One step of the ring, the unit our all-reduces repeat: send ``tensor`` to the right
    neighbour while receiving one of its size from the left, waiting as they do
    (:func:`_waiting_as_batch`). Returns what arrived (a scratch buffer reused by the next call)."""
    with _waiting_as_batch(tensor):
        _check_tensor(tensor, "ring_step")
        ring = ring_of(group)
        flat = tensor.view(-1)
        if ring.size == 1:
            return tensor
        incoming = _scratch(flat.numel(), flat)
        _exchange(flat, incoming, ring)
        return incoming.view_as(tensor)


def _builtin_all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    dist.all_reduce(tensor, group=group)
    return tensor


#: All-reduce implementations by name, all called as ``fn(tensor, group=None)``, summing in place.
ALL_REDUCES = {
    "ring": ring_all_reduce,
    "dist.all_reduce": _builtin_all_reduce,
    "unchunked ring": unchunked_ring_all_reduce,
    "naive": naive_all_reduce,
    "tree": tree_all_reduce,
}


# ----------------------------------------------------------------------------
# watching the ring work (chapter 03's pictures)


@dataclass
class RingSteps:
    """Every rank's tensor before the ring all-reduce and after each of its 2(N−1) steps.

    ``values[r][step]`` is rank r's tensor (K = N elements, one per chunk; rank r
    starts with 10·r + c in chunk c); ``masks[r][step]`` the same run on 2**rank,
    so bit j of an element says that rank j's number has been added into it;
    ``sent[r][step]`` the chunk rank r sent in step ``step + 1``.
    """

    world_size: int
    values: list
    masks: list
    sent: list


class _LandsOnWait:
    """A receive whose data reaches its tensor only when the ring waits for it."""

    def __init__(self, request, staging, target):
        self.request, self.staging, self.target = request, staging, target

    def wait(self, *args, **kwargs):
        self.request.wait(*args, **kwargs)
        self.target.copy_(self.staging)
        return True


def _record_ring_steps_rank():
    rank, n = dist.get_rank(), dist.get_world_size()
    recorded = []
    for data in (10.0 * rank + torch.arange(n), torch.full((n,), 2**rank)):
        states, sent = [], []
        real_isend, real_irecv = dist.isend, dist.irecv

        def is_chunk(tensor, data=data):  # a chunk of the data, not the shape header
            return tensor.untyped_storage().data_ptr() == data.untyped_storage().data_ptr()

        def recording_isend(tensor, *args, data=data, states=states, sent=sent, **kwargs):
            if is_chunk(tensor):  # a send starts every step: take a copy first
                states.append(data.clone())
                sent.append(tensor.storage_offset())  # K = N: the element index is the chunk index
            return real_isend(tensor, *args, **kwargs)

        def staged_irecv(tensor, *args, **kwargs):
            # The ring posts its receives up front; holding each arriving chunk back
            # until the ring waits for it keeps a fast neighbour's chunk in its own step.
            if not is_chunk(tensor):
                return real_irecv(tensor, *args, **kwargs)
            staging = torch.empty_like(tensor)
            return _LandsOnWait(real_irecv(staging, *args, **kwargs), staging, tensor)

        undo = dist_calls.replace_dist_functions({"isend": recording_isend, "irecv": staged_irecv})
        try:
            ring_all_reduce(data)
        finally:
            undo()
        recorded.append((states + [data.clone()], sent))
    (values, sent), (masks, _) = recorded
    return values, masks, sent


def record_ring_steps(world_size: int, **run_kwargs) -> RingSteps:
    """Run :func:`ring_all_reduce` on ``world_size`` ranks (K = N) and record every step of it.

    A spy around ``dist.isend`` copies each rank's tensor whenever the ring
    starts a step (every step begins with a send), so the pictures show the real
    code's state, not a re-enactment.
    """
    results = launch.run(_record_ring_steps_rank, world_size, backend="gloo", **run_kwargs)
    values, masks, sent = (list(x) for x in zip(*results))
    return RingSteps(world_size, values, masks, sent)


# ----------------------------------------------------------------------------
# rounds: the latency term, counted exactly


class _Rounds:
    """One rank's round bookkeeping: it sends at most one message and receives at most one per round."""

    def __init__(self):
        self.last_send = self.last_recv = self.known = self.deepest = 0

    def send_round(self) -> int:
        # The next round after both my previous send and the last message I waited for.
        self.last_send = max(self.last_send, self.known) + 1
        self.deepest = max(self.deepest, self.last_send)
        return self.last_send

    def received(self, sent_in: int) -> None:
        # Not before it was sent, and not in a round in which I already received one.
        self.last_recv = max(sent_in, self.last_recv + 1)
        self.known = max(self.known, self.last_recv)
        self.deepest = max(self.deepest, self.last_recv)


class _StampedSend:
    def __init__(self, works, keep):
        self.works, self.keep = works, keep  # the stamp must live until it is sent

    def wait(self, *args, **kwargs):
        for work in self.works:
            work.wait(*args, **kwargs)
        return True


class _StampedRecv:
    def __init__(self, works, stamp, rounds):
        self.works, self.stamp, self.rounds, self.done = works, stamp, rounds, False

    def wait(self, *args, **kwargs):
        for work in self.works:
            work.wait(*args, **kwargs)
        if not self.done:
            self.rounds.received(int(self.stamp))
            self.done = True
        return True


@contextlib.contextmanager
def count_message_rounds() -> Iterator[_Rounds]:
    """Inside a rank: number every message with the **round** it is sent in; yields the tally.

    The model is the α–β model's: in one round a rank sends at most one message
    and receives at most one, and a message sent after a receive completed goes
    in a later round. Each message is preceded by an 8-byte stamp with its round
    (same peer and tag, so the two arrive in order); a receiver waiting for it
    learns the round. The tally's ``deepest``, taken as the largest over the
    ranks, is how many rounds the algorithm needs: what the α term counts,
    measured exactly however loaded the machine is.
    """
    rounds = _Rounds()
    real_isend, real_irecv = dist.isend, dist.irecv

    def isend(tensor, *args, **kwargs):
        stamp = torch.tensor([rounds.send_round()], dtype=torch.int64, device=tensor.device)
        works = [real_isend(stamp, *args, **kwargs), real_isend(tensor, *args, **kwargs)]
        return _StampedSend(works, stamp)

    def irecv(tensor, *args, **kwargs):
        stamp = torch.zeros(1, dtype=torch.int64, device=tensor.device)
        works = [real_irecv(stamp, *args, **kwargs), real_irecv(tensor, *args, **kwargs)]
        return _StampedRecv(works, stamp, rounds)

    # send and recv call isend and irecv inside torch, so they are stamped too.
    undo = dist_calls.replace_dist_functions({"isend": isend, "irecv": irecv})
    try:
        yield rounds
    finally:
        undo()


def _count_rounds_rank(names):
    n = dist.get_world_size()
    result = {}
    for name in names:
        with count_message_rounds() as rounds:
            ALL_REDUCES[name](torch.zeros(n))
        most = torch.tensor([rounds.deepest])
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        result[name] = int(most)
    return result


def count_rounds(world_size: int, names: Iterable[str] = ("ring", "tree"), **run_kwargs) -> dict:
    """name -> rounds one all-reduce (of :data:`ALL_REDUCES`) needs on ``world_size`` ranks.

    2(N−1) + 1 for the ring and 2⌈log₂N⌉ + 1 for the tree (the + 1 is the shape
    check both do first). See :func:`count_message_rounds`.
    """
    return launch.run(_count_rounds_rank, world_size, list(names), backend="gloo", **run_kwargs)[0]


# ----------------------------------------------------------------------------
# timing, with the spread


#: The timings :func:`time_all_reduce` returns: medians with the fastest and slowest batch.
SpreadTiming = Timing


def time_all_reduce(
    world_size: int,
    sizes: Iterable[int],
    names: Sequence[str] = ("ring", "dist.all_reduce"),
    min_seconds: float = 0.1,
    batches: int = 5,
    **run_kwargs,
) -> dict:
    """Time all-reduce implementations (keys of :data:`ALL_REDUCES`) on ``world_size`` ranks.

    ``sizes`` are array sizes S in bytes (float32). Returns name -> :class:`SpreadTiming`
    (a :class:`course_lib.collectives.Timing` whose ``seconds`` are medians over
    ``batches`` batches, with the fastest and slowest batch beside them), whose
    ``busbw`` can be compared directly.
    """
    unknown = [name for name in names if name not in ALL_REDUCES]
    if unknown:
        raise ValueError(f"unknown all-reduce {unknown[0]!r}; choose from {', '.join(ALL_REDUCES)}")
    calls = {name: ALL_REDUCES[name] for name in names}
    return time_algorithms("all-reduce", calls, world_size, sizes, min_seconds, batches, **run_kwargs)
