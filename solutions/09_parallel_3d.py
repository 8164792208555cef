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
# # 09 · 3D parallelism and the cost model — exercises
#
# In the lesson (`notebooks/09_parallel_3d.ipynb`) every rank got a place on a grid of
# **dp × tp × pp** ranks, one process group per axis, and a stack of MLPs trained on 4 and 8
# ranks exactly like one process. Here you write the grid's arithmetic, one line of the cost
# model, and the one synchronisation that 3D training adds to data parallelism.
#
# The rank order is Megatron's: **tp varies fastest, then dp, then pp**:
#
# ```
# rank = pp_index · (dp · tp) + dp_index · tp + tp_index
# ```
#
# How the checks work: 9.1–9.3 call your function on many grid shapes and compare with the
# course's answer; 9.4 runs your function inside a real DP×TP training run on 2 and 4 ranks and
# compares every parameter with single-process training (rtol = atol = 1e-5). Each prints one
# line: `✔`, or `✘` with the first case that differs and a hint when your answer matches a
# common mistake.

# %%
import torch
import torch.distributed as dist

from course_lib.checks import parallel_3d as check

# %% [markdown]
# ## Exercise 9.1 — rank → (dp, tp, pp)
#
# `coordinates(rank, dp, tp, pp)` returns the tuple `(dp_index, tp_index, pp_index)` of `rank`
# on a grid of `dp · tp · pp` ranks. For dp = tp = pp = 2, rank 5 is `(0, 1, 1)`: tp index
# 5 mod 2 = 1, then dp index (5 // 2) mod 2 = 0, then pp index 5 // 4 = 1.

# %%
def coordinates(rank, dp, tp, pp):
    """(dp_index, tp_index, pp_index) of ``rank``: tp fastest, then dp, then pp."""
    ### BEGIN SOLUTION
    return (rank // tp % dp, rank % tp, rank // (tp * dp))
    ### END SOLUTION


# %%
check.coordinates(coordinates)

# %% [markdown]
# ## Exercise 9.2 — the ranks of every group
#
# A group along an axis is the set of ranks whose **other two** coordinates are equal: the tp
# group of rank 5 on a 2 × 2 × 2 grid is every rank with dp index 0 and pp index 1, `[4, 5]`.
# `group_ranks(axis, dp, tp, pp)` returns every group along `axis` (`"tp"`, `"dp"` or `"pp"`)
# as a list of lists of ranks; each rank is in exactly one of them. (Order does not matter.)
# These are the lists every rank passes to `dist.new_group` — all ranks create all groups.

# %%
def group_ranks(axis, dp, tp, pp):
    """Every group along ``axis``, as lists of ranks."""
    ### BEGIN SOLUTION
    groups = {}
    for rank in range(dp * tp * pp):
        d, t, p = rank // tp % dp, rank % tp, rank // (tp * dp)
        key = {"tp": (d, p), "dp": (t, p), "pp": (d, t)}[axis]
        groups.setdefault(key, []).append(rank)
    return list(groups.values())
    ### END SOLUTION


# %%
check.group_ranks(group_ranks)

# %% [markdown]
# ## Exercise 9.3 — model-state memory per GPU
#
# Mixed-precision Adam keeps 2 + 2 + 12 = 16 bytes per parameter: fp16 parameters (2Ψ), fp16
# gradients (2Ψ) and the fp32 master copy, momentum and variance (12Ψ). With tp and pp a GPU
# holds only Ψ/(tp·pp) of the parameters; ZeRO then shards its part over the **dp** ranks:
# stage 1 the 12 bytes of optimizer state, stage 2 also the gradients, stage 3 also the
# parameters (stage 0 is plain data parallelism: nothing sharded).
#
# `model_state_bytes(psi, zero, dp, tp, pp)` returns the total bytes per GPU.

# %%
def model_state_bytes(psi, zero, dp, tp, pp):
    """Bytes of parameters + gradients + Adam states per GPU (mixed precision)."""
    ### BEGIN SOLUTION
    here = psi / (tp * pp)
    params = 2 * here / (dp if zero >= 3 else 1)
    grads = 2 * here / (dp if zero >= 2 else 1)
    optimizer = 12 * here / (dp if zero >= 1 else 1)
    return params + grads + optimizer
    ### END SOLUTION


# %%
check.model_state_bytes(model_state_bytes)

# %% [markdown]
# ## Exercise 9.4 — a DP×TP step: whose gradients to average?
#
# On a dp × tp grid every rank runs a tensor-parallel model on its dp shard of the batch. After
# the backward, ranks that hold **the same block** of the weights (the same tp index: the dp
# group) must agree on the mean gradient. Ranks of one tp group hold *different* blocks: adding
# their gradients would mix unrelated numbers.
#
# `average_gradients(model, dp_group)` is called on every rank after the backward: make every
# parameter's `.grad` the mean over `dp_group`. Useful: `dist.all_reduce(t, group=…)` (sums in
# place), `dist.get_world_size(group)`.

# %%
def average_gradients(model, dp_group):
    """Every parameter's gradient becomes its mean over the ranks of ``dp_group``."""
    ### BEGIN SOLUTION
    n = dist.get_world_size(dp_group)
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=dp_group)
            p.grad /= n
    ### END SOLUTION


# %%
check.average_gradients(average_gradients)
