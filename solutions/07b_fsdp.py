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
# # 07b · FSDP — exercises
#
# In the lesson (`notebooks/07b_fsdp.ipynb`) `course_lib.fsdp.fully_shard` did the work. Here you
# build four of its pieces: which elements of each parameter a rank's shard holds, the gather
# before a unit's forward, the fp32 reduce-scatter with the fp32 master update, and the order in
# which one step issues its collectives with prefetch. (`course_lib.fsdp`'s functions are switched
# off while the checks run your code.)
#
# Notation: **N** ranks, rank `r` (`dist.get_rank()`), N (`dist.get_world_size()`). A *unit* holds
# its parameters one after another in a flat buffer, zero-padded to a multiple of N; rank r owns
# elements [r·S, (r+1)·S) of it, S = padded/N.
#
# 7b.1 and 7b.4 run your function right here on many cases; 7b.2 and 7b.3 run it on N = 1 … 4 ranks
# and compare with one process. Each check prints one line: `✔`, or `✘` with what differs.

# %%
import torch
import torch.distributed as dist

from course_lib.checks import fsdp as check
from course_lib.zero import adamw_

# %% [markdown]
# ## Exercise 7b.1 — a rank's pieces of a unit
#
# A unit holds parameters of `numels[i]` elements, one after another (total K). Padded to a
# multiple of N and cut into N shards of S = ⌈K/N⌉, shard `rank` covers flat positions
# [rank·S, (rank+1)·S). Return, in order, one `(i, first, end)` per parameter i that has elements
# in this shard: elements [first, end) **of parameter i** (positions within the parameter, not in
# the flat buffer). Padding is no parameter. Example: `numels=[42, 138, 24]`, N = 4: S = 51, and
# rank 0 gets `[(0, 0, 42), (1, 0, 9)]`, rank 3 `[(1, 135, 138), (2, 0, 24)]`.
#
# (This table is what FSDP needs to hand each parameter its slice of the sharded gradient, or to
# save a sharded checkpoint by name.)


# %%
def shard_ranges(numels, rank, world_size):
    """[(parameter index, first, end)] of the elements of each parameter in shard `rank`."""
    ### BEGIN SOLUTION
    size = -(-sum(numels) // world_size)
    start, end = rank * size, (rank + 1) * size
    out, offset = [], 0
    for i, k in enumerate(numels):
        lo, hi = max(start, offset), min(end, offset + k)
        if lo < hi:
            out.append((i, lo - offset, hi - offset))
        offset += k
    return out
    ### END SOLUTION


# %%
check.shard_ranges(shard_ranges)

# %% [markdown]
# ## Exercise 7b.2 — gather a unit before its forward
#
# `gather(unit)` runs as the unit's forward pre-hook (and again just before its backward). The
# check hands you a `unit` with
#
# * `unit.shard`: this rank's shard, fp32, S elements;
# * `unit.full`: the flat buffer of `unit.padded` elements that the layer's parameters are
#   **views** of. While the unit is freed its storage has 0 bytes
#   (`unit.full.untyped_storage().resize_(0)`, done by the check after the forward).
#
# Bring the full parameters back **into that storage**: resize it to `unit.padded` elements
# (`unit.full.untyped_storage().resize_(nbytes)`, 4 bytes per fp32 element), then
# `dist.all_gather_single(unit.full, mine)` with `mine` a copy of the shard (input and output must
# not overlap). Do not assign a new tensor to `unit.full`: the layer's parameters would still point
# at the old storage.


# %%
def gather(unit):
    """All-gather the unit's shards into the storage of `unit.full`."""
    ### BEGIN SOLUTION
    unit.full.untyped_storage().resize_(unit.padded * unit.full.element_size())
    dist.all_gather_single(unit.full, unit.shard.clone())
    ### END SOLUTION


# %%
check.gather_unit(gather)

# %% [markdown]
# ## Exercise 7b.3 — reduce-scatter in fp32, update the fp32 master
#
# After a unit's backward each rank holds its **unsharded bf16** gradient `grad` (flat, padded to a
# multiple of N) from its own shard of the batch. Mixed precision with fp32 master weights:
#
# 1. cast `grad` to fp32 **before** reducing (a sum over ranks is a long sum: chapter text);
# 2. reduce-scatter it: this rank receives the sum over ranks of its shard
#    (`dist.reduce_scatter_single(out, full)`, `out` of S elements); divide by N for the mean;
# 3. update the fp32 master shard `master` **in place** with AdamW: `adamw_(master, grad_shard,
#    exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay)` (chapter 07's, imported above);
# 4. return the new shard **in bf16**: what the next all-gather sends. `master` itself stays fp32.
#
# `dist.all_reduce` is switched off in this check: no rank needs the whole summed gradient.


# %%
def reduce_and_update(grad, master, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    """fp32 reduce-scatter of `grad`, AdamW on the fp32 `master` shard; returns its bf16 copy."""
    ### BEGIN SOLUTION
    n = dist.get_world_size()
    mine = torch.empty(grad.numel() // n)
    dist.reduce_scatter_single(mine, grad.float())
    mine /= n
    adamw_(master, mine, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay)
    return master.bfloat16()
    ### END SOLUTION


# %%
check.reduce_and_update(reduce_and_update)

# %% [markdown]
# ## Exercise 7b.4 — the order of one step's collectives
#
# List, in order, the collectives one forward + backward issues, as `(op, unit, phase)` tuples:
# `("all-gather", u, "forward")`, `("all-gather", u, "backward")`, `("reduce-scatter", u,
# "backward")`. `units` is the forward order. The rules of `course_lib.fsdp`:
#
# * before unit i's forward: gather i unless it is gathered (or already in flight); then, with
#   `prefetch`, start gathering unit i+1 (if there is one and it is not gathered);
# * after unit i's forward: free it if `reshard_after_forward`;
# * before unit i's backward (units run in reverse): gather i unless it is gathered; then, with
#   `prefetch`, start gathering the unit that runs **next in the backward**, i−1;
# * after unit i's backward: reduce-scatter its gradient, free it.
#
# Example, `units=["a", "b"]`, prefetch on, resharding: gather a, gather b (prefetch), — b computes,
# freed — gather b (backward), gather a (prefetch), reduce-scatter b, reduce-scatter a.
# The lesson's timeline plot shows the same order on real ranks.


# %%
def collective_order(units, prefetch, reshard_after_forward):
    """[(op, unit, phase)] in the order one forward + backward issues them."""
    ### BEGIN SOLUTION
    out, gathered = [], set()

    def gather_once(u, phase):
        if u not in gathered:
            out.append(("all-gather", u, phase))
            gathered.add(u)

    for i, u in enumerate(units):
        gather_once(u, "forward")
        if prefetch and i + 1 < len(units):
            gather_once(units[i + 1], "forward")
        if reshard_after_forward:
            gathered.discard(u)
    for i in reversed(range(len(units))):
        gather_once(units[i], "backward")
        if prefetch and i > 0:
            gather_once(units[i - 1], "backward")
        out.append(("reduce-scatter", units[i], "backward"))
        gathered.discard(units[i])
    return out
    ### END SOLUTION


# %%
check.collective_order(collective_order)

# %% [markdown]
# ## What you built
#
# These are the pieces of `course_lib.fsdp.fully_shard`: its `_Unit` lays a unit out as in 7b.1,
# its pre-forward hook gathers as in 7b.2 (asynchronously when prefetching), its backward hook
# reduce-scatters in `reduce_dtype` and the optimizer updates the fp32 shard as in 7b.3, and its
# hooks issue the collectives in the order of 7b.4.
