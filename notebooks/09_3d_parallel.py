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
# # 09 · 3D parallelism and a cost model: putting the strategies together
#
# Each chapter so far cut the work one way: data parallelism (02, 03) the batch, tensor
# parallelism (04, 05) each layer's matrices, pipeline parallelism (06) the stack of layers,
# ZeRO (07) the optimizer's copies. Each also has a price: DP keeps a whole model per GPU, TP
# all-reduces in every layer, PP idles in its bubble, ZeRO sends more. Large models are trained
# with **several at once** — "3D parallelism" (3D 并行, 混合并行): dp × tp × pp GPUs, each
# strategy used where it is cheapest.
#
# This chapter (1) gives every rank a place on a dp × tp × pp grid with one process group per
# axis, (2) trains a small model on 4 and 8 ranks with the chapters' own modules and checks it
# equals one process, (3) turns the earlier chapters' formulas into a **cost model** and sets
# its predictions beside measurements made here, and (4) uses it to choose a mix.
#
# Notation as before: Ψ parameters, p stages, m micro-batches; the grid is **dp × tp × pp**.

# %%
import functools
import inspect

import ipywidgets as widgets
import torch
import torch.nn.functional as F
from IPython.display import display

from course_lib import cost, dp, launch, mesh, pp
from course_lib.comm import count_traffic
from course_lib.models import make_stack, num_params, shard

# %% [markdown]
# ## 1. The rank grid
#
# With 8 ranks and dp = tp = pp = 2, each rank has three coordinates. The order is Megatron's:
# **tp varies fastest, then dp, then pp** (`rank = pp_index·dp·tp + dp_index·tp + tp_index`).
# Why: TP talks in every layer, so its ranks should be neighbours (on a real cluster: GPUs of
# one node, behind NVLink); DP talks once a step; PP only hands activations to the next stage,
# the least traffic, so its stages can sit on different nodes.
#
# A **group** along an axis is every rank whose other two coordinates are equal. Each rank
# belongs to one tp group, one dp group and one pp group:

# %%
layout = mesh.GridLayout(dp=2, tp=2, pp=2)
print("rank 5 sits at", layout.coordinates(5))
for axis in ("tp", "dp", "pp"):
    print(f"{axis} groups:", layout.groups(axis))
layout.draw(highlight=5)

# %% [markdown]
# `RankGrid` is the same layout inside a run, plus the process groups. Creating a group is a
# collective: **every** rank calls `new_group` for **every** group, in the same order, and keeps
# the one it belongs to — so the constructor does it all at once. Each rank reports what it got:

# %%
import torch.distributed as dist  # noqa: E402


def where_am_i():
    grid = mesh.RankGrid(dp=2, tp=2, pp=2)
    return grid.coord, {axis: dist.get_process_group_ranks(getattr(grid, f"{axis}_group"))
                        for axis in ("tp", "dp", "pp")}


for rank, (coord, groups) in enumerate(launch.run(where_am_i, 8, backend="gloo")):
    print(f"rank {rank}: {coord}  groups {groups}")

# %% [markdown]
# ## 2. DP × TP × PP from the chapters' own pieces
#
# The model is a stack of MLP layers. On each rank:
#
# 1. **PP**: `pp.partition` keeps this rank's stage (a contiguous slice of layers, chapter 06);
# 2. **TP**: each layer of the stage becomes `tp.TensorParallelMLP.from_dense(layer,
#    group=tp_group)` (fc1 by columns, fc2 by rows, f and g, chapter 04);
# 3. **DP**: the rank trains on its dp shard of the batch, `pp.train_step(..., group=pp_group)`
#    runs the pipeline; afterwards the gradients are averaged **over the dp group only** — tp
#    ranks hold different blocks and pp ranks different layers, so mixing them in would be wrong.
#
# The pipeline's sends go from a rank to the rank with the same dp and tp index in the next
# stage: that is exactly the pp group. Every tp rank of a stage holds the same activation (g
# all-reduced it), so each sends its own copy to its partner.

# %%
print(inspect.getsource(mesh.build_3d_stage))
print(inspect.getsource(mesh.train_3d))

# %% [markdown]
# Now train the same seeded model three times — one process, DP × TP on 4 ranks, DP × TP × PP
# on 8 ranks — and compare every parameter each rank holds with its block of the
# single-process model (rtol = atol = 1e-5), and the losses step by step.

# %%
DEPTH, D, H = 4, 16, 32
model_fn = functools.partial(make_stack, DEPTH, D, H, 0)
batches = dp.make_batches(3, 8, d_model=D)

reference = model_fn()
reference_losses = mesh.train_dense(reference, batches)
dense = {name: p.detach() for name, p in reference.named_parameters()}

for d, t, p, m in [(2, 2, 1, 1), (2, 2, 2, 2)]:
    results = launch.run(mesh.train_3d, d * t * p, d, t, p, batches, model_fn, m, backend="gloo")
    compared = mesh.compare_with_dense(results, dense, tp_size=t)
    losses = results[-1]["losses"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-5, atol=1e-5)
    print(f"dp={d} tp={t} pp={p} (m={m}): {compared} parameter blocks equal the single process; "
          f"losses {[round(x, 6) for x in losses]}")
print("one process:                     losses", [round(x, 6) for x in reference_losses])

# %% [markdown]
# ### ZeRO-DP + PP + TP
#
# The dp axis need not be plain data parallelism: chapter 07's `ZeroAdam` takes a `group=` too,
# so it shards the optimizer states (ZeRO-1) or also the gradients (ZeRO-2) over the dp group,
# while tp and pp split the model. (DeepSpeed pairs its pipeline only with ZeRO-1: with m
# micro-batches ZeRO-2 reduce-scatters the gradients m times per step. Ours does exactly that,
# and is still exact.) The reference is `torch.optim.AdamW` on one process:

# %%
for zero_stage in (1, 2):
    reference = model_fn()
    reference_losses = mesh.train_dense(reference, batches, zero_stage, lr=0.01)
    dense_adam = {name: p.detach() for name, p in reference.named_parameters()}
    results = launch.run(mesh.train_3d, 8, 2, 2, 2, batches, model_fn, 2, zero_stage, 0.01, backend="gloo")
    compared = mesh.compare_with_dense(results, dense_adam, tp_size=2)
    print(f"ZeRO-{zero_stage} × tp=2 × pp=2: {compared} parameter blocks equal single-process AdamW; "
          f"model states on rank 0 (bytes): {results[0]['memory']}")

# %% [markdown]
# ## 3. A cost model, and how it compares with this machine
#
# `course_lib.cost` collects the formulas of the earlier chapters (its docstring lists them):
# model-state memory Ψ/(tp·pp) per GPU, then ZeRO over dp; activations per layer
# s·b·h·(34 + 5·a·s/h), with TP s·b·h·(10 + 24/t + 5·a·s/(h·t)), with TP + SP divided by t;
# bubble (p−1)/(m+p−1); traffic per step for DP/ZeRO (2Ψ or 3Ψ · (N−1)/N), TP (all-reduces of
# the activation) and PP (activations forward, gradients back).
#
# ### Model states: predicted vs what ZeroAdam holds
#
# Each rank of a 2 × 2 × 2 grid holds Ψ/(tp·pp) of the parameters (a little more: fc2's bias
# is replicated on the tp ranks). Predicted with the fp32 table (4 + 4 + 8 bytes), set beside
# `ZeroAdam.memory_report()` from inside the ranks (its flat buffers are padded to a multiple of
# dp, and stages 0–1 keep full gradients until the step):

# %%
BIG = functools.partial(make_stack, 4, 64, 128, 0)  # larger, so padding and biases matter less
big_batches = dp.make_batches(1, 16, d_model=64)
print(f"{'ZeRO':>5} {'part':>10} {'measured (B)':>13} {'predicted (B)':>14}")
for zero_stage in (0, 1, 2):
    results = launch.run(mesh.train_3d, 8, 2, 2, 2, big_batches, BIG, 2, zero_stage, 0.01, backend="gloo")
    psi_rank = sum(t.numel() for t in results[0]["params"].values())  # what rank 0 holds
    predicted = cost.model_state_bytes(psi_rank, zero_stage, dp=2, precision="fp32")
    for part, measured in results[0]["memory"].items():
        print(f"{zero_stage:>5} {part:>10} {measured:>13,} {predicted[part]:>14,.0f}")

# %% [markdown]
# ### Traffic per step: predicted vs counted
#
# One step on each rank, counted with `count_traffic` (chapter 01): the bytes gloo's sockets
# sent during the pipeline step (TP all-reduces + PP sends; the sends' payload is counted
# separately) and during the dp gradient average. The predictions use the cost model's
# functions with this model's numbers (fp32, 4 bytes; an MLP layer has 2 all-reduces, one
# forward, one backward, and stage 0's first layer skips its backward one: its input needs no
# gradient).

# %%
DEPTH_M, D_M, H_M, BATCH_M, M_M = 4, 64, 128, 64, 2


def measure_one_step(d, t, p, m):
    grid = mesh.RankGrid(d, t, p)
    stage = mesh.build_3d_stage(grid, make_stack(DEPTH_M, D_M, H_M, 0))
    x, y = dp.make_batches(1, BATCH_M, d_model=D_M)[0]
    x, y = shard(x, grid.dp_rank, d), shard(y, grid.dp_rank, d)
    with count_traffic() as pipe:
        pp.train_step(stage, x, y, F.mse_loss, m, group=grid.pp_group)
    with count_traffic() as sync:
        dp.average_gradients_allreduce(stage, group=grid.dp_group)
    return dict(coord=grid.coord, psi=num_params(stage), layers=len(stage), pipe_wire=pipe.sent,
                pipe_p2p=pipe.payload_sent, dp_wire=sync.sent)


def predicted_traffic(d, t, p, m, r):
    tokens = BATCH_M // d // m  # rows of one micro-batch on one rank
    skipped = m * cost.tp_traffic_bytes(tokens, D_M, 1, t, allreduces_per_layer=1, element_bytes=4) \
        if r["coord"].pp == 0 else 0
    return dict(dp=cost.dp_traffic_bytes(r["psi"], 0, d, element_bytes=4),
                tp=m * cost.tp_traffic_bytes(tokens, D_M, r["layers"], t, allreduces_per_layer=2,
                                             element_bytes=4) - skipped,
                pp=cost.pp_traffic_bytes(tokens, D_M, m, p, 4, neighbours=1 if p == 2 else 2))


rows = []
for d, t, p in [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 2)]:
    r = launch.run(measure_one_step, d * t * p, d, t, p, M_M, backend="gloo")[0]  # rank 0
    measured = dict(dp=r["dp_wire"], tp=r["pipe_wire"] - r["pipe_p2p"], pp=r["pipe_p2p"])
    predicted = predicted_traffic(d, t, p, M_M, r)
    for kind in ("dp", "tp", "pp"):
        if predicted[kind] or measured[kind] > 1000:
            rows.append((f"dp={d} tp={t} pp={p}", kind, measured[kind], predicted[kind]))
print(f"{'grid':>16} {'axis':>4} {'measured (B)':>13} {'predicted (B)':>14} {'ratio':>6}")
for grid, kind, measured, predicted in rows:
    print(f"{grid:>16} {kind:>4} {measured:>13,} {predicted:>14,.0f} {measured / predicted:>6.2f}")

# %% [markdown]
# The measured bytes are a few percent above the prediction: gloo adds a header to every message
# and TCP its own, and these messages are small (a few KB). The pipeline's payload is exact but
# for the 80-byte shape header sent once. On GPUs with NCCL, what matters is the same volume
# divided by very different bandwidths: TP's traffic stays inside a node (NVLink, hundreds of
# GB/s), DP's and PP's may cross nodes (tens of GB/s).
#
# ### The bubble
#
# The bubble fraction is the simulator's of chapter 06 — the cost model just quotes the formula:

# %%
for p, m in [(2, 2), (4, 4), (4, 16), (8, 32)]:
    sim = pp.simulate(pp.gpipe_schedule(p, m), t_f=1, t_b=2)
    print(f"p={p}, m={m:>2}: formula {cost.bubble_fraction(p, m):.3f}, simulated {sim.bubble_fraction:.3f}")

# %% [markdown]
# ## 4. A calculator
#
# Pick a model, a number of GPUs (80 GB each) and a mix. The bars show memory per GPU for your
# plan beside plain DP and ZeRO-3 over all GPUs; the text gives traffic per GPU per step and the
# bubble. Activations are for one sequence per micro-batch; tick "recompute" for chapter 06's
# full checkpointing (each layer keeps only its input, at the price of a second forward). A mix
# that cannot run says why.

# %%
def calculator(model="7B", gpus=64, dp=8, tp=4, pp=2, zero=1, sp=True, recompute=False, microbatches=8):
    chosen = cost.PRESETS[model]
    plan = cost.Strategy(dp=dp, tp=tp, pp=pp, zero=zero, sp=sp, recompute=recompute,
                         microbatches=microbatches)
    est = cost.estimate(chosen, plan, gpus)
    if est.problems:
        print("✘ this mix cannot run:\n  - " + "\n  - ".join(est.problems))
        return None
    traffic = ", ".join(f"{k} {cost.format_bytes(v)}" for k, v in est.traffic.items())
    fits = "fits" if est.memory_total <= 80e9 else "does NOT fit"
    print(f"memory per GPU {cost.format_bytes(est.memory_total)} ({fits} in 80 GB); traffic per GPU "
          f"per step: {traffic}; bubble {est.bubble:.1%}")
    for note in est.notes:
        print("  note:", note)
    plans = {"your plan": plan, f"DP × {gpus}": cost.Strategy(dp=gpus, recompute=recompute),
             f"ZeRO-3 × {gpus}": cost.Strategy(dp=gpus, zero=3, recompute=recompute)}
    return cost.draw_plans(chosen, plans)


controls = dict(model=widgets.Dropdown(options=list(cost.PRESETS), value="7B"),
                gpus=widgets.Dropdown(options=[8, 16, 32, 64, 128, 256, 512, 1024], value=64),
                dp=widgets.Dropdown(options=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024], value=8),
                tp=widgets.Dropdown(options=[1, 2, 4, 8, 16], value=4),
                pp=widgets.Dropdown(options=[1, 2, 4, 8, 16], value=2),
                zero=widgets.Dropdown(options=[0, 1, 2, 3], value=1),
                sp=widgets.Checkbox(value=True, description="sequence parallel"),
                recompute=widgets.Checkbox(value=False, description="recompute"),
                microbatches=widgets.IntSlider(value=8, min=1, max=64))
calculator_widget = widgets.interactive(calculator, **controls)
display(calculator_widget)

# %% [markdown]
# The same calculation without the widget, for a few mixes of a 70B model on 1024 GPUs, all with
# full recomputation (without it, 80 layers of 4096-token activations alone outgrow any GPU):

# %%
big = cost.PRESETS["70B"]
print(f"{'mix':>34} {'memory/GPU':>11} {'dp traffic':>11} {'tp traffic':>11} {'bubble':>7}")
for plan in [cost.Strategy(dp=1024, zero=3, recompute=True), cost.Strategy(dp=128, tp=8, zero=1, recompute=True),
             cost.Strategy(dp=16, tp=8, pp=8, zero=1, microbatches=32, recompute=True),
             cost.Strategy(dp=16, tp=8, pp=8, zero=1, sp=True, microbatches=32, recompute=True)]:
    est = cost.estimate(big, plan, 1024)
    name = f"dp{plan.dp} tp{plan.tp} pp{plan.pp} ZeRO-{plan.zero}{' SP' if plan.sp else ''} m={plan.microbatches}"
    print(f"{name:>34} {cost.format_bytes(est.memory_total):>11} {cost.format_bytes(est.traffic['dp']):>11} "
          f"{cost.format_bytes(est.traffic['tp']):>11} {est.bubble:>7.1%}")

# %% [markdown]
# ## 5. Which strategy when
#
# | strategy | what it cuts | gains | pays |
# |---|---|---|---|
# | **DP** 数据并行 | the batch | simplest; throughput grows with GPUs; one all-reduce per step, overlappable with backward | every GPU holds all 16Ψ bytes of model states: the model must fit on one GPU |
# | **ZeRO** (DP's states) | optimizer states / grads / params over dp | model states fall towards 16Ψ/N without touching the model's code | ZeRO-3 sends 1.5× DP's traffic (3Ψ) and gathers every layer twice a step |
# | **TP** 张量并行 | each layer's matrices | parameters *and* activations per GPU fall by t; no bubble | all-reduces of the activations in every layer, forward and backward: needs NVLink-class bandwidth, so t ≤ GPUs per node |
# | **SP** 序列并行 (with TP) | LayerNorm/dropout activations along the sequence | the 10·sbh replicated part of the activations also falls by t | same volume as TP (reduce-scatter + all-gather), more, smaller messages |
# | **PP** 流水线并行 | the stack of layers | only activations cross stages: little traffic, fine across nodes; parameters per GPU fall by p | the bubble (p−1)/(m+p−1) → needs m ≫ p micro-batches; stages must be balanced |
# | **EP/MoE** 专家并行 | experts over ranks | parameters grow with little more compute per token | all-to-all of tokens twice per MoE layer; load balance (chapter 08) |
#
# What the cost model says, as rules of thumb:
#
# 1. **Fits on one GPU with 16Ψ plus activations?** Use DP. If only the optimizer states are too
#    many, ZeRO-1/2 costs no extra traffic; ZeRO-3 if you must, at 1.5× traffic.
# 2. **A layer's activations or parameters too big?** Add TP inside a node (t = 2…8), with SP once
#    the replicated activations matter (long sequences).
# 3. **Still too big across nodes?** Add PP between nodes, with m ≥ 4·p micro-batches to keep the
#    bubble small (p = 8, m = 32: 18 %).
# 4. **All the remaining GPUs go to DP** (often with ZeRO-1): it scales throughput.
#
# The order on the grid follows the same logic: tp fastest (neighbours on NVLink), dp next, pp
# slowest. Next chapter: what goes wrong when you run this for real, and how to find it.
