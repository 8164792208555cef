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
# the forward and backward time of one micro-batch on one stage (t_b ≈ 2·t_f for matrix
# multiplications: backward computes two products per forward one).
#
# | term | 中文 | meaning here |
# |---|---|---|
# | pipeline parallel | 流水线并行 | each rank holds a contiguous slice of the layers |
# | stage | 阶段 | one rank's slice |
# | micro-batch | 微批次 | one of the m equal pieces of a batch |
# | bubble | 气泡 | the share of stage-time spent waiting |
# | activation checkpointing, re-materialisation | 激活检查点 / 重计算 | keep only a stage's input; recompute the rest in backward |
# | load balance | 负载均衡 | equal work per stage |

# %%
import inspect
import time

import ipywidgets as widgets
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from IPython.display import display
from matplotlib.patches import Patch

from course_lib import launch, pp, viz
from course_lib.models import make_stack, regression_data

# %% [markdown]
# ## A picture of a pipeline
#
# The helper below draws a schedule as a Gantt chart: one row per stage (stage 0 on top), time to
# the right, a blue box for each micro-batch's forward and an orange one for its backward (the
# number is the micro-batch). Grey is **idle**: the bubble. The panel on the right shows, per
# stage, the most micro-batches whose activations were alive at once — memory. It draws both the
# simulator's timelines and, later, timelines measured on real ranks.

# %%
COLORS = {"F": "#4C78A8", "B": "#F58518"}


def plot_pipeline(timeline, title, peaks=None, note=None, time_unit="t_f", width=12):
    """Gantt chart of ``timeline`` (per stage: ((kind, i), start, end)); peaks: per-stage bars."""
    p = len(timeline)
    start = min(a[1] for row in timeline for a in row)
    end = max(a[2] for row in timeline for a in row)
    fig = viz.CourseFigure(figsize=(width, 0.55 * p + 2.0), layout="constrained")
    if peaks is None:
        ax = fig.subplots()
    else:
        ax, ax_mem = fig.subplots(1, 2, width_ratios=[6, 1], sharey=True)
    boxes = sum(len(row) for row in timeline) / p
    edge = 0.8 if boxes <= 24 else 0.3 if boxes <= 64 else 0  # thin boxes must stay coloured
    points_per_unit = 72 * width * (0.75 if peaks is None else 0.68) / (end - start)
    digits = len(str(max(i for row in timeline for (_, i), _, _ in row)))
    labelled = {kind for kind in "FB"  # number a kind's boxes only if its narrowest fits the number
                if min((b - a for row in timeline for (k, _), a, b in row if k == kind), default=0)
                * points_per_unit >= 6 * digits + 4}
    for s, row in enumerate(timeline):
        y = p - 1 - s
        ax.broken_barh([(0, end - start)], (y + 0.08, 0.84), facecolor="0.88", hatch="///",
                       edgecolor="0.75", linewidth=0)
        for (kind, i), a, b in row:
            ax.broken_barh([(a - start, b - a)], (y + 0.08, 0.84), facecolor=COLORS[kind],
                           edgecolor="white", linewidth=edge)
            if kind in labelled:
                ax.text((a + b) / 2 - start, y + 0.5, str(i), ha="center", va="center",
                        fontsize=8, color="white", fontweight="bold")
    ax.set_yticks([p - 1 - s + 0.5 for s in range(p)], [f"stage {s}" for s in range(p)])
    ax.set_ylim(0, p)
    ax.set_xlim(0, end - start)
    ax.set_xlabel(f"time ({time_unit})")
    ax.set_title(title, fontsize=11, loc="left")
    legend = [Patch(color=COLORS["F"], label="forward (micro-batch no.)"),
              Patch(color=COLORS["B"], label="backward"),
              Patch(facecolor="0.88", hatch="///", edgecolor="0.75", label="idle (bubble)")]
    fig.legend(handles=legend, loc="outside lower center", ncols=3, fontsize=9, frameon=False)
    if peaks is not None:
        ax_mem.barh([p - 1 - s + 0.5 for s in range(p)], peaks, height=0.6, color="#54A24B")
        for s, value in enumerate(peaks):
            ax_mem.text(value, p - 1 - s + 0.5, f" {value}", va="center", fontsize=9)
        ax_mem.set_xlim(0, max(peaks) * 1.35 + 0.5)
        ax_mem.set_title("live micro-batches\n(peak)", fontsize=9)
        ax_mem.tick_params(left=False)
        ax_mem.set_xticks([])
    if note:
        ax.text(1.0, 1.02, note, transform=ax.transAxes, ha="right", va="bottom", fontsize=10)
    return fig


def show_schedule(name, p, m, t_f=1.0, t_b=2.0, width=12):
    sim = pp.simulate(pp.SCHEDULES[name](p, m), t_f, t_b)
    label = {"gpipe": "GPipe", "1f1b": "1F1B"}[name]
    note = f"bubble {sim.bubble_fraction:.1%}   formula (p−1)/(m+p−1) = {pp.bubble_formula(p, m):.1%}"
    return plot_pipeline(sim.timeline, f"{label}, p = {p}, m = {m}, t_b = {t_b / t_f:g}·t_f",
                         sim.peak_activations, note, width=width)


# %% [markdown]
# ## Naive model parallelism: one device at a time
#
# Split the layers over p devices and push the whole batch through: stage 1 waits for stage 0's
# forward, …, then the backward runs the other way. At any moment **one** device works and the
# other p − 1 wait: each device is idle (p − 1)/p of the time. More devices hold a bigger model,
# but they do not make it faster — with p = 4, three quarters of the hardware is idle. (This is a
# GPipe schedule with a single micro-batch.)

# %%
fig = show_schedule("gpipe", 4, 1)
fig

# %% [markdown]
# ## GPipe: cut the batch into micro-batches
#
# GPipe cuts the batch into m **micro-batches**. Stage 0 sends micro-batch 0 on and starts
# micro-batch 1 at once, so the stages overlap. Every stage runs all m forwards, then all m
# backwards; each micro-batch's loss is divided by m, so the gradients summed over the
# micro-batches equal the full batch's (below, checked on real ranks).

# %%
print(pp.gpipe_schedule(2, 3))
fig = show_schedule("gpipe", 4, 8)
fig

# %% [markdown]
# Count the grey. Each stage is busy for m·(t_f + t_b); the whole step takes (m + p − 1)·(t_f + t_b),
# because the last micro-batch needs p − 1 extra slots to reach the end of the pipe, and the same
# again on the way back. So the idle share of all stage-time is
#
# $$\text{bubble} = \frac{(p-1)(t_f+t_b)}{(m+p-1)(t_f+t_b)} = \frac{p-1}{m+p-1},
# \qquad \frac{\text{idle time}}{\text{ideal time}} = \frac{p-1}{m}.$$
#
# The second form compares the wasted time with the useful time m·(t_f + t_b): with m ≥ 4p it is
# under 1/4, and the bubble is under 20 % ((p−1)/(5p−1) < 1/5). The simulator finds the
# same numbers by playing the schedule out (`pp.simulate`: each stage runs its actions in order,
# each as soon as its input exists):

# %%
print(f"{'p':>2} {'m':>3}  {'simulated':>9}  {'(p-1)/(m+p-1)':>13}  {'idle/ideal':>10}  {'(p-1)/m':>7}")
for p in (2, 4, 8):
    for m in (1, p, 4 * p):
        sim = pp.simulate(pp.gpipe_schedule(p, m))
        ideal = m * (1.0 + 2.0)
        print(f"{p:>2} {m:>3}  {sim.bubble_fraction:>9.1%}  {pp.bubble_formula(p, m):>13.1%}  "
              f"{(sim.total_time - ideal) / ideal:>10.3f}  {(p - 1) / m:>7.3f}")

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

# %%
print(inspect.getsource(pp.one_f_one_b_schedule))
fig = show_schedule("1f1b", 4, 8)
fig

# %% [markdown]
# Same bubble, less memory: with equal stages 1F1B's step takes exactly as long as GPipe's, but
# stage 0 holds p = 4 micro-batches instead of m = 8, and the last stage holds one.

# %%
print(f"{'p':>2} {'m':>2}  {'GPipe bubble':>12}  {'1F1B bubble':>11}  {'GPipe peak per stage':>24}  "
      f"{'1F1B peak per stage':>24}  {'min(p-s, m)':>24}")
for p, m in ((2, 4), (4, 8), (4, 2), (8, 4)):
    g, o = pp.simulate(pp.gpipe_schedule(p, m)), pp.simulate(pp.one_f_one_b_schedule(p, m))
    expected = [min(p - s, m) for s in range(p)]
    print(f"{p:>2} {m:>2}  {g.bubble_fraction:>12.1%}  {o.bubble_fraction:>11.1%}  "
          f"{str(g.peak_activations):>24}  {str(o.peak_activations):>24}  {str(expected):>24}")

# %% [markdown]
# ## Try it: p, m, t_b/t_f and the schedule
#
# The formula does not depend on t_b/t_f as long as every stage is equal; the peak memory depends
# only on the schedule.

# %%
stages_slider = widgets.IntSlider(value=4, min=1, max=8, description="p stages")
micro_slider = widgets.IntSlider(value=8, min=1, max=32, description="m micro")
ratio_slider = widgets.FloatSlider(value=2.0, min=0.5, max=4.0, step=0.5, description="t_b / t_f")
schedule_picker = widgets.Dropdown(options=[("GPipe", "gpipe"), ("1F1B", "1f1b")], value="gpipe",
                                   description="schedule")
formula = widgets.HTML(layout=widgets.Layout(width="300px"))


def redraw(p, m, ratio, name):
    sim = pp.simulate(pp.SCHEDULES[name](p, m), 1.0, ratio)
    peak = "m" if name == "gpipe" else "min(p−s, m)"
    formula.value = (
        f"<b>bubble</b> = (p−1)/(m+p−1)<br>= {p - 1}/{m + p - 1} = <b>{pp.bubble_formula(p, m):.1%}</b>"
        f"<br>simulated: {sim.bubble_fraction:.1%}<br><br><b>idle / ideal</b> = (p−1)/m = {(p - 1) / m:.3f}"
        f"<br><br><b>peak live micro-batches</b><br>{peak}: {sim.peak_activations}"
        f"<br><br>step time: {sim.total_time:g}·t_f<br>ideal m·(t_f+t_b): {m * (1 + ratio):g}·t_f")
    display(show_schedule(name, p, m, 1.0, ratio, width=9))


picture = widgets.interactive_output(redraw, dict(p=stages_slider, m=micro_slider, ratio=ratio_slider,
                                                  name=schedule_picker))
display(widgets.HBox([stages_slider, micro_slider, ratio_slider, schedule_picker]),
        widgets.HBox([picture, formula]))

# %% [markdown]
# ## On real ranks
#
# `pp.partition(model, rank, p)` gives rank r a contiguous slice of an `nn.Sequential`, balanced
# by **parameter count** (for linear layers, compute is proportional to parameters). Then
# `pp.train_step` runs one step of a schedule on every rank:
#
# * a forward receives its input from rank s − 1 (`dist.recv`), runs the stage and sends the
#   output to rank s + 1 with `dist.isend` — non-blocking, so a stage never waits for its
#   neighbour to be ready to receive; the last stage computes the micro-batch's loss / m;
# * a backward receives the gradient of the stage's output from rank s + 1, backpropagates, and
#   sends the gradient of the stage's *input* (`x.grad`) to rank s − 1.
#
# Shapes travel once per step in a small header before the first activation, so a receiver can
# allocate its buffer. The loop, from `course_lib/pp.py`:

# %%
source = inspect.getsource(pp.train_step)
print(source[source.index("    stage_inputs, stage_outputs"):])

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
        for loss, grads in (r[schedule] for r in per_rank):
            for name, grad in grads.items():
                torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(per_rank[-1][schedule][0], full_loss.detach(), rtol=1e-5, atol=1e-5)
        layers = [sorted({int(n.split(".")[0]) for n in r[schedule][1]}) for r in per_rank]
        print(f"p = {p}, {schedule:>5}, m = 8: loss {per_rank[-1][schedule][0]:.5f} and every gradient "
              f"equal to one process ✔  (layers of each rank: {layers})")

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
    for per_rank in launch.run(torch_pipeline_gradients, 2, 4):
        for name, grad in per_rank[schedule].items():
            torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=1e-5, atol=1e-5)
    print(f"torch.distributed.pipelining, {schedule}: the same gradients ✔")

# %% [markdown]
# ## Measured: the bubble in wall-clock time
#
# To measure the bubble, the stages must take a *known* time. Real matrix multiplications will
# not do on a laptop: p ranks share a few CPU cores, so a stage's speed depends on what the others
# are doing. So here each stage **sleeps**: t_f = 30 ms in forward and t_b = 60 ms in backward
# (a tiny `nn.Linear` keeps real gradients flowing). Sleeping ranks do not compete for the cores,
# and what is left to see is the pipeline's own waiting.
#
# `train_step(..., timeline=list)` records every action from the moment its input had arrived
# until its output was sent; everything else is waiting. The measured bubble is
# 1 − Σ busy / (p × wall-clock step time). Each configuration runs three times and keeps the run
# with the smallest bubble: on a shared machine, a rank that gets no core when its input arrives makes
# the whole pipeline wait.

# %%
T_F, T_B = 0.030, 0.060


class SleepInBackward(torch.autograd.Function):
    """Identity whose backward sleeps: a backward of known duration."""

    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.seconds)
        return grad, None


class TimedStage(nn.Module):
    """A stage whose forward takes ``work``·T_F seconds and whose backward ``work``·T_B."""

    def __init__(self, work=1.0, width=4):
        super().__init__()
        self.work = work
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        time.sleep(self.work * T_F)
        return SleepInBackward.apply(self.linear(x), self.work * T_B)


def measured_bubble(timelines):
    start = min(row[0][1] for row in timelines)
    end = max(row[-1][2] for row in timelines)
    busy = sum(b - a for row in timelines for _, a, b in row)
    return 1 - busy / (len(timelines) * (end - start)), end - start


def timed_steps(configs, repeats=3):
    """Per (schedule, m, work of each stage): this rank's timeline of each repeat."""
    rank, device = dist.get_rank(), launch.device()
    torch.manual_seed(0)
    warm_up = TimedStage(0.0).to(device)
    ones = torch.ones(1, 4, device=device)
    pp.train_step(warm_up, ones, ones, F.mse_loss, 1)  # open the links
    results = []
    for schedule, m, work in configs:
        stage = TimedStage(work[rank]).to(device)
        x, y = torch.randn(m, 4, device=device), torch.randn(m, 4, device=device)
        runs = []
        for _ in range(repeats):
            dist.barrier()  # start together
            timeline = []
            pp.train_step(stage, x, y, F.mse_loss, m, schedule, timeline=timeline)
            runs.append(timeline)
        results.append(runs)
    return results


P = 4
BALANCED, UNBALANCED = [1, 1, 1, 1], [1.5, 1, 1, 0.5]  # 8 layers split (2,2,2,2) or (3,2,2,1)
configs = [("gpipe", 1, BALANCED), ("gpipe", 4, BALANCED), ("gpipe", 8, BALANCED),
           ("1f1b", 8, BALANCED), ("1f1b", 8, UNBALANCED)]
per_rank = launch.run(timed_steps, P, configs)
best = []  # per configuration: every rank's timeline in the repeat with the smallest bubble
for c in range(len(configs)):
    repeats = [[per_rank[r][c][k] for r in range(P)] for k in range(len(per_rank[0][c]))]
    best.append(min(repeats, key=lambda timelines: measured_bubble(timelines)[0]))

print(f"p = {P}, t_f = {T_F * 1e3:.0f} ms, t_b = {T_B * 1e3:.0f} ms, balanced stages")
print(f"{'schedule':>8} {'m':>3}  {'step':>7}  {'ideal':>7}  {'measured bubble':>15}  {'formula':>7}  "
      f"{'off by':>6}")
for (schedule, m, _), timelines in list(zip(configs, best))[:4]:
    bubble, wall = measured_bubble(timelines)
    formula = pp.bubble_formula(P, m)
    ideal = (m + P - 1) * (T_F + T_B)
    print(f"{schedule:>8} {m:>3}  {wall * 1e3:>5.0f}ms  {ideal * 1e3:>5.0f}ms  {bubble:>15.1%}  "
          f"{formula:>7.1%}  {abs(bubble - formula) / formula:>6.1%}")

# %% [markdown]
# The last column is the difference relative to the formula (10 % of a 27 % bubble is
# 2.7 points). What is left over is real: a message takes a little time to cross, a stage spends
# a moment between actions, and a woken rank may wait for a free core. Here is the measured GPipe
# step with m = 8, drawn like the simulator's (time in ms):

# %%
timelines = best[2]
t0 = min(row[0][1] for row in timelines)
in_ms = [[(a, (s - t0) * 1e3, (e - t0) * 1e3) for a, s, e in row] for row in timelines]
fig = plot_pipeline(in_ms, f"measured on {P} ranks: GPipe, m = 8, t_f = 30 ms, t_b = 60 ms",
                    note=f"measured bubble {measured_bubble(timelines)[0]:.1%}   "
                         f"formula {pp.bubble_formula(P, 8):.1%}", time_unit="ms")
fig

# %% [markdown]
# ## Measured: an unbalanced partition
#
# The pipeline moves at the pace of its slowest stage. Think of eight equal layers on four ranks:
# balanced (2, 2, 2, 2), or (3, 2, 2, 1) — one rank does 50 % more work, one half as much, the
# total is the same. The last run above was that unbalanced split (1F1B, m = 8); the simulator,
# told each stage's own t_f and t_b, predicts it:

# %%
print(f"{'partition':>24}  {'measured step':>13}  {'simulated':>9}  {'measured bubble':>15}")
for label, (_, m, work), timelines in (("balanced (2, 2, 2, 2)", configs[3], best[3]),
                                       ("unbalanced (3, 2, 2, 1)", configs[4], best[4])):
    bubble, wall = measured_bubble(timelines)
    sim = pp.simulate(pp.one_f_one_b_schedule(P, m), [w * T_F for w in work], [w * T_B for w in work])
    print(f"{label:>24}  {wall * 1e3:>11.0f}ms  {sim.total_time * 1e3:>7.0f}ms  {bubble:>15.1%}")
slow = measured_bubble(best[4])[1] / measured_bubble(best[3])[1]
print(f"the same work, split unevenly, takes {slow:.2f}× as long")

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
        pp.train_step(stage, x[:BATCH // m], y[:BATCH // m], F.mse_loss, 1)
    peaks = {}
    for schedule in ("gpipe", "1f1b"):
        for checkpoint in (False, True):
            with pp.ActivationMeter(stage) as meter:
                pp.train_step(stage, x, y, F.mse_loss, m, schedule, checkpoint=checkpoint)
            peaks[schedule, checkpoint] = meter.peak_bytes
    return one.peak_bytes, peaks


m = 8
peaks = launch.run(activation_peaks, P, m)
print(f"p = {P}, m = {m}: peak live micro-batches = a step's peak bytes / one micro-batch's bytes")
print(f"{'stage':>5}  {'one micro-batch':>15}  {'GPipe':>6}  {'m':>3}  {'1F1B':>5}  {'min(p-s, m)':>11}")
for s, (one, peak) in enumerate(peaks):
    print(f"{s:>5}  {one / 1024:>12.1f}KiB  {peak['gpipe', False] / one:>6.2f}  {m:>3}  "
          f"{peak['1f1b', False] / one:>5.2f}  {min(P - s, m):>11}")

# %% [markdown]
# ## Activation checkpointing: memory for a second forward
#
# Even 1F1B keeps p micro-batches of activations on stage 0. **Re-materialisation** (activation
# checkpointing, 重计算) keeps only each micro-batch's *input* to the stage and throws the rest
# away; the backward first runs the stage's forward again to rebuild them. With a batch of N
# samples and L layers of width d on K = p stages, a GPipe stage's peak memory falls from
# O(N·L/K·d) — every micro-batch's activations of every layer — to O(N + N/M·L/K·d) (the
# letters of the GPipe analysis: K stages, M micro-batches; here p and m): every micro-batch's
# input, plus one micro-batch's full activations while it is being recomputed. The price is one
# more forward per micro-batch: about t_f on top of t_f + t_b ≈ 3·t_f, a third more compute.
#
# `pp.checkpointed(stage, x)` does it with a small `torch.autograd.Function`: forward under
# `torch.no_grad()` saving only `x`; backward recomputes and backpropagates:

# %%
print(inspect.getsource(pp._Rematerialize))

# %% [markdown]
# One stage of 4 layers and one micro-batch of 64 samples, in this process: the bytes kept
# between forward and backward, the forwards started, the time of forward + backward (one thread,
# like a rank), and the gradients — ours against `torch.utils.checkpoint.checkpoint(...,
# use_reentrant=False)` and against no checkpointing.

# %%
def one_stage(mode, x, grad_output, repeats=5):
    """Bytes kept after forward, peak bytes, forwards started, best time, and the gradients."""
    stage = make_stack(4, 256, 1024, seed=0)
    forwards = []
    stage.register_forward_pre_hook(lambda *_: forwards.append(1))
    x = x.clone().requires_grad_()
    run = {"none": stage, "ours": lambda t: pp.checkpointed(stage, t),
           "torch": lambda t: torch.utils.checkpoint.checkpoint(stage, t, use_reentrant=False)}[mode]
    with pp.ActivationMeter(stage) as meter:
        output = run(x)
        kept = meter.live_bytes  # what stays between forward and backward
        output.backward(grad_output)
    grads = [x.grad.clone()] + [q.grad.clone() for q in stage.parameters()]
    calls = len(forwards)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(x).backward(grad_output)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return kept, meter.peak_bytes, calls, min(times), grads


x, grad_output = torch.randn(64, 256), torch.randn(64, 256)
runs = {mode: one_stage(mode, x, grad_output) for mode in ("none", "ours", "torch")}
print(f"{'checkpoint':>10}  {'kept after forward':>18}  {'peak in backward':>16}  {'forwards':>8}  "
      f"{'fwd+bwd':>8}")
for mode, (kept, peak, forwards, seconds, _) in runs.items():
    shown = "(hidden)" if mode == "torch" else f"{peak / 1024:.0f}KiB"
    print(f"{mode:>10}  {kept / 1024:>15.0f}KiB  {shown:>16}  {forwards:>8}  {seconds * 1e3:>6.2f}ms")
for mode in ("ours", "torch"):
    torch.testing.assert_close(runs[mode][4], runs["none"][4], rtol=1e-5, atol=1e-5)
torch.testing.assert_close(runs["ours"][4], runs["torch"][4], rtol=0, atol=0)
print("gradients: ours equal torch.utils.checkpoint's exactly, and both equal no checkpointing ✔")

# %% [markdown]
# Where do the bytes go? Without checkpointing each layer keeps its input (64 × 256 floats,
# 64 KiB), fc1's output before the GELU and the GELU's output (64 × 1024 floats, 256 KiB each):
# 576 KiB per layer, 2304 KiB for four. With checkpointing only the stage's input stays between
# forward and backward, 64 KiB. Ours reaches its peak *during* backward, while the stage is
# rebuilt — the N/M·L/K·d term, paid for one micro-batch at a time. (torch's recomputation runs
# under its own hooks, so the meter cannot see its peak, and it stops recomputing as soon as it
# has rebuilt what the backward needs; both forwards started are counted.) The second forward
# costs roughly t_f on top of t_f + t_b; on a laptop's small matrices the share varies.
#
# In a pipeline the difference multiplies by the micro-batches alive. The same launch as above, a
# step's peak bytes per stage with and without `checkpoint=True`:

# %%
print(f"{'stage':>5}  {'GPipe':>9}  {'GPipe+ckpt':>10}  {'1F1B':>9}  {'1F1B+ckpt':>9}")
for s, (one, peak) in enumerate(peaks):
    print(f"{s:>5}  " + "  ".join(f"{peak[key] / 1024:>7.1f}KiB" for key in
                                  (("gpipe", False), ("gpipe", True), ("1f1b", False), ("1f1b", True))))

# %% [markdown]
# With checkpointing, GPipe's peak no longer grows like m full micro-batches: each live
# micro-batch costs only its stage input, plus one micro-batch rebuilt at a time.
#
# ## Summary
#
# * Naive layer splitting keeps p − 1 of p devices idle.
# * GPipe's m micro-batches cut the bubble to (p − 1)/(m + p − 1) (idle/ideal: (p − 1)/m), under
#   20 % once m ≥ 4p; measured above on real ranks with stages of known duration.
# * GPipe keeps m micro-batches of activations per stage; 1F1B, with the same bubble, keeps
#   min(p − s, m) on stage s.
# * The slowest stage sets the pace: balance the partition.
# * Checkpointing keeps only each stage input and pays one extra forward per micro-batch.
#
# **Next**: the exercises (`exercises/06_pipeline_parallel.ipynb`) build the GPipe and 1F1B
# orders, one stage's send/recv loop, and the recomputing backward.
