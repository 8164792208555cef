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
# # 01 · Collectives: how ranks talk
#
# Every way of training one model on many devices — data, tensor, pipeline, sequence and expert
# parallelism, ZeRO — is ordinary single-device training plus a few **communication patterns**
# between the devices. This chapter meets all of them, runs each on real processes, and
# measures how fast they are.
#
# Notation used in the whole course: **N** ranks (processes, one per device), each holding a
# tensor; **K** elements in the full array; rank `r` is one of 0 … N−1.
#
# * **Point-to-point**: one rank sends, one rank receives (`send`/`recv`).
# * **Collectives**: *every* rank of the group makes the same call, and data moves among all of
#   them: broadcast, reduce, all-reduce, all-gather, reduce-scatter, all-to-all.
#
# `launch.run(fn, N)` runs `fn` on N ranks, each its own process with a `torch.distributed`
# process group (gloo on a laptop's CPU, NCCL when there is one GPU per rank), and returns every
# rank's return value. Printed lines come back prefixed with `[rank r]`.

# %%
import inspect

import ipywidgets as widgets
import torch
import torch.distributed as dist
from IPython.display import display

from course_lib import collectives, launch, viz

# %% [markdown]
# ## Point-to-point: send and recv
#
# `dist.send(tensor, dst)` ships a tensor to rank `dst`; `dist.recv(tensor, src)` waits for one
# from rank `src` and writes it **into** the tensor it is given (which must already have the right
# shape and dtype). Here rank 0 sends three numbers to rank 1:

# %%
def send_to_rank_1():
    t = torch.zeros(3, device=launch.device())  # the rank's device: cuda:r under NCCL
    if dist.get_rank() == 0:
        t = torch.tensor([1.0, 2.0, 3.0], device=launch.device())
        dist.send(t, dst=1)
    else:
        dist.recv(t, src=0)
    print("after:", t.tolist())
    return t


launch.run(send_to_rank_1, 2)

# %% [markdown]
# A blocking `send` may wait until its `recv` is posted. When every rank sends *and* receives in
# the same step — each rank passing its data to the right neighbour, the step every ring algorithm
# repeats — use the non-blocking `isend`, then `recv`, then wait for the send.
#
# The pictures below show **one row per rank** and one cell per element, before and after. A
# cell's colour says which rank its value came from; rank r starts with the values 10·r, 10·r+1, …
# so that sums can be read off.

# %%
viz.show_collective("send/recv", 4)

# %% [markdown]
# ## Broadcast
#
# One rank, the **root** (`src`), has a tensor; afterwards every rank has a copy. Used to start all
# ranks from the same initial weights.

# %%
viz.show_collective("broadcast", 4, root=1)

# %% [markdown]
# ## Reduce
#
# Every rank contributes a tensor; the root (`dst`) ends with their element-wise **sum** (or max,
# …). The other ranks' tensors are left undefined (gloo uses them as scratch), so the picture
# shows "no result" there. A striped cell is a sum: one stripe per rank added into it.

# %%
viz.show_collective("reduce", 4, root=0)

# %% [markdown]
# ## All-reduce
#
# Reduce, but **every** rank ends with the sum. This is the collective of data parallelism: each
# rank computes gradients on its own micro-batch, one all-reduce sums them, and every rank applies
# the same update. A ring all-reduce sends 2(N−1)/N·K elements per rank — almost 2K, no matter how
# large N is (a later chapter builds it).

# %%
viz.show_collective("all-reduce", 4)

# %% [markdown]
# ## All-gather
#
# Each rank holds one **shard** of K/N elements; afterwards every rank holds the whole array of
# K, shards in rank order. Used to reassemble sharded weights (ZeRO-3/FSDP) and sharded
# activations (tensor and sequence parallelism). A ring all-gather sends (N−1)/N·K per rank.

# %%
viz.show_collective("all-gather", 4)

# %% [markdown]
# ## Reduce-scatter
#
# The mirror image of all-gather: every rank starts with a full array of K, the arrays are summed,
# and rank r keeps only **chunk r** of the sum (K/N elements). Also (N−1)/N·K per rank on a ring.
# Chaining the two gives an all-reduce: **all-reduce = reduce-scatter + all-gather**, which is
# exactly how the ring all-reduce works and why ZeRO can shard gradients for free.

# %%
viz.show_collective("reduce-scatter", 4)

# %% [markdown]
# ## All-to-all
#
# Every rank splits its array into N chunks and sends chunk j to rank j; rank r ends with chunk r
# from every rank, in rank order — a transpose of the (rank × chunk) grid. Mixture-of-experts uses
# it to send each token to the rank that holds its expert, and again to bring the results back.

# %%
viz.show_collective("all-to-all", 4)

# %% [markdown]
# ## The code behind the pictures
#
# Each picture comes from the function below, run on every rank (`course_lib/collectives.py`);
# `inp` and `out` are this rank's input and output tensors. Sizes follow nccl-tests: K is the
# number of elements of the **full** array, so all-gather's input is K/N and reduce-scatter's
# output is K/N.

# %%
print(inspect.getsource(collectives.collective))

# %% [markdown]
# A quick check of the identity above, on 4 ranks: an all-reduce of K = 8 elements gives the same
# numbers as a reduce-scatter followed by an all-gather.

# %%
def all_reduce_two_ways():
    rank = dist.get_rank()
    x = 10.0 * rank + torch.arange(8.0, device=launch.device())
    direct = x.clone()
    dist.all_reduce(direct)
    shard = torch.empty(8 // dist.get_world_size(), device=x.device)
    collectives.collective("reduce-scatter", x, shard)
    gathered = torch.empty(8, device=x.device)
    collectives.collective("all-gather", shard, gathered)
    return torch.equal(direct, gathered)


launch.run(all_reduce_two_ways, 4)

# %% [markdown]
# ## Try it: any collective, any N
#
# Pick a collective, the number of ranks N, and (for broadcast and reduce) the root. Each change
# launches N fresh processes and redraws the picture.

# %%
collective_picker = widgets.Dropdown(options=collectives.COLLECTIVES, value="all-to-all",
                                     description="collective")
ranks_slider = widgets.IntSlider(value=4, min=1, max=8, description="N ranks")
root_slider = widgets.IntSlider(value=0, min=0, max=7, description="root")


def redraw(name, n, root):
    display(viz.show_collective(name, n, root=min(root, n - 1)))


picture = widgets.interactive_output(redraw, dict(name=collective_picker, n=ranks_slider,
                                                  root=root_slider))
display(widgets.HBox([collective_picker, ranks_slider, root_slider]), picture)

# %% [markdown]
# ## Where the later chapters use them
#
# | collective | used by |
# |---|---|
# | broadcast | every chapter: the same initial weights on all ranks |
# | all-reduce | data parallelism (gradients), Megatron tensor parallelism (f and g) |
# | all-gather / reduce-scatter | tensor + sequence parallelism, ZeRO and FSDP (weights and gradients) |
# | all-to-all | mixture of experts (tokens to experts and back) |
# | send / recv | pipeline parallelism (activations and gradients between stages), rings |
#
# ## How fast? Time and bus bandwidth
#
# Time one all-reduce of S bytes (the full array) on N ranks, for S from 4 KiB to 4 MiB. Two
# numbers, following nccl-tests (PERFORMANCE.md):
#
# * **algorithm bandwidth** algbw = S / t — bytes of the array per second;
# * **bus bandwidth** busbw = algbw × factor, with factor = 2(N−1)/N for all-reduce,
#   (N−1)/N for all-gather, reduce-scatter and all-to-all, and 1 for broadcast and reduce.
#
# The factor counts what a bandwidth-optimal algorithm must push through each rank's link: a ring
# all-reduce sends 2(N−1)/N·S bytes per rank, so t ≥ 2(N−1)/N·S / B for a link of B bytes/s, i.e.
# busbw ≤ B. That makes busbw comparable across N and across collectives, and against the
# hardware's link speed. Each size is run for about 0.1 s; the time is the slowest rank's.

# %%
sizes = [4 * 1024 * 4**i for i in range(6)]  # 4 KiB, 16 KiB, ..., 4 MiB
timings = [collectives.time_collective("all-reduce", n, sizes) for n in (2, 4)]
timings.append(collectives.time_collective("all-gather", 4, sizes))
for t in timings:
    print(t.table(), end="\n\n")

# %%
viz.plot_timing(timings)

# %% [markdown]
# What to read in the plots (your numbers will differ from run to run):
#
# * **Small arrays are latency-bound**: the time barely changes from 4 KiB to 64 KiB, so busbw is
#   tiny. Here that fixed cost is large — on a laptop the ranks are processes sharing a few CPU
#   cores, so each step waits for the operating system to schedule the next rank; NCCL between
#   GPUs pays a few microseconds instead.
# * **Large arrays are bandwidth-bound**: time grows with S and busbw climbs toward what the
#   "link" can carry — here memory copies through the kernel's loopback network.
# * More ranks on the same cores are slower per call (N = 4 on 2 cores time-slices), which the
#   busbw factor cannot hide: it corrects for the algorithm, not for shared hardware.
#
# Fewer, larger messages are faster: this is why data parallelism groups gradients into buckets
# before all-reducing them (the data-parallel chapter), and why the cost models of later chapters are written as
# "latency + bytes / bandwidth".
#
# **Next**: the exercises (`exercises/01_collectives.ipynb`) build broadcast, a ring all-gather, a
# tree reduce and an all-reduce from nothing but send and recv.
