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
# > **Where to work.** Do these exercises in your own copy, `my_exercises/09c_checkpoint.ipynb` (`make lab` makes it; delete it and run `make lab` again for a fresh one). Answers typed into `exercises/` would be overwritten when the course is updated.
# >
# > Replace every `# YOUR CODE HERE` with your code and run the check cell below it: it prints ✔, or what is wrong. To grade all your notebooks from a terminal, run `make grade`.

# %% [markdown]
# # 09c · Checkpoints across layouts, and a killed rank — exercise
#
# In the lesson (`notebooks/09c_checkpoint.ipynb`) every rank wrote its own **boxes** — blocks of
# the one-process model's tensors, each given by `offsets` and `sizes` per dimension — and a run
# in another layout read the boxes it needed. The step in the middle of that: a rank needs one
# box, a file holds another box of the same tensor; which part of each is the same elements?
#
# How the check works: it calls your function on pairs of boxes of a 12 × 10 tensor and of a
# 1-D tensor (nested, crossing, touching, apart), copies with your ranges, and compares with the
# block the two share; it prints one line: `✔`, or `✘` with the first pair that differs and, when
# your answer matches a common mistake, that mistake.

# %%
from course_lib.checks import checkpoint as check

# %% [markdown]
# ## Exercise 9c.1 — where a wanted box overlaps a saved box
#
# A box starts at `offsets` and spans `sizes` elements in every dimension (ends are exclusive:
# offsets 3, size 2 holds elements 3 and 4). `overlap(want_offsets, want_sizes, have_offsets,
# have_sizes)` returns `None` when the two boxes share no element, else a pair `(want, have)`:
# for every dimension a `(start, stop)`, **each relative to its own box**, so that
#
# ```python
# want_block[as_slices(want)] = have_block[as_slices(have)]   # as_slices: (start, stop) -> slice
# ```
#
# copies every shared element. Example: rows 0–5 wanted, rows 3–8 on disk (a 12 × 10 tensor):
# `overlap((0, 0), (6, 10), (3, 0), (6, 10))` is `([(3, 6), (0, 10)], [(0, 3), (0, 10)])`.


# %% answer="overlap" tags=["answer"]
def overlap(want_offsets, want_sizes, have_offsets, have_sizes):
    """The shared block of two boxes, as (start, stop) per dimension in each box, or None."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.overlap(overlap)
