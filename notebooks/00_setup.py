# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · Set-up: ranks, process groups and backends
#
# Every chapter of this course trains (parts of) a model on **N ranks**. A *rank* is one worker
# process with its own memory; on a multi-GPU box each rank drives one GPU, on your laptop each
# rank is an ordinary CPU process. Ranks share nothing: whatever one rank needs from another has
# to be *communicated*, and counting and arranging that communication is what the whole course is
# about.
#
# This notebook checks your machine, launches 1, 2 and 4 ranks, and shows what you will see when
# something goes wrong. Run the cells from top to bottom (Shift-Enter).

# %% [markdown]
# ## 1. Environment check
# Run this first. It prints the versions the course was built with and which **backend** (the
# library that moves bytes between ranks) a launch of N ranks will use: **gloo** on CPUs,
# **NCCL** when there is one CUDA GPU per rank. On GPUs the launcher starts the group as
# `cpu:gloo,cuda:nccl`: tensors on a GPU go over NCCL, and the chapters that keep their tiny
# models on the CPU still run, over gloo. `COURSE_BACKEND=gloo make lab` keeps everything on gloo.

# %%
from course_lib import env

info = env.report()
assert info["gloo available"], "this PyTorch build has no gloo backend; reinstall with `make lab`"

# %% [markdown]
# ## 2. Launching ranks from a notebook
# `course_lib.launch.run(fn, N, *args)` starts N processes, runs `fn(*args)` in each of them with
# the **default process group** already set up, and returns the N return values in rank order.
# Inside `fn`, `torch.distributed` (imported as `dist`) tells each process who it is:
#
# | call | meaning |
# |---|---|
# | `dist.get_rank()` | this process's id, `0 … N-1` |
# | `dist.get_world_size()` | N, the number of ranks in the group |
# | `dist.get_backend()` | `gloo`, or `cpu:gloo,cuda:nccl` with a GPU per rank |
#
# Anything a rank prints shows up here, prefixed with `[rank r]`.

# %%
import os

import torch
import torch.distributed as dist

from course_lib.launch import device, run


def who_am_i():
    rank, world = dist.get_rank(), dist.get_world_size()
    print(f"I am rank {rank} of {world}, process id {os.getpid()}, backend {dist.get_backend()}")
    return rank


for n in (1, 2, 4):
    print(f"--- {n} rank(s)")
    assert run(who_am_i, n) == list(range(n))

# %% [markdown]
# The ranks print in whatever order the operating system schedules them, but the **returned
# values always come back in rank order**: that is what the `assert` checked.
#
# ## 3. A process group and a first collective
# A *process group* is a set of ranks that communicate together; `run` creates the default one,
# containing all N ranks. A *collective* is a call that every rank of a group makes together.
# Here each rank contributes its rank number and `all_reduce` leaves the sum on every rank:
# 0 + 1 + 2 + 3 = 6.


# %%
def sum_of_ranks():
    t = torch.tensor([float(dist.get_rank())], device=device())  # cuda:r under NCCL
    dist.all_reduce(t)  # every rank calls it; afterwards every rank holds the sum
    return t.item()


print(run(sum_of_ranks, 4))

# %% [markdown]
# ## 4. How fast is a launch?
# The first launch in a notebook starts a helper process (a *forkserver*: on Linux a copy of the kernel
# made with `fork`, so PyTorch is imported already) that imports a few more of torch's modules once;
# every later launch forks ready-made ranks from it, which takes hundredths to tenths of a second
# (0.07–0.2 s for 4 ranks on a 2-core laptop; more while other programs keep the cores busy).

# %%
import time

launch_seconds = []
for attempt in range(3):
    start = time.perf_counter()
    run(sum_of_ranks, 4)
    launch_seconds.append(time.perf_counter() - start)
    print(f"launch {attempt + 1}: 4 ranks in {launch_seconds[-1]:.3f} s")

# %% [markdown]
# ## 5. When a rank fails
# A bug on one rank must not freeze your notebook. If a rank raises, `run` stops the others and
# raises `RankError` with that rank's traceback within seconds (the cell measures how long).

# %%
from course_lib.launch import DeadlockError, RankError


def buggy():
    if dist.get_rank() == 2:
        raise ValueError("rank 2 divided by zero (on purpose)")
    dist.barrier()


start = time.perf_counter()
try:
    run(buggy, 4)
except RankError as err:
    crash_seconds = time.perf_counter() - start
    print(f"RankError from rank {err.rank} after {crash_seconds:.2f} s:\n{err}")
    assert err.rank == 2
else:
    raise AssertionError("rank 2 raised, so run() should have raised RankError")

# %% [markdown]
# ## 6. When ranks wait forever: deadlock
# A collective needs *every* rank of the group. If one rank skips it, the others wait for it
# forever. The launcher bounds that wait (`timeout=`, and a per-collective limit,
# `course_lib.launch.PG_TIMEOUT`, 30 seconds by default) and then tells you which rank waited where.
# Here rank 0 forgets the `all_reduce`:


# %%
def forgetful():
    t = torch.ones(2, device=device())
    if dist.get_rank() != 0:
        dist.all_reduce(t)
    return t


start = time.perf_counter()
try:
    run(forgetful, 3, timeout=4)
except DeadlockError as err:
    deadlock_seconds = time.perf_counter() - start
    print(err)
    assert err.waiting_ranks == [1, 2] and "rank 1: waiting in dist.all_reduce" in str(err)
else:
    raise AssertionError("ranks 1 and 2 wait forever, so run() should have raised DeadlockError")
print(f"\nreported after {deadlock_seconds:.1f} s (timeout=4)")

# %% [markdown]
# Read the report from the top: ranks 1 and 2 are waiting in `dist.all_reduce`, rank 0 has already
# returned after 0 communication calls. The fix is always the same: make every rank make the same
# communication calls in the same order.
#
# A subtler bug is ranks calling the same collective with **different shapes**. gloo may then
# abort, or even return wrong numbers. `run(..., debug=True)` checks every collective's shapes and
# dtypes across ranks first (that check is itself communication, milliseconds per call, so it is
# off by default; chapter 10 measures it):


# %%
def mismatched_shapes():
    dist.all_reduce(torch.ones(4 if dist.get_rank() == 0 else 2, device=device()))


try:
    run(mismatched_shapes, 2, timeout=20, debug=True)
except RankError as err:
    message = str(err)
    print(message[message.find("The ranks made different") : message.find("(ranks")].strip())
    assert "rank 0: allreduce of a float tensor of shape [4]" in message
    assert "rank 1: allreduce of a float tensor of shape [2]" in message
else:
    raise AssertionError("the shapes differ, so debug=True should have raised")

# %% [markdown]
# ## 7. What `run` does
# 1. The ranks meet (the *rendezvous*) in a small key-value **store**: a file in a fresh temporary
#    folder, so two notebooks can launch at once without fighting over a port. (Across machines,
#    `torchrun` does the same job with a TCP store; chapter 10 uses it.)
# 2. Your function is serialised **by value** (with `cloudpickle`), so functions defined in a cell
#    work; each rank is forked from the preloaded forkserver and calls
#    `dist.init_process_group(backend, store=…, rank=r, world_size=N)`.
# 3. Each rank runs your function with `torch.set_num_threads(1)` (N ranks share your cores), sends
#    back its result, and waits until *all* ranks have finished before tearing down, so that no rank
#    leaves while another still talks to it.
# 4. Whatever happens (a result, an error, a timeout, the Stop button), every rank process is ended
#    before `run` returns.
#
# The whole launcher is one module; read it when you are curious:

# %%
import inspect

import course_lib.launch

print(inspect.getsource(course_lib.launch.run))

# %% [markdown]
# ## What you measured
#
# Each number is from your run above: how long the launcher takes, and that an error or a
# deadlock comes back as a clear report within seconds instead of a frozen notebook.

# %%
from course_lib.launch import PG_TIMEOUT

rows = [
    ("warm launch of 4 ranks", "0.07–0.2 s on 2 idle cores", f"{min(launch_seconds):.3f} s (best of 3)"),
    ("a raising rank reported", "within seconds", f"{crash_seconds:.2f} s"),
    ("a deadlock reported", "timeout=4 s, then the report", f"{deadlock_seconds:.1f} s"),
]
print(f"{'what':<26} {'expected':<32} {'measured'}")
for row in rows:
    print(f"{row[0]:<26} {row[1]:<32} {row[2]}")
# An error never waits for the process-group timeout: that is what "nothing hangs" means here.
assert crash_seconds < PG_TIMEOUT and deadlock_seconds < PG_TIMEOUT

# %% [markdown]
# **Next:** [01 · Collectives](01_collectives.ipynb): the communication patterns every later chapter is built from.
