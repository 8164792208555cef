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
# # 07 · ZeRO: sharding optimizer states, gradients and parameters
#
# Data parallelism (chapter 02) keeps a **full copy** of everything on every rank: the parameters,
# their gradients, and the optimizer's state. With N ranks that is N identical copies — and every
# rank also runs the same optimizer update on all of them. ZeRO (the *Zero Redundancy Optimizer*,
# 零冗余优化器) removes that redundancy: each rank keeps only **its 1/N shard** of those tensors
# and fetches the rest exactly when it needs it.
#
# Three stages, each sharding one more kind of tensor:
#
# | stage | each rank keeps 1/N of | name in the ZeRO paper |
# |---|---|---|
# | ZeRO-1 | optimizer states | P_os |
# | ZeRO-2 | + gradients | P_os+g |
# | ZeRO-3 | + parameters | P_os+g+p (PyTorch calls it FSDP) |
#
# Notation: **N** ranks, **Ψ** parameters. Everything below runs on real processes (gloo on the CPU):
# `course_lib.zero.ZeroAdam` is the implementation, about 250 lines you can read top to bottom.

# %%
import inspect

import ipywidgets as widgets
import torch
import torch.distributed as dist
import torch.nn.functional as F
from IPython.display import display
from matplotlib.patches import Patch, Rectangle

from course_lib import launch, zero
from course_lib.comm import count_traffic
from course_lib.models import make_stack, num_params, regression_data, shard
from course_lib.viz import CourseFigure

# %% [markdown]
# ## Where the memory goes
#
# Training with Adam, each parameter brings along its gradient and Adam's two running averages
# (momentum m and variance v). These **model states** are what ZeRO shards. (Activations, temporary
# buffers and fragmentation — the *residual states* — are not touched by ZeRO; activation
# checkpointing and tensor/sequence parallelism deal with those.)
#
# **Mixed-precision training** (how large models are trained on GPUs; the table of the ZeRO paper),
# bytes per parameter:
#
# | parameters (fp16) | gradients (fp16) | Adam: fp32 master copy + m + v | total |
# |---|---|---|---|
# | 2 | 2 | 4 + 4 + 4 = 12 | **16Ψ** |
#
# **fp32 on the CPU** (what this course runs and measures), bytes per parameter:
#
# | parameters (fp32) | gradients (fp32) | Adam: m + v (the parameters are the master copy) | total |
# |---|---|---|---|
# | 4 | 4 | 4 + 4 = 8 | **16Ψ** |
#
# Both come to 16 bytes per parameter, split differently. A 7.5-billion-parameter model needs
# 16 × 7.5·10⁹ = 120 GB of model states — on *every* data-parallel rank, however many there are.
#
# Measured, fp32 table: one process, torch's own `AdamW`, after one step. `zero.storage_bytes` adds
# up the memory behind a list of tensors (each storage once).

# %%
model = make_stack(depth=4, d_model=128, d_hidden=512, seed=0)
psi = num_params(model)
adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
x, y = regression_data(32, 128)
F.mse_loss(model(x), y).backward()
adamw.step()
held = {"params": zero.storage_bytes(model.parameters()),
        "grads": zero.storage_bytes(p.grad for p in model.parameters()),
        "optimizer": zero.storage_bytes(t for state in adamw.state.values() for t in state.values())}
print(f"Ψ = {psi:,} parameters (fp32 on CPU)")
for what, nbytes in held.items():
    print(f"  {what:9} {nbytes:>11,} bytes = {nbytes / psi:5.2f} bytes per parameter")
print(f"  {'total':9} {sum(held.values()):>11,} bytes = {sum(held.values()) / psi:5.2f} Ψ")
del model, adamw

# %% [markdown]
# (The optimizer's few extra bytes are its step counters: one small tensor per parameter tensor.)
#
# ## The idea: Adam works element by element
#
# After data parallelism's all-reduce, every rank holds the same mean gradient and runs the same
# Adam update on all Ψ elements — N times the same work, N copies of m and v. But Adam's update of
# element i needs only element i of the parameter, the gradient, m and v. So split the flat vector
# of all parameters into N equal shards and let **rank r update shard r only**:
#
# * **ZeRO-1**: rank r keeps m and v of its shard only. It needs the *summed* gradient of its shard
#   only, so instead of an all-reduce it runs a **reduce-scatter** (rank r receives the sum of
#   shard r). After updating its shard it **all-gathers** the new parameters, so every rank again
#   holds all of them for the next forward.
# * **ZeRO-2**: the full gradient is no longer needed once it is reduce-scattered, so do that
#   **during the backward**, layer by layer, as soon as each layer's gradient exists, and free it.
#   Now gradients are sharded too.
# * **ZeRO-3**: parameters are sharded too. A layer's full parameters are **all-gathered just
#   before its forward**, freed after it, **all-gathered again before its backward**, freed again.
#
# Recall from chapter 01: **all-reduce = reduce-scatter + all-gather**. ZeRO-1 and ZeRO-2 do
# exactly those two halves, just with the Adam update in between — so they communicate exactly as
# much as plain data parallelism. ZeRO-3 adds one more all-gather (the forward's and the backward's
# gather, plus the gradient's reduce-scatter: three halves instead of two).
#
# The picture: which part of each tensor each of N = 4 ranks holds (coloured) or not (grey), bytes
# in proportion to the fp32 table.

# %%
STAGE_NAMES = {0: "plain DP", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3"}
KIND_COLORS = {"params": "tab:blue", "grads": "tab:orange", "optimizer": "tab:green"}
KIND_LABELS = {"params": "parameters", "grads": "gradients", "optimizer": "Adam states"}


def who_holds_what(n=4, precision="fp32"):
    sizes = dict(zip(KIND_COLORS, zero.PRECISIONS[precision]))
    fig = CourseFigure(figsize=(11, 3.6), layout="constrained")
    for stage, ax in zip(zero.STAGES, fig.subplots(1, 4, sharey=True)):
        sharded = {"params": stage >= 3, "grads": stage >= 2, "optimizer": stage >= 1}
        for rank in range(n):
            x, y = 0, n - 1 - rank
            for kind, width in sizes.items():
                for part in range(n):
                    held = not sharded[kind] or part == rank
                    ax.add_patch(Rectangle((x + part * width / n, y + 0.1), width / n, 0.8,
                                           facecolor=KIND_COLORS[kind] if held else "0.88",
                                           edgecolor="white", linewidth=1))
                x += width + 0.6
        per_rank = sum(zero.formula_bytes(stage, 1, n, precision).values())
        ax.set_title(f"{STAGE_NAMES[stage]}: {per_rank:g}Ψ bytes per rank", fontsize=10)
        ax.set_xlim(0, sum(sizes.values()) + 1.2)
        ax.set_ylim(0, n)
        ax.set_xticks([])
        ax.set_yticks([n - 1 - r + 0.5 for r in range(n)], [f"rank {r}" for r in range(n)])
        ax.tick_params(left=False)
        for side in ax.spines.values():
            side.set_visible(False)
    fig.legend(handles=[Patch(color=c, label=f"{KIND_LABELS[k]} ({sizes[k]} B per parameter)")
                        for k, c in KIND_COLORS.items()] + [Patch(color="0.88", label="not held")],
               loc="outside lower center", ncols=4, frameon=False, fontsize=9)
    fig.suptitle(f"What each of N = {n} ranks holds ({precision}; shard r of each tensor belongs to rank r)",
                 fontsize=11)
    return fig


who_holds_what()

# %% [markdown]
# ### Shards need padding
#
# Reduce-scatter and all-gather move **equal** chunks, but Ψ is rarely a multiple of N. `ZeroAdam`
# lays the parameters each module owns (a Linear layer's weight and bias) one after another in a
# flat buffer, **pads it with zeros** to the next multiple of N, and gives rank r elements
# [r·S, (r+1)·S) with S = padded/N. The padding's gradients are zero, so its Adam state and values
# stay zero. One flat buffer per layer rather than one for the whole model, so that ZeRO-3 can
# gather one layer at a time.

# %%
for name, p in make_stack(depth=1, d_model=6, d_hidden=10).named_parameters():
    print(f"{name:12} {p.numel():3} elements")
layer_sizes = {"layer fc1": 6 * 10 + 10, "layer fc2": 10 * 6 + 6}
for layer, numel in layer_sizes.items():
    for n in (3, 4, 8):
        padded = zero.padded_size(numel, n)
        print(f"{layer} ({numel} elements) on N={n}: padded to {padded}, shards of {padded // n}, "
              f"{padded - numel} zeros of padding")

# %% [markdown]
# ## The code
#
# `step()` first makes sure this rank has its shard of the mean gradient: plain DP all-reduces all
# layers' gradients in one message; ZeRO-1 waits for the reduce-scatters its hook started during
# the backward (so the transfer overlapped the backward, as DDP's buckets do); ZeRO-2 and ZeRO-3
# finished each layer's during the backward already. Then AdamW on this rank's shard (`adamw_`: the
# element-wise update, the same arithmetic as `torch.optim.AdamW`), and stages 1 and 2 all-gather
# each layer's updated parameters, sent while the next layer is being updated. Stage 3 does not:
# the next forward gathers each layer when it needs it.

# %%
print(inspect.getsource(zero.ZeroAdam.step))

# %% [markdown]
# The hook that reduces gradients during the backward, one layer at a time. PyTorch calls a
# parameter's `register_post_accumulate_grad_hook` once its gradient for this backward is complete;
# when all of a layer's parameters are done, ZeRO-1 starts the layer's reduce-scatter without
# waiting (it keeps the full gradient anyway), while ZeRO-2 and ZeRO-3 reduce-scatter it at once and
# free the full gradient:

# %%
print(inspect.getsource(zero.ZeroAdam._grad_ready))
print(inspect.getsource(zero.ZeroAdam._reduce_gradients))

# %% [markdown]
# Stage 3's hooks: gather before the forward (a forward pre-hook), free after it (a forward hook,
# which also asks to be told when the gradient reaches the layer's output — the moment just before
# the layer's backward — to gather again). Freeing resizes the buffer's storage to zero bytes
# rather than dropping the tensor: autograd saved views of the weights for the backward, and they
# see the data again once it is gathered back into the same storage.

# %%
print(inspect.getsource(zero.ZeroAdam._gather))
print(inspect.getsource(zero.ZeroAdam._after_forward))

# %% [markdown]
# ### An aside, measured: gloo's reduce-scatter is an all-reduce
#
# `ZeroAdam` does not call `dist.reduce_scatter_single`: on gloo that built-in runs a full
# all-reduce underneath and keeps one chunk, so it moves twice what a reduce-scatter must.
# `zero.reduce_scatter` sends each chunk j straight to rank j with an all-to-all (chapter 01) and
# adds up the N chunks it receives: (N−1)/N of the array per rank, the same as the ring of
# chapter 03, in one round instead of N−1. The counter from `course_lib.comm` shows the
# difference — bytes each rank received, per element of the K-element input (4 bytes each), on
# N = 4 ranks:

# %%
def reduce_scatter_two_ways(k):
    n = dist.get_world_size()
    with count_traffic() as builtin:
        dist.reduce_scatter_single(torch.empty(k // n), torch.ones(k))
    with count_traffic() as ours:
        zero.reduce_scatter(torch.ones(k))
    return builtin.received / (4 * k), ours.received / (4 * k)


builtin, ours = launch.run(reduce_scatter_two_ways, 4, 2**18)[0]
print(f"gloo's reduce_scatter:  {builtin:.3f}·K   (an all-reduce's 2(N−1)/N = 1.5)")
print(f"zero.reduce_scatter:    {ours:.3f}·K   (a reduce-scatter's (N−1)/N = 0.75)")

# (NCCL's reduce-scatter on GPUs is a real one.)
#
# ## Same numbers as one process
#
# ZeRO changes where tensors live, not the arithmetic: after any number of steps the parameters
# must equal one process training on the whole batch. Each rank computes the mean loss on its
# shard of every batch; the gradient is averaged over ranks; every stage, N = 1 … 4 (3 does not
# divide the layers' sizes: padding in action). The reference is `torch.optim.AdamW`.

# %%
STEPS, BATCH, D_MODEL = 3, 24, 6
HYPER = dict(lr=1e-2, weight_decay=0.1)


def batches():
    x, y = regression_data(STEPS * BATCH, D_MODEL)
    return list(zip(x.split(BATCH), y.split(BATCH)))


def small_model():
    return make_stack(depth=3, d_model=D_MODEL, d_hidden=10, seed=0)


def train_every_stage():
    """In each rank: a few steps of every stage; returns {stage: full parameters}."""
    rank, n = dist.get_rank(), dist.get_world_size()
    result = {}
    for stage in zero.STAGES:
        model = small_model()
        opt = zero.ZeroAdam(model, stage, **HYPER)
        for x, y in batches():
            F.mse_loss(model(shard(x, rank, n)), shard(y, rank, n)).backward()
            opt.step()
            opt.zero_grad()
        result[stage] = opt.full_parameters()
    return result


reference = small_model()
adamw = torch.optim.AdamW(reference.parameters(), **HYPER)
for x, y in batches():
    F.mse_loss(reference(x), y).backward()
    adamw.step()
    adamw.zero_grad()
expected = {name: p.detach() for name, p in reference.named_parameters()}

ours = {}
print(f"Ψ = {num_params(reference)}; largest |difference| from one process with torch.optim.AdamW:")
print("N   " + "".join(f"{STAGE_NAMES[s]:>12}" for s in zero.STAGES))
for n in (1, 2, 3, 4):
    per_rank = launch.run(train_every_stage, n)
    ours[n] = per_rank
    worst = {}
    for stage in zero.STAGES:
        for params in per_rank:  # every rank holds the same full parameters
            for name, p in params[stage].items():
                torch.testing.assert_close(p, expected[name], rtol=1e-5, atol=1e-5)
        worst[stage] = max((p - expected[k]).abs().max().item() for r in per_rank for k, p in r[stage].items())
    print(f"{n:<4}" + "".join(f"{worst[s]:>12.1e}" for s in zero.STAGES))

# %% [markdown]
# Differences of ~10⁻⁸ are float rounding: the ranks add the gradients in a different order than
# one process does.
#
# ## Same numbers as PyTorch's own ZeRO
#
# PyTorch has two built-ins to compare with. `ZeroRedundancyOptimizer` is ZeRO-1: it shards the
# optimizer state by whole parameter tensors (not a flat buffer) and broadcasts each owner's updated
# tensors; it leaves gradient averaging to you (here: an all-reduce per gradient, as chapter 02).
# FSDP2's `fully_shard` is ZeRO-3: each wrapped module's parameters become sharded `DTensor`s,
# gathered around its forward and backward. Both run on the CPU with gloo (FSDP2 on a CPU device
# mesh; the older FSDP1 refuses CPU tensors). These ranks import more of torch, so this cell takes a
# few seconds.

# %%
def train_with_builtins():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer

    rank, n = dist.get_rank(), dist.get_world_size()
    model = small_model()
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, **HYPER)
    for x, y in batches():
        F.mse_loss(model(shard(x, rank, n)), shard(y, rank, n)).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= n
        opt.step()
        opt.zero_grad()
    zro = {name: p.detach().clone() for name, p in model.named_parameters()}

    model = small_model()
    mesh = init_device_mesh("cpu", (n,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), **HYPER)
    for x, y in batches():
        F.mse_loss(model(shard(x, rank, n)), shard(y, rank, n)).backward()
        opt.step()
        opt.zero_grad()
    fsdp = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
    return zro, fsdp


N_BUILTIN = 2
zro, fsdp = launch.run(train_with_builtins, N_BUILTIN)[0]
for what, theirs, stage in (("ZeroRedundancyOptimizer", zro, 1), ("FSDP2 fully_shard", fsdp, 3)):
    mine = ours[N_BUILTIN][0][stage]
    for name in expected:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-5, atol=1e-5)
    diff = max((mine[k] - theirs[k]).abs().max().item() for k in expected)
    print(f"ZeroAdam stage {stage} vs {what} on N={N_BUILTIN}: largest |difference| {diff:.1e}")

# %% [markdown]
# ## Memory, measured against the formulas
#
# Now a model of about half a million parameters, one step of every stage on N = 1, 2, 4 and 8
# ranks. After `step()` (before `zero_grad()`) each rank reports what it holds:
# `opt.memory_report()` adds up the storages of its parameters, gradients and Adam states. This
# cell measures the **fp32 table** (4 + 4 + 8 bytes per parameter); per rank the formulas are
#
# | | parameters | gradients | Adam states | total (fp32) | total (mixed precision) |
# |---|---|---|---|---|---|
# | plain DP | 4Ψ | 4Ψ | 8Ψ | 16Ψ | 16Ψ |
# | ZeRO-1 | 4Ψ | 4Ψ | 8Ψ/N | 8Ψ + 8Ψ/N | 4Ψ + 12Ψ/N |
# | ZeRO-2 | 4Ψ | 4Ψ/N | 8Ψ/N | 4Ψ + 12Ψ/N | 2Ψ + 14Ψ/N |
# | ZeRO-3 | 4Ψ/N | 4Ψ/N | 8Ψ/N | 16Ψ/N | 16Ψ/N |
#
# The same step is also run under the traffic counter: bytes this rank received over the network
# during one whole training step (forward, backward, `step()`), for the next section.

# %%
BIG = dict(depth=4, d_model=128, d_hidden=512)


def measure_every_stage():
    rank, n = dist.get_rank(), dist.get_world_size()
    x, y = regression_data(4 * n, BIG["d_model"])
    x, y = shard(x, rank, n), shard(y, rank, n)
    result = {}
    for stage in zero.STAGES:
        model = make_stack(**BIG, seed=0)
        opt = zero.ZeroAdam(model, stage)
        with count_traffic() as traffic:
            F.mse_loss(model(x), y).backward()
            opt.step()
        result[stage] = dict(opt.memory_report(), received=traffic.received)
        del model, opt
    return result


PSI = num_params(make_stack(**BIG))
WORLD_SIZES = (1, 2, 4, 8)
measured = {n: launch.run(measure_every_stage, n)[0] for n in WORLD_SIZES}  # rank 0's numbers

print(f"Ψ = {PSI:,}; bytes per rank in units of Ψ (measured / formula, fp32):")
print("N   " + "".join(f"{STAGE_NAMES[s]:>18}" for s in zero.STAGES))
for n in WORLD_SIZES:
    cells = []
    for stage in zero.STAGES:
        got = sum(measured[n][stage][k] for k in KIND_COLORS)
        want = sum(zero.formula_bytes(stage, PSI, n).values())
        cells.append(f"{got / PSI:7.3f} / {want / PSI:<7.3f}")
    print(f"{n:<4}" + "".join(f"{c:>18}" for c in cells))


# %%
def plot_memory():
    fig = CourseFigure(figsize=(11, 3.9), layout="constrained")
    axes = fig.subplots(1, 4, sharey=True)
    formulas = {0: "16Ψ", 1: "8Ψ + 8Ψ/N", 2: "4Ψ + 12Ψ/N", 3: "16Ψ/N"}
    xs = range(len(WORLD_SIZES))
    for stage, ax in zip(zero.STAGES, axes):
        bottom = [0.0] * len(WORLD_SIZES)
        for kind, color in KIND_COLORS.items():
            heights = [measured[n][stage][kind] / PSI for n in WORLD_SIZES]
            ax.bar(xs, heights, 0.6, bottom=bottom, color=color, label=f"{KIND_LABELS[kind]} (measured)")
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.plot(xs, [sum(zero.formula_bytes(stage, PSI, n).values()) / PSI for n in WORLD_SIZES],
                "k_", markersize=28, markeredgewidth=2.5, label="formula")
        ax.set_xticks(list(xs), [str(n) for n in WORLD_SIZES])
        ax.set_xlabel("N ranks")
        ax.set_title(f"{STAGE_NAMES[stage]}: {formulas[stage]}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("bytes per parameter on each rank\n(model states ÷ Ψ, fp32)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=4, frameon=False, fontsize=9)
    fig.suptitle(f"Memory per rank after step(): bars measured from storages, black bars the formula "
                 f"(Ψ = {PSI:,})", fontsize=11)
    return fig


plot_memory()

# %% [markdown]
# Measured and formula agree to a fraction of a percent (the rest is padding). With N = 8, ZeRO-3
# holds 2 bytes per parameter instead of 16. Notice the limits as N grows: ZeRO-1 never gets below
# the 8Ψ of parameters and gradients, ZeRO-2 never below the 4Ψ of parameters (fp32; 4Ψ and 2Ψ in
# mixed precision); only ZeRO-3 keeps shrinking.
#
# ## Traffic, measured: 2Ψ, 2Ψ, 3Ψ
#
# The bytes each rank received in that one step, in units of Ψ elements (4 bytes each), against
# the formulas. A reduce-scatter or an all-gather moves (N−1)/N of its array per rank, an
# all-reduce (one of each) twice that. So plain DP's all-reduce is 2Ψ·(N−1)/N; ZeRO-1 and ZeRO-2's
# reduce-scatter + all-gather the same 2Ψ·(N−1)/N; ZeRO-3's two all-gathers (forward, backward)
# plus a reduce-scatter 3Ψ·(N−1)/N. These are measured wire bytes (the kernel's TCP counters), gloo's
# message headers included.

# %%
print("N   " + "".join(f"{STAGE_NAMES[s]:>18}" for s in zero.STAGES) + "    (measured / formula, × Ψ·4 B)")
for n in WORLD_SIZES[1:]:
    cells = [f"{measured[n][s]['received'] / (4 * PSI):7.3f} / {zero.formula_traffic(s, PSI, n) / (4 * PSI):<7.3f}"
             for s in zero.STAGES]
    print(f"{n:<4}" + "".join(f"{c:>18}" for c in cells))


# %%
def plot_traffic():
    fig = CourseFigure(figsize=(8, 3.8), layout="constrained")
    ax = fig.subplots()
    ns = WORLD_SIZES[1:]
    width = 0.8 / len(ns)
    for i, n in enumerate(ns):
        xs = [s + (i - (len(ns) - 1) / 2) * width for s in zero.STAGES]
        got = [measured[n][s]["received"] / (4 * PSI) for s in zero.STAGES]
        want = [zero.formula_traffic(s, PSI, n) / (4 * PSI) for s in zero.STAGES]
        ax.bar(xs, got, width * 0.9, color=f"C{i}", label=f"N = {n}, measured")
        ax.plot(xs, want, "k_", markersize=18, markeredgewidth=2.5, label="formula" if i == 0 else None)
    ax.set_xticks(list(zero.STAGES), ["plain DP\n2Ψ·(N−1)/N", "ZeRO-1\n2Ψ·(N−1)/N", "ZeRO-2\n2Ψ·(N−1)/N",
                                      "ZeRO-3\n3Ψ·(N−1)/N"])
    ax.set_ylabel("received per step (× Ψ·4 bytes)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9, loc="upper left")
    ax.set_title(f"Traffic per rank and training step (Ψ = {PSI:,}, fp32, gloo)", fontsize=11)
    return fig


plot_traffic()

# %% [markdown]
# ZeRO-1 and ZeRO-2 cut memory **for free** in communication volume. ZeRO-3 pays 1.5× plain DP's
# traffic — and that traffic sits in the forward and backward pass, so in practice a layer's gather
# is overlapped with the previous layer's compute (prefetching), which this small implementation
# does not do.
#
# A common miscount (it appears in the notes this course grew from): "ZeRO-1 all-reduces the
# gradient, then all-gathers the parameters: 3Ψ". Correct as a description of a naive
# implementation — but no rank needs the *whole* summed gradient, only its shard, so the all-reduce
# can stop halfway, at the reduce-scatter. The measurement above says 2Ψ.
#
# ## ZeRO is data parallelism, not model parallelism
#
# ZeRO-3 stores every layer in pieces on different ranks — that looks like model parallelism
# (模型并行). It is not, and the difference matters:
#
# * **What a rank computes.** In ZeRO every rank runs the **whole model** (every layer, with the
#   **full** weights gathered just in time) on **its own shard of the batch** — exactly what data
#   parallelism does. In model parallelism a rank computes only **part of the model** — some
#   layers (pipeline) or a slice of every layer (tensor parallel) — on the **same** data as its
#   partners.
# * **What moves.** ZeRO moves parameters and gradients; model parallelism moves activations
#   (a pipeline stage's output, a tensor-parallel layer's partial sums).
# * **Consequences.** ZeRO needs a batch large enough for N ranks, and it does not shrink
#   activation memory or the time a layer takes: a layer too wide for one device's compute still
#   needs tensor parallelism. ZeRO splits *storage*; model parallelism splits *computation*.
#   Because they split different things, they combine (chapter 09).
#
# Seen from inside: in ZeRO-3 on 2 ranks, a hook after ZeroAdam's gather prints what the first layer
# computes with on each rank — the full weight, and this rank's own samples:

# %%
def what_each_rank_computes():
    rank, n = dist.get_rank(), dist.get_world_size()
    model = small_model()
    opt = zero.ZeroAdam(model, stage=3)
    layer = model[0].fc1

    def report(module, args):
        print(f"fc1 of layer 0 computes with weight {tuple(module.weight.shape)} (the full matrix) "
              f"on input {tuple(args[0].shape)}: samples {rank * 24 // n}…{(rank + 1) * 24 // n - 1} of 24")

    layer.register_forward_pre_hook(report)  # runs after ZeroAdam's own pre-hook has gathered
    x, y = batches()[0]
    F.mse_loss(model(shard(x, rank, n)), shard(y, rank, n)).backward()
    opt.step()
    shard_sizes = [u.param_shard.numel() for u in opt.units]
    print(f"between steps it stores {sum(shard_sizes)} of the {num_params(model)} parameter values")


launch.run(what_each_rank_computes, 2);

# %% [markdown]
# ## A calculator for real models
#
# How much memory do model states take per GPU for a real model? Pick Ψ (in billions), the number
# of data-parallel ranks N, the ZeRO stage and the precision. The bars are the formulas above
# (model states only: activations and buffers come on top); the dashed line is a device's memory.
# Try a 7B model on 8 GPUs of 80 GB: plain data parallelism needs 112 GB per GPU in mixed
# precision and does not fit; ZeRO-2 needs about 26 GB.

# %%
def memory_calculator(psi_billions=7.0, n=8, stage=2, precision="mixed", device_gb=80.0):
    psi_b = psi_billions * 1e9
    per_rank = {k: v / 1e9 for k, v in zero.formula_bytes(stage, psi_b, n, precision).items()}
    total = sum(per_rank.values())
    totals = [sum(zero.formula_bytes(s, psi_b, n, precision).values()) / 1e9 for s in zero.STAGES]
    fig = CourseFigure(figsize=(11, 4.1), layout="constrained")
    ax_ranks, ax_stages = fig.subplots(1, 2, width_ratios=[3, 2])
    shown = min(n, 16)
    bottom = [0.0] * shown
    optimizer = "Adam: fp32 master + m + v" if precision == "mixed" else "Adam: m + v"
    names = {"params": "parameters", "grads": "gradients", "optimizer": optimizer}
    for kind, color in KIND_COLORS.items():
        ax_ranks.bar(range(shown), [per_rank[kind]] * shown, 0.7, bottom=bottom, color=color,
                     label=f"{names[kind]}: {per_rank[kind]:.1f} GB")
        bottom = [b + per_rank[kind] for b in bottom]
    ax_ranks.set_xticks(range(shown), [str(r) for r in range(shown)])
    ax_ranks.set_xlabel("rank" + (f" (ranks 16…{n - 1} hold the same)" if n > shown else ""))
    ax_ranks.set_ylabel("GB of model states per rank")
    verdict = "" if device_gb <= 0 else (" — fits" if total <= device_gb else " — does NOT fit")
    ax_ranks.set_title(f"{STAGE_NAMES[stage]}, {precision}, Ψ = {psi_billions:g}B, N = {n}: "
                       f"{total:.1f} GB per rank{verdict}", fontsize=10)
    ax_ranks.set_ylim(0, max(total, device_gb) * 1.15)
    bars = ax_stages.bar(range(4), totals, 0.6, color=["0.35" if s == stage else "0.75" for s in zero.STAGES])
    ax_stages.bar_label(bars, [f"{t:.1f}" for t in totals], fontsize=9, padding=2)
    ax_stages.set_xticks(range(4), [STAGE_NAMES[s] for s in zero.STAGES])
    ax_stages.set_title("every stage, same Ψ and N (GB per rank)", fontsize=10)
    ax_stages.set_ylim(0, max(totals + [device_gb]) * 1.15)
    for ax in (ax_ranks, ax_stages):
        if device_gb > 0:
            ax.axhline(device_gb, color="crimson", linestyle="--", linewidth=1.5,
                       label=f"device memory: {device_gb:g} GB")
        ax.grid(axis="y", alpha=0.3)
    fig.legend(*ax_ranks.get_legend_handles_labels(), loc="outside lower center", ncols=4, fontsize=9,
               frameon=False)
    return fig


controls = dict(
    psi_billions=widgets.BoundedFloatText(value=7.0, min=0.001, max=10_000, step=0.5, description="Ψ (billions)"),
    n=widgets.Dropdown(options=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024], value=8, description="N ranks"),
    device_gb=widgets.BoundedFloatText(value=80, min=0, max=10_000, description="device GB"),
    stage=widgets.ToggleButtons(options=[(STAGE_NAMES[s], s) for s in zero.STAGES], value=2, description="stage"),
    precision=widgets.ToggleButtons(options=[("mixed: 2+2+12", "mixed"), ("fp32: 4+4+8", "fp32")],
                                    value="mixed", description="precision"),
)
calculator = widgets.interactive_output(lambda **kw: display(memory_calculator(**kw)), controls)
display(widgets.VBox([widgets.HBox([controls["psi_billions"], controls["n"], controls["device_gb"]]),
                      controls["stage"], controls["precision"], calculator]))

# %% [markdown]
# ## Summary
#
# | | each rank holds, mixed precision | each rank holds, fp32 | traffic per step | when to use |
# |---|---|---|---|---|
# | plain DP | 16Ψ | 16Ψ | 2Ψ | the model states fit on one device |
# | ZeRO-1 | 4Ψ + 12Ψ/N | 8Ψ + 8Ψ/N | 2Ψ | optimizer states are most of the memory: shard them for free |
# | ZeRO-2 | 2Ψ + 14Ψ/N | 4Ψ + 12Ψ/N | 2Ψ | also free in traffic volume; a common default |
# | ZeRO-3 | 16Ψ/N | 16Ψ/N | 3Ψ | even the parameters do not fit; pays 1.5× the traffic |
#
# (Traffic times (N−1)/N, in elements.) Beyond this chapter: ZeRO-Offload moves the optimizer
# states to CPU memory, ZeRO++ compresses the gathers; FSDP2 is PyTorch's ZeRO-3.
#
# Glossary (术语): data parallel 数据并行 · model parallel 模型并行 · tensor parallel 张量并行 · pipeline
# parallel 流水线并行 · optimizer states 优化器状态 · gradients 梯度 · parameters 参数 · shard 分片 ·
# mixed precision 混合精度 · model states 模型状态 · residual states 剩余状态 · Zero Redundancy
# Optimizer 零冗余优化器 · reduce-scatter 规约分发 · all-gather 全收集.
#
# **Next**: the exercises (`exercises/07_zero.ipynb`) build the padded shard, AdamW on a shard, the
# ZeRO-1 step and the ZeRO-2 gradient hook.
