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
# > **Where to work.** Do these exercises in your own copy, `my_exercises/02_data_parallel.ipynb` (`make lab` makes it; delete it and run `make lab` again for a fresh one). Answers typed into `exercises/` would be overwritten when the course is updated.
# >
# > Replace every `# YOUR CODE HERE` with your code and run the check cell below it: it prints ✔, or what is wrong. To grade all your notebooks from a terminal, run `make grade`.

# %% [markdown]
# # 02 · Data parallel — exercises
#
# In the lesson (`notebooks/02_data_parallel.ipynb`) every rank held a full copy of the model,
# computed gradients on its own slice of the batch, and the ranks agreed on the **mean** gradient
# before each optimizer step — through a parameter server, or with one all-reduce. Here you write
# those pieces yourself.
#
# Notation: **N** ranks, a global batch of **B** samples, **Ψ** parameters, **M** micro-batches
# per rank and step. Rank `r` is `dist.get_rank()`, N is `dist.get_world_size()`.
#
# How the checks work: each check cell runs your function on N = 1, 2, 3 and 4 ranks. Every rank
# builds the same small MLP (`models.make_mlp(8, 16, seed=3)`) and gets its shard of a global
# batch; what every rank ends with — its gradients, or its parameters after three momentum-SGD
# steps — is compared with **one process training on the whole batch** (fp32, rtol = atol = 1e-5).
# A mismatch prints the world size, the rank, the step, the parameter and the element, and often
# what the numbers look like (a sum instead of a mean, …). torch's `DistributedDataParallel` is
# switched off inside the checks: it is the reference, not the answer.
#
# The optimizer is `dp.SGD`, the course's few-line momentum SGD (the same update as
# `torch.optim.SGD(params, lr=0.1, momentum=0.9)`): `optimizer.step()` and `optimizer.zero_grad()`.

# %%
import torch
import torch.distributed as dist
import torch.nn.functional as F

from course_lib import dp, launch, models
from course_lib.checks import data_parallel as check

# %% [markdown]
# ### A warm-up you can run: local gradients differ, their mean does not
#
# Each of 2 ranks takes its half of a batch of 8 and computes the gradient of the mean-squared
# error on it. The two local gradients differ; their mean is the gradient of the whole batch.
# This is the fact every exercise below relies on. (Use a function like this to debug yours:
# call your code inside it and print on each rank.)

# %%
def local_gradient_norm():
    rank, n = dist.get_rank(), dist.get_world_size()
    model = models.make_mlp(8, 16, seed=3)
    x, y = models.regression_data(8, d_model=8)
    F.mse_loss(model(models.shard(x, rank, n)), models.shard(y, rank, n)).backward()
    grad = model.fc1.weight.grad
    print(f"my fc1.weight.grad[0, :3] = {grad[0, :3].tolist()}")
    return grad


local = launch.run(local_gradient_norm, 2)
model = models.make_mlp(8, 16, seed=3)
x, y = models.regression_data(8, d_model=8)
F.mse_loss(model(x), y).backward()
print("mean of the two:", ((local[0] + local[1]) / 2)[0, :3].tolist())
print("full batch:     ", model.fc1.weight.grad[0, :3].tolist())

# %% [markdown]
# ## Exercise 2.1 — this rank's slice of the batch
#
# `shard_batch(batch)` returns this rank's part of `batch` (a tensor whose first dimension is the
# batch, B rows; B is a multiple of N). Rank r gets the **contiguous block** of B/N rows starting
# at row r·B/N — rank 0 the first B/N rows, rank N−1 the last. Every row goes to exactly one rank,
# so together the ranks see the whole batch, and the mean of their gradients is the full-batch
# gradient.
#
# The check gives your function a batch whose row i holds the number i, so a wrong answer names
# the rows you returned.

# %% answer="shard_batch" tags=["answer"]
def shard_batch(batch):
    """Return this rank's contiguous block of len(batch) / N rows."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.shard_batch(shard_batch)

# %% [markdown]
# ## Exercise 2.2 — average the gradients with all-reduce
#
# Each rank has run `loss.backward()` on its own shard, so `p.grad` of every parameter `p` holds
# its **local** gradient. `average_gradients(model)` makes every rank's `p.grad` the **mean** over
# the N ranks, in place: `dist.all_reduce(t)` sums `t` over all ranks into every rank's `t`; then
# divide by N. After it, every rank applies the same update and the replicas stay identical.
#
# Each rank sends about 2(N−1)/N·Ψ numbers (a ring all-reduce): almost 2Ψ, whatever N.

# %% answer="average_gradients" tags=["answer"]
def average_gradients(model):
    """Replace every rank's gradients with their mean over all ranks (all-reduce, then divide)."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.average_gradients(average_gradients)

# %% [markdown]
# ## Exercise 2.3 — a parameter-server step
#
# Rank 0 is the **server**; the others are **workers**. Only the server holds an optimizer:
# `optimizer` is a `dp.SGD` on rank 0 and `None` on every other rank. Each rank has its local
# gradients in `p.grad`. `parameter_server_step(model, optimizer)`:
#
# 1. every worker sends its gradients to rank 0;
# 2. rank 0 adds them to its own, divides by N, and calls `optimizer.step()`;
# 3. rank 0 sends the **updated parameters** to every worker, which copies them into its model
#    (`p.copy_(...)` inside `with torch.no_grad():`).
#
# `dist.send(t, dst)` / `dist.recv(t, src)` move one tensor (a `recv` fills a tensor of the same
# shape you give it). One message per parameter is fine; `dp.flatten(tensors)` makes one vector
# of many tensors and `dp.unflatten_into(vector, tensors)` copies it back, if you want one message.
# The all-reduce family (`dist.all_reduce`, `dist.all_gather`, …) is switched off here: a
# server's workers talk to the server only. Count what rank 0 receives: (N−1)·Ψ.

# %% answer="parameter_server_step" tags=["answer"]
def parameter_server_step(model, optimizer):
    """Gather gradients on rank 0, average, step there, send the new parameters to every rank."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.parameter_server_step(parameter_server_step)

# %% [markdown]
# ## Exercise 2.4 — gradient accumulation, one sync per step
#
# A batch that does not fit in memory at once is split into **M micro-batches**: forward and
# backward each, and let the gradients **add up** in `p.grad` (that is what `backward()` does).
# Divide each micro-batch's loss by M, so the sum of their gradients is the gradient of the mean
# loss over all of them.
#
# `accumulate_and_step(model, optimizer, micro_batches)` gets this rank's M micro-batches, a list
# of `(x, y)` pairs (the loss is `F.mse_loss(model(x), y)`), and every rank has its own `dp.SGD`.
# Do the M forward/backward passes, then average the gradients across ranks **once** — call your
# `average_gradients` from 2.2 — then `optimizer.step()` and `optimizer.zero_grad()` (the
# gradients are zero when your function is called and must be zero again when it returns).
#
# Communicating after every micro-batch would give the same numbers for M times the traffic;
# the check counts your communication calls and says so. torch's DDP offers the same saving as
# `with ddp.no_sync(): loss.backward()` on the first M−1 micro-batches.

# %% answer="accumulate_and_step" tags=["answer"]
def accumulate_and_step(model, optimizer, micro_batches):
    """M forward/backward passes (loss / M each), one gradient average, one optimizer step."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


# %%
check.accumulate_and_step(accumulate_and_step)
