"""Instructor mode: what only a machine with GPUs can check (CI has none; these skip, saying why).

On such a machine the rest of `make test` exercises the GPU path too: "auto" starts
cpu:gloo,cuda:nccl, so the lessons of chapters 00, 01 and 06 and every torchrun demo in
test_demo.py put their tensors on the ranks' GPUs and talk over NCCL.
"""

import pytest
import torch
import torch.distributed as dist
from conftest import gpus

from course_lib import collectives, comm, launch
from course_lib.launch import DeadlockError, run


def ring_on_the_gpu():
    rank = dist.get_rank()
    x = torch.arange(1000.0, device=launch.device()) * (rank + 1)
    ours, builtin = x.clone(), x.clone()
    comm.ALL_REDUCES["ring"](ours)
    dist.all_reduce(builtin)
    return ours.device.type, torch.equal(ours, builtin), ours


@gpus(2)
def test_from_scratch_ring_all_reduce_over_nccl_equals_the_builtin():
    for device_type, same, total in run(ring_on_the_gpu, 2):
        assert device_type == "cuda" and same
        assert torch.equal(total, torch.arange(1000.0) * 3)


@gpus(2)
def test_busbw_timing_runs_on_the_gpus():
    timing = collectives.time_collective("all-reduce", 2, [1 << 20], min_seconds=0.01)
    assert timing.backend == launch.GPU_BACKEND and timing.seconds[0] > 0


@gpus(1)
def test_auto_picks_nccl_and_returns_cpu_tensors():
    n = min(2, torch.cuda.device_count())

    def on_gpu():
        t = torch.ones(3, device=launch.device()) * dist.get_rank()
        dist.all_reduce(t)
        return dist.get_backend(), t

    out = run(on_gpu, n)
    assert all(b == launch.GPU_BACKEND for b, _ in out)
    assert all(t.device.type == "cpu" for _, t in out)


@gpus(1)
def test_one_rank_on_one_gpu():
    assert run(lambda: str(launch.device()), 1) == ["cuda:0"]


def skips_a_collective():
    t = torch.ones(2, device=launch.device())
    if dist.get_rank() != 0:
        dist.all_reduce(t)  # NCCL only queues it: the hang must still be reported here
    return t


@gpus(2)
def test_a_skipped_collective_on_the_gpus_is_located():
    with pytest.raises(DeadlockError, match=r"waiting in dist\.all_reduce"):
        run(skips_a_collective, 2, timeout=5)
