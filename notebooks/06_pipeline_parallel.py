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
# # 06 · Pipeline parallelism: GPipe, 1F1B and activation checkpointing
#
# When a model's layers do not fit on one device, give each device a **contiguous slice of the
# layers**, a *stage*: device 0 runs layers 1–4, device 1 layers 5–8, and so on. Activations
# travel forward from stage to stage, their gradients travel back. Only neighbours talk, with
# plain `send`/`recv`, and what they send is small (one activation tensor), which is why pipeline
# parallelism (流水线并行) is the usual way to cross the slow links between machines.
#
# The catch is time: a stage can only work when its input has arrived. This chapter measures that
# idle time, the **bubble** (气泡), and the two classic ways to shrink it and its memory cost.
#
# Notation: **p** stages (one per rank), **m** micro-batches (微批次) per step, **t_f** and **t_b**
# the forward and backward time of one micro-batch on one stage. For matrix multiplications
# t_b ≈ 2·t_f: for each product of the forward, the backward computes two, the gradient of the
# input and the gradient of the weight. The first cell below measures it on this machine.
#
# | term | 中文 | meaning here |
# |---|---|---|
# | pipeline parallel | 流水线并行 | each rank holds a contiguous slice of the layers |
# | stage | 阶段 | one rank's slice |
# | micro-batch | 微批次 | one of the m equal pieces of a batch |
# | bubble | 气泡 | the share of stage-time spent waiting |
# | 1F1B | 一次前向一次反向 (1F1B) | after a warm-up, alternate one forward and one backward |
# | activation checkpointing, re-materialisation | 激活检查点 / 重计算 | keep only a stage's input; recompute the rest in backward |
# | load balance | 负载均衡 | equal work per stage |

# %%
import inspect

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint

from course_lib import launch, pp, viz
from course_lib.models import make_stack, regression_data

# %% [markdown]
# ## First, measure t_b / t_f
#
# One stage of 4 MLP layers (width 256, hidden 1024) and one micro-batch of 64 samples. Its input
# needs its gradient, as on every stage but the first. Two measurements: the **work**, counted by
# `pp.FlopCounter` (the floating-point operations of every matrix product that runs, forward and
# backward, by torch's own formulas), and the **time**, by `pp.time_forward_backward` on one
# thread like a rank (the fastest of 30 runs: other programs on the machine only ever make a run
# slower).

# %%
STAGE_SHAPE = dict(depth=4, d_model=256, d_hidden=1024)
probe_stage, probe_x = make_stack(**STAGE_SHAPE, seed=0), torch.randn(64, STAGE_SHAPE["d_model"])
probe_input = probe_x.clone().requires_grad_()
with pp.FlopCounter() as forward_flops:
    probe_output = probe_stage(probe_input)
with pp.FlopCounter() as backward_flops:
    probe_output.backward(torch.ones_like(probe_output))
flop_ratio = backward_flops.total / forward_flops.total
t_f_measured, t_b_measured = pp.time_forward_backward(probe_stage, probe_x)
backward_ratio = t_b_measured / t_f_measured
print(
    f"work: forward {forward_flops.total / 1e6:.0f} MFLOP, backward {backward_flops.total / 1e6:.0f} MFLOP:"
    f"  ratio {flop_ratio:.2f}"
)
print(
    f"time: t_f = {t_f_measured * 1e3:.2f} ms, t_b = {t_b_measured * 1e3:.2f} ms:  t_b / t_f = {backward_ratio:.2f}"
)
assert flop_ratio == 2, "for each forward product, the backward computes two"
assert 1.3 < backward_ratio < 4, "a backward should take about two forwards"

# %% [markdown]
# The work is exactly twice the forward's; the time is close to twice (the GELU, the bias and the
# gradient accumulation add a little, and small matrices do not run at full speed). On the first
# stage, whose input needs no gradient, the first layer skips one product: there t_b is a little
# under 2·t_f. The pictures below use t_b = 2·t_f; the measurements on real ranks use your ratio.
#
# ## A picture of a pipeline
#
# `viz.plot_schedule(name, p, m)` plays a schedule out and draws it as a Gantt chart: one row per
# stage (stage 0 on top), time to the right, a blue box for each micro-batch's forward and an
# orange one for its backward (the number is the micro-batch). Grey is **idle**: the bubble. The
# panel on the right shows, per stage, the most micro-batches whose activations were alive at
# once — memory. (`viz.plot_pipeline` draws any timeline, later also ones measured on real ranks.)

#
# ## Naive model parallelism: one device at a time
#
# Split the layers over p devices and push the whole batch through: stage 1 waits for stage 0's
# forward, …, then the backward runs the other way. At any moment **one** device works and the
# other p − 1 wait: each device is idle (p − 1)/p of the time. More devices hold a bigger model,
# but they do not make it faster — with p = 4, three quarters of the hardware is idle. (This is a
# GPipe schedule with a single micro-batch.)

# %%
viz.plot_schedule("gpipe", 4, 1)

# %% [markdown]
# ## GPipe: cut the batch into micro-batches
#
# GPipe (Huang et al., 2019) cuts the batch into m **micro-batches**. Stage 0 sends micro-batch 0
# on and starts micro-batch 1 at once, so the stages overlap. Every stage runs all m forwards,
# then all m backwards; each micro-batch's loss is divided by m, so the gradients summed over the
# micro-batches equal the full batch's (below, checked on real ranks).

# %%
print(pp.gpipe_schedule(2, 3))
viz.plot_schedule("gpipe", 4, 8)

# %% [markdown]
# Count the grey. Each stage is busy for m·(t_f + t_b), the **ideal** time: what the step would
# take with no waiting. The whole step takes (m + p − 1)·(t_f + t_b), because the last micro-batch
# needs p − 1 extra slots to reach the end of the pipe, and the same again on the way back. So
# the idle share of all stage-time is
#
# $$\text{bubble} = \frac{(p-1)(t_f+t_b)}{(m+p-1)(t_f+t_b)} = \frac{p-1}{m+p-1},
# \qquad \frac{\text{step} - \text{ideal}}{\text{ideal}} = \frac{(p-1)(t_f+t_b)}{m\,(t_f+t_b)} = \frac{p-1}{m}.$$
#
# The second form compares the wasted time with the ideal time; Megatron-LM's paper (Narayanan
# et al., 2021) quotes it as the "bubble time fraction". With m ≥ 4p it is under 1/4, and the
# bubble is under 20 % ((p−1)/(5p−1) < 1/5) — GPipe's authors found the bubble negligible from
# m ≥ 4p on. The simulator finds the same numbers by playing the schedule out (`pp.simulate`:
# each stage runs its actions in order, each as soon as its input exists):

# %%
print(
    f"{'p':>2} {'m':>3}  {'simulated bubble':>16}  {'(p-1)/(m+p-1)':>13}  "
    f"{'simulated (step-ideal)/ideal':>28}  {'(p-1)/m':>7}"
)
for p in (2, 4, 8):
    for m in (1, p, 4 * p):
        sim = pp.simulate(pp.gpipe_schedule(p, m), t_f=1.0, t_b=2.0)
        ideal = m * (1.0 + 2.0)  # m·(t_f + t_b)
        over_ideal = (sim.total_time - ideal) / ideal
        print(
            f"{p:>2} {m:>3}  {sim.bubble_fraction:>16.1%}  {pp.bubble_formula(p, m):>13.1%}  "
            f"{over_ideal:>28.3f}  {(p - 1) / m:>7.3f}"
        )
        assert abs(sim.bubble_fraction - pp.bubble_formula(p, m)) < 1e-12
        assert abs(over_ideal - (p - 1) / m) < 1e-12
        assert m < 4 * p or sim.bubble_fraction < 0.2

# %% [markdown]
# **The price: memory.** A stage must keep each micro-batch's activations from its forward until
# its backward. GPipe runs all m forwards first, so every stage holds **m** micro-batches of
# activations at the peak (the green bars). More micro-batches shrink the bubble and grow the
# memory — unless the order changes.
#
# ## 1F1B: one forward, one backward
#
# Stage s runs only min(p − s − 1, m) forwards to fill the pipe, then **alternates**: one forward,
# one backward — each backward frees a micro-batch. At most **min(p − s, m)** micro-batches are
# alive on stage s, however large m is. The last stage runs each backward right after its forward.
# This order with a flush at the end of every step (all backwards done before the optimizer
# step, so every micro-batch uses the same weights) is PipeDream-Flush (Narayanan et al., 2021)
# and Megatron-LM's default; the first PipeDream (2019) ran 1F1B without the flush, with
# asynchronous updates and stashed weight versions.

# %%
print(inspect.getsource(pp.one_f_one_b_schedule))
viz.plot_schedule("1f1b", 4, 8)

# %% [markdown]
# Same bubble, less memory: with equal stages 1F1B's step takes exactly as long as GPipe's, but
# stage 0 holds p = 4 micro-batches instead of m = 8, and the last stage holds one.

# %%
print(
    f"{'p':>2} {'m':>2}  {'GPipe bubble':>12}  {'1F1B bubble':>11}  {'GPipe peak per stage':>24}  "
    f"{'1F1B peak per stage':>24}  {'min(p-s, m)':>24}"
)
for p, m in ((2, 4), (4, 8), (4, 2), (8, 4)):
    g, o = pp.simulate(pp.gpipe_schedule(p, m)), pp.simulate(pp.one_f_one_b_schedule(p, m))
    expected = [min(p - s, m) for s in range(p)]
    print(
        f"{p:>2} {m:>2}  {g.bubble_fraction:>12.1%}  {o.bubble_fraction:>11.1%}  "
        f"{str(g.peak_activations):>24}  {str(o.peak_activations):>24}  {str(expected):>24}"
    )
    assert g.total_time == o.total_time and g.peak_activations == [m] * p
    assert o.peak_activations == expected

# %% [markdown]
# ## Try it: p, m, t_b/t_f and the schedule
#
# The formula does not depend on t_b/t_f as long as every stage is equal; the peak memory depends
# only on the schedule.

# %%
viz.pipeline_explorer()

# %% [markdown]
# ## On real ranks
#
# `pp.partition(model, rank, p)` gives rank r a contiguous slice of an `nn.Sequential`, balanced
# by **parameter count** (a linear layer's multiply-adds per sample equal its weights, so equal
# parameters mean equal compute). Then `pp.train_step` runs one step of a schedule on every rank:
#
# * a forward receives its input from rank s − 1 (`dist.recv`), runs the stage and sends the
#   output to rank s + 1 with `dist.isend` — non-blocking, so a stage never waits for its
#   neighbour to be ready to receive; the last stage computes the micro-batch's loss / m;
# * a backward receives the gradient of the stage's output from rank s + 1, backpropagates, and
#   sends the gradient of the stage's *input* (`x.grad`) to rank s − 1.
#
# Shapes travel once per step in a small header before the first activation, so a receiver can
# allocate its buffer. The loop, from `course_lib/pipeline_parallel.py`:

# %%
source = inspect.getsource(pp.train_step)
print(source[source.index("    stage_inputs, stage_outputs") :])

# %% [markdown]
# Is it right? Every stage's gradients must equal one process training on the whole batch with a
# mean loss — for both schedules, on 2 and 4 ranks, to rtol = atol = 10⁻⁵:

# %%
DEPTH, D_MODEL, D_HIDDEN, BATCH = 8, 32, 64, 32


def pipeline_gradients(m):
    """Loss and this stage's gradients after one step of each schedule."""
    rank, p, device = dist.get_rank(), dist.get_world_size(), launch.device()
    x, y = (t.to(device) for t in regression_data(BATCH, D_MODEL))
    results = {}
    for schedule in ("gpipe", "1f1b"):
        stage = pp.partition(make_stack(DEPTH, D_MODEL, D_HIDDEN, seed=0), rank, p).to(device)
        loss = pp.train_step(stage, x, y, F.mse_loss, m, schedule)
        results[schedule] = loss, {name: q.grad for name, q in stage.named_parameters()}
    return results


model = make_stack(DEPTH, D_MODEL, D_HIDDEN, seed=0)
x, y = regression_data(BATCH, D_MODEL)
full_loss = F.mse_loss(model(x), y)
full_loss.backward()
for p in (2, 4):
    per_rank = launch.run(pipeline_gradients, p, 8)
    for schedule in ("gpipe", "1f1b"):
        for _loss, grads in (r[schedule] for r in per_rank):
            for name, grad in grads.items():
                torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(per_rank[-1][schedule][0], full_loss.detach(), rtol=1e-5, atol=1e-5)
        layers = [sorted({int(n.split(".")[0]) for n in r[schedule][1]}) for r in per_rank]
        assert sorted(sum(layers, [])) == list(range(DEPTH))  # every layer on exactly one rank
        print(
            f"p = {p}, {schedule:>5}, m = 8: loss {per_rank[-1][schedule][0]:.5f} and every gradient "
            f"equal to one process ✔  (layers of each rank: {layers})"
        )

# %% [markdown]
# A second reference: torch's own `torch.distributed.pipelining` (`ScheduleGPipe`, `Schedule1F1B`)
# on the same slices gives the same gradients.


# %%
def torch_pipeline_gradients(m):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    rank, p, device = dist.get_rank(), dist.get_world_size(), launch.device()
    x, y = (t.to(device) for t in regression_data(BATCH, D_MODEL))
    results = {}
    for schedule, kind in (("gpipe", ScheduleGPipe), ("1f1b", Schedule1F1B)):
        stage = pp.partition(make_stack(DEPTH, D_MODEL, D_HIDDEN, seed=0), rank, p).to(device)
        runner = kind(PipelineStage(stage, rank, p, device), m, loss_fn=F.mse_loss)
        runner.step(x) if rank == 0 else runner.step(target=y)
        results[schedule] = {name: q.grad for name, q in stage.named_parameters()}
    return results


for schedule in ("gpipe", "1f1b"):
    for rank_result in launch.run(torch_pipeline_gradients, 2, 4):
        for name, grad in rank_result[schedule].items():
            torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=1e-5, atol=1e-5)
    print(f"torch.distributed.pipelining, {schedule}: the same gradients ✔")

# %% [markdown]
# ## Measured: the bubble in wall-clock time
#
# To measure the bubble, the stages must take a *known* time. Real matrix multiplications will
# not do on a laptop: p ranks share a few CPU cores, so a stage's speed depends on what the others
# are doing. So here each stage **sleeps** (`pp.TimedStage`): t_f = 30 ms in forward and
# t_b = t_f × the ratio you measured at the top in backward (a tiny `nn.Linear` keeps real
# gradients flowing). Sleeping ranks do not compete for the cores, and what is left to see is the
# pipeline's own waiting.
#
# `train_step(..., timeline=list)` records every action from the moment its input had arrived
# until its output was sent; everything else is waiting. The measured bubble is
# 1 − Σ busy / (p × wall-clock step time), and the measured (step − ideal)/ideal is Σ idle / Σ busy
# (each stage's busy time is its ideal time). `pp.timed_steps` runs each configuration three times
# and `pp.least_disturbed` keeps the run with the smallest bubble: on a shared machine, a rank that
# gets no core when its input arrives makes the whole pipeline wait.

# %%
T_F = 0.030
T_B = min(max(round(backward_ratio, 1), 1.5), 3.0) * T_F  # your measured t_b / t_f (kept within 1.5–3)
P = 4
BALANCED, UNBALANCED = [1, 1, 1, 1], [1.5, 1, 1, 0.5]  # 8 layers split (2,2,2,2) or (3,2,2,1)
configs = [
    ("gpipe", 1, BALANCED),
    ("gpipe", 4, BALANCED),
    ("gpipe", 8, BALANCED),
    ("1f1b", 4, BALANCED),
    ("1f1b", 8, BALANCED),
    ("1f1b", 8, UNBALANCED),
]
best = pp.least_disturbed(launch.run(pp.timed_steps, P, configs, T_F, T_B))

print(f"p = {P}, t_f = {T_F * 1e3:.0f} ms, t_b = {T_B * 1e3:.0f} ms, balanced stages")
print(
    f"{'schedule':>8} {'m':>2}  {'step':>7}  {'(m+p-1)(t_f+t_b)':>16}  {'bubble':>7}  {'(p-1)/(m+p-1)':>13}  "
    f"{'(step-ideal)/ideal':>18}  {'(p-1)/m':>7}"
)
measured = {}  # (schedule, m) -> (bubble, idle / busy, wall seconds)
for (schedule, m, work), timelines in zip(configs, best):
    if work is not BALANCED:
        continue
    bubble, wall = pp.measured_bubble(timelines)
    measured[schedule, m] = bubble, bubble / (1 - bubble), wall
    print(
        f"{schedule:>8} {m:>2}  {wall * 1e3:>5.0f}ms  {(m + P - 1) * (T_F + T_B) * 1e3:>14.0f}ms  "
        f"{bubble:>7.1%}  {pp.bubble_formula(P, m):>13.1%}  {bubble / (1 - bubble):>18.3f}  "
        f"{(P - 1) / m:>7.3f}"
    )
    assert abs(bubble - pp.bubble_formula(P, m)) < 0.1, "measured bubble far from (p-1)/(m+p-1)"

# %% [markdown]
# Both schedules measure close to the formulas, and 1F1B's bubble is GPipe's at the same m. What
# is left over is real: a message takes a little time to cross, a stage spends a moment between
# actions, and a woken rank may wait for a free core. Here is the measured GPipe step with m = 8,
# drawn like the simulator's (time in ms):

# %%
bubble_gpipe_8 = pp.measured_bubble(best[2])[0]
viz.plot_measured_pipeline(
    best[2],
    f"measured on {P} ranks: GPipe, m = 8, t_f = {T_F * 1e3:.0f} ms, t_b = {T_B * 1e3:.0f} ms",
    note=f"measured bubble {bubble_gpipe_8:.1%}   formula {pp.bubble_formula(P, 8):.1%}",
)

# %% [markdown]
# ## Measured: an unbalanced partition
#
# The pipeline moves at the pace of its slowest stage. Think of eight equal layers on four ranks:
# balanced (2, 2, 2, 2), or (3, 2, 2, 1) — one rank does 50 % more work, one half as much, the
# total is the same. The last run above was that unbalanced split (1F1B, m = 8); the simulator,
# told each stage's own t_f and t_b, predicts it:

# %%
print(f"{'partition':>24}  {'measured step':>13}  {'simulated':>9}  {'measured bubble':>15}")
steps = {}
for label, (_, m, work), timelines in (
    ("balanced (2, 2, 2, 2)", configs[4], best[4]),
    ("unbalanced (3, 2, 2, 1)", configs[5], best[5]),
):
    bubble, wall = pp.measured_bubble(timelines)
    sim = pp.simulate(pp.one_f_one_b_schedule(P, m), [w * T_F for w in work], [w * T_B for w in work])
    steps[label] = wall, sim.total_time
    print(f"{label:>24}  {wall * 1e3:>11.0f}ms  {sim.total_time * 1e3:>7.0f}ms  {bubble:>15.1%}")
    assert abs(wall - sim.total_time) < 0.25 * sim.total_time, "measured step far from the simulator's"
(balanced_wall, balanced_sim), (unbalanced_wall, unbalanced_sim) = steps.values()
slowdown, slowdown_simulated = unbalanced_wall / balanced_wall, unbalanced_sim / balanced_sim
print(f"the same work, split unevenly, takes {slowdown:.2f}× as long (simulated: {slowdown_simulated:.2f}×)")
assert slowdown > 1.0, "the unbalanced split should take longer"

# %% [markdown]
# Every micro-batch has to pass the slowest stage, so in the steady state the whole pipeline runs
# at its pace and the faster stages wait: the bubble grows although no work was added. This is why
# stages must be balanced (负载均衡), and why `pp.partition` balances parameters — real models
# also need the embedding and the loss head counted, which is where the hand-tuning that makes
# pipelines unpopular starts.
#
# ## Measured: live activations per stage
#
# `pp.ActivationMeter` counts the bytes autograd saves for backward (through
# `torch.autograd.graph.saved_tensors_hooks`) and when they are freed: the activations.
# Dividing a step's peak by one micro-batch's bytes gives the number of micro-batches alive at
# once, on a real model with real compute. The same launch also runs with `checkpoint=True`,
# used in the next section.


# %%
def activation_peaks(m):
    """Peak bytes of one micro-batch, and of a step per (schedule, checkpoint)."""
    rank, p, device = dist.get_rank(), dist.get_world_size(), launch.device()
    stage = pp.partition(make_stack(DEPTH, D_MODEL, D_HIDDEN, seed=0), rank, p).to(device)
    x, y = (t.to(device) for t in regression_data(BATCH, D_MODEL))
    with pp.ActivationMeter(stage) as one:  # a single micro-batch of the same size
        pp.train_step(stage, x[: BATCH // m], y[: BATCH // m], F.mse_loss, 1)
    peaks = {}
    for schedule in ("gpipe", "1f1b"):
        for checkpoint in (False, True):
            with pp.ActivationMeter(stage) as meter:
                pp.train_step(stage, x, y, F.mse_loss, m, schedule, checkpoint=checkpoint)
            peaks[schedule, checkpoint] = meter.peak_bytes
    return one.peak_bytes, peaks


M_MEMORY = 8
peaks = launch.run(activation_peaks, P, M_MEMORY)
print(f"p = {P}, m = {M_MEMORY}: peak live micro-batches = a step's peak bytes / one micro-batch's bytes")
print(f"{'stage':>5}  {'one micro-batch':>15}  {'GPipe':>6}  {'m':>3}  {'1F1B':>5}  {'min(p-s, m)':>11}")
for s, (one, peak) in enumerate(peaks):
    gpipe_live, one_f_one_b_live = peak["gpipe", False] / one, peak["1f1b", False] / one
    print(
        f"{s:>5}  {one / 1024:>12.1f}KiB  {gpipe_live:>6.2f}  {M_MEMORY:>3}  "
        f"{one_f_one_b_live:>5.2f}  {min(P - s, M_MEMORY):>11}"
    )
    assert abs(gpipe_live - M_MEMORY) < 0.25 and abs(one_f_one_b_live - min(P - s, M_MEMORY)) < 0.25

# %% [markdown]
# ## Activation checkpointing: memory for a second forward
#
# Even 1F1B keeps p micro-batches of activations on stage 0. **Re-materialisation** (activation
# checkpointing, 重计算) keeps only each micro-batch's *input* to the stage and throws the rest
# away; the backward first runs the stage's forward again to rebuild them. Take micro-batches of
# **b** samples (a batch of m·b) and L layers of width **h** split over p stages, L/p layers each.
# Without it, a GPipe stage's peak holds every layer's activations of all m micro-batches,
# O(m·b·(L/p)·h). With it (GPipe's analysis, in the course's letters), the peak is
#
# $$O\big(m\,b\,h \;+\; b\,(L/p)\,h\big):$$
#
# the m stage inputs, plus one micro-batch's activations while it is being rebuilt. The price is
# one more forward per micro-batch: t_f on top of t_f + t_b, so the compute grows by the factor
# (2·t_f + t_b)/(t_f + t_b), which is 4/3 when t_b = 2·t_f.
#
# `pp.checkpointed(stage, x)` does it with a small `torch.autograd.Function`: forward under
# `torch.no_grad()` saving only `x`; backward recomputes and backpropagates:

# %%
print(inspect.getsource(pp._Rematerialize))

# %% [markdown]
# The stage you timed at the top (4 layers, width 256, hidden 1024) and one micro-batch of 64
# samples, in this process: the bytes kept between forward and backward, the forwards started,
# the matrix-product FLOPs of forward + backward, and the gradients — ours against
# `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)` and against no checkpointing. Then
# the time of forward + backward, the three taking turns (one thread, the fastest of ten each).


# %%
def one_stage(mode, x, grad_output):
    """Bytes kept after forward, peak bytes, forwards started, FLOPs, and the gradients."""
    stage = make_stack(**STAGE_SHAPE, seed=0)
    forwards = []
    stage.register_forward_pre_hook(lambda *_: forwards.append(1))
    x = x.clone().requires_grad_()
    run = {
        "none": stage,
        "ours": lambda t: pp.checkpointed(stage, t),
        "torch": lambda t: torch.utils.checkpoint.checkpoint(stage, t, use_reentrant=False),
    }[mode]
    with pp.ActivationMeter(stage) as meter, pp.FlopCounter() as flops:
        output = run(x)
        kept = meter.live_bytes  # what stays between forward and backward
        output.backward(grad_output)
    grads = [x.grad.clone()] + [q.grad.clone() for q in stage.parameters()]
    return dict(
        kept=kept,
        peak=meter.peak_bytes,
        forwards=len(forwards),
        flops=flops.total,
        grads=grads,
        step=lambda: run(x).backward(grad_output),
    )


grad_output = torch.randn(64, STAGE_SHAPE["d_model"])
runs = {mode: one_stage(mode, probe_x, grad_output) for mode in ("none", "ours", "torch")}
seconds = pp.fastest({mode: r["step"] for mode, r in runs.items()}, repeats=10)
print(
    f"{'checkpoint':>10}  {'kept after forward':>18}  {'peak in backward':>16}  {'forwards':>8}  "
    f"{'FLOPs ÷ none':>12}  {'fwd+bwd':>8}  {'÷ none':>6}"
)
for mode, r in runs.items():
    shown = "(hidden)" if mode == "torch" else f"{r['peak'] / 1024:.0f}KiB"
    print(
        f"{mode:>10}  {r['kept'] / 1024:>15.0f}KiB  {shown:>16}  {r['forwards']:>8}  "
        f"{r['flops'] / runs['none']['flops']:>12.3f}  {seconds[mode] * 1e3:>6.2f}ms  "
        f"{seconds[mode] / seconds['none']:>6.2f}"
    )
for mode in ("ours", "torch"):
    torch.testing.assert_close(runs[mode]["grads"], runs["none"]["grads"], rtol=1e-5, atol=1e-5)
torch.testing.assert_close(runs["ours"]["grads"], runs["torch"]["grads"], rtol=0, atol=0)
print("gradients: ours equal torch.utils.checkpoint's exactly, and both equal no checkpointing ✔")

recompute_flops = runs["ours"]["flops"] / runs["none"]["flops"]
recompute_time = seconds["ours"] / seconds["none"]
recompute_formula = (2 * t_f_measured + t_b_measured) / (t_f_measured + t_b_measured)
print(
    f"extra compute: FLOPs {recompute_flops:.3f}× (4/3 = {4 / 3:.3f});  time {recompute_time:.2f}× "
    f"((2·t_f + t_b)/(t_f + t_b) with your t_f, t_b = {recompute_formula:.2f}×)"
)
assert runs["none"]["kept"] == 4 * 576 * 1024 and runs["ours"]["kept"] == 64 * 1024  # explained below
assert [runs[mode]["forwards"] for mode in ("none", "ours", "torch")] == [1, 2, 2]
assert recompute_flops == 4 / 3 and runs["torch"]["flops"] < runs["ours"]["flops"]
assert 1.0 < recompute_time < 2.5, "the second forward should cost about t_f (timing: a loose check)"

# %% [markdown]
# Where do the bytes go? Without checkpointing each layer keeps its input (64 × 256 floats,
# 64 KiB), fc1's output before the GELU and the GELU's output (64 × 1024 floats, 256 KiB each):
# 576 KiB per layer, 2304 KiB for four. With checkpointing only the stage's input stays between
# forward and backward, 64 KiB. Ours reaches its peak *during* backward, while the stage is
# rebuilt — the b·(L/p)·h term, paid for one micro-batch at a time. (torch's recomputation runs
# under its own hooks, so the meter cannot see its peak, and it stops recomputing as soon as it
# has rebuilt what the backward needs: it skips the last product, fc2 of the last layer, so its
# FLOPs stay a little under 4/3.) The time grows by about one forward, as the formula says; on a
# busy laptop the measured share varies more than the FLOPs do.
#
# In a pipeline the difference multiplies by the micro-batches alive. The same launch as above, a
# step's peak bytes per stage with and without `checkpoint=True`, beside the formula's two terms
# counted in bytes: m stage inputs of b·h floats (b = 32/8 = 4 samples, h = 32: 512 bytes each)
# plus the rest of one micro-batch's activations (the "one micro-batch" column of the table
# above, less its input, which is already among the m):

# %%
micro_b = BATCH // M_MEMORY
input_bytes = micro_b * D_MODEL * 4  # one micro-batch's stage input: b·h floats


def checkpointed_peak(one):
    """m·b·h·4 bytes of stage inputs + one micro-batch's activations besides its input."""
    return M_MEMORY * input_bytes + one - input_bytes


print(f"{'stage':>5}  {'GPipe':>9}  {'GPipe+ckpt':>10}  {'formula':>9}  {'1F1B':>9}  {'1F1B+ckpt':>9}")
for s, (one, peak) in enumerate(peaks):
    print(
        f"{s:>5}  {peak['gpipe', False] / 1024:>7.1f}KiB  {peak['gpipe', True] / 1024:>8.1f}KiB  "
        f"{checkpointed_peak(one) / 1024:>7.1f}KiB  {peak['1f1b', False] / 1024:>7.1f}KiB  "
        f"{peak['1f1b', True] / 1024:>7.1f}KiB"
    )
    assert peak["gpipe", True] < peak["gpipe", False] / 2
    if s < P - 1:  # the last stage is different, see below
        assert peak["gpipe", True] == checkpointed_peak(one), "checkpointed GPipe peak off the formula"

# %% [markdown]
# With checkpointing, GPipe's peak no longer grows like m full micro-batches: each live
# micro-batch costs only its stage input, plus one micro-batch rebuilt at a time — to the byte on
# every stage but the last. The last stage also keeps, for each micro-batch, what the loss saves
# for its backward (its output and its target, 2·b·h more floats): a real model's loss head is
# one more thing to count when balancing stages.
#
# ## Summary
#
# * Naive layer splitting keeps p − 1 of p devices idle.
# * GPipe's m micro-batches cut the bubble to (p − 1)/(m + p − 1) ((step − ideal)/ideal:
#   (p − 1)/m), under 20 % once m ≥ 4p; measured above on real ranks with stages of known duration.
# * GPipe keeps m micro-batches of activations per stage; 1F1B, with the same bubble, keeps
#   min(p − s, m) on stage s.
# * The slowest stage sets the pace: balance the partition.
# * Checkpointing keeps only each stage input and pays one extra forward per micro-batch.
#
# ## What you measured
#
# Each formula of this chapter beside the number your run produced (p = 4 on real ranks).

# %%
one_0, peak_0 = peaks[0]
rows = [
    ("backward ÷ forward FLOPs, one stage", "2", f"{flop_ratio:.2f}"),
    ("t_b / t_f, one stage, time", "≈ 2", f"{backward_ratio:.2f}"),
    (
        "GPipe bubble, m = 8",
        f"(p−1)/(m+p−1) = {pp.bubble_formula(P, 8):.3f}",
        f"{measured['gpipe', 8][0]:.3f}",
    ),
    ("1F1B bubble, m = 8", f"(p−1)/(m+p−1) = {pp.bubble_formula(P, 8):.3f}", f"{measured['1f1b', 8][0]:.3f}"),
    ("GPipe (step−ideal)/ideal, m = 4", f"(p−1)/m = {(P - 1) / 4:.3f}", f"{measured['gpipe', 4][1]:.3f}"),
    ("1F1B (step−ideal)/ideal, m = 4", f"(p−1)/m = {(P - 1) / 4:.3f}", f"{measured['1f1b', 4][1]:.3f}"),
    ("1F1B (step−ideal)/ideal, m = 8", f"(p−1)/m = {(P - 1) / 8:.3f}", f"{measured['1f1b', 8][1]:.3f}"),
    (
        "GPipe step, m = 8",
        f"(m+p−1)(t_f+t_b) = {(8 + P - 1) * (T_F + T_B) * 1e3:.0f} ms",
        f"{measured['gpipe', 8][2] * 1e3:.0f} ms",
    ),
    ("unbalanced (3,2,2,1) ÷ balanced step", f"simulated {slowdown_simulated:.2f}×", f"{slowdown:.2f}×"),
    ("GPipe live micro-batches, stage 0", f"m = {M_MEMORY}", f"{peak_0['gpipe', False] / one_0:.2f}"),
    (
        "1F1B live micro-batches, stage 0",
        f"min(p−s, m) = {min(P, M_MEMORY)}",
        f"{peak_0['1f1b', False] / one_0:.2f}",
    ),
    (
        "1F1B live micro-batches, last stage",
        "min(p−s, m) = 1",
        f"{peaks[-1][1]['1f1b', False] / peaks[-1][0]:.2f}",
    ),
    (
        "GPipe+ckpt peak, stage 0",
        f"m·b·h·4 + rest of one = {checkpointed_peak(one_0) / 1024:.1f} KiB",
        f"{peak_0['gpipe', True] / 1024:.1f} KiB",
    ),
    ("checkpointing: FLOPs ÷ without", "(2t_f+t_b)/(t_f+t_b) = 4/3 = 1.333", f"{recompute_flops:.3f}"),
    (
        "checkpointing: time ÷ without",
        f"(2t_f+t_b)/(t_f+t_b) = {recompute_formula:.2f} (your t_f, t_b)",
        f"{recompute_time:.2f}",
    ),
]
print(f"{'quantity':<38}  {'formula':<48}  {'measured':>9}")
for quantity, formula_text, value in rows:
    print(f"{quantity:<38}  {formula_text:<48}  {value:>9}")

# %% [markdown]
# **Next**: the exercises (`my_exercises/06_pipeline_parallel.ipynb`) build the GPipe and 1F1B
# orders, one stage's send/recv loop, and the recomputing backward.
