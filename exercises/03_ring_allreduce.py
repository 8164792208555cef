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
# > **Where to work.** Do these exercises in your own copy, `my_exercises/03_ring_allreduce.ipynb` (`make lab` makes it; delete it and run `make lab` again for a fresh one). Answers typed into `exercises/` would be overwritten when the course is updated.
# >
# > Replace every `# YOUR CODE HERE` with your code and run the check cell below it: it prints ✔, or what is wrong. To grade all your notebooks from a terminal, run `make grade`.

# %% [markdown]
# # 03 · Ring all-reduce and DDP's buckets — exercises
#
# In the lesson (`notebooks/03_ring_allreduce.ipynb`) you saw the ring all-reduce move
# 2(N−1)/N·K elements per rank, and DDP all-reduce gradients in buckets while backward still
# runs. Here you build the ring yourself from send/recv, and the bucket assignment DDP uses.
#
# Notation: **N** ranks, a tensor of **K** elements on each. The tensor is cut into N **chunks**:
# chunk `c` is `tensor.view(-1).tensor_split(N)[c]`, a *view* (writing into it writes into the
# tensor). When N does not divide K, the first K mod N chunks hold one element more; when K < N,
# some chunks are empty (sending an empty tensor is fine).
#
# How the checks work: each ring check runs your function on N = 1, 2, 3 and 4 ranks, on three
# tensors (K = 10 as int64, K = 7 as float32, K = 2 as int64), and compares the result *exactly*
# with the sums computed from every rank's data. It also counts the bytes each rank sent: a ring
# sends each chunk once per phase, and a version that gets the right numbers by sending more is
# reported. Inside the checks the built-in collectives are switched off (only `dist.send`,
# `dist.recv`, `dist.isend`, `dist.irecv` work), and a function that waits forever is stopped
# after about ten seconds and reported as a deadlock.

# %%
import torch
import torch.distributed as dist

from course_lib import launch
from course_lib.checks import ring_allreduce as check

# %% [markdown]
# ### Warm-up you can run: chunks, and one ring step
#
# Chunks of K = 10 elements on N = 3 ranks have 4, 3 and 3 elements:

# %%
torch.arange(10).tensor_split(3)

# %% [markdown]
# One **ring step**: every rank sends one chunk to its right neighbour `(r + 1) % N` and
# receives one from its left neighbour `(r − 1) % N`. Everybody sends and receives at once, so
# the send must not block: `isend`, then `recv`, then wait for the send. Here each rank sends
# its chunk `r` and receives its left neighbour's chunk `r − 1` into a scratch buffer:

# %%
def one_ring_step():
    r, n = dist.get_rank(), dist.get_world_size()
    tensor = 100 * r + torch.arange(10)  # rank r holds 100r, 100r + 1, ...
    chunks = tensor.tensor_split(n)
    incoming = torch.empty_like(chunks[(r - 1) % n])
    request = dist.isend(chunks[r], (r + 1) % n)
    dist.recv(incoming, (r - 1) % n)
    request.wait()
    print(f"sent chunk {r} {chunks[r].tolist()}, received chunk {(r - 1) % n}: {incoming.tolist()}")


results = launch.run(one_ring_step, 3)

# %% [markdown]
# ## Exercise 3.1 — ring reduce-scatter
#
# After `ring_reduce_scatter(tensor)`, **chunk r of rank r's tensor** holds the sum over all ranks
# of their chunk r. Work in place; the other chunks may end up holding anything (partial sums).
#
# Every chunk travels once around the ring, picking up one rank's contribution per hop. For
# chunk `c` to end complete on rank `c` after N−1 hops, it must start on rank `c + 1`. So at
# step `s = 0 … N−2` rank r
#
# * **sends** its chunk `(r − s − 1) % N` to the right (at step 0 its own data, later the partial
#   sum it just added to),
# * **receives** chunk `(r − s − 2) % N` from the left into a scratch buffer, and **adds** it to
#   its own chunk `(r − s − 2) % N`.
#
# ```
# N = 3   step 0: rank 0 sends chunk 2, receives chunk 1 (+=)   rank 1 sends 0, receives 2   ...
#         step 1: rank 0 sends chunk 1, receives chunk 0 (+=)   → chunk 0 is complete on rank 0
# ```
#
# Each rank sends N−1 chunks: (N−1)/N·K elements.

# %% answer="ring_reduce_scatter" tags=["answer"]
def ring_reduce_scatter(tensor):
    """Sum chunk r of every rank's `tensor` into chunk r of rank r's `tensor`, in place, around a ring."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.ring_reduce_scatter(ring_reduce_scatter)

# %% [markdown]
# ## Exercise 3.2 — ring all-gather
#
# Now the other half. Rank r starts with its finished chunk r (what 3.1 leaves); after
# `ring_all_gather(tensor)` **every** chunk of every rank's tensor holds the right values: chunk
# c is rank c's chunk c. (The check fills the chunks a rank does not own with −99.)
#
# The same ring as exercise 1.2, but in place: at step `s` rank r sends chunk `(r − s) % N` —
# its own first, then the one it received last — and receives chunk `(r − s − 1) % N`
# **directly into that chunk** of its tensor (no scratch buffer, no addition).

# %% answer="ring_all_gather" tags=["answer"]
def ring_all_gather(tensor):
    """Fill every chunk c of every rank's `tensor` with chunk c of rank c, in place, around a ring."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.ring_all_gather(ring_all_gather)

# %% [markdown]
# ## Exercise 3.3 — ring all-reduce
#
# All-reduce = reduce-scatter + all-gather. After `ring_all_reduce(tensor)` every rank's tensor
# holds the sum over all ranks, in place. Use your two functions. Each rank sends
# 2(N−1)/N·K elements in 2(N−1) steps — never more than 2K, however many ranks join — where the
# reduce + broadcast of exercise 1.4 made the root receive K elements ⌈log₂ N⌉ times and send
# them N−1 times.

# %% answer="ring_all_reduce" tags=["answer"]
def ring_all_reduce(tensor):
    """Sum every rank's `tensor` into every rank's `tensor`, in place: reduce-scatter, then all-gather."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.ring_all_reduce(ring_all_reduce)

# %% [markdown]
# ## Exercise 3.4 — DDP's buckets
#
# DDP does not all-reduce each gradient alone (too many small messages) nor all of them at the
# end (no overlap with backward). It groups parameters into **buckets** of about
# `bucket_cap_mb`. Backward computes gradients from the last layer to the first, so buckets are
# filled in **reverse** parameter order: the first bucket is ready early, and its all-reduce runs
# while backward computes the rest.
#
# `assign_buckets(sizes, cap_bytes)` gets each parameter's gradient size in bytes, in
# registration order (`sizes[i]` for parameter i), and returns the buckets as lists of parameter
# indices. Walk from the **last** parameter to the first, appending each to the open bucket;
# as soon as the open bucket holds **at least** `cap_bytes`, close it and open a new one. A
# bucket left open at the end is the last bucket. For example
# `assign_buckets([4, 4, 4], 8) == [[2, 1], [0]]` and `assign_buckets([16, 4, 4, 4], 10) ==
# [[3, 2, 1], [0]]`.
#
# `course_lib.ddp.BucketedDDP` uses this rule. Torch's DDP closes its buckets the same way (at
# the cap or above) but differs in three ways, which the lesson measures: its first backward pass
# uses a single bucket for everything; from the next step on, it walks the order in which the
# gradients actually became ready in that pass (for a plain stack of layers, the reverse of the
# registration order, so the buckets come out as yours); and when `bucket_cap_mb` is left at its
# default of 25 MiB, its first bucket closes at 1 MiB, so that the first all-reduce starts early.

# %% answer="assign_buckets" tags=["answer"]
def assign_buckets(sizes, cap_bytes):
    """Indices of the parameters in each bucket, last parameter first; a bucket closes at >= cap_bytes."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.assign_buckets(assign_buckets)

# %% [markdown]
# **Done?** Your `ring_all_reduce` is the algorithm behind `dist.all_reduce` on gloo, and NCCL's
# ring. The lesson's last part wraps it all up: `course_lib.ddp.BucketedDDP` fills buckets with
# your rule and all-reduces each one as soon as its last gradient is in, while backward goes on.
