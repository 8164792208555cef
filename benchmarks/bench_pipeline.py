"""Our GPipe step (course_lib.pp.train_step) against torch.distributed.pipelining.ScheduleGPipe.

Same model (an 8-layer MLP stack split over 2 ranks), same batch, same number of
micro-batches; steps alternate between the two so that both see the same machine
load. Goal from the pipeline issue: ours at most 1.2x torch's time per step.
"""

import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from course_lib import launch, pp
from course_lib.models import make_stack, regression_data

RANKS, DEPTH, D_MODEL, D_HIDDEN, BATCH, MICRO_BATCHES = 2, 8, 256, 1024, 128, 4
STEPS, WARMUP = 20, 3
GOAL = 1.2


def compare_steps():
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    rank, p = dist.get_rank(), dist.get_world_size()
    x, y = regression_data(BATCH, D_MODEL)
    ours = pp.partition(make_stack(DEPTH, D_MODEL, D_HIDDEN, seed=0), rank, p)
    theirs = pp.partition(make_stack(DEPTH, D_MODEL, D_HIDDEN, seed=0), rank, p)
    schedule = ScheduleGPipe(
        PipelineStage(theirs, rank, p, torch.device("cpu")), MICRO_BATCHES, loss_fn=F.mse_loss
    )

    def our_step():
        pp.train_step(ours, x, y, F.mse_loss, MICRO_BATCHES, "gpipe")

    def their_step():
        if rank == 0:
            schedule.step(x)
        elif rank == p - 1:
            schedule.step(target=y)
        else:
            schedule.step()

    times = {"ours": [], "torch": []}
    for i in range(WARMUP + STEPS):
        for name, step, model in (("ours", our_step, ours), ("torch", their_step, theirs)):
            model.zero_grad(set_to_none=True)
            dist.barrier()
            start = time.perf_counter()
            step()
            dist.barrier()  # a step ends when the slowest rank is done
            if i >= WARMUP:
                times[name].append(time.perf_counter() - start)
    same = all(
        torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-5)
        for a, b in zip(ours.parameters(), theirs.parameters())
    )
    return {name: statistics.median(t) for name, t in times.items()}, same


def main():
    start = time.perf_counter()
    results = launch.run(compare_steps, RANKS, backend="gloo", timeout=300)  # a CPU comparison
    ours = max(r[0]["ours"] for r in results)
    theirs = max(r[0]["torch"] for r in results)
    print(
        f"GPipe, {RANKS} ranks, {DEPTH}-layer MLP stack (d_model {D_MODEL}, d_hidden {D_HIDDEN}), "
        f"batch {BATCH}, m = {MICRO_BATCHES}; median of {STEPS} steps"
    )
    print(f"  course_lib.pp.train_step                      {ours * 1e3:8.1f} ms per step")
    print(f"  torch.distributed.pipelining.ScheduleGPipe    {theirs * 1e3:8.1f} ms per step")
    ratio = ours / theirs
    verdict = "meets" if ratio <= GOAL else "MISSES"
    print(
        f"  ratio ours / torch: {ratio:.2f}x ({verdict} the goal of <= {GOAL}x); "
        f"gradients equal: {all(r[1] for r in results)}; {time.perf_counter() - start:.0f} s in all"
    )


if __name__ == "__main__":
    main()
