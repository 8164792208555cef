"""Chapter 01: the collectives, run on N ranks, looked at, and timed.

    from course_lib import collectives, viz
    demo = collectives.run_collective("all-gather", 4)   # every rank's data before/after
    viz.plot_collective(demo)
    timing = collectives.time_collective("all-reduce", 4, [4096, 65536])
    viz.plot_timing([timing])

Sizes follow nccl-tests: K is the number of elements of the *full* array and
S = K·(bytes per element). All-gather starts from K/N elements per rank and ends
with K; reduce-scatter starts from K and ends with K/N; all-to-all sends and
receives K per rank; the rest keep K elements per rank.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from course_lib import launch

#: Every collective this chapter runs, in the order the lesson meets them.
COLLECTIVES = ("send/recv", "broadcast", "reduce", "all-reduce",
               "all-gather", "reduce-scatter", "all-to-all")
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


def buffers(name: str, k: int, dtype=torch.float32, fill=None):
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
    m_in, m_out = buffers(name, k, torch.int64, fill=lambda m: torch.full((m,), 2 ** rank))
    m_before = m_in.clone()
    collective(name, m_in, m_out, root)
    undefined = name == "reduce" and rank != root
    return before, None if undefined else out, m_before, None if undefined else m_out


def run_collective(name: str, world_size: int, k: int | None = None, root: int = 0,
                   **run_kwargs) -> CollectiveDemo:
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
    seconds: list  # per call: the slowest rank's (median of batch means)

    @property
    def algbw(self) -> list[float]:
        return [bandwidth(self.name, s, t, self.world_size)[0] for s, t in zip(self.nbytes, self.seconds)]

    @property
    def busbw(self) -> list[float]:
        return [bandwidth(self.name, s, t, self.world_size)[1] for s, t in zip(self.nbytes, self.seconds)]

    def table(self) -> str:
        """A small text table in the style of nccl-tests' output."""
        lines = [f"{self.name} on N={self.world_size} ranks ({self.backend}), "
                 f"busbw = algbw × {bus_factor(self.name, self.world_size):.3g}",
                 f"{'size':>10} {'time (ms)':>10} {'algbw (GB/s)':>13} {'busbw (GB/s)':>13}"]
        for s, t, a, b in zip(self.nbytes, self.seconds, self.algbw, self.busbw):
            lines.append(f"{format_bytes(s):>10} {t * 1e3:>10.3f} {a / 1e9:>13.3f} {b / 1e9:>13.3f}")
        return "\n".join(lines)


def format_bytes(nbytes: float) -> str:
    """4096 -> '4 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:g} {unit}"
        nbytes /= 1024


def sync_device(dev: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures it (nothing to wait for on the CPU)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def slowest_rank(seconds: float) -> float:
    """The largest value over all ranks: a collective is done when its last rank is."""
    t = torch.tensor([seconds], dtype=torch.float64, device=launch.device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def time_calls(calls: dict, make_args, sizes: list, min_seconds: float, batches: int,
               max_iters: int = 100):
    """Inside a rank: seconds per call of each ``calls[name](*make_args(k))``, per size.

    Per size S: one warm-up call (first calls set up connections), an estimate that sets the
    number of calls per batch, then ``batches`` batches taking turns between the names, so a busy
    moment of a shared laptop hits all alike. A rank's time is the median of its batch means; the
    result is the slowest rank's (a collective is done when its last rank is).
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
            sync_device(dev)
            start = time.perf_counter()
            call(*args)
            sync_device(dev)
            estimate = slowest_rank(time.perf_counter() - start)
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
            seconds[name].append(slowest_rank(sorted(means[name])[batches // 2]))
        measured_bytes.append(k * 4)
    return measured_bytes, seconds, dist.get_backend()


def _time_rank(name: str, sizes: list, min_seconds: float, max_iters: int, batches: int):
    nbytes, seconds, backend = time_calls({name: functools.partial(collective, name)},
                                          functools.partial(buffers, name), sizes, min_seconds,
                                          batches, max_iters)
    return nbytes, seconds[name], backend


def time_collective(name: str, world_size: int, sizes, min_seconds: float = 0.1,
                    max_iters: int = 100, batches: int = 5, **run_kwargs) -> Timing:
    """Time collective ``name`` on ``world_size`` ranks for each size S in bytes (float32).

    Each size runs for about ``min_seconds`` after one warm-up call, in
    ``batches`` loops of up to ``max_iters`` calls. A rank's time per call is
    the median of its loops' means; the result is the slowest rank's.
    """
    _check_name(name)
    results = launch.run(_time_rank, world_size, name, list(sizes), min_seconds, max_iters, batches,
                         **run_kwargs)
    nbytes, seconds, backend = results[0]
    return Timing(name, world_size, backend, nbytes, seconds)
