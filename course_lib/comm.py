"""Communication, measured: a traffic counter for every chapter.

    with count_traffic() as traffic:        # inside a rank
        dist.all_reduce(grad)
    traffic.sent, traffic.received          # bytes on this rank's wire, measured

Two kinds of figure, kept apart on purpose:

* **payload** bytes: what point-to-point calls (send/recv/isend/irecv) were asked
  to move. Exact by construction; collectives have no payload figure, because
  how much a collective moves per rank depends on its algorithm.
* **wire** bytes: what really crossed this rank's TCP connections while the
  counter was on, read from the kernel (Linux ``TCP_INFO``: bytes_sent,
  bytes_received). This covers built-in collectives too (gloo's all-reduce
  shows up as its ring's 2(N-1)/N·K) and includes gloo's small message headers
  (tens of bytes per message). Not available under NCCL or off Linux: None.

Chapter 03 adds all-reduce built from point-to-point calls only, to count and time:
``ring_all_reduce`` (= ``ring_reduce_scatter`` + ``ring_all_gather``), and for
contrast ``unchunked_ring_all_reduce``, ``naive_all_reduce`` and ``tree_all_reduce``;
``record_ring_steps`` records every step of the ring for its pictures,
``count_rounds`` counts the rounds of messages each needs (the α term), and
``time_all_reduce`` times them against ``dist.all_reduce``, with the spread.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from course_lib import launch
from course_lib.collectives import Timing, time_algorithms

_P2P = {"send": "sent", "isend": "sent", "recv": "received", "irecv": "received"}
_COLLECTIVES = (
    "broadcast",
    "all_reduce",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "barrier",
    "all_gather_single",
    "reduce_scatter_single",
)
# struct tcp_info (linux/tcp.h): u64 tcpi_bytes_received at byte 128, u64 tcpi_bytes_sent at 200.
_BYTES_RECEIVED_AT, _BYTES_SENT_AT, _TCP_INFO_SIZE = 128, 200, 232


@dataclass
class Call:
    op: str
    payload_bytes: int = 0  # point-to-point only
    wire_sent: int | None = None  # measured during the call (async calls finish later)
    wire_received: int | None = None


@dataclass
class Traffic:
    """What one rank sent and received while a :func:`count_traffic` block ran."""

    calls: list[Call] = field(default_factory=list)
    payload_sent: int = 0
    payload_received: int = 0
    sent: int | None = None  # wire bytes, measured over the whole block
    received: int | None = None

    def count(self, op: str) -> int:
        return sum(c.op == op for c in self.calls)

    def __str__(self):
        wire = "n/a" if self.sent is None else f"{self.sent:,} B sent, {self.received:,} B received"
        return (
            f"{len(self.calls)} calls; payload {self.payload_sent:,} B sent, "
            f"{self.payload_received:,} B received; wire {wire}"
        )


def tcp_bytes() -> tuple[int, int] | None:
    """(bytes sent, bytes received) over all of this process's TCP sockets, or None."""
    if not sys.platform.startswith("linux"):
        return None
    sent = received = 0
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for name in fds:
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=int(name))
        except OSError:
            continue
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
                if len(info) >= _BYTES_SENT_AT + 8:
                    sent += struct.unpack_from("Q", info, _BYTES_SENT_AT)[0]
                    received += struct.unpack_from("Q", info, _BYTES_RECEIVED_AT)[0]
        except OSError:
            pass
        finally:
            sock.detach()  # the socket belongs to gloo: do not close it
    return sent, received


def _measures_wire() -> bool:
    # gloo (alone, or for the CPU tensors beside NCCL) talks over TCP sockets we can read;
    # NCCL's traffic (shared memory, NVLink, InfiniBand) is invisible here.
    return dist.is_initialized() and "gloo" in dist.get_backend() and tcp_bytes() is not None


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _count_payload_at_the_process_group(traffic: Traffic):
    """Add every point-to-point payload to ``traffic`` where all of them pass: the process group's
    own send and recv, below any Python name (``from torch.distributed import isend`` counts too).
    Returns the function that undoes it."""
    group_class = torch._C._distributed_c10d.ProcessGroup
    real_send, real_recv = group_class.send, group_class.recv

    def send(self, tensors, *args, **kwargs):
        traffic.payload_sent += sum(_tensor_bytes(t) for t in tensors)
        return real_send(self, tensors, *args, **kwargs)

    def recv(self, tensors, *args, **kwargs):
        traffic.payload_received += sum(_tensor_bytes(t) for t in tensors)
        return real_recv(self, tensors, *args, **kwargs)

    group_class.send, group_class.recv = send, recv

    def undo():
        group_class.send, group_class.recv = real_send, real_recv

    return undo


@contextlib.contextmanager
def count_traffic():
    """Count this rank's communication inside the ``with`` block; yields a :class:`Traffic`."""
    traffic = Traffic()
    wire = _measures_wire()
    depth = [0]  # a call made inside a counted call (recv uses irecv) is not counted again

    def wrap(name, original):
        direction = _P2P.get(name)

        @functools.wraps(original)
        def counted(*args, **kwargs):
            if depth[0]:
                return original(*args, **kwargs)
            call = Call(name)
            if direction:  # the payload totals are counted below, at the process group
                call.payload_bytes = _tensor_bytes(args[0] if args else kwargs.get("tensor"))
            before = tcp_bytes() if wire else None
            depth[0] += 1
            try:
                result = original(*args, **kwargs)
            finally:
                depth[0] -= 1
            if before is not None:
                after = tcp_bytes()
                call.wire_sent, call.wire_received = after[0] - before[0], after[1] - before[1]
            traffic.calls.append(call)
            return result

        return counted

    def wrap_batch(original):
        @functools.wraps(original)
        def counted(p2p_ops):
            if depth[0]:
                return original(p2p_ops)
            for op in p2p_ops:
                sent = getattr(op.op, "__name__", "") == "isend"
                traffic.calls.append(Call("isend" if sent else "irecv", _tensor_bytes(op.tensor)))
            depth[0] += 1
            try:
                return original(p2p_ops)
            finally:
                depth[0] -= 1

        return counted

    counted = {
        name: wrap_batch(getattr(dist, name))
        if name == "batch_isend_irecv"
        else wrap(name, getattr(dist, name))
        for name in (*_P2P, *_COLLECTIVES, "batch_isend_irecv")
        if hasattr(dist, name)
    }
    start = tcp_bytes() if wire else None
    undo = launch.replace_dist_functions(counted)
    undo_payload = _count_payload_at_the_process_group(traffic)
    try:
        yield traffic
    finally:
        undo_payload()
        undo()
        if start is not None:
            end = _settled_tcp_bytes()
            traffic.sent, traffic.received = end[0] - start[0], end[1] - start[1]


def _settled_tcp_bytes(quiet_s: float = 0.005, limit_s: float = 0.2):
    """Counters once they stop moving: a finished isend may still sit in the
    socket's buffer until the peer reads it, and only then counts as sent."""
    last, start = tcp_bytes(), time.monotonic()
    while time.monotonic() - start < limit_s:
        time.sleep(quiet_s)
        now = tcp_bytes()
        if now == last:
            break
        last = now
    return last


# ----------------------------------------------------------------------------
# all-reduce built from point-to-point calls (chapter 03)
#
# Chunk c of a tensor of K elements on N ranks is ``tensor.view(-1).tensor_split(N)[c]``:
# the first K mod N chunks hold one element more than the others.

#: Size of the header each rank sends its right neighbour before a ring, so that
#: ranks holding different shapes or dtypes fail with a clear error.
HEADER_BYTES = 80
_HEADER_DIMS = 8
_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.complex64,
    torch.complex128,
)


def global_rank(group, group_rank: int) -> int:
    """Point-to-point calls name peers by their global rank, even inside a group."""
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


@dataclass(frozen=True)
class Ring:
    """This rank's place in a group: its group rank, the group size, its neighbours."""

    rank: int
    size: int
    group: object = None

    def global_rank(self, group_rank: int) -> int:
        return global_rank(self.group, group_rank)

    @property
    def left(self) -> int:
        return self.global_rank((self.rank - 1) % self.size)

    @property
    def right(self) -> int:
        return self.global_rank((self.rank + 1) % self.size)


def ring_of(group=None) -> Ring:
    """This rank's :class:`Ring` in ``group`` (None: every rank)."""
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this rank is not a member of the group it was asked to communicate in")
    return Ring(rank, dist.get_world_size(group), group)


def _header(tensor: torch.Tensor) -> torch.Tensor:
    code = _DTYPES.index(tensor.dtype) if tensor.dtype in _DTYPES else -1
    shape = list(tensor.shape) if tensor.dim() <= _HEADER_DIMS else [tensor.numel()]
    dims = shape + [0] * (_HEADER_DIMS - len(shape))
    return torch.tensor([code, len(shape)] + dims, dtype=torch.int64, device=tensor.device)


def send_header(tensor: torch.Tensor, dst: int, group=None):
    """Start sending ``tensor``'s shape and dtype to ``dst``, so it can allocate a buffer.

    Returns (request, header): the header must live until the request completes.
    """
    if tensor.dtype not in _DTYPES or tensor.dim() > _HEADER_DIMS:
        raise ValueError(
            f"a header describes up to {_HEADER_DIMS} dimensions of "
            f"{', '.join(str(d).replace('torch.', '') for d in _DTYPES)}; "
            f"got shape {tuple(tensor.shape)} {tensor.dtype}"
        )
    header = _header(tensor)
    return dist.isend(header, dst, group=group), header


def recv_header(src: int, group=None, device="cpu") -> tuple[tuple, torch.dtype]:
    """The (shape, dtype) that :func:`send_header` on ``src`` sent."""
    header = torch.empty(2 + _HEADER_DIMS, dtype=torch.int64, device=device)
    dist.recv(header, src, group=group)
    code, ndim, *dims = header.tolist()
    return tuple(dims[:ndim]), _DTYPES[code]


def _describe(header: torch.Tensor) -> str:
    code, ndim, *dims = header.tolist()
    dtype = str(_DTYPES[code]).replace("torch.", "") if 0 <= code < len(_DTYPES) else "another dtype"
    return f"shape {tuple(dims[:ndim])} {dtype}"


def _checked_ring(tensor, group, name: str) -> Ring:
    """Validate ``tensor`` and agree on its shape and dtype with the left neighbour."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} needs a tensor, got {type(tensor).__name__}")
    if not tensor.is_contiguous():
        raise ValueError(
            f"{name} works in place on a contiguous tensor; this one is a strided view "
            "(call it on tensor.contiguous() and copy the result back)"
        )
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


def _reduce_scatter(flat: torch.Tensor, ring: Ring) -> torch.Tensor:
    r, n = ring.rank, ring.size
    parts = flat.tensor_split(n)
    if n == 1:
        return flat
    # Chunk c starts at rank c+1 and travels right, each rank adding its own
    # part, so after N-1 steps it is complete on rank c. At step s this rank
    # sends chunk r-s-1 and adds the arriving chunk r-s-2.
    # Every receive is posted up front, each into its own scratch slot, so the
    # left neighbour's next chunk can arrive while this rank is still adding.
    width = parts[0].numel()
    slots = _scratch(width * (n - 1), flat)
    incoming = [slots[s * width : s * width + parts[(r - s - 2) % n].numel()] for s in range(n - 1)]
    receives = [dist.irecv(slot, ring.left, group=ring.group) for slot in incoming]
    sends = [dist.isend(parts[(r - 1) % n], ring.right, group=ring.group)]
    for step in range(n - 1):
        receives[step].wait()
        chunk = parts[(r - step - 2) % n]
        chunk += incoming[step]
        if step < n - 2:  # the partial sum moves on: the right neighbour adds to it next
            sends.append(dist.isend(chunk, ring.right, group=ring.group))
    for request in sends:
        request.wait()
    return parts[r]


def _all_gather(flat: torch.Tensor, ring: Ring) -> None:
    r, n = ring.rank, ring.size
    parts = flat.tensor_split(n)
    if n == 1:
        return
    # At step s this rank sends chunk r-s (its own, then the one it received
    # last) and receives chunk r-s-1 straight into place. Each chunk arrives
    # once, so all receives can be posted up front.
    sends = [dist.isend(parts[r], ring.right, group=ring.group)]
    receives = [dist.irecv(parts[(r - s - 1) % n], ring.left, group=ring.group) for s in range(n - 1)]
    for step in range(n - 1):
        receives[step].wait()
        if step < n - 2:
            sends.append(dist.isend(parts[(r - step - 1) % n], ring.right, group=ring.group))
    for request in sends:
        request.wait()


def ring_reduce_scatter(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum chunk r of every rank's ``tensor`` into chunk r of rank r's ``tensor``, over a ring.

    In place; returns that chunk (a view). The other chunks are left holding
    partial sums. N-1 steps; each rank sends (N-1)/N·K elements.
    """
    ring = _checked_ring(tensor, group, "ring_reduce_scatter")
    return _reduce_scatter(tensor.view(-1), ring)


def ring_all_gather(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Fill every chunk c of every rank's ``tensor`` with chunk c of rank c's, over a ring.

    In place (chunk r of rank r is the input); returns ``tensor``. N-1 steps;
    each rank sends (N-1)/N·K elements.
    """
    ring = _checked_ring(tensor, group, "ring_all_gather")
    _all_gather(tensor.view(-1), ring)
    return tensor


def ring_all_reduce(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group``, in place, from send/recv only; returns it.

    A reduce-scatter then an all-gather around the ring, 2(N-1) steps; each rank
    sends 2(N-1)/N·K elements (plus a HEADER_BYTES header), however large N is.
    """
    ring = _checked_ring(tensor, group, "ring_all_reduce")
    flat = tensor.view(-1)
    _reduce_scatter(flat, ring)
    _all_gather(flat, ring)
    return tensor


def unchunked_ring_all_reduce(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` in place by passing whole tensors around the ring (for contrast).

    N-1 steps, each moving all K elements: every rank sends (N-1)·K.
    """
    ring = _checked_ring(tensor, group, "unchunked_ring_all_reduce")
    passing, incoming = tensor.clone(), torch.empty_like(tensor)
    for _ in range(ring.size - 1):
        _exchange(passing.view(-1), incoming.view(-1), ring)
        tensor += incoming
        passing, incoming = incoming, passing  # forward what arrived: a neighbour's original
    return tensor


def naive_all_reduce(tensor: torch.Tensor, group=None, root: int = 0) -> torch.Tensor:
    """Sum ``tensor`` in place: everyone sends to ``root``, which adds and sends the sum back.

    The root receives (N-1)·K elements and sends (N-1)·K; the others send and
    receive K each. ``root`` is a rank of ``group``.
    """
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


def tree_all_reduce(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` in place over a binomial tree: reduce to rank 0, then broadcast back.

    Each half takes ⌈log₂N⌉ rounds and every round moves the whole tensor, so
    the tree needs 2⌈log₂N⌉ rounds of K elements where the ring needs 2(N−1)
    rounds of K/N: fewer messages (latency), more bytes (bandwidth). Like the
    ring it first checks shape and dtype with its left neighbour (one round).
    """
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


def _builtin_all_reduce(tensor: torch.Tensor, group=None) -> torch.Tensor:
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

        undo = launch.replace_dist_functions({"isend": recording_isend, "irecv": staged_irecv})
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
def count_message_rounds():
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
    undo = launch.replace_dist_functions({"isend": isend, "irecv": irecv})
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


def count_rounds(world_size: int, names=("ring", "tree"), **run_kwargs) -> dict:
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
    sizes,
    names=("ring", "dist.all_reduce"),
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
