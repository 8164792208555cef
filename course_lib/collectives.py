"""Chapter 01: the collectives, run on N ranks, looked at, and timed.

    from course_lib import collectives, viz
    demo = collectives.run_collective("all-gather", 4)   # every rank's data before/after
    viz.plot_collective(demo)
    timing = collectives.time_collective("all-reduce", 4, [4096, 65536])
    viz.plot_timing([timing])                 # median batch, band = best to worst batch
    wire = collectives.wire_bytes(["all-reduce"], 4, 1 << 20)   # TCP bytes per rank (gloo)
    traces = collectives.trace_broadcast("tree", 8)             # every rank's send/recv, in order
    collectives.count_rounds(traces)                            # 3 = ⌈log₂8⌉

Sizes follow nccl-tests: K is the number of elements of the *full* array and
S = K·(bytes per element). All-gather starts from K/N elements per rank and ends
with K; reduce-scatter starts from K and ends with K/N; all-to-all sends and
receives K per rank; the rest keep K elements per rank.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from course_lib import dist_calls, launch
from course_lib.traffic import count_traffic
from course_lib.units import format_bytes

if TYPE_CHECKING:
    from course_lib.alpha_beta import AlphaBeta

#: Every collective this chapter runs, in the order the lesson meets them.
COLLECTIVES = ("send/recv", "broadcast", "reduce", "all-reduce", "all-gather", "reduce-scatter", "all-to-all")
#: Collectives that have a root rank (the source or destination).
ROOTED = ("broadcast", "reduce")

# torch 2.13 calls the single-tensor versions *_single and deprecates *_tensor;
# older versions only have the latter.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _check_name(name: str) -> None:
    if name not in COLLECTIVES:
        raise ValueError(f"unknown collective {name!r}; choose one of {', '.join(COLLECTIVES)}")


# ----------------------------------------------------------------------------
# sizes and bus bandwidth


def numels(name: str, k: int, n: int) -> tuple[int, int]:
    """(input, output) elements per rank for a full array of ``k`` elements on ``n`` ranks."""
    _check_name(name)
    if name in ("all-gather", "reduce-scatter", "all-to-all") and k % n:
        raise ValueError(f"{name} splits the array into N={n} equal chunks: K={k} is not a multiple of {n}")
    if name == "all-gather":
        return k // n, k
    if name == "reduce-scatter":
        return k, k // n
    return k, k


def bus_factor(name: str, n: int) -> float:
    """busbw / algbw for collective ``name`` on ``n`` ranks (nccl-tests' PERFORMANCE.md).

    The factor turns "array bytes per second" into "bytes per second each link
    must carry" for a bandwidth-optimal algorithm, so that every collective can
    be compared with the hardware's link speed.
    """
    _check_name(name)
    if name == "all-reduce":
        return 2 * (n - 1) / n
    if name in ("all-gather", "reduce-scatter", "all-to-all"):
        return (n - 1) / n
    return 1.0  # send/recv, broadcast, reduce: the whole array crosses each link once


def bandwidth(name: str, nbytes: int, seconds: float, n: int) -> tuple[float, float]:
    """(algbw, busbw) in bytes per second: algbw = S/t, busbw = algbw · bus_factor."""
    algbw = nbytes / seconds
    return algbw, algbw * bus_factor(name, n)


# ----------------------------------------------------------------------------
# the rank side: one collective on this rank's buffers


def buffers(
    name: str, k: int, dtype: torch.dtype = torch.float32, fill: Callable[[int], torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (input, output) tensors for a full array of ``k`` elements.

    In-place collectives (broadcast, reduce, all-reduce) return the same tensor twice.
    ``fill(numel)`` gives the input's values (zeros when None); call inside a rank.
    """
    n, dev = dist.get_world_size(), launch.device()
    k_in, k_out = numels(name, k, n)
    inp = fill(k_in).to(dev, dtype) if fill else torch.zeros(k_in, dtype=dtype, device=dev)
    if name in ("broadcast", "reduce", "all-reduce"):
        return inp, inp
    return inp, torch.empty(k_out, dtype=dtype, device=dev)


def collective(name: str, inp: torch.Tensor, out: torch.Tensor, root: int = 0) -> None:
    """Run collective ``name`` from this rank's ``inp`` into ``out`` (see :func:`buffers`).

    "send/recv" is a ring shift: every rank sends to rank+1 and receives from
    rank−1 (mod N), the step every ring algorithm repeats. Reductions sum.
    """
    rank, n = dist.get_rank(), dist.get_world_size()
    if name == "send/recv":
        if n == 1:
            out.copy_(inp)
            return
        # isend first: two blocking sends facing each other would wait forever.
        request = dist.isend(inp, (rank + 1) % n)
        dist.recv(out, (rank - 1) % n)
        request.wait()
    elif name == "broadcast":
        dist.broadcast(out, src=root)
    elif name == "reduce":
        dist.reduce(out, dst=root)
    elif name == "all-reduce":
        dist.all_reduce(out)
    elif name == "all-gather":
        _all_gather_flat(out, inp)
    elif name == "reduce-scatter":
        _reduce_scatter_flat(out, inp)
    elif name == "all-to-all":
        dist.all_to_all_single(out, inp)
    else:
        _check_name(name)


# ----------------------------------------------------------------------------
# run one collective and keep every rank's data before and after


@dataclass
class CollectiveDemo:
    """Every rank's data before and after one collective.

    ``before[r]`` / ``after[r]`` are rank r's values (``after[r]`` is None where
    the collective leaves no defined result: the non-root ranks of a reduce).
    ``*_sources[r][i]`` is a bit mask of the ranks whose data reached element i
    (bit j set: rank j contributed), found by running the same collective on
    the value 2**rank.
    """

    name: str
    world_size: int
    root: int
    before: list
    after: list
    before_sources: list
    after_sources: list


def sources(mask: int) -> list[int]:
    """The ranks whose bits are set in ``mask``."""
    return [j for j in range(int(mask).bit_length()) if mask >> j & 1]


def _demo_rank(name: str, k: int, root: int):
    rank = dist.get_rank()
    base = 10 if numels(name, k, dist.get_world_size())[0] <= 10 else 100
    inp, out = buffers(name, k, fill=lambda m: base * rank + torch.arange(m))
    before = inp.clone()
    collective(name, inp, out, root)
    # The same collective on 2**rank: sums of distinct powers of two are bit masks.
    m_in, m_out = buffers(name, k, torch.int64, fill=lambda m: torch.full((m,), 2**rank))
    m_before = m_in.clone()
    collective(name, m_in, m_out, root)
    undefined = name == "reduce" and rank != root
    return before, None if undefined else out, m_before, None if undefined else m_out


def run_collective(
    name: str, world_size: int, k: int | None = None, root: int = 0, **run_kwargs
) -> CollectiveDemo:
    """Run collective ``name`` on ``world_size`` ranks; return every rank's data before/after.

    ``k`` is the full array's element count (default: 2 elements per rank for
    N ≤ 4, else 1); rank r starts with the values 10·r + 0, 1, 2, ... so that
    sums can still be read.
    """
    _check_name(name)
    if k is None:
        k = world_size * (2 if world_size <= 4 else 1)
    if not 0 <= root < world_size:
        raise ValueError(f"root must be a rank in 0..{world_size - 1}, got {root}")
    numels(name, k, world_size)  # fail here, not in every rank
    results = launch.run(_demo_rank, world_size, name, k, root, **run_kwargs)
    before, after, before_src, after_src = (list(x) for x in zip(*results))
    return CollectiveDemo(name, world_size, root, before, after, before_src, after_src)


# ----------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    """Seconds per call of one collective at several sizes, on ``world_size`` ranks."""

    name: str
    world_size: int
    backend: str
    nbytes: list  # S: the full array's bytes, per size
    seconds: list  # per call: the median over batches (a batch takes as long as its slowest rank)
    fastest: list | None = None  # the best batch: the least disturbed by other programs
    slowest: list | None = None  # the worst batch

    @property
    def algbw(self) -> list[float]:
        return [bandwidth(self.name, s, t, self.world_size)[0] for s, t in zip(self.nbytes, self.seconds)]

    @property
    def busbw(self) -> list[float]:
        return [bandwidth(self.name, s, t, self.world_size)[1] for s, t in zip(self.nbytes, self.seconds)]

    def table(self) -> str:
        """A small text table in the style of nccl-tests' output."""
        spread = self.fastest is not None and self.slowest is not None
        lines = [
            f"{self.name} on N={self.world_size} ranks ({self.backend}), "
            f"busbw = algbw × {bus_factor(self.name, self.world_size):.3g}",
            f"{'size':>10} {'time (ms)':>10} {'algbw (GB/s)':>13} {'busbw (GB/s)':>13}"
            + (f" {'best–worst batch (ms)':>22}" if spread else ""),
        ]
        for i, (s, t, a, b) in enumerate(zip(self.nbytes, self.seconds, self.algbw, self.busbw)):
            row = f"{format_bytes(s):>10} {t * 1e3:>10.3f} {a / 1e9:>13.3f} {b / 1e9:>13.3f}"
            if spread:
                row += f" {f'{self.fastest[i] * 1e3:.3f}–{self.slowest[i] * 1e3:.3f}':>22}"
            lines.append(row)
        return "\n".join(lines)


def sync_device(dev: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures it (nothing to wait for on the CPU)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def slowest_rank(seconds: float | Sequence[float]) -> float | list[float]:
    """The largest value over all ranks: a collective is done when its last rank is.

    ``seconds`` is one number, or a list (one per batch: the maximum is taken element-wise).
    """
    single = not isinstance(seconds, (list, tuple))
    t = torch.tensor([seconds] if single else list(seconds), dtype=torch.float64, device=launch.device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0]) if single else t.tolist()


def time_calls(
    calls: dict,
    make_args: Callable[[int], tuple],
    sizes: list,
    min_seconds: float,
    batches: int,
    max_iters: int = 100,
    spread: dict | None = None,
) -> tuple[list[int], dict[str, list[float]], str]:
    """Inside a rank: seconds per call of each ``calls[name](*make_args(k))``, per size.

    Per size S: one warm-up call (first calls set up connections), an estimate that sets the
    number of calls per batch, then ``batches`` batches taking turns between the names, so a busy
    moment of a shared laptop hits all alike. Every batch starts at a barrier and lasts as long
    as its slowest rank; the result is the median batch. ``spread``, when given a dict, receives
    ``spread[name]`` = [(best batch, worst batch) per size].
    Returns (bytes per size, {name: seconds per size}, backend).
    """
    n, dev = dist.get_world_size(), launch.device()
    seconds = {name: [] for name in calls}
    measured_bytes = []
    for nbytes in sizes:
        k = max(n, nbytes // 4 // n * n)  # float32, a multiple of N so chunks are equal
        args = make_args(k)
        iters = {}
        for name, call in calls.items():
            call(*args)
            estimate = math.inf
            for _ in range(2):  # the better of two: one call can land on a busy moment
                sync_device(dev)
                start = time.perf_counter()
                call(*args)
                sync_device(dev)
                estimate = min(estimate, time.perf_counter() - start)
            estimate = slowest_rank(estimate)
            iters[name] = max(1, min(max_iters, math.ceil(min_seconds / batches / max(estimate, 1e-9))))
        means = {name: [] for name in calls}
        for _ in range(batches):
            for name, call in calls.items():
                dist.barrier()
                start = time.perf_counter()
                for _ in range(iters[name]):
                    call(*args)
                sync_device(dev)
                means[name].append((time.perf_counter() - start) / iters[name])
        for name in calls:
            per_batch = slowest_rank(means[name])
            seconds[name].append(statistics.median(per_batch))
            if spread is not None:
                spread.setdefault(name, []).append((min(per_batch), max(per_batch)))
        measured_bytes.append(k * 4)
    return measured_bytes, seconds, dist.get_backend()


def _time_rank(name: str, sizes: list, min_seconds: float, max_iters: int, batches: int):
    spread = {}
    nbytes, seconds, backend = time_calls(
        {name: functools.partial(collective, name)},
        functools.partial(buffers, name),
        sizes,
        min_seconds,
        batches,
        max_iters,
        spread,
    )
    return nbytes, seconds[name], backend, spread[name]


def time_collective(
    name: str,
    world_size: int,
    sizes: Iterable[int],
    min_seconds: float = 0.1,
    max_iters: int = 100,
    batches: int = 7,
    **run_kwargs,
) -> Timing:
    """Time collective ``name`` on ``world_size`` ranks for each size S in bytes (float32).

    Each size runs for about ``min_seconds`` after one warm-up call, in ``batches`` batches of
    up to ``max_iters`` calls. A batch lasts as long as its slowest rank; ``seconds`` is the
    median batch's time per call, ``fastest`` and ``slowest`` the best and worst batch.
    """
    _check_name(name)
    results = launch.run(
        _time_rank, world_size, name, list(sizes), min_seconds, max_iters, batches, **run_kwargs
    )
    nbytes, seconds, backend, spread = results[0]
    return Timing(
        name, world_size, backend, nbytes, seconds, [lo for lo, _ in spread], [hi for _, hi in spread]
    )


def time_collectives(
    names: Sequence[str],
    world_size: int,
    sizes: Iterable[int],
    min_seconds: float = 0.05,
    batches: int = 7,
    **run_kwargs,
) -> dict:
    """Time several collectives in one launch, taking turns batch by batch: name -> :class:`Timing`."""
    for name in names:
        _check_name(name)
    results = launch.run(
        _time_many_rank, world_size, list(names), list(sizes), min_seconds, batches, **run_kwargs
    )
    nbytes, seconds, backend, spread = results[0]
    return {
        name: Timing(
            name,
            world_size,
            backend,
            nbytes[name],
            seconds[name],
            [lo for lo, _ in spread[name]],
            [hi for _, hi in spread[name]],
        )
        for name in names
    }


def _time_many_rank(names: list, sizes: list, min_seconds: float, batches: int):
    # Each collective needs its own buffers, so time each on its own, size by size.
    nbytes, seconds, spread = {}, {}, {}
    for name in names:
        one_spread = {}
        nb, sec, backend = time_calls(
            {name: functools.partial(collective, name)},
            functools.partial(buffers, name),
            sizes,
            min_seconds,
            batches,
            spread=one_spread,
        )
        nbytes[name], seconds[name], spread[name] = nb, sec[name], one_spread[name]
    return nbytes, seconds, backend, spread


#: The α–β prediction for each collective's usual algorithm (``model``: an
#: :class:`~course_lib.alpha_beta.AlphaBeta`): (formula, seconds(model, N, S)).
PREDICTIONS = {
    "send/recv": ("α + S/β", lambda model, n, s: model.message(s)),
    "all-reduce": ("ring: 2(N−1)·(α + S/(N·β))", lambda model, n, s: model.ring_all_reduce(n, s)),
    "all-gather": ("ring: (N−1)·(α + S/(N·β))", lambda model, n, s: model.ring_all_gather(n, s)),
    "all-to-all": ("pairwise: (N−1)·(α + S/(N·β))", lambda model, n, s: model.ring_all_gather(n, s)),
    "broadcast": ("tree: ⌈log₂N⌉·(α + S/β)", lambda model, n, s: model.tree(n, s)),
}


def predict(model: AlphaBeta, timing: Timing) -> list | None:
    """α–β predicted seconds per size for a :class:`Timing` (None for a collective without one)."""
    if timing.name not in PREDICTIONS:
        return None
    return [PREDICTIONS[timing.name][1](model, timing.world_size, s) for s in timing.nbytes]


# ----------------------------------------------------------------------------
# bytes on the wire: what each rank really sent and received, beside the busbw factor


@dataclass
class WireBytes:
    """Bytes each rank's TCP sockets moved during one call of collective ``name`` (gloo only)."""

    name: str
    world_size: int
    nbytes: int  # S, the full array
    sent: list  # per rank
    received: list  # per rank

    @property
    def busiest(self) -> float:
        """The busiest link direction, in units of S: max over ranks of bytes sent or received / S."""
        return max(max(self.sent), max(self.received)) / self.nbytes


def _wire_rank(names: list, k: int, root: int):
    if launch.device().type != "cpu":
        return None  # the tensors travel over NCCL, whose bytes no socket counter sees
    out = {}
    for name in names:
        inp, o = buffers(name, k)
        collective(name, inp, o, root)  # the first call sets up connections: not counted
        counts = []
        for _ in range(2):  # the fewer bytes of two calls: a stray late packet is not the algorithm's
            dist.barrier()
            with count_traffic() as traffic:
                collective(name, inp, o, root)
            dist.barrier()
            counts.append((traffic.sent, traffic.received))
        out[name] = (
            None if counts[0][0] is None else min(c[0] for c in counts),
            None if counts[0][1] is None else min(c[1] for c in counts),
        )
    return out


def wire_bytes(
    names: Sequence[str], world_size: int, nbytes: int, root: int = 0, **run_kwargs
) -> dict | None:
    """Count the TCP bytes every rank moves in one call of each collective: name -> :class:`WireBytes`.

    None where they cannot be read (NCCL's traffic, or not Linux).
    """
    for name in names:
        _check_name(name)
    k = max(world_size, nbytes // 4 // world_size * world_size)
    results = launch.run(_wire_rank, world_size, list(names), k, root, **run_kwargs)
    if any(r is None or any(sent is None for sent, _ in r.values()) for r in results):
        return None
    return {
        name: WireBytes(name, world_size, k * 4, [r[name][0] for r in results], [r[name][1] for r in results])
        for name in names
    }


# ----------------------------------------------------------------------------
# broadcast from send/recv, traced: how many rounds of messages?


def flat_broadcast(tensor: torch.Tensor, src: int = 0) -> None:
    """The root sends the whole tensor to each other rank in turn: N−1 messages from one rank."""
    rank, n = dist.get_rank(), dist.get_world_size()
    if rank == src:
        for dst in range(n):
            if dst != src:
                dist.send(tensor, dst)
    else:
        dist.recv(tensor, src)


def tree_broadcast(tensor: torch.Tensor, src: int = 0) -> None:
    """A binomial tree: every rank that has the data sends it on, so the holders double each round.

    Ranks relative to the root, ``me = (rank − src) mod N``. In the round of distance d = 1, 2,
    4, …: a holder (me < d) sends to me + d, and ranks d … 2d−1 receive: ⌈log₂N⌉ rounds in all.
    """
    rank, n = dist.get_rank(), dist.get_world_size()
    me, distance = (rank - src) % n, 1
    while distance < n:
        if me < distance and me + distance < n:
            dist.send(tensor, (me + distance + src) % n)
        elif distance <= me < 2 * distance:
            dist.recv(tensor, (me - distance + src) % n)
        distance *= 2


#: Broadcasts by name, all called as ``fn(tensor, src)``.
BROADCASTS = {
    "tree": tree_broadcast,
    "flat": flat_broadcast,
    "dist.broadcast": lambda tensor, src=0: dist.broadcast(tensor, src),
}


@contextlib.contextmanager
def trace_point_to_point() -> Iterator[list[tuple[str, int, int]]]:
    """Record this rank's send/recv/isend/irecv calls, in order, as ``(op, peer, bytes)``."""
    events, depth = [], [0]  # a call made inside a traced call (recv uses irecv) is not recorded

    def wrap(op, original):
        @functools.wraps(original)
        def traced(*args, **kwargs):
            if not depth[0]:
                tensor = args[0] if args else kwargs["tensor"]
                peer = args[1] if len(args) > 1 else kwargs.get("dst", kwargs.get("src"))
                events.append((op, int(peer), tensor.numel() * tensor.element_size()))
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1

        return traced

    undo = dist_calls.replace_dist_functions(
        {op: wrap(op, getattr(dist, op)) for op in ("send", "recv", "isend", "irecv")}
    )
    try:
        yield events
    finally:
        undo()


def message_rounds(traces: list) -> list:
    """Every message of a traced program with the round it arrives in: [(src, dst, bytes, round)].

    ``traces[r]`` is rank r's ``(op, peer, bytes)`` list, in order (:func:`trace_point_to_point`).
    The α–β model's view: every message takes one round; a rank sends one message at a time and
    receives one at a time (it may do both at once); a blocking send or a recv waits for its
    message. The k-th message from a to b is the k-th recv on b from a.
    """
    n = len(traces)
    clock, out_port, in_port, done = [0] * n, [0] * n, [0] * n, [0] * n
    in_flight = collections.defaultdict(collections.deque)  # (src, dst) -> round each was sent in
    messages = []
    progress = True
    while progress:
        progress = False
        for r in range(n):
            while done[r] < len(traces[r]):
                op, peer, nbytes = traces[r][done[r]]
                if op in ("send", "isend"):
                    out_port[r] = max(clock[r], out_port[r]) + 1
                    in_flight[r, peer].append(out_port[r])
                    if op == "send":
                        clock[r] = out_port[r]
                else:
                    if not in_flight[peer, r]:
                        break  # its message is not sent yet: come back to this rank later
                    arrival = max(in_flight[peer, r].popleft(), in_port[r] + 1)
                    in_port[r] = arrival
                    clock[r] = max(clock[r], arrival)
                    messages.append((peer, r, nbytes, arrival))
                done[r] += 1
                progress = True
    stuck = [r for r in range(n) if done[r] < len(traces[r])]
    if stuck:
        r = stuck[0]
        raise ValueError(f"rank {r} waits for a message nobody sends: {traces[r][done[r]]}")
    return sorted(messages, key=lambda m: (m[3], m[0], m[1]))


def count_rounds(traces: list) -> int:
    """The round in which a traced program's last message arrives (see :func:`message_rounds`):
    how many α's it pays one after another."""
    return max((m[3] for m in message_rounds(traces)), default=0)


def _trace_rank(algorithms: list, k: int, src: int):
    traces = {}
    for algorithm in algorithms:
        tensor = torch.full((k,), float(dist.get_rank() == src), device=launch.device())
        with trace_point_to_point() as events:
            BROADCASTS[algorithm](tensor, src)
        if not bool((tensor == 1).all()):
            raise AssertionError(f"the {algorithm} broadcast did not reach rank {dist.get_rank()}")
        traces[algorithm] = events
    return traces


def trace_broadcast(
    algorithm: str | Sequence[str], world_size: int, k: int = 4, src: int = 0, **run_kwargs
) -> list | dict[str, list]:
    """Run a send/recv broadcast ("tree" or "flat") on ``world_size`` ranks and return every rank's
    traced messages (a list per rank). ``algorithm`` may also be a tuple of names, run one after
    the other in the same launch: then a dict name -> traces."""
    names = (algorithm,) if isinstance(algorithm, str) else tuple(algorithm)
    for name in names:
        if name not in ("tree", "flat"):
            raise ValueError(f"only the send/recv broadcasts can be traced: 'tree' or 'flat', not {name!r}")
    per_rank = launch.run(_trace_rank, world_size, list(names), k, src, **run_kwargs)
    traces = {name: [r[name] for r in per_rank] for name in names}
    return traces[algorithm] if isinstance(algorithm, str) else traces


def _one_zero_tensor(k: int):
    """Arguments of an in-place algorithm timed at K elements: one array it overwrites."""
    return (torch.zeros(k, device=launch.device()),)


def _time_algorithms_rank(calls: dict, sizes: list, min_seconds: float, batches: int):
    spread = {}
    nbytes, seconds, backend = time_calls(calls, _one_zero_tensor, sizes, min_seconds, batches, spread=spread)
    return nbytes, seconds, backend, spread


def time_algorithms(
    kind: str,
    calls: dict,
    world_size: int,
    sizes: Iterable[int],
    min_seconds: float,
    batches: int,
    **run_kwargs,
) -> dict:
    """Time several in-place algorithms ``calls[name](tensor)`` for one collective ``kind``, taking
    turns on the same ranks: name -> :class:`Timing`, the median batch with the fastest and slowest
    beside it."""
    names = list(calls)
    nbytes, seconds, backend, spread = launch.run(
        _time_algorithms_rank, world_size, calls, list(sizes), min_seconds, batches, **run_kwargs
    )[0]
    return {
        name: Timing(
            kind,
            world_size,
            backend,
            nbytes,
            seconds[name],
            [lo for lo, _ in spread[name]],
            [hi for _, hi in spread[name]],
        )
        for name in names
    }


def time_broadcasts(
    world_size: int,
    sizes: Iterable[int],
    names: Iterable[str] = ("tree", "flat", "dist.broadcast"),
    min_seconds: float = 0.05,
    batches: int = 7,
    **run_kwargs,
) -> dict:
    """Time broadcasts (keys of :data:`BROADCASTS`) from rank 0, taking turns: name -> :class:`Timing`."""
    calls = {name: functools.partial(BROADCASTS[name], src=0) for name in names}
    return time_algorithms("broadcast", calls, world_size, sizes, min_seconds, batches, **run_kwargs)
