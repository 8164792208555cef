"""The latency–bandwidth (α–β) time model: fitted to your own measurements in chapter 01, then
used wherever the course predicts a time (rings vs trees in 03, plans in 09, nodes in 10).

    pp = alpha_beta.measure_point_to_point([4, 4096, 65536, 1 << 20, 4 << 20])
    model = alpha_beta.fit(pp.nbytes, pp.seconds)   # model.alpha (s), model.beta (bytes/s)
    model.ring_all_reduce(4, 16 << 20)                # predicted seconds, beside a measurement

On a shared machine, fit ``pp.fastest`` (the best of several batches: other programs only ever
add time) rather than ``pp.seconds`` (the median batch); chapter 01 does.

One message of S bytes takes t(S) = α + S/β: α is the fixed cost of any message (software, the
operating system, the wire's latency), β the bandwidth of the link. An algorithm that sends
``rounds`` messages one after another, each of S bytes, takes rounds·α + rounds·S/β.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from course_lib import launch


@dataclass(frozen=True)
class AlphaBeta:
    """t(S) = alpha + S / beta for one message of S bytes."""

    alpha: float  # seconds per message
    beta: float  # bytes per second

    def message(self, nbytes: float) -> float:
        """Seconds for one message of ``nbytes``."""
        return self.alpha + nbytes / self.beta

    def rounds(self, rounds: int, nbytes_per_round: float) -> float:
        """Seconds for ``rounds`` messages in a row, each of ``nbytes_per_round``."""
        return rounds * self.message(nbytes_per_round)

    def ring_all_reduce(self, n: int, nbytes: float) -> float:
        """2(N−1)α + 2(N−1)/N·S/β: a reduce-scatter then an all-gather, N−1 rounds each."""
        return 0.0 if n == 1 else self.rounds(2 * (n - 1), nbytes / n)

    def ring_all_gather(self, n: int, nbytes: float) -> float:
        """(N−1)α + (N−1)/N·S/β, S the full array's bytes (reduce-scatter costs the same)."""
        return 0.0 if n == 1 else self.rounds(n - 1, nbytes / n)

    ring_reduce_scatter = ring_all_gather

    def tree(self, n: int, nbytes: float) -> float:
        """⌈log₂N⌉(α + S/β): a binomial-tree broadcast or reduce of the whole array."""
        return self.rounds(math.ceil(math.log2(n)) if n > 1 else 0, nbytes)

    def chain(self, n: int, nbytes: float) -> float:
        """(N−1)(α + S/β): the whole array passed along a chain of N ranks."""
        return self.rounds(n - 1, nbytes)

    def describe(self) -> str:
        return f"α = {self.alpha * 1e6:.0f} µs per message, β = {self.beta / 1e9:.3g} GB/s"


def fit(nbytes: Sequence[float], seconds: Sequence[float], small_bytes: int = 4096) -> AlphaBeta:
    """Fit t(S) = α + S/β to measured one-message times.

    α comes from the small messages (the median time of those of at most ``small_bytes``:
    there, S/β is negligible); β from the large ones, by least squares of t − α = S/β over the
    messages whose S/β is at least half the time (where bandwidth, not latency, dominates).
    Robust to one slow measurement at either end; raises when the sizes cannot separate the two.
    """
    points = sorted(zip(nbytes, seconds))
    if len(points) < 2:
        raise ValueError("fit needs at least two sizes")
    small = [t for s, t in points if s <= small_bytes] or [points[0][1]]
    alpha = statistics.median(small)
    large = [(s, t - alpha) for s, t in points if t - alpha >= 0.5 * t and s > small_bytes]
    if not large:  # no size was bandwidth-bound: use the largest anyway
        large = [(s, t - alpha) for s, t in points[-1:]]
    excess = sum(s * d for s, d in large)
    if excess <= 0:
        raise ValueError(
            "the largest messages were no slower than the smallest: measure larger sizes to see the bandwidth"
        )
    beta = sum(s * s for s, _ in large) / excess
    return AlphaBeta(alpha, beta)


@dataclass
class PointToPoint:
    """One-way seconds per message of each size: the median over batches, and the spread."""

    nbytes: list
    seconds: list  # median of batch means
    fastest: list  # the best batch mean
    slowest: list  # the worst batch mean

    def table(self) -> str:
        from course_lib.collectives import format_bytes

        lines = [f"{'size':>10} {'median (µs)':>12} {'best (µs)':>10} {'worst (µs)':>11}"]
        for s, t, lo, hi in zip(self.nbytes, self.seconds, self.fastest, self.slowest):
            lines.append(f"{format_bytes(s):>10} {t * 1e6:>12.1f} {lo * 1e6:>10.1f} {hi * 1e6:>11.1f}")
        return "\n".join(lines)


def _ping_pong(sizes: list, min_seconds: float, batches: int, max_iters: int, batch_scheduling: bool = False):
    """Ranks 0 and 1 bounce a message; one-way time = round trip / 2 (other ranks idle).

    The sizes take turns, batch by batch, so that a busy moment of a shared machine hits
    all sizes alike rather than spoiling every batch of one size. With ``batch_scheduling``
    every thread of the rank runs as SCHED_BATCH meanwhile (:func:`launch.threads_as_batch`).
    """
    if batch_scheduling and launch.device().type == "cpu":
        with launch.threads_as_batch():
            return _ping_pong(sizes, min_seconds, batches, max_iters)
    rank, dev = dist.get_rank(), launch.device()
    bufs = [torch.zeros(max(1, nbytes // 4), dtype=torch.float32, device=dev) for nbytes in sizes]

    def bounce(buf):
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)
            dist.send(buf, 0)

    def timed(buf, iters: int) -> float:
        """Seconds per round trip over ``iters`` bounces, as rank 0 saw them (all ranks agree)."""
        dist.barrier()
        _sync(dev)
        start = time.perf_counter()
        for _ in range(iters):
            bounce(buf)
        _sync(dev)  # NCCL only queues the messages: wait for them
        took = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64, device=dev)
        dist.broadcast(took, 0)
        return float(took)

    iters = []
    for buf in bufs:
        bounce(buf)  # the first message of a size sets up buffers
        estimate = min(timed(buf, 1), timed(buf, 1))  # the better of two single round trips
        iters.append(max(1, min(max_iters, math.ceil(min_seconds / batches / max(estimate, 1e-9)))))
    means = [[] for _ in sizes]
    for _ in range(batches):
        for i, buf in enumerate(bufs):
            means[i].append(timed(buf, iters[i]) / 2)
    return [(buf.numel() * 4, statistics.median(m), min(m), max(m)) for buf, m in zip(bufs, means)]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure_point_to_point(
    sizes: Iterable[int],
    world_size: int = 2,
    min_seconds: float = 0.1,
    batches: int = 7,
    max_iters: int = 200,
    batch_scheduling: bool = False,
    **run_kwargs,
) -> PointToPoint:
    """Time one send/recv of each size (bytes, float32) between ranks 0 and 1 of a launch.

    ``batch_scheduling``: on CPU, the ranks' threads run as Linux's SCHED_BATCH while they
    measure, so that no woken gloo thread preempts the rank it serves (issue 21). On one day
    ranks run as SCHED_BATCH throughout gave a steady α (69–79 µs over five runs, against
    87–156 µs with the default policy); on another, this switch gave 43–72 µs against the
    default's 48–77 µs, no steadier. ``benchmarks/bench_alpha_beta.py`` compares the two."""
    if world_size < 2:
        raise ValueError("a point-to-point message needs at least 2 ranks")
    rows = launch.run(
        _ping_pong, world_size, list(sizes), min_seconds, batches, max_iters, batch_scheduling, **run_kwargs
    )[0]
    nbytes, seconds, fastest, slowest = (list(x) for x in zip(*rows))
    return PointToPoint(nbytes, seconds, fastest, slowest)
