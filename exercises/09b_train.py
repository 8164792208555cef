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
# > **Where to work.** Do these exercises in your own copy, `my_exercises/09b_train.ipynb` (`make lab` makes it; delete it and run `make lab` again for a fresh one). Answers typed into `exercises/` would be overwritten when the course is updated.
# >
# > Replace every `# YOUR CODE HERE` with your code and run the check cell below it: it prints ✔, or what is wrong. To grade all your notebooks from a terminal, run `make grade`.

# %% [markdown]
# # 09b · Capstone: a small GPT with every axis at once — exercises
#
# In the lesson (`notebooks/09b_train.ipynb`) one GPT trained on 1 to 8 ranks with data, tensor
# (with sequence parallelism), pipeline, context and expert parallelism, and ZeRO/FSDP sharding,
# and every loss curve lay on the one-process curve. Here you write the arithmetic that decides
# what each rank does: its groups, its rows of the batch, and the bytes it holds.
#
# The rank order is Megatron-LM's, with five axes, **fastest first: tp, cp, ep, dp, pp**:
#
# ```
# rank = (((pp_index · dp + dp_index) · ep + ep_index) · cp + cp_index) · tp + tp_index
# ```
#
# How the checks work: each calls your function on many grid shapes and compares with the
# course's answer; it prints one line: `✔`, or `✘` with the first case that differs and, when
# your answer matches a common mistake, that mistake.

# %%
from course_lib.checks import train as check

# %% [markdown]
# ## Exercise 9b.1 — the ranks of one group on a five-axis grid
#
# `sizes` is a dict `{"tp": …, "cp": …, "ep": …, "dp": …, "pp": …}`. The group of `rank` along
# `axis` is every rank whose **other four** coordinates equal `rank`'s. On tp2 × cp1 × ep2 × dp2 ×
# pp1 (8 ranks), rank 6 has tp index 0, ep index 1, dp index 1: its ep group is `[4, 6]` and its
# dp group `[2, 6]`. `group_of(rank, axis, sizes)` returns that list of ranks (any order).


# %% answer="group_of" tags=["answer"]
def group_of(rank, axis, sizes):
    """The ranks that differ from ``rank`` only in the coordinate along ``axis``."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.group_of(group_of)

# %% [markdown]
# ## Exercise 9b.2 — a rank's rows of the global batch
#
# Only the **data ranks** split the batch: there are dp·ep of them (expert-parallel ranks hold
# different experts but take different tokens too), and data rank `dp_index · ep + ep_index`
# takes the r-th contiguous share. The tp, cp and pp ranks of one replica work on the *same*
# rows. The pipeline then cuts the share into `m` equal micro-batches, so
#
# ```
# global batch = micro-batch × m × dp · ep
# ```
#
# `micro_batch_rows(rank, sizes, global_batch, m)` returns the rows `rank` computes as one
# `(start, stop)` pair per micro-batch, in order. Example: dp2 × ep2 (4 ranks), a global batch of
# 8, m = 2: rank 3 (dp 1, ep 1, data rank 3) computes `[(6, 7), (7, 8)]`.


# %% answer="micro_batch_rows" tags=["answer"]
def micro_batch_rows(rank, sizes, global_batch, m):
    """[(start, stop)] of each of ``rank``'s m micro-batches within the global batch."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.micro_batch_rows(micro_batch_rows)

# %% [markdown]
# ## Exercise 9b.3 — the bytes of one block on one rank
#
# One sequence-parallel block (chapter 05) with d = `d_model`, h = `d_hidden`, trained with fp32
# AdamW (4 bytes per parameter, 4 per gradient, 8 for the two moments). Split over the tp ranks:
# qkv (weight 3d·d, bias 3d), proj's weight (d·d), fc1 (h·d and h), fc2's weight (d·h). Whole on
# every tp rank: both LayerNorms (weight and bias of d each) and the two row-parallel biases (d
# each). Then ZeRO shards over the **dp** ranks: `"zero1"` the moments, `"zero2"` also the
# gradients, `"zero3"` and `"fsdp"` also the parameters; `"none"` shards nothing.
#
# `block_state_bytes(d_model, d_hidden, tp, dp, sharding)` returns the bytes one rank holds.
# (The checks use sizes where everything splits evenly.)


# %% answer="block_state_bytes" tags=["answer"]
def block_state_bytes(d_model, d_hidden, tp, dp, sharding):
    """Bytes of parameters + gradients + Adam moments of one SP block on one rank."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.block_state_bytes(block_state_bytes)
