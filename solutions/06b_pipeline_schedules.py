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
# # 06b · Pipeline schedules — exercises
#
# In the lesson (`notebooks/06b_pipeline_schedules.ipynb`) `course_lib.pp` played out and ran
# interleaved 1F1B, ZB-H1 and DualPipe-V. Here you write three of the pieces: the interleaved
# order of one rank, a linear layer's backward split into two passes, and ZB-H1's order.
#
# An **action** is `(kind, micro-batch, stage)`: `"F"` forward, `"B"` full backward, `"I"` the
# backward for the input only, `"W"` the backward for the weights only. Each function returns
# the list of actions of **one rank**; the checks call it for every rank and play the whole
# schedule out with `pp.simulate`, which first validates it (a W after its I, a backward after
# its forward, nothing waiting in a circle). They run in this notebook and take under a second.

# %%
import torch

from course_lib import pp
from course_lib.checks import pipeline_schedules as check


def show(order, p, *args, t_b=2, t_w=1):
    """Play the schedule made of order(r, p, *args) for every rank; one column per time slot."""
    sim = pp.simulate([order(r, p, *args) for r in range(p)], t_f=1, t_b=t_b, t_w=t_w)
    for r, row in enumerate(sim.timeline):
        slots = ["  .  "] * int(sim.total_time)
        for (kind, i, s), start, end in row:
            for t in range(int(start), int(end)):
                slots[t] = f"{kind}{i}/{s:<2}"
        print(f"rank {r}: " + "".join(slots))
    print(f"idle per rank {sim.bubble_time:g}, peak live activations per rank {sim.peak_activations}")


# %% [markdown]
# ## Exercise 6b.1 — the interleaved order of one rank
#
# Rank r of p holds v stages: r, r + p, …, r + (v − 1)·p. Return its actions for m micro-batches:
#
# 1. if m is not a multiple of p, raise `ValueError` (micro-batches go in rounds of p);
# 2. the **forwards**, in order: for each round of p micro-batches (0…p−1, then p…2p−1, …), the
#    round through the rank's first stage, then through its second, …, then its last;
# 3. the **backwards** (kind `"B"`) take the same rounds, but the stages in reverse (last first);
# 4. warm up with `w = min((p − r − 1)·2 + (v − 1)·p, m·v)` forwards, then alternate one forward,
#    one backward until the forwards run out, then the remaining backwards.
#
# For p = 2, m = 2, v = 2 rank 1 holds stages 1 and 3, warms up with 2 forwards:
# `F0/1 F1/1 | F0/3 B0/3 F1/3 B1/3 | B0/1 B1/1` (written kind·micro-batch/stage).


# %%
def interleaved_order(rank, p, m, v):
    """Rank ``rank``'s actions under interleaved 1F1B with v stages per rank."""
    ### BEGIN SOLUTION
    if m % p:
        raise ValueError(f"m = {m} is not a multiple of p = {p}")

    def stage_and_microbatch(k, reverse):
        round_, within = divmod(k, p * v)
        local = within // p
        return round_ * p + within % p, ((v - 1 - local) if reverse else local) * p + rank

    forwards = [("F", *stage_and_microbatch(k, False)) for k in range(m * v)]
    backwards = [("B", *stage_and_microbatch(k, True)) for k in range(m * v)]
    warmup = min((p - rank - 1) * 2 + (v - 1) * p, m * v)
    actions = forwards[:warmup]
    for k in range(m * v - warmup):
        actions += [forwards[warmup + k], backwards[k]]
    return actions + backwards[m * v - warmup :]
    ### END SOLUTION


# %%
check.interleaved_order(interleaved_order)

# %% [markdown]
# ## Exercise 6b.2 — a linear layer's split backward
#
# A linear layer computes y = x·Wᵀ + b with W of shape (out, in). Given ∂L/∂y (`grad_output`):
#
# * `input_gradient(grad_output, weight)` returns ∂L/∂x — the I pass, run at once;
# * `weight_gradient(grad_output, x)` returns (∂L/∂W, ∂L/∂b) — the W pass, run later.
#
# x may have more than two dimensions (batch, sequence, features): every leading index is one
# more row. The check plugs your two functions into `SplitBackward` (which holds on to x and
# ∂L/∂y between the passes), runs a small MLP's backward as I then W, and compares with a plain
# backward.


# %%
def input_gradient(grad_output, weight):
    """∂L/∂x of y = x·Wᵀ + b."""
    ### BEGIN SOLUTION
    return grad_output @ weight
    ### END SOLUTION


def weight_gradient(grad_output, x):
    """(∂L/∂W, ∂L/∂b) of y = x·Wᵀ + b, summed over every row."""
    ### BEGIN SOLUTION
    g = grad_output.reshape(-1, grad_output.shape[-1])
    rows = x.reshape(-1, x.shape[-1])
    return g.t() @ rows, g.sum(0)
    ### END SOLUTION


# %%
check.split_backward(input_gradient, weight_gradient)

# %% [markdown]
# ## Exercise 6b.3 — the ZB-H1 order
#
# ZB-H1 is 1F1B with every backward split into I and W. Rank r of p (one stage, stage r):
#
# * warm up with `min(p − r − 1, m)` forwards, as 1F1B;
# * then for each micro-batch k = 0, 1, …, m−1: the next forward if any is left, then `("I", k, r)`;
#   the W's are what you place: nothing waits for them, but a micro-batch's activations live until
#   its W, and 1F1B's peak (p micro-batches on rank 0) must not grow;
# * every I must be followed, sooner or later, by its W.
#
# The check plays your schedule with t_f = 1, t_b = 2 (I = 1, W = 1) and wants ZB-H1's idle time
# (p − 1)(F + B − 2W) = p − 1 per rank, a third of 1F1B's, with 1F1B's peak memory. Hint: rank r
# can afford to keep r W's waiting. `show(zb_h1_order, 4, 8)` draws yours.


# %%
def zb_h1_order(rank, p, m):
    """Rank ``rank``'s actions under ZB-H1: F, I and W, weight gradients deferred into the bubble."""
    ### BEGIN SOLUTION
    warmup = min(p - rank - 1, m)
    actions = [("F", i, rank) for i in range(warmup)]
    waiting = []
    for k in range(m):
        if warmup + k < m:
            actions.append(("F", warmup + k, rank))
        actions.append(("I", k, rank))
        waiting.append(k)
        if k >= rank:
            actions.append(("W", waiting.pop(0), rank))
    return actions + [("W", i, rank) for i in waiting]
    ### END SOLUTION


# %%
check.zb_h1_order(zb_h1_order)

# %% [markdown]
# Your order and the library's `pp.zb_h1_schedule` need not be the same list: any order that keeps
# the dependencies, reaches ZB-H1's idle time and keeps 1F1B's peak memory passes.

# %%
assert torch.__version__  # the notebook ran to the end
