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
# > **Where to work.** Do these exercises in your own copy, `my_exercises/07_zero.ipynb` (`make lab` makes it; delete it and run `make lab` again for a fresh one). Answers typed into `exercises/` would be overwritten when the course is updated.
# >
# > Replace every `# YOUR CODE HERE` with your code and run the check cell below it: it prints ✔, or what is wrong. To grade all your notebooks from a terminal, run `make grade`.

# %% [markdown]
# # 07 · ZeRO — exercises
#
# In the lesson (`notebooks/07_zero.ipynb`) `course_lib.zero.ZeroAdam` did the work. Here you build
# its pieces yourself: the padded shard every rank owns, AdamW on that shard, the ZeRO-1 step, and
# the ZeRO-2 gradient hook.
#
# Notation: **N** ranks, **Ψ** parameters laid out one after another in a **flat** vector of
# K elements, rank `r` (`dist.get_rank()`), N (`dist.get_world_size()`).
#
# How the checks work: 7.1 and 7.2 run your function right here on many sizes; 7.3 and 7.4 run it on
# N = 1, 2, 3 and 4 ranks, each training a small MLP of 82 parameters (not a multiple of 3 or 4) on
# its own shard of every batch, and compare what each rank ends with against one process training on
# the whole batch (to 1e-5). Each check prints one line: `✔`, or `✘` with N, the rank, the step and
# the element that differ, expected vs got. A function that waits forever is stopped after about
# 20 seconds.

# %%
import torch
import torch.distributed as dist

from course_lib import launch
from course_lib.checks import zero as check
from course_lib.models import make_mlp, num_params

# %% [markdown]
# ### A warm-up you can run: the model of the checks does not split evenly
#
# The checks' MLP has 82 parameters. Split over N = 4 ranks that is 20.5 each — so ZeRO pads the flat
# vector with zeros up to the next multiple of N (84) and gives every rank an equal shard of 21.
# Equal shards are what reduce-scatter and all-gather need: every rank sends and receives the
# same number of elements.

# %%
model = make_mlp(5, 7, seed=3)
K = num_params(model)
for n in (1, 2, 3, 4):
    padded = -(-K // n) * n  # round up to a multiple of n
    print(f"N={n}: K={K} padded to {padded}, shards of {padded // n}, {padded - K} zeros of padding")

# %% [markdown]
# ### The two collectives of ZeRO, on 2 ranks
#
# `dist.reduce_scatter_single(out, full)`: rank r's `out` becomes chunk r of the sum over ranks of
# `full`. `dist.all_gather_single(full, mine)`: every rank's `full` becomes all ranks' `mine` one
# after another. Both need `full` to hold exactly N × `out` elements. (This is also how to debug
# your functions below: call them inside a function like this one, print on each rank, and run it
# with `launch.run`.)

# %%
def two_collectives():
    rank, n = dist.get_rank(), dist.get_world_size()
    full = torch.arange(4.0) + 10 * rank  # rank 0: [0, 1, 2, 3], rank 1: [10, 11, 12, 13]
    mine = torch.empty(4 // n)
    dist.reduce_scatter_single(mine, full)
    print(f"input {full.tolist()} -> my chunk of the sum {mine.tolist()}")
    dist.all_gather_single(full, mine)
    print(f"after all-gather of the chunks: {full.tolist()}")


launch.run(two_collectives, 2);

# %% [markdown]
# ## Exercise 7.1 — a rank's shard, zero-padded
#
# `shard_of(flat, rank, world_size)` returns rank `rank`'s shard of the 1-D tensor `flat` (K elements):
# pad `flat` with zeros to the next multiple of N, cut it into N equal shards, and return shard
# `rank` as a **new** tensor (leave `flat` unchanged). With K = 10 and N = 4: shards of 3,
# rank 3 gets `[flat[9], 0, 0]`.

# %% answer="shard_of" tags=["answer"]
def shard_of(flat, rank, world_size):
    """Rank `rank`'s shard of `flat`, padded with zeros to a multiple of `world_size`."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.shard_of(shard_of)

# %% [markdown]
# ## Exercise 7.2 — AdamW on one shard
#
# Update `param` **in place** with one AdamW step (what `torch.optim.AdamW` does), given its gradient
# `grad`, the first and second moments `exp_avg` and `exp_avg_sq` (also updated in place) and the step
# number `step` (1 for the first step). With β₁, β₂ = `betas`, λ = `weight_decay`, η = `lr`:
#
# ```
# param      ← param · (1 − η·λ)                    decoupled weight decay (the "W" in AdamW)
# exp_avg    ← β₁·exp_avg + (1 − β₁)·grad
# exp_avg_sq ← β₂·exp_avg_sq + (1 − β₂)·grad²
# param      ← param − η · (exp_avg / (1 − β₁^step)) / (√(exp_avg_sq / (1 − β₂^step)) + eps)
# ```
#
# Every line works element by element: element i of the result needs only element i of `param`,
# `grad`, `exp_avg` and `exp_avg_sq`. That is why ZeRO can split the optimizer: a rank that holds
# elements [a, b) of all four can update exactly those, and nothing else.
#
# Useful in-place methods: `t.mul_(x)`, `t.add_(u, alpha=x)`, `t.addcmul_(u, w, value=x)`,
# `t.addcdiv_(u, w, value=x)`.

# %% answer="adamw_step_" tags=["answer"]
def adamw_step_(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    """One AdamW step on `param`, `exp_avg` and `exp_avg_sq`, all in place."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.adamw_step_(adamw_step_)

# %% [markdown]
# ## Exercise 7.3 — the ZeRO-1 step
#
# Every rank holds the **full** flat parameters `flat_params` (padded to a multiple of N, the same on
# every rank) and its own **local** gradient `flat_grad` (same length, from its shard of the batch).
# It holds Adam's moments `exp_avg`, `exp_avg_sq` only for **its shard**: K/N elements each. One step:
#
# 1. **reduce-scatter** `flat_grad`: rank r receives the sum over ranks of shard r —
#    `dist.reduce_scatter_single(out, flat_grad)` with `out` a new tensor of the shard's size;
#    divide by N for the mean (every rank's loss is the mean over its shard of the batch);
# 2. run your `adamw_step_` (7.2) on rank r's shard of `flat_params` — a slice is a view, so the
#    update lands in `flat_params` — with the mean gradient's shard and the moments;
# 3. **all-gather** the updated shards so every rank has all new parameters:
#    `dist.all_gather_single(flat_params, my_shard.clone())` (the clone: input and output must not overlap).
#
# The gradient traffic is a reduce-scatter plus an all-gather — together the size of one all-reduce,
# so ZeRO-1 costs no more communication than plain data parallelism. (That is the algorithm's
# volume: on gloo, `dist.reduce_scatter_single` itself runs an all-reduce underneath, as the lesson
# measured, which is why `course_lib.zero` writes its own. `dist.all_reduce` is switched off in
# this check: with it every rank would receive the whole gradient.) If 7.2 is not done yet, this
# check reads "not attempted" too.
#
# The check passes `eps=0.01`, not the usual 1e-8: Adam divides m by √v, which does not change when
# the gradient is N times too large, so with a tiny eps a forgotten division by N would go unnoticed.

# %% answer="zero1_step" tags=["answer"]
def zero1_step(flat_params, flat_grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    """ZeRO-1: reduce-scatter the gradient, AdamW on this rank's shard, all-gather the parameters."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.zero1_step(zero1_step)

# %% [markdown]
# ## Exercise 7.4 — the ZeRO-2 gradient hook
#
# ZeRO-2 does not wait for `step()`: as soon as a parameter's gradient is complete during backward,
# it is reduce-scattered and the full gradient is dropped. PyTorch calls a hook at exactly that
# moment: `param.register_post_accumulate_grad_hook(hook)` runs `hook(param)` once `param.grad` holds
# this backward's gradient.
#
# Write that hook. `shard_grad_hook(param)`:
#
# 1. flattens `param.grad`, pads it with zeros to a multiple of N, and reduce-scatters it
#    (`dist.reduce_scatter_single`); divide by N for the mean;
# 2. keeps the result as `param.grad_shard` — **adding** to the one already there, if any: with
#    two backwards before a step (gradient accumulation), the shards must add up like `.grad` does
#    (so ZeRO-2 reduce-scatters once per backward: M times for M micro-batches, as the lesson
#    measures);
# 3. sets `param.grad = None`, so the full gradient is freed: this is ZeRO-2's memory saving.
#
# The check registers your hook on every parameter of the MLP, runs two backwards on every rank, and
# compares each `grad_shard` with this rank's shard of one process's gradient on the whole batch.

# %% answer="shard_grad_hook" tags=["answer"]
def shard_grad_hook(param):
    """Reduce-scatter `param.grad`, keep this rank's mean shard in `param.grad_shard`, free `param.grad`."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.shard_grad_hook(shard_grad_hook)

# %% [markdown]
# ## What you built
#
# Put together, these are ZeRO stages 1 and 2 of `course_lib.zero.ZeroAdam`: the lesson shows its
# code, checks it against one process, against `torch`'s `ZeroRedundancyOptimizer` and FSDP2, and
# measures its memory and traffic. Stage 3 adds one more pair of hooks: all-gather a layer's
# parameters just before its forward (and again before its backward), free them right after.
