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
# produce them (you fix them in `my_exercises/10_debugging.ipynb`). The second part runs the
# strategies of chapters 02–09 as ordinary scripts under `torchrun`, the launcher you use on real
# clusters: on one machine, then as two "nodes" started on this machine, the way two machines
# would meet. Each rank shows what torchrun told it (RANK, LOCAL_RANK, GROUP_RANK), which GPU it
# would use, and how a global batch splits over the ranks; an all-reduce across the nodes is
# timed beside the α–β model's prediction.

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
    assert err.rank == 2 and err.exc_type == "ZeroDivisionError"  # the last rank, named first
else:
    raise AssertionError("the last rank must fail")

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
    assert sorted(err.waiting_ranks) == [1, 2]  # rank 0 returned; 1 and 2 wait for it
else:
    raise AssertionError("ranks 1 and 2 must wait forever")

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
    raise AssertionError("an endless loop is not a deadlock") from None
except LaunchTimeout as err:
    print(err)
    assert type(err) is LaunchTimeout
else:
    raise AssertionError("an endless loop must time out")

# %% [markdown]
# **Different shapes.** gloo does not compare shapes across ranks: an all-reduce of 4 numbers on
# one rank and 2 on the other may finish with wrong numbers, or abort a rank. `debug=True` sets
# `TORCH_DISTRIBUTED_DEBUG=DETAIL`, which makes every collective first compare what the ranks
# called (operation, shapes, dtypes) and names the difference:


# %%
def mismatched_shapes():
    dist.all_reduce(torch.ones(4 if dist.get_rank() == 0 else 2))


try:
    run(mismatched_shapes, 2, timeout=20, debug=True)
except RankError as err:
    lines = str(err).splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("RuntimeError"))
    print("\n".join(lines[first:]))  # the rank's error, without the traceback above it
    assert "shape" in str(err)
else:
    raise AssertionError("debug=True must catch the different shapes")

# %% [markdown]
# That comparison is itself communication, so it costs time on every collective. Measured here,
# for a small all-reduce (the mean over 20 calls, slowest rank) — a switch for bug hunts only:

# %%
import time


def all_reduce_seconds(calls=20):
    t = torch.ones(1000)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        dist.all_reduce(t)
    return (time.perf_counter() - start) / calls


plain, checked = max(run(all_reduce_seconds, 2)), max(run(all_reduce_seconds, 2, debug=True))
print(
    f"all-reduce of 1000 floats on 2 ranks: {plain * 1e3:.2f} ms plain, {checked * 1e3:.2f} ms with debug=True"
)

# %% [markdown]
# ## 2. Four bugs and what they look like
#
# The labs in `my_exercises/10_debugging.ipynb` each start from one of these. Their check module,
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
# (`python -m torch.distributed.run`): on every machine it starts `--nproc_per_node` processes
# and gives each its identity in environment variables — `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
# `LOCAL_WORLD_SIZE`, `GROUP_RANK` (which machine), `MASTER_ADDR`, `MASTER_PORT` and a few
# more (section 4 prints them). When one process fails, torchrun stops the others it started;
# with `--max-restarts R` (default 0) it would start the group again, up to R times. A script
# then needs only `dist.init_process_group(backend)`, which reads `RANK`, `WORLD_SIZE`,
# `MASTER_ADDR` and `MASTER_PORT` (the `env://` method).
#
# `course_lib.demo` is such a script. `torchrun --nproc_per_node N -m course_lib.demo STRATEGY`
# runs a few steps of one strategy — `dp`, `ring`, `tp`, `sp`, `pp`, `zero`, `moe` or `3d` — with
# the course's code, has every rank recompute single-process training (the models are tiny) and
# compare, and exits non-zero on a mismatch:

# %%
import course_lib.demo

print(course_lib.demo.__doc__[: course_lib.demo.__doc__.find("STRATEGY is")])
for name, (_, _, what) in course_lib.demo.STRATEGIES.items():
    print(f"  {name:5} {what}")

# %% [markdown]
# A bare `!torchrun ...` in a notebook cell prints the failure and carries on: the cell does not
# fail, and neither does a headless run of the notebook. `course_lib.torchrun.run_torchrun` runs
# torchrun as a subprocess, streams its output here, and **raises `TorchrunError`** on failure.
# Each run starts fresh Python processes, so it takes seconds (importing torch dominates): put
# several strategies into one run.

# %%
from course_lib.torchrun import TorchrunError, run_torchrun

start = time.perf_counter()
ON_TWO_RANKS = ["dp", "ring", "tp", "sp", "pp", "zero", "moe"]  # every strategy but 3d (8 ranks)
output = run_torchrun(ON_TWO_RANKS, nproc=2)  # raises if anything failed
one_node_seconds = time.perf_counter() - start
print(f"[one torchrun, 2 processes, {len(ON_TWO_RANKS)} strategies: {one_node_seconds:.1f} s]")
assert all(f"demo {s}: OK  world_size=2" in output for s in ON_TWO_RANKS)

# %% [markdown]
# With `echo=True` (the default) you see everything torchrun prints as it arrives; `echo=False`
# only returns it. A strategy that cannot use the world size says what it needs before any
# communication (try `run_torchrun("tp", nproc=3)`).
#
# And a failing run: `--perturb` corrupts the last rank's result on purpose. The ranks notice,
# rank 0 says which rank and which tensor, every rank exits with code 1, torchrun reports the
# failure and the helper raises. (`e.output` holds everything torchrun printed.)

# %%
try:
    run_torchrun("ring --perturb", nproc=2, echo=False)
except TorchrunError as e:
    print(f"TorchrunError, exit code {e.returncode}:\n{e}")
    assert e.returncode != 0 and "MISMATCH on rank 1" in str(e)
else:
    raise AssertionError("a perturbed ring must fail")

# %% [markdown]
# ## 4. Two nodes on this machine
#
# A multi-node job runs **one torchrun per machine** (node). They find each other at a
# *rendezvous*: with `--rdzv_backend c10d --rdzv_endpoint HOST:PORT` the torchrun on HOST opens
# a small key-value store on PORT, the others connect to it, and once `--nnodes` of them have
# joined, the rendezvous numbers the nodes and torchrun numbers the ranks. We can do exactly
# that on one machine: two torchruns, each with 2 processes, meeting at `127.0.0.1` (loopback).
# This is what each "node" runs (PORT is a free port picked for the run):

# %%
from course_lib.torchrun import NODE_RANK_IGNORED, nodes_command, run_nodes

for node in (0, 1):
    print(f"node {node}: torchrun", " ".join(nodes_command(node, endpoint="127.0.0.1:PORT")[3:]))

# %% [markdown]
# `run_nodes` starts both, prints their output (each line marked `[node i]`), and **raises
# `TorchrunError`** naming the node as soon as one fails, or after `timeout` seconds; either way
# it first ends both torchruns and every rank they started, so a node that never joins cannot
# leave the notebook waiting (try `run_nodes(["--fail-rank", "3"])`: rank 3 raises). The program every rank runs, `python -m course_lib.torchrun`, prints
# what it was told, then (in the same run, as starting costs seconds) checks the global-batch
# identity of 4.3, times an all-reduce across the nodes for 4.4, and runs the `dp` demo on all
# four ranks.
#
# On one machine, two "nodes" must not share GPUs (two ranks of one NCCL job on one GPU are
# refused: "Duplicate GPU detected"), so we give node 0 GPUs 0 and 1 and node 1 GPUs 2 and 3
# with `CUDA_VISIBLE_DEVICES`, as you would when splitting a 4-GPU machine in two. Without GPUs,
# each rank prints what it would select.

# %%
two_nodes = run_nodes(
    nnodes=2, nproc_per_node=2, node_env=[{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
)
print(f"[two torchruns, 2 processes each: {two_nodes.seconds:.1f} s]")

# %% [markdown]
# ### 4.1 RANK, LOCAL_RANK, GROUP_RANK
#
# What each rank was told, collected from all four:

# %%
ranks = sorted(two_nodes.report["ranks"], key=lambda v: int(v["RANK"]))
columns = (
    "RANK",
    "LOCAL_RANK",
    "GROUP_RANK",
    "NODE_RANK",
    "LOCAL_WORLD_SIZE",
    "WORLD_SIZE",
    "GROUP_WORLD_SIZE",
)
print("  ".join(columns))
for v in ranks:
    print("  ".join(f"{str(v[c]):>{len(c)}}" for c in columns))
print(
    f"MASTER_ADDR:MASTER_PORT = {ranks[0]['MASTER_ADDR']}:{ranks[0]['MASTER_PORT']} on every rank; "
    f"the rendezvous was at {two_nodes.endpoint}"
)

for v in ranks:  # every rank's identity, checked
    rank, local, group, per_node = (
        int(v[k]) for k in ("RANK", "LOCAL_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE")
    )
    assert rank == group * per_node + local  # the nodes are numbered first, then the processes on each
    assert int(v["WORLD_SIZE"]) == 4 and int(v["GROUP_WORLD_SIZE"]) == 2 and v["NODE_RANK"] is None
assert [int(v["RANK"]) for v in ranks] == [0, 1, 2, 3]
assert len({(v["MASTER_ADDR"], v["MASTER_PORT"]) for v in ranks}) == 1
assert ranks[0]["MASTER_PORT"] != two_nodes.endpoint.rsplit(":", 1)[1]  # not the rendezvous port
assert NODE_RANK_IGNORED in two_nodes.outputs[1]  # torchrun's own warning, printed by node 1

# %% [markdown]
# - **RANK** is the process's number in the whole job (0 … N−1): what `dist.get_rank()` returns,
#   and what decides which shard of the data a rank takes.
# - **LOCAL_RANK** is its number on its own machine (0 … LOCAL_WORLD_SIZE−1).
# - **GROUP_RANK** is the node's number, decided **by the rendezvous**. torchrun numbers the
#   nodes' processes one node after the other, so RANK = GROUP_RANK · LOCAL_WORLD_SIZE +
#   LOCAL_RANK when all nodes run the same number of processes (asserted above for all four).
# - **NODE_RANK is not set.** Some tools (PyTorch Lightning, for one) read a variable of that
#   name; torchrun sets GROUP_RANK. And the `--node_rank` we passed was **ignored**: node 1's
#   torchrun said so ("node_rank is only used for static rdzv_backend"). With `c10d` the
#   rendezvous decides which node is 0; only torchrun's default `static` rendezvous (with
#   `--master_addr`/`--master_port`) uses `--node_rank`, and then node 0 must be the machine at
#   `--master_addr`. Code must never assume that the machine where you typed `--node_rank 0`
#   holds rank 0: read the variables.
# - **MASTER_ADDR / MASTER_PORT** are *not* the rendezvous endpoint: after the rendezvous,
#   torchrun points every rank at a store that node 0's torchrun opened on another port (printed
#   above), and `init_process_group` meets there.
#
# ### 4.2 LOCAL_RANK picks the GPU
#
# A GPU script calls `torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))` before its first
# CUDA work (and before `init_process_group` with NCCL): each process on a node takes a
# different GPU of that node. `cuda:i` means the i-th GPU *this process can see*: with
# `CUDA_VISIBLE_DEVICES=2,3`, `cuda:0` is physical GPU 2. Using RANK instead would ask rank 3
# for `cuda:3` on a node where only `cuda:0` and `cuda:1` exist ("invalid device ordinal").

# %%
print(
    "RANK  node  CUDA_VISIBLE_DEVICES  set_device(LOCAL_RANK)  physical GPU  set_device(RANK) would ask for"
)
for v in ranks:
    listed = v["CUDA_VISIBLE_DEVICES"].split(",")
    by_rank = f"cuda:{v['RANK']}" + ("" if int(v["RANK"]) < len(listed) else ", which does not exist there")
    print(
        f"{v['RANK']:>4}  {v['GROUP_RANK']:>4}  {v['CUDA_VISIBLE_DEVICES']:>20}  {v['device']:>22}  "
        f"{v['physical_gpu']:>12}  {by_rank}"
    )
    assert v["device"] == f"cuda:{v['LOCAL_RANK']}"
    assert v["physical_gpu"] == int(listed[int(v["LOCAL_RANK"])])
assert sorted(v["physical_gpu"] for v in ranks) == [0, 1, 2, 3]  # four ranks, four different GPUs
assert any(int(v["RANK"]) >= len(v["CUDA_VISIBLE_DEVICES"].split(",")) for v in ranks)

# %% [markdown]
# (torchrun itself passes `CUDA_VISIBLE_DEVICES` on as it found it; its `--virtual-local-rank`
# option instead gives each process one GPU in it, and LOCAL_RANK = 0.) Exercise 10.5 computes
# (node, local rank, GPU) of every rank.
#
# ### 4.3 The global batch: micro × accumulation × data-parallel ranks
#
# One optimizer step consumes the **global batch** B. Each data-parallel rank runs M
# micro-batches of b samples (chapter 02's gradient accumulation) before the gradients are
# averaged, so
#
# B = b × M × N_dp.
#
# DeepSpeed checks exactly this in its configuration (`train_batch_size` =
# `train_micro_batch_size_per_gpu` × `gradient_accumulation_steps` × its data-parallel world
# size). Adding a node doubles N_dp: keep B (and the learning rate tuned for it) by halving M.
# In the two-node run, every rank trained one step with b = 2 and
# M = `accumulation_steps(16, 2, 4)`; the ranks counted their samples and compared the averaged
# gradient with one process on all 16 samples:

# %%
from course_lib.torchrun import accumulation_steps

batch = two_nodes.report["batch"]
b, M, n_dp, B = batch["micro_batch"], batch["accumulation_steps"], batch["dp_ranks"], batch["global_batch"]
print(
    f"b × M × N_dp = {b} × {M} × {n_dp} = {b * M * n_dp};  global batch B = {B};  "
    f"samples the ranks saw: {batch['samples_seen']}"
)
print(f"largest |gradient − one process on all {B} samples| = {batch['max_grad_diff']:.1e}")
assert b * M * n_dp == B == batch["samples_seen"]
assert batch["max_grad_diff"] <= 1e-5

assert accumulation_steps(16, 2, 8) == M // 2  # the same B on twice the ranks: half the steps
try:
    accumulation_steps(24, 2, 8)  # 24 samples do not split into micro-batches of 2 on 8 ranks
except ValueError as err:
    print("accumulation_steps(24, 2, 8):", err)
else:
    raise AssertionError("a global batch that does not split must be refused")

# %% [markdown]
# Refusing beats rounding: M = 1 would silently train with 16 samples per step instead of 24.
# Exercise 10.6 writes `accumulation_steps`, with tensor and pipeline parallelism in it.
#
# ### 4.4 Time across the nodes: the α–β model beside a measurement
#
# Chapter 01's latency–bandwidth model says a message of S bytes takes α + S/β. Fit α and β on
# this machine (a quick ping-pong between two ranks over loopback; we fit the best of several
# batches, the machine's speed when nothing else interferes):

# %%
from course_lib import alpha_beta
from course_lib.collectives import format_bytes
from course_lib.comm import HEADER_BYTES

pp = alpha_beta.measure_point_to_point([4, 4096, 65536, 1 << 20, 4 << 20], min_seconds=0.05)
model = alpha_beta.fit(pp.nbytes, pp.fastest)
print(pp.table())
print("fitted to the best batches:", model.describe())

# %% [markdown]
# The two-node run timed the course's ring all-reduce between rank 0 (node 0) and rank 2
# (node 1): N = 2 ranks, so 2(N−1) = 2 messages of S/2 each, after one small message in which the
# ring checks its neighbour's shape and dtype (`HEADER_BYTES`). Predicted: α + HEADER/β +
# 2(α + S/(2β)), beside the measurement (best batch and median):

# %%
timed = two_nodes.report["all_reduce"]
print(f"ranks {two_nodes.report['pair']} (one per node)")
print(f"{'S':>8} {'predicted':>10} {'best':>10} {'median':>10}  best/predicted")
cross_node = []
for nbytes, median, best in zip(timed["nbytes"], timed["seconds"], timed["fastest"]):
    predicted = model.message(HEADER_BYTES) + model.ring_all_reduce(2, nbytes)
    cross_node.append((nbytes, predicted, best))
    print(
        f"{format_bytes(nbytes):>8} {predicted * 1e3:>7.2f} ms {best * 1e3:>7.2f} ms {median * 1e3:>7.2f} ms"
        f"  {best / predicted:6.2f}"
    )
assert len(cross_node) == 3 and all(best > 0 for _, _, best in cross_node)

# %% [markdown]
# How close the two columns come depends on how busy this machine is: the fit and the
# all-reduce ran at different moments, and on a laptop the four ranks of the two "nodes" share a
# few cores, so a message waits whenever its receiver is not scheduled. Read the ratio, not the
# digits.
#
# **Loopback is not a network.** Here the bytes never leave the machine: the operating system
# copies them from one process's socket buffer to another's, so β is about the speed of a
# memory copy, and α is the cost of the software (Python, gloo, the kernel), not of a wire.
# Between real nodes:
#
# - β becomes the network's: 25 Gb/s Ethernet carries about 3 GB/s, one 400 Gb/s InfiniBand
#   port 50 GB/s, shared by the GPUs of a node that use that card; inside a node, GPUs talk over
#   NVLink, far faster. A ring that spans nodes runs at its slowest link, so the model is
#   evaluated with the network's α and β (4.6).
# - α gains the cards, cables and switches between the machines; with NCCL on GPUs, RDMA
#   (InfiniBand, RoCE) skips the operating system's socket copies that dominate here.
# - The nodes no longer share CPU cores, memory or a kernel, and they fail on their own: a node
#   that never joins leaves the others waiting at the rendezvous (`run_nodes` stops them at its
#   timeout; torchrun's own `join_timeout` is 600 s unless set).
# - Left to itself, NCCL picks an `ib…` interface first, then any other except `docker…` and
#   `lo`, and the loopback `lo` only when nothing else exists (or `NCCL_SOCKET_IFNAME` names it);
#   on real machines, which interface the nodes share becomes a question (below).
#
# ### 4.5 On real machines
#
# Run the same command on every machine; `HOST` is the address of the machine that hosts the
# rendezvous *as the others see it*, and `--rdzv_id` a name the job's nodes share:
#
# ```bash
# torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
#          --rdzv_id myjob -m course_lib.demo dp
# ```
#
# With `c10d` no `--node_rank` is needed (it would be ignored, as we saw). The `static`
# rendezvous, torchrun's default, takes `--master_addr HOST --master_port 29500 --node_rank i`
# instead, with node_rank 0 on HOST.
#
# **When it does not start or hangs at the start:**
# - *Name resolution errors*: `HOST` must resolve on every node, and the hostname each node
#   reports must lead to an address the others can reach (one mapped to 127.0.1.1 in
#   `/etc/hosts` does not). Use IP addresses to rule names out.
# - *Hangs at the rendezvous*: the rendezvous port must be reachable (`nc -zv HOST 29500` from
#   another node), and so must the ports that torchrun's store, gloo and NCCL open afterwards,
#   which are not fixed in advance: a firewall between the nodes must let them through. A port
#   still held by an earlier run blocks too: pick another.
# - *Several network interfaces*: a rank may pick one the other node cannot reach (docker0, a
#   VPN). Name the right one: `GLOO_SOCKET_IFNAME=eth0` for gloo; `NCCL_SOCKET_IFNAME=eth0` for
#   NCCL, which reads the value as a *prefix* (`=eth0` means exactly eth0, `^docker` excludes);
#   `ip addr` lists the names.
# - *NCCL hangs, or is very slow, between the GPUs of one machine*: direct GPU-to-GPU copies
#   over PCIe can be blocked by the platform (PCIe ACS, an IOMMU, some virtual machines).
#   NCCL's troubleshooting guide fixes the platform; `NCCL_P2P_DISABLE=1` is the stop-gap that
#   sends the data through host memory instead, slower but working. NCCL's documentation lists
#   such switches as debugging aids, to remove once the cause is fixed.
# - *What did NCCL choose?* `NCCL_DEBUG=INFO` prints its version, the interfaces and transports
#   it picked, and more; `NCCL_DEBUG=WARN` only what went wrong.
# - Same code, Python, torch and NCCL versions on every node.
#
# ### 4.6 When two machines are slower than one
#
# Data parallelism all-reduces the gradients, Ψ numbers, every step. Evaluate the α–β ring
# formula 2(N−1)α + 2(N−1)/N·S/β with S = 4Ψ bytes (fp32 gradients) for the slowest link of the
# ring. Take Ψ = 1 B parameters, 8 GPUs per node joined by NVLink (assume ~200 GB/s per GPU),
# between nodes a 25 Gb/s Ethernet or a 400 Gb/s InfiniBand card, α = 10 µs everywhere (it
# hardly matters here), and one step that computes for 1 s on 8 GPUs (0.5 s on 16, as the batch
# per GPU halves):

# %%
PSI, ALPHA = 1e9, 10e-6
nvlink, ethernet_25g, infiniband_400g = (
    alpha_beta.AlphaBeta(ALPHA, beta) for beta in (200e9, 25e9 / 8, 400e9 / 8)
)
setups = [
    ("1 node,  8 GPUs (NVLink)", 8, nvlink, 1.0),
    ("2 nodes, 16 GPUs, 25 Gb/s Ethernet", 16, ethernet_25g, 0.5),
    ("2 nodes, 16 GPUs, 400 Gb/s InfiniBand", 16, infiniband_400g, 0.5),
]
step = {}
for name, n, link, compute in setups:
    comm_s = link.ring_all_reduce(n, 4 * PSI)
    step[name] = comm_s + compute
    print(f"{name:38} all-reduce {comm_s:6.2f} s + compute {compute:.1f} s = {step[name]:5.2f} s per step")
one, eth, ib = step.values()
assert eth / one > 2.5  # twice the GPUs, almost three times slower per step
assert ib < one  # a fast network makes 16 GPUs faster than 8
assert nvlink.beta / ethernet_25g.beta == 64

# %% [markdown]
# Twice the GPUs, almost three times *slower* per step on Ethernet: the 25 Gb/s link is 64 times
# slower than the assumed NVLink, and the all-reduce (≈ 2·4Ψ bytes per rank) does not shrink with
# N. Overlap (chapter 03's buckets) hides communication only up to the compute time. What helps:
# a faster interconnect (InfiniBand / RoCE, several cards per node), sending less across nodes
# (hierarchical all-reduce: reduce inside the node first; lower-precision gradients; more
# accumulation steps per optimizer step, 4.3, so fewer syncs per sample), and placing the chatty
# strategies inside a node — TP's all-reduces in every layer within a node, pipeline stages or
# data parallelism across nodes (chapter 09).
#
# ## What you measured
#
# Each formula of this chapter beside the number your run produced.

# %%
nbytes, predicted, best = cross_node[-1]
identity_holds = sum(
    int(v["RANK"]) == int(v["GROUP_RANK"]) * int(v["LOCAL_WORLD_SIZE"]) + int(v["LOCAL_RANK"]) for v in ranks
)
rows = [
    ("RANK = GROUP_RANK·LOCAL_WORLD_SIZE + LOCAL_RANK", "every rank", f"{identity_holds} of {len(ranks)}"),
    (
        "GPU of set_device(LOCAL_RANK), ranks 0–3",
        "CUDA_VISIBLE_DEVICES[LOCAL_RANK]",
        ", ".join(str(v["physical_gpu"]) for v in ranks),
    ),
    ("B = b × M × N_dp", f"{b} × {M} × {n_dp} = {b * M * n_dp}", f"{batch['samples_seen']} samples"),
    ("|accumulated DP gradient − one process|", "0 (fp32 rounding)", f"{batch['max_grad_diff']:.1e}"),
    (
        "α, β on loopback (best batches)",
        "t = α + S/β",
        f"{model.alpha * 1e6:.0f} µs, {model.beta / 1e9:.2f} GB/s",
    ),
    (
        f"ring all-reduce, 2 nodes, S = {format_bytes(nbytes)}",
        f"3α + (H + S)/β = {predicted * 1e3:.2f} ms",
        f"{best * 1e3:.2f} ms",
    ),
    (
        "one torchrun / two-node run, wall time",
        "seconds",
        f"{one_node_seconds:.1f} s / {two_nodes.seconds:.1f} s",
    ),
    (
        "all-reduce, plain → debug=True (DETAIL)",
        "extra checks",
        f"{plain * 1e3:.2f} → {checked * 1e3:.2f} ms",
    ),
]
print(f"{'quantity':47} {'formula':32} {'measured':>20}")
for what, formula, got in rows:
    print(f"{what:47} {formula:32} {got:>20}")

# %% [markdown]
# **Next:** the exercises, `my_exercises/10_debugging.ipynb`: fix the four broken functions, then
# place every rank of a multi-node job (10.5) and split a global batch (10.6).
