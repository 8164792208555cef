"""Our ring all-reduce (send/recv from Python) against gloo's own `dist.all_reduce` (issue 21).

Goals, N = 2 and 4 ranks, every figure a median over interleaved rounds (ours and gloo's
take turns inside one launch, so a busy moment of a shared machine hits both alike), and
every ratio from one run:

* median time per call at S = 4 KiB … 256 KiB within 1.5× of gloo's;
* bus bandwidth ≥ 1.0× gloo's at 16 MiB and 64 MiB;
* CPU time per call (the whole process: Python thread and gloo's threads) ≤ 1.1× gloo's at 16 MiB.

Before each table it prints the figures issue 21 measured for the ring as it was, and the
machine's load average (`uptime`) beside every measurement. Beside each goal it prints what
explains it: one ring step (`comm.ring_step`, the unit the ring repeats) and how many steps a
call costs; the same ring without its header message (the shape check that turns a neighbour
holding another tensor into a clear error); the same ring waiting with the default scheduling
policy (our all-reduces switch their rank's threads to SCHED_BATCH for the call, see
`ring_allreduce._waiting_as_batch`); at 16 and 64 MiB the floor — the ring's bytes alone, all
its messages posted at once with no additions and no step waiting for the one before — so
both all-reduces can be compared with what the transport allows; and the CPU each thread
spends per call. The goals are judged on the default launch, as the lessons run.
`python benchmarks/bench_ring.py 2` runs N = 2 only.
"""

import contextlib
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from course_lib import collectives, comm, launch, ring_allreduce
from course_lib.units import format_bytes

SMALL = [4 << 10, 16 << 10, 64 << 10, 256 << 10]
LARGE = [16 << 20, 64 << 20]
SMALL_GOAL, BUSBW_GOAL, CPU_GOAL = 1.5, 1.0, 1.1

#: Issue 21's figures for the ring before this change (quiet 2-core machine).
BEFORE = """\
Before (issue 21, the ring as it was; quiet 2-core machine):
| N, size   | ours, median | gloo all_reduce, median | ours, best  | gloo, best  |
| 2, 16 KiB | 3.1–5.9 ms   | 0.38–0.42 ms            | 0.65 ms     | 0.28 ms     |
| 4, 16 KiB | 5.1–7.7 ms   | 4.5–5.5 ms              | 1.5–2.0 ms  | 1.0–1.7 ms  |
| 2, 16 MiB | busbw ratio 0.80 (range 0.70–0.90); CPU per call 16.2 ms vs 8.4 ms (1.93×) |
| 4, 16 MiB | busbw ratio 0.85 (range 0.77–1.11)                                       |"""

NAMES = ("ring", "dist.all_reduce")  # what the CPU goal compares


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f} (5 min {five:.1f}) on {os.cpu_count()} CPUs"


class _RingWithoutHeader(ring_allreduce._RingCall):
    """The same ring without its shape check: no header message (measures what the check costs;
    a neighbour holding another shape would hang it, so only here)."""

    def _exchange_headers(self) -> None:
        pass  # check() then has nothing to wait for


def _ring_without_header(tensor):
    with ring_allreduce._waiting_as_batch(tensor):
        ring, flat = _RingWithoutHeader(tensor, None, "ring without header"), tensor.view(-1)
        ring_allreduce._reduce_scatter(flat, ring)
        ring_allreduce._all_gather(flat, ring)
        return tensor


def _ring_default_policy(tensor):
    """Our ring waiting with the scheduling policy the rank runs with (no SCHED_BATCH switch)."""
    switch = ring_allreduce._waiting_as_batch
    ring_allreduce._waiting_as_batch = lambda tensor: contextlib.nullcontext()
    try:
        return comm.ring_all_reduce(tensor)
    finally:
        ring_allreduce._waiting_as_batch = switch


def _bytes_alone(tensor):
    """The floor: the ring's 2(N−1) messages of one chunk each, every one posted at once — the
    same bytes over the same connections, with no additions and no step waiting for the last."""
    with ring_allreduce._waiting_as_batch(tensor):
        n, r = dist.get_world_size(), dist.get_rank()
        parts = tensor.view(-1).tensor_split(n)
        width = parts[0].numel()
        inbox = ring_allreduce._scratch(width * 2 * (n - 1), parts[0])  # kept between calls, as the ring's
        requests = [dist.irecv(inbox[i * width : (i + 1) * width], (r - 1) % n) for i in range(2 * (n - 1))]
        requests += [dist.isend(parts[0], (r + 1) % n) for _ in range(2 * (n - 1))]
        for request in requests:
            request.wait()
        return tensor


CALLS = {
    "ring": comm.ring_all_reduce,
    "dist.all_reduce": comm.ALL_REDUCES["dist.all_reduce"],
    "default policy": _ring_default_policy,
}


def cpu_rank(sizes, rounds):
    """Median (over interleaved rounds) CPU seconds per call of this whole process."""
    result = {}
    for nbytes in sizes:
        tensor = torch.zeros(nbytes // 4)
        per = {name: [] for name in NAMES}
        for name in NAMES:
            CALLS[name](tensor)
        for _ in range(rounds):
            for name in NAMES:
                dist.barrier()
                start = time.process_time()
                CALLS[name](tensor)
                per[name].append(time.process_time() - start)
        result[nbytes] = {name: statistics.median(v) for name, v in per.items()}
    return result


def _thread_ticks() -> dict:
    """CPU clock ticks so far of this process's threads, summed by thread name."""
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        ticks[name] = ticks.get(name, 0) + int(fields[11]) + int(fields[12])  # utime + stime
    return ticks


def thread_cpu_rank(nbytes: int, calls: int) -> dict:
    """Inside a rank: CPU seconds per call of each thread (by name), for ours and gloo's."""
    tensor, per_tick = torch.zeros(nbytes // 4), 1 / os.sysconf("SC_CLK_TCK")
    result = {}
    for name, call in CALLS.items():
        for _ in range(20):
            call(tensor)
        dist.barrier()
        before, start = _thread_ticks(), time.perf_counter()
        for _ in range(calls):
            call(tensor)
        wall, after = (time.perf_counter() - start) / calls, _thread_ticks()
        cpu = {t: (after[t] - before.get(t, 0)) * per_tick / calls for t in after}
        result[name] = wall, {t: c for t, c in cpu.items() if c > 0}
    return result


def print_thread_cpu(n: int, nbytes: int = 4 << 10, calls: int = 400) -> None:
    per_rank = launch.run(thread_cpu_rank, n, nbytes, calls)
    print(
        f"N = {n}, {format_bytes(nbytes)}, {calls} calls in a row ({load()}): wall ms per call, "
        "CPU ms per call by thread (means over the ranks)"
    )
    for name in CALLS:
        wall = statistics.mean(r[name][0] for r in per_rank)
        threads = sorted({t for r in per_rank for t in r[name][1]})
        cpu = {t: statistics.mean(r[name][1].get(t, 0.0) for r in per_rank) for t in threads}
        print(
            f"  {name:>16}: wall {wall * 1e3:.3f}; " + ", ".join(f"{t} {c * 1e3:.3f}" for t, c in cpu.items())
        )


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def run(n: int, rounds: int = 7) -> list:
    verdicts = []
    print(f"\n=== N = {n} ranks ({load()})")
    calls = {**CALLS, "step": comm.ring_step, "no header": _ring_without_header}
    small = collectives.time_algorithms("all-reduce", calls, n, SMALL, 0.3, rounds)
    print(f"median time per call, {rounds} interleaved rounds ({load()}); goal ours ≤ {SMALL_GOAL}× gloo")
    print(
        f"{'S':>8} {'ours ms':>9} {'gloo ms':>9} {'ratio':>6} {'ours best':>10} {'gloo best':>10} "
        f"{'1 step ms':>10} {'no header':>10} {'default policy':>15}  goal"
    )
    for i, s in enumerate(small["ring"].nbytes):
        ours, gloo, step = (small[k].seconds[i] for k in ("ring", "dist.all_reduce", "step"))
        ratio = ours / gloo
        verdicts.append(
            (f"N={n}, {format_bytes(s)}: time ours/gloo {ratio:.2f} (≤ {SMALL_GOAL})", ratio <= SMALL_GOAL)
        )
        print(
            f"{format_bytes(s):>8} {ours * 1e3:>9.3f} {gloo * 1e3:>9.3f} {ratio:>6.2f} "
            f"{small['ring'].fastest[i] * 1e3:>10.3f} {small['dist.all_reduce'].fastest[i] * 1e3:>10.3f} "
            f"{step * 1e3:>10.3f} {small['no header'].seconds[i] * 1e3:>10.3f} "
            f"{small['default policy'].seconds[i] * 1e3:>15.3f}  {verdict(ratio <= SMALL_GOAL)}"
        )
    step0 = small["step"].seconds[0]
    print(
        f"floor: one ring step (4 KiB, comm.ring_step) takes {step0 * 1e3:.3f} ms; a ring all-reduce "
        f"needs 2(N−1) = {2 * (n - 1)} of them one after another, so ours at 4 KiB costs "
        f"{small['ring'].seconds[0] / step0:.1f} steps and gloo's {small['dist.all_reduce'].seconds[0] / step0:.1f}"
    )
    for name, what in (
        ("no header", "without its header message (no shape check)"),
        ("default policy", "waiting with the default policy (no SCHED_BATCH switch)"),
    ):
        ratios = [t / g for t, g in zip(small[name].seconds, small["dist.all_reduce"].seconds)]
        print(f"the same ring {what}, ÷ gloo's: " + ", ".join(f"{x:.2f}" for x in ratios))
    large_calls = {**CALLS, "bytes alone": _bytes_alone}
    large = collectives.time_algorithms("all-reduce", large_calls, n, LARGE, 1.0, rounds)
    cpu = launch.run(cpu_rank, n, LARGE, rounds)
    print(
        f"bus bandwidth and CPU per call ({load()}); goals busbw ≥ {BUSBW_GOAL}× gloo, CPU ≤ {CPU_GOAL}× gloo at 16 MiB"
    )
    for i, s in enumerate(large["ring"].nbytes):
        ours_bw, gloo_bw = large["ring"].busbw[i], large["dist.all_reduce"].busbw[i]
        floor_bw, default_bw = large["bytes alone"].busbw[i], large["default policy"].busbw[i]
        ratio = ours_bw / gloo_bw
        ours_cpu = statistics.mean(c[LARGE[i]]["ring"] for c in cpu)
        gloo_cpu = statistics.mean(c[LARGE[i]]["dist.all_reduce"] for c in cpu)
        line = (
            f"{format_bytes(s):>8}: busbw ours {ours_bw / 1e9:.3f} GB/s, gloo {gloo_bw / 1e9:.3f} GB/s, "
            f"ratio {ratio:.2f} ({verdict(ratio >= BUSBW_GOAL)}); CPU per call (mean of ranks) "
            f"ours {ours_cpu * 1e3:.1f} ms, gloo {gloo_cpu * 1e3:.1f} ms, ratio {ours_cpu / gloo_cpu:.2f}"
        )
        verdicts.append(
            (f"N={n}, {format_bytes(s)}: busbw ours/gloo {ratio:.2f} (≥ {BUSBW_GOAL})", ratio >= BUSBW_GOAL)
        )
        if LARGE[i] == 16 << 20:
            cpu_ratio = ours_cpu / gloo_cpu
            line += f" ({verdict(cpu_ratio <= CPU_GOAL)})"
            verdicts.append(
                (f"N={n}, 16 MiB: CPU ours/gloo {cpu_ratio:.2f} (≤ {CPU_GOAL})", cpu_ratio <= CPU_GOAL)
            )
        print(line)
        print(
            f"{'':>10}floor (the ring's bytes alone, all posted at once): {floor_bw / 1e9:.3f} GB/s; "
            f"gloo reaches {gloo_bw / floor_bw:.2f} of it, ours {ours_bw / floor_bw:.2f} "
            f"(ours with the default policy {default_bw / floor_bw:.2f})"
        )
    return verdicts


def main(world_sizes=(2, 4)):
    start = time.perf_counter()
    os.environ.pop(launch.SCHED_BATCH_ENV, None)  # the goals: the default launch, as lessons run
    print(f"{load()} before (other programs make every figure noisy; the ratios less so)\n")
    print(BEFORE)
    verdicts = []
    for n in world_sizes:
        verdicts += run(n)
    print(f"\nAfter ({load()}):")
    for text, ok in verdicts:
        print(f"  {verdict(ok):>6}  {text}")
    print(
        f"{sum(ok for _, ok in verdicts)} of {len(verdicts)} goals met ({time.perf_counter() - start:.0f} s)"
    )
    print("\n=== Why: where the CPU goes, by thread")
    print_thread_cpu(world_sizes[0])


if __name__ == "__main__":
    main(tuple(int(a) for a in sys.argv[1:]) or (2, 4))
