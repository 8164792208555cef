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
# # 10 · Debugging and scaling out
#
# Distributed bugs have three faces: a rank **crashes**, ranks **wait for each other forever**,
# or everything runs and the **numbers are wrong**. The first part of this chapter reads the
# reports the course's launcher gives for each, and tells four short stories of bugs that
# produce them (you fix them in `exercises/10_debugging.ipynb`). The second part runs the
# strategies of chapters 02–09 as ordinary scripts under `torchrun`, the launcher you use on real
# clusters, on one machine and on several.

# %%
import torch
import torch.distributed as dist

from course_lib.launch import DeadlockError, LaunchTimeout, RankError, run

# %% [markdown]
# ## 1. Reading the launcher's reports
#
# | what happened | what `run` raises | what to read first |
# |---|---|---|
# | a rank raised or died | `RankError` (`.rank`, `.exc_type`) | the rank number and the last line of its traceback |
# | ranks waited in communication that others never joined | `DeadlockError` | one line per rank: *waiting in dist.X (call #k)* or *returned* |
# | ranks were still computing at `timeout` | `LaunchTimeout` | "none of them was inside a communication call" |
# | shapes or dtypes differ between ranks | often nothing (wrong numbers) or an abort | rerun with `debug=True` |
#
# **A crash.** The first rank that failed is named; the others failed *because* it left.

# %%
def last_rank_divides_by_zero():
    rank, n = dist.get_rank(), dist.get_world_size()
    share = 12 // (n - 1 - rank)  # the last rank divides by zero
    dist.barrier()
    return share


try:
    run(last_rank_divides_by_zero, 3)
except RankError as err:
    print(f"RankError, err.rank = {err.rank}, err.exc_type = {err.exc_type!r}\n\n{err}")

# %% [markdown]
# **A deadlock.** Rank 0 makes one all-reduce fewer than the others. Count the calls in the
# report: ranks 1 and 2 are in their call #2, rank 0 returned after 1. Calls are matched *by
# order*, not by the line they come from, so the first all-reduce of every rank still worked.

# %%
def one_all_reduce_fewer():
    t = torch.ones(1)
    dist.all_reduce(t)
    if dist.get_rank() != 0:
        dist.all_reduce(t)
    return t.item()


try:
    run(one_all_reduce_fewer, 3, timeout=4)
except DeadlockError as err:
    print(str(err).split("\n\nWhere")[0])  # the per-rank lines; the traceback follows in `err`

# %% [markdown]
# **Too slow, not stuck.** When no rank is inside a communication call at the deadline, the error
# is a plain `LaunchTimeout` (a `DeadlockError` is a special case of it): an endless loop, or simply
# more work than `timeout` allows.

# %%
def endless():
    while True:
        pass


try:
    run(endless, 2, timeout=2)
except DeadlockError:
    print("unexpected: reported as a deadlock")
except LaunchTimeout as err:
    print(err)

# %% [markdown]
# **Different shapes.** gloo does not compare shapes across ranks: an all-reduce of 4 numbers on
# one rank and 2 on the other may finish with wrong numbers, or abort a rank. `debug=True` sets
# `TORCH_DISTRIBUTED_DEBUG=DETAIL`, which checks every collective first and names the difference
# (about 10 ms per collective: only while hunting a bug).

# %%
def mismatched_shapes():
    dist.all_reduce(torch.ones(4 if dist.get_rank() == 0 else 2))


try:
    run(mismatched_shapes, 2, timeout=20, debug=True)
except RankError as err:
    text = str(err)
    print(text[text.find("Collectives differ"):].splitlines()[0])

# %% [markdown]
# ## 2. Four bugs and what they look like
#
# The labs in `exercises/10_debugging.ipynb` each start from one of these. Their check module,
# `course_lib.checks.debugging`, has `show(check, broken_fn)`, which runs a broken version and
# prints the report — the lab cells use it, and so does this one.
#
# 1. **A collective one rank skips** (lab 10.1). A metric is averaged over ranks, and a rank with
#    an empty shard "has nothing to add" and skips the all-reduce. The others wait for it:
#    `DeadlockError`, with that rank listed as *returned*. Rule: every rank of a group makes the
#    same communication calls in the same order — contribute zeros instead of skipping.
# 2. **A rank that crashes** (lab 10.2). A ring looks up its right neighbour as `ranks[rank + 1]`:
#    the last rank raises `IndexError`. `RankError` names rank N−1; the other ranks' errors
#    (connection closed) are listed as consequences. Rule: ring indices wrap, `(rank + 1) % N`.
#    Off-by-one bugs love the last rank — test with N ≥ 3 so first, middle and last all exist.
# 3. **The wrong process group** (lab 10.3). With data × tensor parallelism, the row-parallel
#    all-reduce must run over the TP group; without `group=` it runs over the world and adds the
#    other replicas' activations. Nothing fails; only a comparison with one process shows it.
#    With one replica the group *is* the world, and the bug hides: test on grids.
# 4. **Skipped synchronisation everywhere** (lab 10.4). `with ddp.no_sync():` around the whole
#    accumulation loop skips the all-reduce on the last micro-batch too, so the gradients are
#    never averaged; each replica trains on its own shard and the replicas drift apart, with a
#    perfectly plausible loss curve. Rule: no_sync on micro-batches 1 … M−1, never on the last.
#
# Here is story 3 on 4 ranks (two replicas × TP 2):

# %%
from course_lib.checks import debugging


def row_parallel_on_the_world(x_shard, w_shard, tp_group):
    y = x_shard @ w_shard.T
    dist.all_reduce(y)  # should be dist.all_reduce(y, group=tp_group)
    return y


debugging.show(debugging.row_parallel_output, row_parallel_on_the_world)

# %% [markdown]
# Silent bugs are why every chapter compares with single-process training. The habit carries
# over to real runs: train a few steps at small scale against a reference before the big run,
# and log a checksum of the parameters on every rank — replicas that should be equal and are not
# reveal a synchronisation bug within a few steps.
#
# ## 3. The same strategies as scripts under `torchrun`
#
# So far, `run` started ranks from the notebook. On a cluster you start them with **torchrun**
# (`python -m torch.distributed.run`): it starts N processes per machine, sets `RANK`,
# `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` in each, and restarts or stops
# them together. A script then needs only `dist.init_process_group(backend)`, which reads those
# variables (the `env://` method).
#
# `course_lib.demo` is such a script. `torchrun --nproc_per_node N -m course_lib.demo STRATEGY`
# runs a few steps of one strategy — `dp`, `ring`, `tp`, `sp`, `pp`, `zero`, `moe` or `3d` — with
# the course's code, has every rank recompute single-process training (the models are tiny) and
# compare, and exits non-zero on a mismatch. Its module docstring shows the multi-node commands:

# %%
import course_lib.demo

print(course_lib.demo.__doc__[:course_lib.demo.__doc__.find("Two machines")])
for name, (_, _, what) in course_lib.demo.STRATEGIES.items():
    print(f"  {name:5} {what}")

# %% [markdown]
# A bare `!torchrun ...` in a notebook cell prints the failure and carries on: the cell does not
# fail, and neither does a headless run of the notebook. `course_lib.torchrun.run_torchrun` runs
# torchrun as a subprocess, streams its output here, and **raises `TorchrunError`** on failure.
# Each run starts fresh Python processes, so it takes a few seconds (importing torch dominates).

# %%
import time

from course_lib.torchrun import TorchrunError, run_torchrun

for strategy in ("dp", "ring"):
    start = time.perf_counter()
    output = run_torchrun(strategy, nproc=2, echo=False)  # raises if anything failed
    summary = [line for line in output.splitlines() if line.startswith("demo ")]
    print(*summary, f"   [torchrun, 2 processes: {time.perf_counter() - start:.1f} s]")

# %% [markdown]
# With `echo=True` (the default) you see everything torchrun prints as it arrives. Several
# strategies can share one torchrun (one process start-up), and a strategy that cannot use the
# world size says what it needs before any communication (try `run_torchrun("tp", nproc=3)`):

# %%
out = run_torchrun(["tp", "pp", "moe"], nproc=2)

# %% [markdown]
# And a failing run: `--perturb` corrupts the last rank's result on purpose. The ranks notice,
# rank 0 says which rank and which tensor, every rank exits with code 1, torchrun reports the
# failure and the helper raises. (`e.output` holds everything torchrun printed.)

# %%
try:
    run_torchrun("ring --perturb", nproc=2, echo=False)
except TorchrunError as e:
    print(f"TorchrunError, exit code {e.returncode}:\n{e}")

# %% [markdown]
# ## 4. Scaling out: more than one machine
#
# Two nodes with 2 ranks each: run the same command on both, changing only `--node_rank`.
# `HOST` is node 0's address *as node 1 sees it*:
#
# ```bash
# # on node 0                                        # on node 1
# torchrun --nnodes 2 --node_rank 0 \               torchrun --nnodes 2 --node_rank 1 \
#   --nproc_per_node 2 --rdzv_backend c10d \          --nproc_per_node 2 --rdzv_backend c10d \
#   --rdzv_endpoint HOST:29500 \                      --rdzv_endpoint HOST:29500 \
#   -m course_lib.demo dp                             -m course_lib.demo dp
# ```
#
# The older static form is `--master_addr HOST --master_port 29500` instead of the rendezvous
# options; both end up as `MASTER_ADDR` / `MASTER_PORT` in every rank, which is also all that a
# hand-written launcher must set (with `RANK` and `WORLD_SIZE`).
#
# **When it does not start or hangs at the start:**
# - *"hosts not found" / name resolution errors*: `HOST` must resolve on every node, and every
#   node's own hostname must resolve to an address the others can reach (not 127.0.1.1). Check
#   `/etc/hosts` on each node, or use IP addresses to rule names out.
# - *Hangs at the rendezvous*: node 0's firewall must let the port in (`MASTER_PORT`, and the
#   ports gloo / NCCL open afterwards); `nc -zv HOST 29500` from node 1 tests it. A port still
#   held by a crashed earlier run also blocks: pick another.
# - *Several network cards*: ranks may pick an interface the other node cannot reach (docker0,
#   a VPN). Pin it: `GLOO_SOCKET_IFNAME=eth0` for gloo, `NCCL_SOCKET_IFNAME=eth0` for NCCL
#   (`ip addr` lists the names).
# - *NCCL hangs or wrong results on one machine*: on some consumer GPUs (no NVLink, certain PCIe
#   switches or virtualised hosts) direct GPU-to-GPU copies do not work. `NCCL_P2P_DISABLE=1`
#   routes through host memory: slower but correct. `NCCL_DEBUG=INFO` shows what NCCL chose.
# - Same code, Python, torch and NCCL versions on every node.
#
# ### When two machines are slower than one
#
# Data parallelism all-reduces the gradients, Ψ numbers, every step. A ring sends 2(N−1)/N·Ψ
# elements per rank, and a ring is only as fast as its **slowest link**: with two nodes, some link
# crosses the network. Take Ψ = 1 B parameters with fp32 gradients, 8 GPUs per node joined by
# NVLink (~200 GB/s per GPU), and a 25 Gb/s Ethernet between nodes, and suppose one step computes
# for 1 s on 8 GPUs (0.5 s on 16, as the batch per GPU halves):

# %%
def all_reduce_seconds(psi, n, bytes_per_second, bytes_per_element=4):
    """Ring all-reduce time: 2(N-1)/N · Ψ elements through the slowest link."""
    return 2 * (n - 1) / n * psi * bytes_per_element / bytes_per_second


psi = 1e9
nvlink, ethernet_25g, infiniband_400g = 200e9, 25e9 / 8, 400e9 / 8
setups = [("1 node,  8 GPUs (NVLink)", 8, nvlink, 1.0),
          ("2 nodes, 16 GPUs, 25 Gb/s Ethernet", 16, ethernet_25g, 0.5),
          ("2 nodes, 16 GPUs, 400 Gb/s InfiniBand", 16, infiniband_400g, 0.5)]
for name, n, bandwidth, compute in setups:
    comm = all_reduce_seconds(psi, n, bandwidth)
    print(f"{name:38} all-reduce {comm:6.2f} s + compute {compute:.1f} s = {comm + compute:5.2f} s per step")

# %% [markdown]
# Twice the GPUs, almost three times *slower* per step on Ethernet: the 25 Gb/s link is 64 times slower than
# NVLink, and the all-reduce (≈ 2·4Ψ bytes) does not shrink with N. Overlap (chapter 03's buckets)
# hides communication only up to the compute time. What helps: a faster interconnect
# (InfiniBand / RoCE, several cards per node), sending less across nodes (hierarchical all-reduce:
# reduce inside the node first; mixed-precision gradients; larger batches per step, i.e. fewer
# syncs via accumulation), and placing the chatty strategies inside a node — TP's all-reduces
# every layer within a node, pipeline stages or data parallelism across nodes (chapter 09).
#
# **Next:** the exercises, `exercises/10_debugging.ipynb`: fix the four broken functions.
