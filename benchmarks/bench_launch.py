"""How long does `course_lib.launch.run` take? (cold start, then warm launches)

Goal from the course's launcher issue: a warm launch of 4 ranks well under a second.
"""

import statistics
import time

import torch
import torch.distributed as dist

from course_lib.launch import run


def tiny_all_reduce():
    t = torch.ones(1)
    dist.all_reduce(t)
    return t.item()


def timed(n):
    start = time.perf_counter()
    run(tiny_all_reduce, n)
    return time.perf_counter() - start


def main():
    cold = timed(2)
    print(f"cold first launch (starts the forkserver, on Linux a fork of this process): {cold:.2f} s")
    print(f"{'ranks':>5}  {'median warm launch':>18}  {'min':>7}  {'max':>7}")
    for n in (1, 2, 4, 8):
        times = [timed(n) for _ in range(10)]
        print(f"{n:>5}  {statistics.median(times):>16.3f} s  {min(times):>5.3f} s  {max(times):>5.3f} s")
        if n == 4:
            warm4 = statistics.median(times)
    verdict = "meets" if warm4 < 0.5 else "MISSES"
    print(f"warm launch of 4 ranks: {warm4:.3f} s ({verdict} the goal of well under 1 s)")


if __name__ == "__main__":
    main()
