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
# > **Where to work.** Do these exercises in your own copy, `my_exercises/05_sequence_parallel.ipynb` (`make lab` makes it; delete it and run `make lab` again for a fresh one). Answers typed into `exercises/` would be overwritten when the course is updated.
# >
# > Replace every `# YOUR CODE HERE` with your code and run the check cell below it: it prints ✔, or what is wrong. To grade all your notebooks from a terminal, run `make grade`.

# %% [markdown]
# # 05 · Sequence parallelism — exercises
#
# Tensor parallelism (chapter 04) splits the big matrices, but leaves every rank holding the
# whole sequence wherever the work is per token: LayerNorm, dropout, the residual adds. Sequence
# parallelism splits *those* regions along the sequence instead, and swaps each of TP's
# all-reduces for its two halves: an **all-gather** where a sequence shard enters a
# tensor-parallel region, a **reduce-scatter** where it leaves.
#
# Notation: **N** ranks, rank **r**; activations have shape `(batch, seq, d_model)`, and the
# sequence is **dim 1**. Rank r's shard is its contiguous block of positions
# `r·s/N … (r+1)·s/N`.
#
# How the checks work: each check runs your code on N = 1, 2 and 4 ranks on activations of shape
# (2, 4, 8) and compares the output **and the gradients** with one process that sees the whole
# sequence (rtol = atol = 1e-5), printing `✔` or `✘` with N, rank, tensor, element, and a hint
# for common mistakes. `course_lib.tp` (the course's answer) is switched off inside the checks.

# %%
import torch
import torch.distributed as dist
import torch.nn.functional as F

from course_lib import launch
from course_lib.checks import sequence_parallel as check

# %% [markdown]
# ### A warm-up you can run: all-gather along the sequence
#
# `dist.all_gather(list_of_tensors, mine)` fills the list with every rank's tensor, in rank
# order; `torch.cat(..., dim=1)` joins them along the sequence. Each rank starts with a shard of
# 2 positions filled with its rank number:

# %%
def gather_demo():
    rank, n = dist.get_rank(), dist.get_world_size()
    mine = torch.full((1, 2, 3), float(rank))
    parts = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather(parts, mine)
    return torch.cat(parts, dim=1)[0, :, 0]  # one number per position


launch.run(gather_demo, 3, backend="gloo")

# %% [markdown]
# ## Exercise 5.1 — my shard of the sequence
#
# `sequence_shard(x)` takes the whole activation `x` (the same on every rank) and returns this
# rank's block of positions along dim 1, shape `(batch, seq/N, d_model)`. Index or `chunk`; the
# check also follows the gradient back into `x`, so do not `.detach()`.

# %% answer="sequence_shard" tags=["answer"]
def sequence_shard(x):
    """This rank's contiguous block of the sequence (dim 1) of x."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.sequence_shard(sequence_shard)

# %% [markdown]
# ## Exercise 5.2 — all-gather forward, reduce-scatter backward
#
# Entering a tensor-parallel region, every rank needs the **whole** sequence (attention mixes all
# positions; a column-parallel layer multiplies every token). Forward: all-gather the shards along
# dim 1. Backward: each rank's gradient of the gathered tensor covers the whole sequence but only
# its own part of the computation, so the gradient of my shard is the **sum over ranks**, keeping
# **my block** of positions: a reduce-scatter.
#
# Useful: `dist.all_gather(list, t)` (as above) and
# `dist.reduce_scatter(out, list_of_N_blocks)` — it sums block j over the ranks into rank j's
# `out`. Both want contiguous tensors (`.contiguous()`).

# %% answer="GatherFromSequenceRegion" tags=["answer"]
class GatherFromSequenceRegion(torch.autograd.Function):
    """All-gather the sequence shards (dim 1) forward; reduce-scatter the gradient backward."""

    @staticmethod
    def forward(ctx, x_shard):
        # YOUR CODE HERE
        raise NotImplementedError("exercise: replace this line with your code")

    @staticmethod
    def backward(ctx, grad):
        # YOUR CODE HERE
        raise NotImplementedError("exercise: replace this line with your code")


# %%
check.gather_from_sequence_region(GatherFromSequenceRegion)

# %% [markdown]
# ## Exercise 5.3 — reduce-scatter forward, all-gather backward
#
# Leaving a tensor-parallel region (after the row-parallel layer) every rank holds a **partial
# sum** over the whole sequence. Tensor parallelism all-reduced it; sequence parallelism needs
# only its own positions of the sum afterwards: a **reduce-scatter**. Backward is the mirror
# image: every rank's shard of the gradient is needed everywhere, an all-gather.
#
# Together, 5.2 and 5.3 do the work of one all-reduce: an all-reduce *is* a reduce-scatter
# followed by an all-gather, so with bandwidth-optimal collectives (NCCL's rings, or the ring you
# built in chapter 03) they move the same bytes. (gloo's CPU `reduce_scatter` is the exception: it
# moves an all-reduce's worth by itself — the lesson measures it — which is why `course_lib.tp`
# builds its reduce-scatter from an all-to-all.)

# %% answer="ReduceScatterToSequenceRegion" tags=["answer"]
class ReduceScatterToSequenceRegion(torch.autograd.Function):
    """Sum over ranks and keep my block of the sequence forward; all-gather the gradient backward."""

    @staticmethod
    def forward(ctx, x):
        # YOUR CODE HERE
        raise NotImplementedError("exercise: replace this line with your code")

    @staticmethod
    def backward(ctx, grad):
        # YOUR CODE HERE
        raise NotImplementedError("exercise: replace this line with your code")


# %%
check.reduce_scatter_to_sequence_region(ReduceScatterToSequenceRegion)

# %% [markdown]
# ## Exercise 5.4 — the sequence-parallel LayerNorm + MLP sublayer
#
# The second half of a pre-norm transformer block is `x + mlp(norm(x))`. Sequence-parallel, rank
# r gets only its shard `x_shard` and returns only its shard of the result:
#
# ```
# x_shard ─▶ norm (on s/N tokens) ─▶ all-gather (5.2) ─▶ fc1 columns r ─▶ gelu ─▶ fc2 rows r
#         ─▶ reduce-scatter (5.3) ─▶ + fc2.bias ─▶ + x_shard (the residual, on s/N tokens)
# ```
#
# `norm` is a `nn.LayerNorm` and `mlp` a dense `course_lib.models.MLP`: use `norm(x_shard)` as it
# is (every rank holds all of it), and rank r's blocks of `mlp.fc1` (rows of the weight, and the
# bias) and `mlp.fc2` (columns of the weight) as in chapter 04. No f here: the all-gather's
# backward already sums the gradient over ranks. Add `mlp.fc2.bias` once, after the reduce-scatter.
#
# The check compares your output shard, `x_shard.grad`, and the blocks of the fc1/fc2 gradients
# with the dense sublayer. `norm.weight`, `norm.bias` and `mlp.fc2.bias` are whole on every rank
# but each rank trained them on its own tokens only, so their gradients are **parts of a sum**:
# the check adds them over the ranks (a trainer all-reduces them once per step).

# %% answer="sequence_parallel_mlp" tags=["answer"]
def sequence_parallel_mlp(x_shard, norm, mlp):
    """x + mlp(norm(x)) for this rank's shard of the sequence, with the MLP tensor-parallel."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.sequence_parallel_mlp(sequence_parallel_mlp)
