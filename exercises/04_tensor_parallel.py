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
# > **Where to work.** Do these exercises in your own copy, `my_exercises/04_tensor_parallel.ipynb` (`make lab` makes it; delete it and run `make lab` again for a fresh one). Answers typed into `exercises/` would be overwritten when the course is updated.
# >
# > Replace every `# YOUR CODE HERE` with your code and run the check cell below it: it prints ✔, or what is wrong. To grade all your notebooks from a terminal, run `make grade`.

# %% [markdown]
# # 04 · Tensor parallelism — exercises
#
# In the lesson (`notebooks/04_tensor_parallel.ipynb`) the MLP's two weight matrices were cut
# into blocks, one per rank, and two small autograd functions, **f** and **g**, kept the
# arithmetic equal to the dense layer. Here you build each piece yourself and then put them
# together into a tensor-parallel MLP.
#
# Notation: **N** ranks, rank **r**. `nn.Linear` stores its weight as `(out, in)` and computes
# `x @ weight.T + bias`. Rank r's **block** of a size S is the index range
# `r·S/N … (r+1)·S/N` (contiguous, the Megatron layout).
#
# How the checks work: each check runs your code on N = 1, 2 and 4 ranks with a small seeded MLP
# (d_model 8, hidden 16) and compares **the forward output and the gradients** with the dense
# layer computed in one process (rtol = atol = 1e-5). It prints one line: `✔`, or `✘` with N,
# the rank, the tensor and the element that differ, and a hint when your numbers match a common
# mistake. Inside the checks `course_lib.tp` (the course's own answer) is switched off; the
# collectives of `torch.distributed` are yours to use.

# %%
import torch
import torch.distributed as dist
import torch.nn.functional as F

from course_lib import launch
from course_lib.checks import tensor_parallel as check

# %% [markdown]
# ### A warm-up you can run: each rank's block
#
# `launch.run(fn, N)` runs `fn` on N ranks (processes) and returns what each returned. Here every
# rank reports its block of the 16 hidden features. Use the same pattern to debug your answers:
# call them inside a function like this one and print on each rank.

# %%
def my_block(size):
    rank, n = dist.get_rank(), dist.get_world_size()
    return rank * size // n, (rank + 1) * size // n


launch.run(my_block, 4, 16)

# %% [markdown]
# ## Exercise 4.1 — column-parallel linear
#
# The MLP's first layer is `fc1(x) = x @ A + b` with `A = fc1.weight.T`. Megatron splits **A by
# columns**: rank r keeps the columns of its block of output features. Since `weight` is `A.T`,
# that is rank r's block of **rows** of `weight`, and the same block of `bias`.
#
# `column_parallel(x, weight, bias)` gets the replicated input `x` (shape `(…, in)`) and the
# dense layer's `weight` `(out, in)` and `bias` `(out,)`. Return this rank's block of the output
# features, `x @ weight[block].T + bias[block]`, shape `(…, out/N)`. Slice, do not copy
# (`.detach()`/`.clone()` would cut the gradient the check follows back into `weight`).
#
# No communication is needed: every rank computes different columns of the same output.

# %% answer="column_parallel" tags=["answer"]
def column_parallel(x, weight, bias):
    """This rank's block of output features of the linear layer (weight, bias)."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.column_parallel(column_parallel)

# %% [markdown]
# ## Exercise 4.2 — f: identity forward, all-reduce backward
#
# Every rank uses the same input `x`, but the loss depends on `x` through **every** rank's
# columns. So the gradient of `x` is a sum over ranks: rank r alone only knows the part that
# flowed through its own columns. Megatron's **f** fixes that: forward it passes `x` through
# unchanged; backward it all-reduces the gradient.
#
# Write it as a `torch.autograd.Function` (no group argument: use the default group). Return a
# new tensor from `backward` — the gradient autograd hands you is not yours to change in place.
# Useful: `x.view_as(x)`, `grad.clone()`, `dist.all_reduce(t)` (in place, sums over ranks).

# %% answer="CopyToTPRegion" tags=["answer"]
class CopyToTPRegion(torch.autograd.Function):
    """f: the identity forward; all-reduce (sum over ranks) of the gradient backward."""

    @staticmethod
    def forward(ctx, x):
        # YOUR CODE HERE
        raise NotImplementedError("exercise: replace this line with your code")

    @staticmethod
    def backward(ctx, grad):
        # YOUR CODE HERE
        raise NotImplementedError("exercise: replace this line with your code")


# %%
check.copy_to_tp_region(CopyToTPRegion)

# %% [markdown]
# ## Exercise 4.3 — g: all-reduce forward, identity backward
#
# **g** is f's mirror image. Forward: every rank holds a partial result, and the output is their
# sum (all-reduce). Backward: the output is the same on every rank, and so is its gradient, which
# is also exactly the gradient of each rank's partial result (d(sum)/d(part) = 1): pass it
# through unchanged.
#
# Do not all-reduce the input in place: all-reduce a copy.

# %% answer="ReduceFromTPRegion" tags=["answer"]
class ReduceFromTPRegion(torch.autograd.Function):
    """g: all-reduce (sum over ranks) forward; the identity backward."""

    @staticmethod
    def forward(ctx, x):
        # YOUR CODE HERE
        raise NotImplementedError("exercise: replace this line with your code")

    @staticmethod
    def backward(ctx, grad):
        # YOUR CODE HERE
        raise NotImplementedError("exercise: replace this line with your code")


# %%
check.reduce_from_tp_region(ReduceFromTPRegion)

# %% [markdown]
# ## Exercise 4.4 — row-parallel linear, bias once
#
# The second layer `fc2(y) = y @ B + b` (`B = fc2.weight.T`) gets `y` already split by features:
# rank r holds `y_r`, its block of the hidden features (the output of its columns of fc1). Split
# **B by rows** to match: rank r multiplies `y_r` by its block of rows of B, which is its block of
# **columns** of `weight`. Each rank now holds a partial product; the output is their sum.
#
# `row_parallel(y_r, weight, bias)`: return the full output `y @ weight.T + bias` on every rank.
# Sum the partial products with your g (`ReduceFromTPRegion.apply`), and add the bias **once**,
# after the sum — added on every rank before it, it would be counted N times.

# %% answer="row_parallel" tags=["answer"]
def row_parallel(y_r, weight, bias):
    """The full output of the linear layer from this rank's block of input features."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.row_parallel(row_parallel)

# %% [markdown]
# ## Exercise 4.5 — the tensor-parallel MLP
#
# Put it together: `tensor_parallel_mlp(x, mlp)` computes `mlp.fc2(gelu(mlp.fc1(x)))` with fc1
# column-parallel and fc2 row-parallel, and returns the dense output on every rank:
#
# ```
# x ──f──▶ column_parallel(fc1) ──gelu──▶ row_parallel(fc2) (g inside, + bias once) ──▶ out
# ```
#
# GELU needs no communication: it acts element by element on this rank's own columns. The check
# also compares every gradient: `x.grad` must be the whole gradient on every rank (that is f's
# job), and each parameter's gradient must be the dense gradient on this rank's block.

# %% answer="tensor_parallel_mlp" tags=["answer"]
def tensor_parallel_mlp(x, mlp):
    """The MLP's output, computed tensor-parallel (f, column-parallel fc1, GELU, row-parallel fc2)."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.tensor_parallel_mlp(tensor_parallel_mlp)
