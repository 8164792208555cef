"""How stable is chapter 01's α–β fit from run to run (issue 21)?

Chapter 01 measures one-way message times between two ranks (`alpha_beta.measure_point_to_point`,
sizes taking turns batch by batch) and fits t(S) = α + S/β to the best batch of each size. A
learner runs that cell once; later chapters predict times with the α and β it gave. This runs
the same measurement and fit RUNS times, each in its own launch as the lesson does, and prints
α and β per run with their spread (largest ÷ smallest) and the machine's load beside each, for
the lesson's setting (the default scheduling policy), the same with the ranks' threads run as
SCHED_BATCH while they measure, and both for longer batches. `python benchmarks/bench_alpha_beta.py 3`
runs 3 rounds.
"""

import os
import statistics
import sys
import time

from course_lib import alpha_beta

SIZES = [64, 1024, 4096, 64 * 1024, 1 << 20, 16 << 20]  # chapter 01's
#: (min_seconds, batches, SCHED_BATCH while measuring): the lesson's setting first.
SETTINGS = [(0.05, 7, False), (0.05, 7, True), (0.2, 15, False), (0.2, 15, True)]


def main(runs: int = 5) -> None:
    start = time.perf_counter()
    fits = {setting: [] for setting in SETTINGS}
    for _ in range(runs):
        for setting in SETTINGS:  # settings take turns, so a busy moment hits them alike
            min_seconds, batches, batch_scheduling = setting
            t0 = time.perf_counter()
            pp = alpha_beta.measure_point_to_point(
                SIZES, min_seconds=min_seconds, batches=batches, batch_scheduling=batch_scheduling
            )
            model = alpha_beta.fit(pp.nbytes, pp.fastest)
            fits[setting].append((model.alpha, model.beta, time.perf_counter() - t0, os.getloadavg()[0]))
    print(f"chapter 01's α–β fit (best batches), {runs} runs per setting, each its own launch")
    print(
        f"{'min_seconds':>11} {'batches':>7} {'policy':>7}  {'α per run (µs)':<34} {'spread':>6}  "
        f"{'β per run (GB/s)':<34} {'spread':>6}  {'s/run':>5}  load"
    )
    for (min_seconds, batches, batch_scheduling), rows in fits.items():
        alphas = [a * 1e6 for a, _, _, _ in rows]
        betas = [b / 1e9 for _, b, _, _ in rows]
        print(
            f"{min_seconds:>11g} {batches:>7} {'batch' if batch_scheduling else 'default':>7}  "
            f"{' '.join(f'{a:.0f}' for a in alphas):<34} "
            f"{max(alphas) / min(alphas):>5.2f}×  {' '.join(f'{b:.2f}' for b in betas):<34} "
            f"{max(betas) / min(betas):>5.2f}×  {statistics.mean(r[2] for r in rows):>5.1f}  "
            f"{min(r[3] for r in rows):.1f}–{max(r[3] for r in rows):.1f}"
        )
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
