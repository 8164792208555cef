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
# # 09d · A time model that predicts the step — exercises
#
# In the lesson (`notebooks/09d_step_time.ipynb`) a step's time was the sum of three kinds of
# work — FLOPs over a core's rate, ops times one op's cost, every message priced by α–β — and a
# pipeline's bubble. Here you write the two formulas under it: the FLOPs of one training step,
# and the α–β price of one collective.
#
# How the checks work: both are arithmetic. 9d.1 calls your function on four model shapes (the
# last one 7B-sized) and compares with the course's answer, then with what torch's
# `FlopCounterMode` counts on a real model; 9d.2 prices nine calls with α = 50 µs and β = 2 GB/s.
# Each prints one line: `✔`, or `✘` with the first case that differs and a hint when your answer
# matches a common mistake.

# %%
from course_lib.checks import step_time as check

# %% [markdown]
# ## Exercise 9d.1 — FLOPs of one training step
#
# The capstone's GPT: an embedding, `n_layers` blocks of width d = `d_model` with an MLP of
# 4d, and a head of d × `vocab_size`. Ψ counts the weights of the **matrix products** — per block
# qkv (3d²), the output projection (d²), fc1 and fc2 (d·4d each), and the head (d·V); an
# embedding look-up multiplies nothing. Each such weight costs 2 FLOPs per token forward and 4
# backward. Attention adds two products per layer, q·kᵀ and scores·v, each 2·s·d FLOPs per token
# forward (s = `seq_len`), ×3 with the backward. T = `batch_size` · `seq_len` tokens.
#
# `step_flops(vocab_size, seq_len, d_model, n_layers, batch_size)` returns the FLOPs of one
# forward and backward.


# %%
def step_flops(vocab_size, seq_len, d_model, n_layers, batch_size):
    """FLOPs of one training step (forward + backward) of the dense GPT."""
    ### BEGIN SOLUTION
    d = d_model
    psi = n_layers * (4 * d * d + 2 * d * 4 * d) + d * vocab_size
    tokens = batch_size * seq_len
    return 6 * psi * tokens + 12 * n_layers * seq_len * d * tokens
    ### END SOLUTION


# %%
check.step_flops(step_flops)

# %% [markdown]
# ## Exercise 9d.2 — α–β time of one collective
#
# One message of S bytes takes α + S/β. A ring all-reduce over n ranks is a reduce-scatter and
# then an all-gather: 2(n−1) rounds, each moving S/n. An all-gather, a reduce-scatter and an
# all-to-all each take (n−1) rounds of S/n (S: the whole array). Over one rank nothing moves.
#
# `collective_seconds(op, n, nbytes, alpha, beta)` returns the seconds of one call; `op` is one
# of "send", "all_reduce", "all_gather", "reduce_scatter", "all_to_all".


# %%
def collective_seconds(op, n, nbytes, alpha, beta):
    """α–β seconds of one call of ``op`` over ``n`` ranks on an array of ``nbytes``."""
    ### BEGIN SOLUTION
    if op == "send":
        return alpha + nbytes / beta
    if n == 1:
        return 0.0
    rounds = 2 * (n - 1) if op == "all_reduce" else n - 1
    return rounds * (alpha + nbytes / n / beta)
    ### END SOLUTION


# %%
check.collective_seconds(collective_seconds)
