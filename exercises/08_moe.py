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
# > **Where to work.** Do these exercises in your own copy, `my_exercises/08_moe.ipynb` (`make lab` makes it; delete it and run `make lab` again for a fresh one). Answers typed into `exercises/` would be overwritten when the course is updated.
# >
# > Replace every `# YOUR CODE HERE` with your code and run the check cell below it: it prints ✔, or what is wrong. To grade all your notebooks from a terminal, run `make grade`.

# %% [markdown]
# # 08 · Mixture of experts — exercises
#
# In the lesson (`notebooks/08_moe.ipynb`) a gate sent every token to k of E experts, each expert's
# buffer held C = ceil(k·cf·T/E) tokens, and the experts lived on different ranks, reached through
# an all-to-all. Here you build those pieces yourself:
#
# | exercise | you write | runs on |
# |---|---|---|
# | 8.1 | the top-k gate: which experts, with which weights | one process |
# | 8.2 | capacity: each assignment's slot in its expert's buffer, or −1 (dropped) | one process |
# | 8.3 | an all-to-all with uneven splits, from send/recv only | N = 1, 2, 3, 4 ranks |
# | 8.4 | the expert-parallel forward: dispatch, experts, return, combine | N = 1, 2, 4 ranks |
#
# Notation: **T** tokens (on this rank), **E** experts, **k** experts per token, **D** features,
# **N** ranks. A `(T, k)` tensor is indexed `[token, choice]`; choice 0 is the token's most probable
# expert.
#
# Each check cell compares your function with the course's reference (`course_lib.moe`) and prints
# one line: `✔`, or `✘` with the token, choice, expert and slot (or the rank and row) that differ.
# Inside a check the reference function you are rebuilding is switched off.

# %%
import torch
import torch.distributed as dist

from course_lib import launch, moe
from course_lib.checks import moe as check

# %% [markdown]
# ### A look at the reference on four tokens
#
# Three experts, k = 2, capacity factor 0.5, so C = ceil(2 · 0.5 · 4 / 3) = 2 slots per expert.
# (The probabilities are given directly; their logarithms are valid logits.)

# %%
probs = torch.tensor([[0.70, 0.20, 0.10],
                      [0.60, 0.30, 0.10],
                      [0.15, 0.80, 0.05],
                      [0.50, 0.10, 0.40]])  # no ties among a token's top two: topk's order is then defined
example = moe.route(probs.log(), k=2, capacity_factor=0.5)
print("C =", example.capacity)
print("expert_index\n", example.expert_index)
print("slot\n", example.slot)
print("weight\n", example.weight)

# %% [markdown]
# Read it row by row: token 3's first choice, expert 0, found both of expert 0's slots taken by the
# first choices of tokens 0 and 1, so it was dropped (slot −1, weight 0). Its second choice, expert
# 2, was free. Token 2's second choice, expert 0, was full as well. Token 1 lost its second choice
# (expert 1) to token 0's second choice: among second choices, earlier tokens go first.
#
# (When two probabilities tie, `torch.topk` does not promise which comes first, so examples and
# tests here avoid ties among the k largest.)
#
# ## Exercise 8.1 — the top-k gate
#
# `top_k_gate(logits, k)` takes the gate's output, `logits` of shape `(T, E)`, and returns
# `(expert_index, weight)`, both `(T, k)`:
#
# * `expert_index[t]`: the k experts with the highest probability (softmax over E), **most
#   probable first** (`torch.topk` sorts for you);
# * `weight[t]`: the weight that expert's output gets when the results are combined. For **k = 1**
#   it is the probability itself (Switch Transformer: an unsure gate scales the output down, and
#   that is how the gate gets a gradient). For **k ≥ 2** the k chosen probabilities are
#   **renormalised** to sum to 1.
#
# Keep `weight` computed from `logits` (no `.detach()`, no `.item()`): the gate learns through it.

# %% answer="top_k_gate" tags=["answer"]
def top_k_gate(logits, k):
    """Return (expert_index, weight), both T×k: the k most probable experts and their weights."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.top_k_gate(top_k_gate)

# %% [markdown]
# ## Exercise 8.2 — capacity: slots and drops
#
# `assign_slots(expert_index, num_experts, capacity)` gives every assignment (token t, choice j) its
# position in expert `expert_index[t, j]`'s buffer of `capacity` slots, or −1 when the buffer is
# already full. Returns `slot`, `(T, k)`, integers.
#
# The order in which assignments claim slots decides who is dropped:
#
# 1. **all first choices before any second choice** (then all second choices before any third…),
# 2. within one choice, **earlier tokens first**.
#
# So a token loses its second expert before any token loses its first. Keep one counter per
# expert; walk choice by choice, token by token. (A loop is fine here; the reference in
# `course_lib/moe.py` uses a cumulative sum instead.)

# %% answer="assign_slots" tags=["answer"]
def assign_slots(expert_index, num_experts, capacity):
    """Return slot (T×k): the position of each (token, choice) in its expert's buffer, -1 if full."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.assign_slots(assign_slots)

# %% [markdown]
# ## Exercise 8.3 — all-to-all with uneven splits, from send/recv
#
# `all_to_all(rows, send_counts)` runs on every rank. `rows` has one row per token to send; the
# first `send_counts[0]` rows go to rank 0, the next `send_counts[1]` to rank 1, and so on — some
# counts may be 0, and every rank's counts are different. Return `(received, recv_counts)`:
# `recv_counts[j]` is how many rows rank j sent you, and `received` holds the rows from rank 0,
# then those from rank 1, … (the rows that stay on your rank included, in their place).
#
# A receiver cannot size its buffer before it knows how many rows are coming, so work in two rounds:
#
# 1. **counts**: send each rank j how many rows you have for it (a one-element tensor, also when
#    it is 0), and receive the same from every rank;
# 2. **rows**: send piece j to rank j and receive `recv_counts[j]` rows from rank j, skipping empty
#    pieces (both sides know they are empty after round 1). Your own piece is just copied.
#
# Use `dist.isend` for every send, then `dist.recv`, then wait for the sends (if every rank first
# blocked in `send`, they could wait for each other forever). `rows.split(send_counts)` cuts the
# pieces; `dist.recv` writes into a view such as `received.split(recv_counts)[j]`. Built-in
# collectives are switched off in this check. The rows are floats; keep any other trailing shape.

# %% [markdown]
# What it should do, shown with the course's version on 3 ranks (`launch.run(fn, N)` runs `fn` on N
# ranks; use it the same way to try your own function, with prints on each rank):

# %%
def show_course_all_to_all():
    rank = dist.get_rank()
    send_counts = [[1, 2, 0], [0, 1, 1], [2, 0, 1]][rank]
    rows = torch.tensor([[10.0 * rank + i] for i in range(sum(send_counts))])
    received, recv_counts = moe.all_to_all(rows, send_counts)
    print(f"sent {rows.view(-1).tolist()} split {send_counts} -> received {received.view(-1).tolist()} "
          f"split {recv_counts}")


launch.run(show_course_all_to_all, 3)

# %% answer="all_to_all" tags=["answer"]
def all_to_all(rows, send_counts):
    """Send piece j of rows to rank j; return (rows received from ranks 0..N-1, recv_counts)."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.all_to_all(all_to_all)

# %% [markdown]
# ## Exercise 8.4 — the expert-parallel forward
#
# `moe_forward(x, gate, experts, k, capacity_factor)` runs on every rank: `x` is this rank's own
# `(T, D)` tokens (T differs between ranks), `gate` the replicated router (`gate(x)` gives `(T, E)`
# logits), and `experts` **this rank's** E/N experts: rank r holds experts r·E/N … (r+1)·E/N − 1,
# so `experts[i]` is expert r·E/N + i. Return the `(T, D)` output
#
#     y[t] = Σ over kept choices j of  weight[t, j] · expert_{expert_index[t, j]}(x[t])
#
# (a dropped assignment adds nothing; a token with every choice dropped gets a zero row). Steps:
#
# 1. **route** with `moe.route(gate(x), k, capacity_factor)` (it takes C from this rank's own T);
# 2. **dispatch**: list the kept assignments (`slot >= 0`), sort them by expert — the rows for
#    rank j are then one block — and send the token rows `x[token]` with your `all_to_all`
#    (counts per destination rank). Send each row's expert number along, in a second `all_to_all`
#    with the same counts, so the receiver knows which of its experts it is for;
# 3. **experts**: run each local expert on the rows received for it, writing the results in the
#    rows' places;
# 4. **return**: one more `all_to_all` sends the results back (the counts are `recv_counts` from
#    step 2); they arrive in the order you sent the rows;
# 5. **combine**: add `weight[t, j] · result` into row t of a zero `(T, D)` tensor
#    (`index_add_` does it in one call).
#
# The check compares your output with a one-process loop over tokens (`moe.dense_moe`), for
# k = 2 and k = 1, and runs your function under `torch.no_grad()`: send/recv move numbers, not
# gradients (the lesson's `MoELayer` wraps its all-to-all in an autograd function for that), so try
# it under `torch.no_grad()` yourself too. If 8.3 is not done yet, `moe.all_to_all(rows, send_counts)` is the course's
# version with the same signature.

# %% answer="moe_forward" tags=["answer"]
def moe_forward(x, gate, experts, k, capacity_factor):
    """This rank's MoE output (T×D) for its tokens x, with its local experts, over all-to-all."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.moe_forward(moe_forward)

# %% [markdown]
# ## What you built
#
# With these four pieces you have the whole forward pass of an expert-parallel MoE layer:
# `course_lib.moe.MoELayer` is the same, plus one thing — its all-to-all is an autograd function
# whose backward runs the exchange in reverse, so gradients reach the experts on other ranks and
# come back to the tokens (the lesson checks every gradient against the one-process loop).
# Your dispatch sends the expert numbers as a second message; the library instead first exchanges
# how many rows each rank has for each expert (E/N counts per pair of ranks), and sorts rows by
# (expert, slot) so the order itself says which expert a row is for.
