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
# # 01 · Collectives from send/recv — exercises
#
# In the lesson (`notebooks/01_collectives.ipynb`) every collective was a single call into
# `torch.distributed`. Here you build some of them yourself from the only two things a network
# really offers: **send** a tensor to one rank, and **receive** a tensor from one rank.
#
# Notation, as in the lesson: **N** ranks; **K** elements in the **full** array. In broadcast,
# reduce and all-reduce every rank's tensor is the full array of K; in all-gather each rank holds
# a shard of K/N and ends with all K. Rank `r` is `dist.get_rank()`, N is `dist.get_world_size()`.
#
# How the checks work: each check cell runs your function on N = 1, 2, 3 and 4 ranks (3 is not a
# power of two), with every rank as the root, on tensors of whole numbers, and compares the result
# *exactly* with torch's own collective. It prints one line: `✔`, or `✘` with the world size, the
# rank and the element that differ. Inside the check the built-in collectives (`dist.broadcast`,
# `dist.all_reduce`, …) are switched off: only `dist.send`, `dist.recv`, `dist.isend` and
# `dist.irecv` work. A function that waits forever (a `recv` nobody sends to) is stopped after
# about ten seconds and reported as a deadlock, with where each rank was waiting.
#
# Two rules of point-to-point that every exercise leans on:
#
# * `dist.send(t, dst)` may **block until `dst` posts the matching `recv`**. If two ranks both
#   `send` to each other first, both can wait forever. Use `req = dist.isend(t, dst)` (returns at
#   once), do your `recv`, then `req.wait()`.
# * A `recv` must name a tensor of the **same shape and dtype** as the one sent; gloo does not
#   always catch a mismatch.

# %%
import torch
import torch.distributed as dist

from course_lib import launch
from course_lib.checks import collectives as check

# %% [markdown]
# ### A warm-up you can run: send/recv on two ranks
#
# Rank 0 sends a tensor to rank 1. `launch.run(fn, N)` runs `fn` on N ranks, each a separate
# process, and returns what every rank returned. Add prints or change the code to experiment —
# this is also how you can debug your own functions below: call them inside a function like
# `hello`, print on each rank, and look at the `[rank r]` lines.

# %%
def hello():
    rank = dist.get_rank()
    t = torch.zeros(3, device=launch.device())  # the rank's device: cuda:r under NCCL
    if rank == 0:
        t += torch.tensor([1.0, 2.0, 3.0], device=t.device)
        dist.send(t, dst=1)
    else:
        dist.recv(t, src=0)
    print("I hold", t.tolist())
    return t


launch.run(hello, 2)

# %% [markdown]
# ## Exercise 1.1 — broadcast
#
# After `broadcast(tensor, src)`, every rank's `tensor` holds what rank `src`'s `tensor` held.
# Change `tensor` **in place** (`dist.recv` writes into the tensor you give it), return nothing.
#
# The simplest correct version: `src` sends to each of the other N−1 ranks in turn; every other
# rank receives once from `src`. (The root then sends (N−1)·K elements alone, in N−1 rounds — the
# lesson traced a tree that needs only ⌈log₂N⌉, and exercise 1.3 builds that tree for reduce.)

# %%
def broadcast(tensor, src):
    """Make every rank's `tensor` equal to rank `src`'s, in place, using only send/recv."""
    ### BEGIN SOLUTION
    rank, n = dist.get_rank(), dist.get_world_size()
    if rank == src:
        for dst in range(n):
            if dst != src:
                dist.send(tensor, dst)
    else:
        dist.recv(tensor, src)
    ### END SOLUTION


# %%
check.broadcast(broadcast)

# %% [markdown]
# ## Exercise 1.2 — all-gather as a ring
#
# `all_gather(tensor)` returns a list of N tensors on every rank: item `j` is rank `j`'s `tensor`,
# its shard of K/N elements.
#
# Build it as a **ring**: rank r only ever sends to its right neighbour `(r + 1) % N` and receives
# from its left neighbour `(r - 1) % N`. Start with your own tensor in slot `r`. In each of N−1
# steps, send the slot you filled most recently to the right and receive the next slot from the
# left: at step `s` rank r sends slot `(r − s) % N` and receives slot `(r − s − 1) % N`.
#
# ```
# step 0:  r sends its own slot r          receives slot r−1 (the left neighbour's own)
# step 1:  r forwards slot r−1             receives slot r−2
# ...      after N−1 steps every rank holds all N slots
# ```
#
# Every rank sends and receives one shard of K/N elements per step, (N−1)/N·K in all — the
# least any algorithm can manage, since each rank must receive the N−1 shards it lacks, and no
# rank does more than another: that is why rings are bandwidth-optimal. Every rank sends and receives in the same
# step, so use `isend` for the send (see the rules above).

# %%
def all_gather(tensor):
    """Return [tensor of rank 0, ..., tensor of rank N-1] on every rank, gathered around a ring."""
    ### BEGIN SOLUTION
    rank, n = dist.get_rank(), dist.get_world_size()
    right, left = (rank + 1) % n, (rank - 1) % n
    gathered = [torch.empty_like(tensor) for _ in range(n)]
    gathered[rank] = tensor.clone()
    for step in range(n - 1):
        request = dist.isend(gathered[(rank - step) % n], right)
        dist.recv(gathered[(rank - step - 1) % n], left)
        request.wait()
    return gathered
    ### END SOLUTION


# %%
check.all_gather(all_gather)

# %% [markdown]
# ## Exercise 1.3 — reduce as a binomial tree
#
# After `reduce(tensor, dst)`, rank `dst`'s `tensor` holds the **sum** of every rank's `tensor`
# (in place). The other ranks' tensors may end up holding anything — use them as scratch.
#
# A binomial tree finishes in ⌈log₂ N⌉ rounds instead of N−1. Number the ranks relative to the
# root, `me = (rank − dst) % N`, so the root is 0. In round `step = 1, 2, 4, …`:
#
# * if `me` has the bit `step` set, send your partial sum to `me − step` and stop;
# * otherwise, if `me + step < N`, receive from `me + step` and add it to your tensor.
#
# Convert back to real ranks with `(me ± step + dst) % N`. With N = 3 and dst = 0: round 1, rank 1
# sends to 0 (rank 2 has no partner at distance 1 and waits); round 2, rank 2 sends to 0.

# %%
def reduce(tensor, dst):
    """Sum every rank's `tensor` into rank `dst`'s `tensor`, in place, using only send/recv."""
    ### BEGIN SOLUTION
    rank, n = dist.get_rank(), dist.get_world_size()
    me = (rank - dst) % n
    incoming = torch.empty_like(tensor)
    step = 1
    while step < n:
        if me % (2 * step):
            dist.send(tensor, (me - step + dst) % n)
            break
        if me + step < n:
            dist.recv(incoming, (me + step + dst) % n)
            tensor += incoming
        step *= 2
    ### END SOLUTION


# %%
check.reduce(reduce)

# %% [markdown]
# ## Exercise 1.4 — all-reduce = reduce + broadcast
#
# After `all_reduce(tensor)`, **every** rank's `tensor` holds the sum over all ranks. Build it from
# your `reduce` (1.3) and `broadcast` (1.1): two lines. (If those are not done yet, this check
# reads "not attempted" too.)
#
# It is correct, but not fast: the root receives the whole K elements ⌈log₂N⌉ times (the tree),
# then sends them N−1 times (your broadcast). Chapter 03 builds the ring all-reduce, where every
# rank sends only 2(N−1)/N·K elements — the algorithm behind data parallelism.

# %%
def all_reduce(tensor):
    """Sum every rank's `tensor` into every rank's `tensor`, in place: reduce, then broadcast."""
    ### BEGIN SOLUTION
    reduce(tensor, 0)
    broadcast(tensor, 0)
    ### END SOLUTION


# %%
check.all_reduce(all_reduce)
