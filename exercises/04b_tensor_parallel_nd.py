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
# > **Where to work.** Do these exercises in your own copy, `my_exercises/04b_tensor_parallel_nd.ipynb` (`make lab` makes it; delete it and run `make lab` again for a fresh one). Answers typed into `exercises/` would be overwritten when the course is updated.
# >
# > Replace every `# YOUR CODE HERE` with your code and run the check cell below it: it prints ✔, or what is wrong. To grade all your notebooks from a terminal, run `make grade`.

# %% [markdown]
# # 04b · Tensor parallelism in 2D, 2.5D and 3D — exercises
#
# In the lesson (`notebooks/04b_tensor_parallel_nd.ipynb`) the ranks formed a grid and both the
# activations and the weights were cut into blocks. Here you write the three pieces that decide
# whether such a layer is right: which block each rank owns on the 2D grid, SUMMA's steps, and
# which chunks each rank owns on the 3D cube.
#
# Notation: a linear layer computes `Y = X·B` with `X` the `(M, K)` activations and
# `B = weight.T` of shape `(K, F)`; `nn.Linear` stores `weight` as `(F, K)`. On the **q×q grid**
# rank `r` sits at row `i = r // q`, column `j = r % q` (so `r = i·q + j`). Block `(i, j)` of a
# matrix cut into q×q equal blocks is rows `i·R/q … (i+1)·R/q` and columns `j·C/q … (j+1)·C/q`
# for an `(R, C)` matrix.
#
# How the checks work: 4b.1 and 4b.3 call your function for every rank of grids with q = 1, 2, 3
# and compare with the course's answer, in this process. 4b.2 runs your SUMMA on a real 2×2 grid
# of 4 ranks and compares every rank's block of the product (rtol = atol = 1e-4); it also counts
# your collective calls. Each prints one line: `✔`, or `✘` with the rank, the block and the
# element that differ, and a hint when your answer matches a common mistake. Inside the checks
# the course's own `course_lib.tp_nd` is switched off.

# %%
import torch
import torch.distributed as dist

from course_lib.checks import tensor_parallel_nd as check

# %% [markdown]
# ## Exercise 4b.1 — the blocks rank (i, j) owns
#
# `owned_blocks(x, weight, q, rank)` returns the two blocks rank `rank` holds on the q×q grid:
# `X_ij`, block (i, j) of `x`, and `B_ij`, block (i, j) of **`B = weight.T`** — shape
# `(K/q, F/q)`, not weight's own orientation. Return views or copies, as you like.


# %% answer="owned_blocks" tags=["answer"]
def owned_blocks(x, weight, q, rank):
    """(X_ij, B_ij) for rank = i·q + j, with B = weight.T."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.owned_blocks(owned_blocks)

# %% [markdown]
# ## Exercise 4b.2 — SUMMA
#
# `summa(x_block, b_block, grid)` runs on every rank of a q×q grid. Rank (i, j) holds `X_ij`
# and `B_ij` and returns its block of the product, `C_ij = Σ_k X_ik · B_kj`, in q steps. In
# step k:
#
# * `X_ik` is on rank (i, k): **broadcast it along grid row i** —
#   `group=grid.group("row")`, `src=grid.ranks("row")[k]` (the global rank of (i, k));
# * `B_kj` is on rank (k, j): **broadcast it along grid column j** —
#   `group=grid.group("col")`, `src=grid.ranks("col")[k]`;
# * add `X_ik @ B_kj` to your block of C.
#
# `grid.coords` is `(i, j)` and `grid.q` is q. The source rank sends its block; every other rank
# receives into a buffer of the same shape (`torch.empty_like(x_block)`). Do not broadcast into
# `x_block` itself — you still need it in the step where you are the source — and multiply only
# after both broadcasts of the step have returned.


# %% answer="summa" tags=["answer"]
def summa(x_block, b_block, grid):
    """C_ij = Σ_k X_ik·B_kj on rank (i, j) of a q×q grid, by q steps of row and column broadcasts."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.summa(summa)

# %% [markdown]
# To debug, run your SUMMA on 4 ranks yourself and look at what each rank returns
# (`tp_nd.make_grid("2d")` builds the grid's row and column groups): with B the identity, rank
# (i, j) must get back its own block of x. Uncomment the last line once `summa` is written.


# %%
def try_summa():
    from course_lib import tp_nd

    grid = tp_nd.make_grid("2d")
    i, j = grid.coords
    x, b = torch.arange(16.0).view(4, 4), torch.eye(4)
    mine = summa(tp_nd.block(x, 2, i, j), tp_nd.block(b, 2, i, j), grid)
    return grid.coords, mine


# launch.run(try_summa, 4)  # (from course_lib import launch)

# %% [markdown]
# ## Exercise 4b.3 — the 3D index mapping
#
# On a q×q×q cube rank `r` sits at `(a, b, c)` with `r = a·q² + b·q + c`. For the first linear
# layer it holds:
#
# * of `x` (M, K): **row block a** (of q), and within it **piece b** (of q) of the rows; **column
#   block c** (of q). That is `X_ac` cut along the b axis: rows `(a·q + b)·M/q² … (a·q + b + 1)·M/q²`.
# * of `weight` (F, K), stored `(out, in)`: **output block b** (rows, of q) and within it **piece a**
#   (of q); **input block c** (columns, of q). That is `W_bc` cut along the a axis.
#
# `owned_3d(x, weight, q, rank)` returns the two chunks. (In the lesson, rank (a, b, c)
# all-gathers its X chunks along b to get `X_ac`, its weight chunks along a to get `W_bc`,
# multiplies, and reduce-scatters along c.)


# %% answer="owned_3d" tags=["answer"]
def owned_3d(x, weight, q, rank):
    """(x chunk, weight chunk) that rank (a, b, c), rank = a·q² + b·q + c, holds on the cube."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.owned_chunks_3d(owned_3d)
