"""Our BucketedDDP against torch's DistributedDataParallel: time of one training step.

A step is forward + backward (gradients averaged when backward returns) on
this rank's shard of the batch; both wrappers get the same model and data, and
take turns step by step so a busy moment of a shared machine hits both alike.
Goal from the course's chapter-03 issue: ours / torch's ≤ 1.1.
"""

import os
import statistics
import time

import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from course_lib import ddp, launch, models

GOAL = 1.1
DEPTH, D_MODEL, D_HIDDEN, BATCH = 8, 256, 1024, 64  # 4.2 M parameters, 16.8 MB of gradients
STEPS, WARMUP = 20, 3


def step(model, x, y):
    start = time.perf_counter()
    F.mse_loss(model(x), y).backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def compare_rank(bucket_cap_mb):
    rank, n = dist.get_rank(), dist.get_world_size()
    ours = ddp.BucketedDDP(models.make_stack(DEPTH, D_MODEL, D_HIDDEN), bucket_cap_mb=bucket_cap_mb)
    torch_ddp = DistributedDataParallel(
        models.make_stack(DEPTH, D_MODEL, D_HIDDEN), bucket_cap_mb=bucket_cap_mb
    )
    x, y = models.regression_data(BATCH * n, D_MODEL)
    x, y = models.shard(x, rank, n), models.shard(y, rank, n)
    times = {"ours": [], "torch": []}
    for i in range(WARMUP + STEPS):
        for name, model in (("ours", ours), ("torch", torch_ddp)):
            dist.barrier()
            elapsed = step(model, x, y)
            if i >= WARMUP:
                times[name].append(elapsed)
    result = {name: statistics.median(t) for name, t in times.items()}
    result["buckets"] = len(ours.buckets)
    del torch_ddp  # a live DDP wrapper at process-group teardown can hang
    return result


def main(rounds=2):
    start = time.perf_counter()
    params = models.num_params(models.make_stack(DEPTH, D_MODEL, D_HIDDEN))
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(
        f"model: {DEPTH} MLP layers {D_MODEL}→{D_HIDDEN}→{D_MODEL}, {params / 1e6:.1f} M parameters "
        f"({params * 4 / 2**20:.1f} MiB of fp32 gradients); batch {BATCH} per rank; "
        f"median of {STEPS} steps per round, {rounds} rounds (separate launches)"
    )
    print(
        f"{'N':>2} {'cap MiB':>8} {'buckets':>8} {'ours ms':>8} {'torch ms':>9} {'ours/torch per round':>22}"
    )
    verdicts = []
    for n in (2, 4):
        for cap in (25.0, 4.0):
            ratios, ours, theirs = [], [], []
            for _ in range(rounds):
                results = launch.run(compare_rank, n, cap, timeout=300)
                ours.append(max(r["ours"] for r in results))  # a step is done when its slowest rank is
                theirs.append(max(r["torch"] for r in results))
                ratios.append(ours[-1] / theirs[-1])
            print(
                f"{n:>2} {cap:>8g} {results[0]['buckets']:>8} {statistics.median(ours) * 1e3:>8.1f} "
                f"{statistics.median(theirs) * 1e3:>9.1f} {'  '.join(f'{r:.2f}' for r in ratios):>22}"
            )
            verdicts.append(statistics.median(ratios))
    worst = max(verdicts)
    print(
        f"BucketedDDP / DDP step time, median per configuration: {min(verdicts):.2f} … {worst:.2f} "
        f"({'meets' if worst <= GOAL else 'MISSES'} the goal of ≤ {GOAL})"
    )
    print(f"load average after: {os.getloadavg()[0]:.1f}; ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
