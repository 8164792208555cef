"""The traffic counter: what one rank sent and received, counted and measured.

    with count_traffic() as traffic:        # inside a rank
        dist.all_reduce(grad)
    traffic.sent, traffic.received          # bytes on this rank's wire, measured

Two kinds of figure, kept apart on purpose:

* **payload** bytes: what point-to-point calls (send/recv/isend/irecv) were asked
  to move, counted at the process group's own send and recv, so an import by
  name or an alias counts too. Exact by construction; collectives have no payload
  figure, because how much a collective moves per rank depends on its algorithm.
* **wire** bytes: what really crossed this rank's TCP connections while the
  counter was on, read from the kernel (Linux ``TCP_INFO``: bytes_sent,
  bytes_received). This covers built-in collectives too (gloo's all-reduce
  shows up as its ring's 2(N-1)/N·K) and includes gloo's small message headers
  (tens of bytes per message). Not available under NCCL or off Linux: None.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from course_lib import dist_calls

_P2P = {"send": "sent", "isend": "sent", "recv": "received", "irecv": "received"}
_COLLECTIVES = (*dist_calls.COLLECTIVE_CALLS, "barrier")  # counted as calls; their bytes on the wire
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
def count_traffic() -> Iterator[Traffic]:
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
    undo = dist_calls.replace_dist_functions(counted)
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
