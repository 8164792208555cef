"""Our ring all-reduce (send/recv from Python) against the backend's own `dist.all_reduce`.

Bus bandwidth for S = 4 KiB … 64 MiB on N = 2 and 4 ranks, and the ratio ring/built-in.
Goal from the course's chapter-03 issue: at least 0.9× of the built-in at S ≥ 16 MiB.
Both run in the same ranks, taking turns batch by batch, so a busy moment of a
shared machine hits both alike.
"""

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from course_lib import comm, launch
from course_lib.collectives import format_bytes

SIZES = [4 * 1024 * 4**i for i in range(8)]  # 4 KiB, 16 KiB, ..., 64 MiB
GOAL, LARGE = 0.9, 16 * 2**20


def cpu_ms_rank(sizes, reps=7):
    """Median CPU time per call of this rank's process (all its threads): the work, without the waiting."""
    result = {}
    for nbytes in sizes:
        tensor = torch.zeros(nbytes // 4)
        for name in ("ring", "dist.all_reduce"):
            comm.ALL_REDUCES[name](tensor)
            times = []
            for _ in range(reps):
                dist.barrier()
                start = time.process_time()
                comm.ALL_REDUCES[name](tensor)
                times.append(time.process_time() - start)
            result[nbytes, name] = statistics.median(times) * 1e3
    return result


def main(world_sizes=(2, 4), rounds=5):
    start = time.perf_counter()
    print(
        f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
        "(other processes on the machine make every figure noisy)"
    )
    verdicts = []
    for n in world_sizes:
        timings = comm.time_all_reduce(n, SIZES, min_seconds=0.2, batches=5)
        ring, builtin = timings["ring"], timings["dist.all_reduce"]
        print(f"\nall-reduce on N={n} ranks ({builtin.backend}); busbw = S/t × 2(N−1)/N")
        print(
            f"{'S':>9} {'ring ms':>9} {'built-in ms':>12} {'ring GB/s':>10} {'built-in GB/s':>14} {'ratio':>6}"
        )
        for s, tr, tb, br, bb in zip(ring.nbytes, ring.seconds, builtin.seconds, ring.busbw, builtin.busbw):
            print(
                f"{format_bytes(s):>9} {tr * 1e3:>9.3f} {tb * 1e3:>12.3f} {br / 1e9:>10.3f} "
                f"{bb / 1e9:>14.3f} {br / bb:>6.2f}"
            )
        # The goal sizes again, in several independent rounds: one round can be hit by a busy moment.
        large = [s for s in SIZES if s >= LARGE]
        ratios = {s: [] for s in large}
        for _ in range(rounds):
            again = comm.time_all_reduce(n, large, min_seconds=0.3, batches=5)
            for s, br, bb in zip(large, again["ring"].busbw, again["dist.all_reduce"].busbw):
                ratios[s].append(br / bb)
        cpu = launch.run(cpu_ms_rank, n, large)
        for s in large:
            ring_cpu = statistics.mean(c[s, "ring"] for c in cpu)
            builtin_cpu = statistics.mean(c[s, "dist.all_reduce"] for c in cpu)
            median = statistics.median(ratios[s])
            print(
                f"{format_bytes(s)}: ratio over {rounds} rounds: median {median:.2f} "
                f"(range {min(ratios[s]):.2f}–{max(ratios[s]):.2f}); CPU time per call (mean of ranks): "
                f"ring {ring_cpu:.1f} ms, built-in {builtin_cpu:.1f} ms"
            )
            verdicts.append((n, s, median))
    print()
    for n, s, median in verdicts:
        print(
            f"N={n}, S={format_bytes(s)}: ring/built-in busbw, median of rounds: {median:.2f} "
            f"({'meets' if median >= GOAL else 'MISSES'} the goal of ≥ {GOAL})"
        )
    print(f"load average after: {os.getloadavg()[0]:.1f}; ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main(tuple(int(a) for a in sys.argv[1:]) or (2, 4))
