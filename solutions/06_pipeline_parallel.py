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
# # 06 · Pipeline parallelism — exercises
#
# In the lesson (`notebooks/06_pipeline_parallel.ipynb`) `course_lib.pp` ran GPipe and 1F1B
# pipelines on real ranks. Here you write the pieces yourself: the order in which each stage
# runs its forwards and backwards (two schedules), the loop one rank runs to execute its order
# with send/recv, and the recomputing backward of activation checkpointing.
#
# Notation: **p** stages (one per rank; stage s runs on rank s), **m** micro-batches. An
# **action** is `("F", i)` — the forward of micro-batch i on this stage — or `("B", i)`, its
# backward. A **schedule** is a list with one list of actions per stage, in the order that stage
# runs them.
#
# How the checks work: 6.1 and 6.2 compare your schedule with the reference for every p = 1…5
# and m = 1…8, after making sure it is a schedule at all and cannot deadlock; 6.3 runs your loop
# on p = 1, 2, 3 and 4 ranks with GPipe and 1F1B orders and compares every stage's gradients and
# the loss with one process training on the whole batch (rtol = atol = 10⁻⁵); 6.4 runs in this
# notebook. Each prints one line: `✔`, or `✘` with what differs and where. A loop that waits
# forever is stopped after about twenty seconds and reported as a deadlock.

# %%
import torch
import torch.distributed as dist

from course_lib import launch, pp
from course_lib.checks import pipeline_parallel as check

# %% [markdown]
# ### A picture you can print
#
# `pp.simulate` plays a schedule out: each stage runs its actions in its order, each as soon as
# its input exists (a forward needs the previous stage's forward of the same micro-batch; a
# backward needs this stage's forward and the next stage's backward). `show` prints the result
# one time slot per column, with t_f = 1 and t_b = 2 slots; `.` is idle. Use it on your own
# schedules once they exist.

# %%
def show(schedule, t_b=2):
    sim = pp.simulate(schedule, t_f=1, t_b=t_b)
    for s, row in enumerate(sim.timeline):
        slots = [" . "] * int(sim.total_time)
        for (kind, i), start, end in row:
            for t in range(int(start), int(end)):
                slots[t] = f"{kind}{i:<2}"
        print(f"stage {s}: " + "".join(slots))
    print(f"bubble {sim.bubble_fraction:.1%}, peak live micro-batches per stage {sim.peak_activations}")


show(pp.gpipe_schedule(3, 4))

# %% [markdown]
# ## Exercise 6.1 — the GPipe order
#
# Return the GPipe schedule for `num_stages` stages and `num_microbatches` micro-batches: every
# stage runs the forwards of micro-batches 0, 1, …, m−1, then their backwards in the same order
# 0, 1, …, m−1. For p = 2, m = 3:
#
# ```
# [[("F", 0), ("F", 1), ("F", 2), ("B", 0), ("B", 1), ("B", 2)],
#  [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("B", 1), ("B", 2)]]
# ```
#
# (Yes, every stage gets the same list: the pipeline's shape comes from the *waiting*, which the
# simulator and the real ranks add.)

# %%
def gpipe_schedule(num_stages, num_microbatches):
    """Per stage, its list of actions: all forwards, then all backwards, micro-batch 0 first."""
    ### BEGIN SOLUTION
    one_stage = [("F", i) for i in range(num_microbatches)] + [("B", i) for i in range(num_microbatches)]
    return [list(one_stage) for _ in range(num_stages)]
    ### END SOLUTION


# %%
check.gpipe_schedule(gpipe_schedule)

# %% [markdown]
# ## Exercise 6.2 — the 1F1B order
#
# GPipe keeps all m micro-batches' activations alive on every stage. 1F1B runs a backward as soon
# as it can, freeing one micro-batch for each new one it starts. Stage s:
#
# 1. **warm-up**: the forwards of the first `w = min(p − s − 1, m)` micro-batches;
# 2. **steady state**: for each of the remaining m − w micro-batches, one forward (the next
#    micro-batch) then one backward (the oldest one still alive);
# 3. **cool-down**: the backwards that are left.
#
# For p = 3, m = 4, stage 0 warms up with 2 forwards: `F0 F1 | F2 B0 F3 B1 | B2 B3`; stage 2 (the
# last) has no warm-up: `F0 B0 F1 B1 F2 B2 F3 B3`. Stage s then never holds more than
# min(p − s, m) micro-batches. Print `show(one_f_one_b_schedule(4, 8))` to see it.

# %%
def one_f_one_b_schedule(num_stages, num_microbatches):
    """Per stage, its list of actions: warm-up forwards, then one forward one backward, then the rest."""
    ### BEGIN SOLUTION
    p, m = num_stages, num_microbatches

    def stage_actions(s):
        next_forward = next_backward = 0
        actions = []
        while next_backward < m:
            # Forward while the pipe is filling (p - s micro-batches alive), else backward.
            if next_forward < m and next_forward - next_backward < p - s:
                actions.append(("F", next_forward))
                next_forward += 1
            else:
                actions.append(("B", next_backward))
                next_backward += 1
        return actions

    return [stage_actions(s) for s in range(p)]
    ### END SOLUTION


# %%
check.one_f_one_b_schedule(one_f_one_b_schedule)

# %% [markdown]
# ## Exercise 6.3 — one stage's send/recv loop
#
# Now run an order for real. `run_stage(stage, actions, micro_inputs, micro_targets, loss_fn,
# activation_shape)` is called on every rank at once; rank s holds `stage`, its slice of the
# model, and `actions`, its list from a schedule. Rank 0 uses `micro_inputs` (a list of the m
# input micro-batches), the last rank uses `micro_targets`; every tensor passed between stages has
# shape `activation_shape`. Walk through `actions`:
#
# * `("F", i)`: get the input — `micro_inputs[i]` on rank 0, otherwise receive it from rank s − 1
#   into `torch.empty(activation_shape)` and call `.requires_grad_()` on it, so that backward
#   computes its gradient. Run `stage`. The last rank turns the output into
#   `loss_fn(output, micro_targets[i]) / m` (the mean over the whole batch is the mean of the m
#   micro-batch means); the others send the output to rank s + 1. Keep this micro-batch's input
#   and output (or loss) for its backward.
# * `("B", i)`: the last rank calls `loss.backward()`; the others receive the gradient of their
#   output from rank s + 1 and call `output.backward(gradient)`. Every rank but 0 then sends the
#   gradient of its input, `x.grad`, to rank s − 1.
#
# Send with `dist.isend` (it returns a request at once; a blocking `send` may wait for the
# receiver, which may be waiting for you) and keep the requests; `.wait()` on all of them at the
# end. Receive with `dist.recv`. Return the loss of the whole batch (the sum of the m losses
# above, a tensor or a number) on the last rank and `None` on the others. Gradients accumulate
# in the parameters' `.grad`: the check compares them with one process's full-batch gradients.
#
# To watch your loop run, launch it yourself in a new cell, e.g. on 2 ranks with GPipe and m = 2
# (`print` inside shows up as `[rank r] …`):
#
# ```python
# import torch.nn.functional as F
# from course_lib.models import make_stack, regression_data
#
# def try_it(m=2):
#     rank, p = dist.get_rank(), dist.get_world_size()
#     stage = pp.partition(make_stack(4, 8, 16), rank, p)
#     x, y = regression_data(8, 8)
#     actions = pp.gpipe_schedule(p, m)[rank]
#     return run_stage(stage, actions, list(x.split(8 // m)), list(y.split(8 // m)), F.mse_loss, (8 // m, 8))
#
# launch.run(try_it, 2)
# ```

# %%
def run_stage(stage, actions, micro_inputs, micro_targets, loss_fn, activation_shape):
    """Run this rank's actions with send/recv; return the batch's mean loss on the last rank."""
    ### BEGIN SOLUTION
    rank, p = dist.get_rank(), dist.get_world_size()
    m = len(micro_inputs)
    first, last = rank == 0, rank == p - 1
    inputs, outputs, requests = {}, {}, []
    total = 0.0
    for kind, i in actions:
        if kind == "F":
            if first:
                x = micro_inputs[i]
            else:
                x = torch.empty(activation_shape)
                dist.recv(x, rank - 1)
                x.requires_grad_()
            y = stage(x)
            if last:
                y = loss_fn(y, micro_targets[i]) / m
                total += y.item()
            else:
                requests.append(dist.isend(y.detach(), rank + 1))
            inputs[i], outputs[i] = x, y
        else:
            x, y = inputs.pop(i), outputs.pop(i)
            if last:
                y.backward()
            else:
                grad = torch.empty(activation_shape)
                dist.recv(grad, rank + 1)
                y.backward(grad)
            if not first:
                requests.append(dist.isend(x.grad, rank - 1))
    for request in requests:
        request.wait()
    return total if last else None
    ### END SOLUTION


# %%
check.run_stage(run_stage)

# %% [markdown]
# ## Exercise 6.4 — the recomputing backward
#
# With activation checkpointing a stage runs its forward under `torch.no_grad()`: no graph, no
# stored activations, only the stage's input `x` is kept. When the gradient of the output,
# `grad_output`, arrives, the stage must rebuild what it threw away:
#
# 1. take a fresh copy of the input that autograd will track: `x.detach().requires_grad_()`;
# 2. run the stage's forward again, with gradients on (`torch.enable_grad()`);
# 3. backpropagate `grad_output` through the new output;
# 4. return the gradient of the input, to be sent to the previous stage.
#
# The stage's parameters get their gradients in step 3. The check compares them and your returned
# gradient with `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`, and counts the
# forwards: exactly one, the recomputation.

# %%
def recompute_backward(stage, x, grad_output):
    """Re-run the stage's forward on x with a graph, backpropagate grad_output, return x's gradient."""
    ### BEGIN SOLUTION
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        output = stage(x)
    output.backward(grad_output)
    return x.grad
    ### END SOLUTION


# %%
check.recompute_backward(recompute_backward)

# %% [markdown]
# That is the whole of `pp.checkpointed` in the lesson: a `torch.autograd.Function` whose forward
# runs under `torch.no_grad()` keeping `x`, and whose backward is your `recompute_backward`
# (returning the parameters' gradients to autograd instead of accumulating them itself).
