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
# # 10 · Debugging — labs, and the arithmetic of many nodes
#
# Four short distributed functions, each with a bug that really happens in practice. For each
# lab you first **run the broken version** and read what the launcher (or the check) reports;
# then you write the fixed function in the answer cell, and the check cell runs it on several
# world sizes and compares every rank with one process. Two exercises at the end (10.5, 10.6)
# work out where each rank of a multi-node job runs and how a global batch is split.
#
# Reading the reports is covered in the lesson (`notebooks/10_debugging.ipynb`):
# `RankError` names the rank that crashed and quotes its traceback; `DeadlockError` lists where
# every rank was waiting; a silently wrong result only shows up when you compare numbers.
#
# Rank `r` is `dist.get_rank()`, N is `dist.get_world_size()`.

# %%
import torch
import torch.distributed as dist
import torch.nn.functional as F

from course_lib.checks import debugging as check

# %% [markdown]
# ## Lab 10.1 — a collective one rank skips
#
# Every rank holds the losses of its own samples (a 1-D tensor), and we want the **mean over all
# samples of all ranks**. The dataset does not split evenly, so the last rank has **no samples**
# at all. The broken version skips the all-reduce on a rank with nothing to contribute. Run it
# and read the report (it takes a few seconds: the other ranks wait until the timeout).

# %%
def global_mean_broken(losses):
    total = torch.stack([losses.sum(), torch.tensor(float(len(losses)))])
    if len(losses) > 0:  # "nothing to add" ... but the others wait for this rank
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


check.show(check.global_mean, global_mean_broken)

# %% [markdown]
# The report says which ranks were waiting in `dist.all_reduce` and that the last rank had
# already returned after 0 communication calls. **A collective needs every rank of its group.**
# Fix it: every rank joins the all-reduce, contributing a sum of 0 and a count of 0 when it has
# no samples. Return a Python float, the same on every rank.

# %%
def global_mean(losses):
    """The mean of every rank's losses (some ranks may have none), on every rank."""
    ### BEGIN SOLUTION
    total = torch.stack([losses.sum(), torch.tensor(float(len(losses)))])
    dist.all_reduce(total)
    return (total[0] / total[1]).item()
    ### END SOLUTION


# %%
check.global_mean(global_mean)

# %% [markdown]
# ## Lab 10.2 — the last rank falls off the end
#
# Every rank sends its tensor `t` to its right neighbour and returns what it received from its
# left neighbour, as in one step of a ring all-reduce. The broken version looks the neighbours
# up in a list of ranks. Run it: which rank crashed, and why did the others stop too?

# %%
def pass_right_broken(t):
    rank, n = dist.get_rank(), dist.get_world_size()
    ranks = list(range(n))
    right, left = ranks[rank + 1], ranks[rank - 1]
    received = torch.empty_like(t)
    request = dist.isend(t, right)  # isend: every rank sends and receives at once, no deadlock
    dist.recv(received, left)
    request.wait()
    return received


check.show(check.pass_right, pass_right_broken)

# %% [markdown]
# `RankError` names the **last** rank and quotes its `IndexError`: rank N−1 has no `rank + 1`
# in the list. (`ranks[rank - 1]` happens to work for rank 0 only because Python reads index −1
# as the last element.) The launcher stopped the other ranks, which were waiting for a message
# that would never come. (The check runs N = 2, 3, 4.) Fix it: the ring wraps around, right = (r + 1) mod N, left = (r − 1) mod N.

# %%
def pass_right(t):
    """Send t to rank (r+1) mod N; return the tensor received from rank (r-1) mod N."""
    ### BEGIN SOLUTION
    rank, n = dist.get_rank(), dist.get_world_size()
    right, left = (rank + 1) % n, (rank - 1) % n
    received = torch.empty_like(t)
    request = dist.isend(t, right)
    dist.recv(received, left)
    request.wait()
    return received
    ### END SOLUTION


# %%
check.pass_right(pass_right)

# %% [markdown]
# ## Lab 10.3 — the wrong process group
#
# The ranks form data-parallel **replicas**, each split over a **tensor-parallel group** of
# adjacent ranks (with 4 ranks: replicas {0, 1} and {2, 3}). Each replica has its own batch `x`.
# A row-parallel layer (chapter 04) gives each TP rank a block of the input features and the
# same block of the columns of `w`; the partial products `x_shard @ w_shard.T` must be **summed
# over the TP group**. The broken version all-reduces over the default group, the whole world.
# Nothing crashes; the numbers are wrong. Run it:

# %%
def row_parallel_output_broken(x_shard, w_shard, tp_group):
    y = x_shard @ w_shard.T
    dist.all_reduce(y)  # the default group: every rank of every replica
    return y


check.show(check.row_parallel_output, row_parallel_output_broken)

# %% [markdown]
# Every rank got the sum over *all* replicas, so the other replicas' data leaked into this one.
# With a single replica the bug would be invisible — one more reason to test on grids where
# the groups differ from the world. Fix it: name the group in every collective.

# %%
def row_parallel_output(x_shard, w_shard, tp_group):
    """x @ w.T of this replica: the partial products summed over the tensor-parallel group."""
    ### BEGIN SOLUTION
    y = x_shard @ w_shard.T
    dist.all_reduce(y, group=tp_group)
    return y
    ### END SOLUTION


# %%
check.row_parallel_output(row_parallel_output)

# %% [markdown]
# ## Lab 10.4 — `no_sync` on every micro-batch
#
# With torch's `DistributedDataParallel`, gradient accumulation over M micro-batches should
# all-reduce **once**, after the last backward: `with ddp_model.no_sync():` around the first M−1
# backward passes tells DDP to skip its all-reduce. `micro_batches` is this rank's list of
# `(x, y)` pairs; the loss is `F.mse_loss(ddp_model(x), y) / M`. The broken version wraps *all*
# of them — a pattern that is easy to write with one `with` around the loop:

# %%
def accumulate_broken(ddp_model, micro_batches):
    with ddp_model.no_sync():
        for x, y in micro_batches:
            (F.mse_loss(ddp_model(x), y) / len(micro_batches)).backward()


check.show(check.accumulate_with_no_sync, accumulate_broken)

# %% [markdown]
# No error, no hang: every rank simply keeps its own gradient, the replicas drift apart, and
# the training curve looks plausible. The check counts DDP's all-reduces (0 here). Fix it: skip
# the sync on all but the last micro-batch.

# %%
def accumulate_with_no_sync(ddp_model, micro_batches):
    """Forward/backward every micro-batch (loss / M); DDP all-reduces after the last one only."""
    ### BEGIN SOLUTION
    m = len(micro_batches)
    for i, (x, y) in enumerate(micro_batches):
        if i < m - 1:
            with ddp_model.no_sync():
                (F.mse_loss(ddp_model(x), y) / m).backward()
        else:
            (F.mse_loss(ddp_model(x), y) / m).backward()
    ### END SOLUTION


# %%
check.accumulate_with_no_sync(accumulate_with_no_sync)


# %% [markdown]
# ## Exercise 10.5 — where does each rank run?
#
# torchrun starts `nproc_per_node[g]` processes on node g and numbers them **node after node**:
# node 0's processes get ranks 0, 1, …, node 1's continue where node 0's stopped, and so on
# (the lesson's two-node run showed RANK = GROUP_RANK · LOCAL_WORLD_SIZE + LOCAL_RANK when all
# nodes run the same number; nodes may also run different numbers). LOCAL_RANK counts from 0 on
# every node. A GPU script then calls `torch.cuda.set_device(LOCAL_RANK)`, and `cuda:i` means the
# i-th GPU the process can see: the i-th entry of `CUDA_VISIBLE_DEVICES` when that variable is
# set (an empty string hides every GPU), GPU i otherwise.
#
# Write `placement(rank, nproc_per_node, cuda_visible_devices)`:
# - `nproc_per_node`: a list, the number of processes on each node, e.g. `[2, 2]` or `[4, 2, 2]`;
# - `cuda_visible_devices`: `None` (no node sets it), or a list with each node's value, a string
#   such as `"2,3"` or `None` for a node that does not set it;
# - return `(node, local_rank, gpu)`: three ints, `gpu` being the physical GPU number that
#   `set_device(local_rank)` selects;
# - raise `ValueError` for a rank that does not exist, and for a local rank with no GPU to use.
#
# For example `placement(2, [2, 2], ["0,1", "2,3"]) == (1, 0, 2)`.

# %%
def placement(rank, nproc_per_node, cuda_visible_devices):
    """(node, local_rank, gpu) of global rank `rank` under torchrun."""
    ### BEGIN SOLUTION
    if not 0 <= rank < sum(nproc_per_node):
        raise ValueError(f"rank {rank} does not exist: there are {sum(nproc_per_node)} processes")
    node, first = 0, 0
    while rank >= first + nproc_per_node[node]:
        first += nproc_per_node[node]
        node += 1
    local_rank = rank - first
    visible = None if cuda_visible_devices is None else cuda_visible_devices[node]
    if visible is None:
        return node, local_rank, local_rank
    gpus = [int(g) for g in visible.split(",") if g.strip()]
    if local_rank >= len(gpus):
        raise ValueError(f"node {node} lists {len(gpus)} GPU(s), local rank {local_rank} has none")
    return node, local_rank, gpus[local_rank]
    ### END SOLUTION


# %%
check.placement(placement)

# %% [markdown]
# ## Exercise 10.6 — how many accumulation steps?
#
# One optimizer step consumes the **global batch**: each data-parallel replica runs M
# micro-batches of b samples before the gradients are averaged, so
#
# global batch = b × M × (data-parallel ranks),
#
# the identity DeepSpeed checks in its configuration: `train_batch_size` =
# `train_micro_batch_size_per_gpu` × `gradient_accumulation_steps` × its world size, which is the
# data-parallel world size once model parallelism is in use. With tensor parallelism t and
# pipeline parallelism p, the t·p ranks of one replica work on the *same* samples: only
# world_size / (t·p) ranks are data-parallel.
#
# Write `accumulation_steps(global_batch, micro_batch, world_size, tp, pp)` returning M as an int.
# Raise `ValueError` when world_size is not a multiple of tp·pp, and when the global batch is not
# a whole, positive number of micro-batches per data-parallel rank — never round: a silently
# different batch size changes training (the learning rate was tuned for the batch you asked for).

# %%
def accumulation_steps(global_batch, micro_batch, world_size, tp, pp):
    """M with global_batch = micro_batch × M × world_size / (tp · pp)."""
    ### BEGIN SOLUTION
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not a multiple of tp·pp = {tp * pp}")
    per_step = micro_batch * (world_size // (tp * pp))
    if global_batch % per_step or global_batch < per_step:
        raise ValueError(f"global batch {global_batch} is not a multiple of {per_step}")
    return global_batch // per_step
    ### END SOLUTION


# %%
check.accumulation_steps(accumulation_steps)
