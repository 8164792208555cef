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
# Notation: **N** ranks, **Ψ** parameters, **M** micro-batches accumulated per step. Everything
# below runs on real processes (gloo on the CPU): `course_lib.zero.ZeroAdam` is the
# implementation, one file you can read top to bottom. The primary source is the ZeRO paper:
# Rajbhandari, Rasley, Ruwase and He, "ZeRO: Memory Optimizations Toward Training Trillion
# Parameter Models" (SC 2020).

# %%
import contextlib
import inspect

import torch
import torch.distributed as dist
import torch.nn.functional as F

from course_lib import launch, viz, zero
from course_lib.comm import count_traffic
from course_lib.models import make_stack, num_params, regression_data, shard

# %% [markdown]
# ## Where the memory goes
#
# Training with Adam, each parameter brings along its gradient and Adam's two running averages
# (momentum m and variance v). These **model states** (模型状态) are what the three stages of
# ZeRO-DP shard. The rest of a GPU's memory the paper calls **residual states** (剩余状态):
# activations, temporary buffers, and memory lost to fragmentation. ZeRO-DP's stages 1–3 leave
# those alone; the paper's second half, **ZeRO-R**, goes after them: it partitions the activation
# checkpoints that tensor-parallel ranks would otherwise each hold in full (optionally moving them
# to CPU memory), caps the temporary buffers (such as the fused buffer a gradient all-reduce
# packs into) at a constant size, and defragments memory by copying long-lived tensors
# (activation checkpoints, gradients) into pre-allocated contiguous space. This chapter builds
# ZeRO-DP; for activations see activation checkpointing (chapter 06) and tensor and sequence
# parallelism (chapters 04, 05).
#
# **Mixed-precision training** (how large models are trained on GPUs; how the ZeRO paper counts,
# its Section 3.1), bytes per parameter:
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
held = {
    "params": zero.storage_bytes(model.parameters()),
    "grads": zero.storage_bytes(p.grad for p in model.parameters()),
    "optimizer": zero.storage_bytes(t for state in adamw.state.values() for t in state.values()),
}
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
# in proportion to the fp32 table (`viz.plot_zero_holdings`, drawn from `zero.formula_bytes`).

# %%
STAGE_NAMES = viz.ZERO_STAGE_NAMES
KINDS = ("params", "grads", "optimizer")
viz.plot_zero_holdings(n=4, precision="fp32")

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
        print(
            f"{layer} ({numel} elements) on N={n}: padded to {padded}, shards of {padded // n}, "
            f"{padded - numel} zeros of padding"
        )

# %% [markdown]
# ## The code
#
# `step()` first makes sure this rank has its shard of the mean gradient: plain DP all-reduces all
# layers' gradients in one message; ZeRO-1 waits for the reduce-scatters its hook started during
# the backward (so the transfer overlapped the backward, as DDP's buckets do); ZeRO-2 and ZeRO-3
# finished each layer's during the backward already. Then AdamW on this rank's shard (`adamw_`: the
# element-wise update, the same arithmetic as `torch.optim.AdamW`), and stages 1 and 2 all-gather
# each layer's updated parameters, sent while the next layer is being updated. Stage 3 does not:
# the next forward gathers each layer when it needs it. (The lines about `no_sync` and `unsynced`
# serve gradient accumulation, the last measurement of this chapter.)

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


rs_builtin, rs_ours = launch.run(reduce_scatter_two_ways, 4, 2**18)[0]
print(f"gloo's reduce_scatter:  {rs_builtin:.3f}·K   (an all-reduce's 2(N−1)/N = 1.5)")
print(f"zero.reduce_scatter:    {rs_ours:.3f}·K   (a reduce-scatter's (N−1)/N = 0.75)")
assert abs(rs_builtin - 1.5) < 0.05 and abs(rs_ours - 0.75) < 0.03, "the counter disagrees with the claim"

# %% [markdown]
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

ours, worst_vs_adamw = {}, 0.0
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
        worst[stage] = max(
            (p - expected[k]).abs().max().item() for r in per_rank for k, p in r[stage].items()
        )
    print(f"{n:<4}" + "".join(f"{worst[s]:>12.1e}" for s in zero.STAGES))
    worst_vs_adamw = max(worst_vs_adamw, *worst.values())

# %% [markdown]
# Differences of at most ~10⁻⁷ are float rounding: the ranks add the gradients in a different order than
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
worst_vs_builtin = {}
for what, theirs, stage in (("ZeroRedundancyOptimizer", zro, 1), ("FSDP2 fully_shard", fsdp, 3)):
    mine = ours[N_BUILTIN][0][stage]
    for name in expected:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-5, atol=1e-5)
    diff = max((mine[k] - theirs[k]).abs().max().item() for k in expected)
    worst_vs_builtin[what] = diff
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


def held_per_psi(n, stage):
    return sum(measured[n][stage][k] for k in KINDS) / PSI


def formula_per_psi(n, stage):
    return sum(zero.formula_bytes(stage, PSI, n).values()) / PSI


print(f"Ψ = {PSI:,}; bytes per rank in units of Ψ (measured / formula, fp32):")
print("N   " + "".join(f"{STAGE_NAMES[s]:>18}" for s in zero.STAGES))
for n in WORLD_SIZES:
    print(
        f"{n:<4}"
        + "".join(f"{held_per_psi(n, s):7.3f} / {formula_per_psi(n, s):<7.3f}".rjust(18) for s in zero.STAGES)
    )
    for stage in zero.STAGES:  # padding is the only difference, under 1 %
        assert abs(held_per_psi(n, stage) / formula_per_psi(n, stage) - 1) < 0.01, (n, stage)
assert round(held_per_psi(8, 3), 2) == 2.0  # ZeRO-3 on 8 ranks: 2 bytes per parameter, not 16

# %%
viz.plot_zero_memory(measured, PSI)

# %% [markdown]
# Measured and formula agree to within 1 % (the cell asserts it; the rest would be padding, and
# for this model's layer sizes there is none). With N = 8, ZeRO-3 holds 2 bytes per parameter
# instead of 16. Notice the limits as N grows: ZeRO-1 never gets below the 8Ψ of parameters and
# gradients, ZeRO-2 never below the 4Ψ of parameters (fp32; 4Ψ and 2Ψ in mixed precision); only
# ZeRO-3 keeps shrinking.
#
# ## Traffic, measured: 2Ψ, 2Ψ, 3Ψ
#
# The bytes each rank received in that one step, in units of Ψ elements (4 bytes each), against
# the formulas. A reduce-scatter or an all-gather moves (N−1)/N of its array per rank, an
# all-reduce (one of each) twice that. So plain DP's all-reduce is 2Ψ·(N−1)/N; ZeRO-1 and ZeRO-2's
# reduce-scatter + all-gather the same 2Ψ·(N−1)/N; ZeRO-3's two all-gathers (forward, backward)
# plus a reduce-scatter 3Ψ·(N−1)/N. These are measured wire bytes (the kernel's TCP counters), gloo's
# message headers included. (Where the kernel does not report them, e.g. on macOS, the counter
# returns None and the cell says so.)

# %%
wire = measured[2][0]["received"] is not None
received = {n: {s: measured[n][s]["received"] for s in zero.STAGES} for n in WORLD_SIZES[1:]}
if wire:
    print(
        "N   " + "".join(f"{STAGE_NAMES[s]:>18}" for s in zero.STAGES) + "    (measured / formula, × Ψ·4 B)"
    )
    for n in WORLD_SIZES[1:]:
        got = [received[n][s] / (4 * PSI) for s in zero.STAGES]
        want = [zero.formula_traffic(s, PSI, n) / (4 * PSI) for s in zero.STAGES]
        print(f"{n:<4}" + "".join(f"{g:7.3f} / {w:<7.3f}".rjust(18) for g, w in zip(got, want)))
        for g, w in zip(got, want):  # headers add a little, never less than the formula
            assert 0.99 < g / w < 1.05, (n, g, w)
else:
    print("this system does not report TCP byte counts: no wire measurement")

# %%
viz.plot_zero_traffic(received, PSI) if wire else None

# %% [markdown]
# ZeRO-1 and ZeRO-2 cut memory **for free** in communication volume. ZeRO-3 pays 1.5× plain DP's
# traffic — and that traffic sits in the forward and backward pass, so in practice a layer's gather
# is overlapped with the previous layer's compute (prefetching), which this small implementation
# does not do.
#
# A common miscount: "ZeRO-1 all-reduces the gradient, then all-gathers the parameters: 3Ψ". That
# describes a naive implementation — DeepSpeed's own first ZeRO-1 worked that way, and its release
# of 17 March 2020 ("ZeRO stage 1 with reduced communication") replaced the all-reduce by a
# reduce-scatter, cutting the volume from 1.5× to 1× of data parallelism. PyTorch's
# `ZeroRedundancyOptimizer` used above is also of that kind: you all-reduce the gradients, it
# broadcasts each owner's new parameters. No rank needs the *whole* summed gradient, only its
# shard, so the all-reduce can stop halfway, at the reduce-scatter: the ZeRO paper's Section 7
# counts 2Ψ for stages 1 and 2, and the measurement above says 2Ψ.
#
# ## Gradient accumulation: M micro-batches per step
#
# A large batch is often built from M micro-batches: M forwards and backwards whose gradients add
# up, then one `step()`. Plain data parallelism reduces the sum **once**, after the last backward
# (chapter 02's accumulation; DDP's `no_sync()` skips the others). ZeRO-2's promise is different:
# no rank ever holds the full gradient — so every backward must reduce-scatter its gradient at once
# and add it into the shard, **M reduce-scatters per step**. ZeRO-3 also gathers every layer's
# parameters before its forward and its backward, in every micro-batch. Counted in halves of an
# all-reduce (Ψ·(N−1)/N elements each):
#
# | | M = 1 | M micro-batches, reduced every backward | first M − 1 under `no_sync()` |
# |---|---|---|---|
# | plain DP (`ZeroAdam` stage 0 all-reduces in `step()`) | 2 | 2 | 2 |
# | ZeRO-1 | 2 | M + 1 | 2 |
# | ZeRO-2 | 2 | M + 1 | 2, but the full gradient is held between micro-batches |
# | ZeRO-3 | 3 | 3M | 2M + 1, the same |
#
# ZeRO-1 keeps the full gradient anyway, so accumulating it locally and reduce-scattering once is
# free: DeepSpeed's ZeRO-1 communicates only at the accumulation boundary. `ZeroAdam`, like DDP,
# sends on every backward unless you wrap the first M − 1 in `opt.no_sync()`. For ZeRO-2 and
# ZeRO-3, `no_sync()` trades memory for traffic: the full gradient (4Ψ bytes in fp32) stays on
# every rank between micro-batches — the memory ZeRO-2 exists to save. DeepSpeed's ZeRO-2 takes
# the traffic (it reduce-scatters at every micro-batch), which is also why DeepSpeed refuses
# ZeRO-2 and ZeRO-3 with its pipeline, where many micro-batches per step are the rule (chapter 09).
#
# Measured: one step of M = 4 micro-batches on N = 4 ranks, every stage, with and without
# `no_sync()`; the gradient bytes a rank holds between micro-batches too, and the final parameters
# both ways checked equal.

# %%
M, N_ACC = 4, 4


def accumulate(m=M):
    rank, n = dist.get_rank(), dist.get_world_size()
    x, y = regression_data(4 * n * m, BIG["d_model"])
    x, y = shard(x, rank, n), shard(y, rank, n)
    result = {}
    for stage in zero.STAGES:
        params = []
        for unsharded in (False, True):
            model = make_stack(**BIG, seed=0)
            opt = zero.ZeroAdam(model, stage)
            with count_traffic() as traffic:
                for i in range(m):
                    skip = opt.no_sync() if unsharded and i < m - 1 else contextlib.nullcontext()
                    with skip:
                        (F.mse_loss(model(shard(x, i, m)), shard(y, i, m)) / m).backward()
                    if i == m - 2:
                        grads_between = opt.memory_report()["grads"]
                opt.step()
            result[stage, unsharded] = dict(received=traffic.received, grads=grads_between)
            params.append(opt.full_parameters())
        for name in params[0]:  # with or without no_sync: the same step
            torch.testing.assert_close(params[0][name], params[1][name], rtol=1e-5, atol=1e-6)
    return result


accumulated = launch.run(accumulate, N_ACC)[0]
print(f"M = {M} micro-batches, N = {N_ACC}; received per step in halves of an all-reduce (Ψ·(N−1)/N·4 B),")
print("and gradient bytes held between micro-batches (× 4Ψ):")
print(f"{'':9}{'every backward':>26}{'no_sync for M − 1':>26}")
half = PSI * 4 * (N_ACC - 1) / N_ACC
for stage in zero.STAGES:
    cells = []
    for unsharded in (False, True):
        r = accumulated[stage, unsharded]
        want = zero.formula_traffic(stage, PSI, N_ACC, micro_batches=M, accumulate_unsharded=unsharded) / half
        got = r["received"] / half if wire else float("nan")
        cells.append(f"{got:5.2f} / {want:<4g} grads {r['grads'] / (4 * PSI):.2f}")
        if wire:
            assert 0.99 < got / want < 1.05, (stage, unsharded, got, want)
        # between micro-batches: the shard (ZeRO-2/3, every backward) or the full gradient
        assert abs(r["grads"] / (4 * PSI) - (1 / N_ACC if stage >= 2 and not unsharded else 1)) < 0.01
    print(f"{STAGE_NAMES[stage]:9}" + "".join(c.rjust(26) for c in cells))

# %% [markdown]
# ZeRO-2 reduce-scatters M = 4 times and pays (M + 1)/2 = 2.5× plain DP's volume while holding only
# a quarter of the gradient; with `no_sync()` it pays DP's volume and holds the whole gradient.
# ZeRO-3 pays 3M halves: 6× DP. Either way the final parameters are the same (the cell asserts it).
# Which costs less depends on which is scarcer — memory or bandwidth — and on how well the
# reduce-scatters hide behind the backward.
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
# * **Consequences.** ZeRO needs a batch large enough for N ranks, and ZeRO-DP does not shrink the
#   activations of a sample or the time a layer takes: a layer too wide for one device's compute
#   still needs tensor parallelism. ZeRO-DP splits *storage*; model parallelism splits
#   *computation*. Because they split different things, they combine (chapter 09).
#
# Seen from inside: in ZeRO-3 on 2 ranks, a hook after ZeroAdam's gather records what the first
# layer computes with on each rank — the full weight, and this rank's own samples:


# %%
def what_each_rank_computes():
    rank, n = dist.get_rank(), dist.get_world_size()
    model = small_model()
    opt = zero.ZeroAdam(model, stage=3)
    layer = model[0].fc1
    seen = {}

    def record(module, args):  # runs after ZeroAdam's own pre-hook has gathered
        seen.update(weight=tuple(module.weight.shape), rows=args[0].shape[0])

    layer.register_forward_pre_hook(record)
    x, y = batches()[0]
    F.mse_loss(model(shard(x, rank, n)), shard(y, rank, n)).backward()
    opt.step()
    stored = sum(u.param_shard.numel() for u in opt.units)
    print(
        f"fc1 of layer 0 computes with weight {seen['weight']} on {seen['rows']} samples "
        f"({rank * BATCH // n}…{(rank + 1) * BATCH // n - 1} of {BATCH}); between steps it stores "
        f"{stored} of the {num_params(model)} parameter values"
    )
    return dict(seen, stored=stored, psi=num_params(model))


inside = launch.run(what_each_rank_computes, 2)
for r in inside:
    assert r["weight"] == (10, D_MODEL) and r["rows"] == BATCH // 2  # the full matrix, half the batch
    assert r["stored"] <= r["psi"] // 2 + 2  # half the values (plus padding)

# %% [markdown]
# ## A calculator for real models
#
# How much memory do model states take per GPU for a real model? Pick Ψ (in billions), the number
# of data-parallel ranks N, the ZeRO stage and the precision (`viz.zero_memory_calculator`, drawn
# from `zero.formula_bytes`). The bars are the formulas above (model states only: activations and
# buffers come on top); the dashed line is a device's memory. Try a 7B model on 8 GPUs of 80 GB:
# plain data parallelism needs 112 GB per GPU in mixed precision and does not fit (a 141 GB GPU
# would hold the model states, with little left for activations); ZeRO-2 needs about 26 GB.

# %%
seven_b = {s: sum(zero.formula_bytes(s, 7e9, 8, "mixed").values()) / 1e9 for s in zero.STAGES}
assert seven_b[0] == 112 and round(seven_b[2]) == 26, seven_b
viz.zero_memory_calculator(psi_billions=7.0, n=8, stage=2, precision="mixed", device_gb=80.0)

# %% [markdown]
# ## Summary
#
# | | each rank holds, mixed precision | each rank holds, fp32 | traffic per step | when to use |
# |---|---|---|---|---|
# | plain DP | 16Ψ | 16Ψ | 2Ψ | the model states fit on one device |
# | ZeRO-1 | 4Ψ + 12Ψ/N | 8Ψ + 8Ψ/N | 2Ψ | optimizer states are most of the memory: shard them for free |
# | ZeRO-2 | 2Ψ + 14Ψ/N | 4Ψ + 12Ψ/N | 2Ψ; (M+1)Ψ with M micro-batches | also free in traffic volume at M = 1; a common default |
# | ZeRO-3 | 16Ψ/N | 16Ψ/N | 3Ψ; 3MΨ with M micro-batches | even the parameters do not fit; pays 1.5× the traffic |
#
# (Traffic times (N−1)/N, in elements.) Beyond this chapter: **ZeRO-Offload** (Ren et al., USENIX
# ATC 2021) keeps the fp16 parameters and the forward and backward on the GPU and moves everything
# else to the CPU — the gradients, the fp32 master weights and Adam's moments (14 of the 16 bytes
# per parameter) — and runs the Adam update itself on the CPU, then copies the new fp16 parameters
# back. **ZeRO-R** (above) handles the residual states. **ZeRO++** (Wang et al. 2023) quantises the
# parameter gathers and the gradient reduce-scatter, and keeps a second copy of the parameters
# sharded only within each node, so the backward's gathers stay inside the node. **FSDP2** is PyTorch's ZeRO-3 (its `set_requires_gradient_sync(False)` is the
# `no_sync()` above).
#
# Glossary (术语): data parallel 数据并行 · model parallel 模型并行 · tensor parallel 张量并行 · pipeline
# parallel 流水线并行 · optimizer states 优化器状态 · gradients 梯度 · parameters 参数 · shard 分片 ·
# mixed precision 混合精度 · model states 模型状态 · residual states 剩余状态 · Zero Redundancy
# Optimizer 零冗余优化器 · reduce-scatter 归约散射 · all-gather 全收集 · gradient accumulation 梯度累积 ·
# offload 卸载.
#
# ## What you measured
#
# Each formula of this chapter beside the number your run produced (rank 0's; traffic in halves
# of an all-reduce, Ψ·(N−1)/N elements, where the system reports wire bytes).

# %%
rows = [
    ("gloo reduce_scatter, per K elements", "2(N−1)/N = 1.5", f"{rs_builtin:.3f}"),
    ("zero.reduce_scatter, per K elements", "(N−1)/N = 0.75", f"{rs_ours:.3f}"),
    ("|ZeroAdam − torch AdamW|, N = 1…4", "float rounding", f"{worst_vs_adamw:.1e}"),
    *[
        (f"|ZeroAdam − {what}|, N = {N_BUILTIN}", "float rounding", f"{d:.1e}")
        for what, d in worst_vs_builtin.items()
    ],
]
for stage, name in STAGE_NAMES.items():
    formula = {0: "16Ψ", 1: "8Ψ + 8Ψ/N", 2: "4Ψ + 12Ψ/N", 3: "16Ψ/N"}[stage]
    rows.append(
        (
            f"{name} memory per rank, N = 8 (× Ψ B)",
            f"{formula} = {formula_per_psi(8, stage):.3f}",
            f"{held_per_psi(8, stage):.3f}",
        )
    )
for stage, name in STAGE_NAMES.items():
    want = zero.formula_traffic(stage, PSI, 4) / (PSI * 4 * 3 / 4)
    got = f"{received[4][stage] / (PSI * 4 * 3 / 4):.3f}" if wire else "n/a"
    rows.append(
        (f"{name} traffic, one step, N = 4 (halves)", f"{'3' if stage == 3 else '2'}Ψ → {want:g}", got)
    )
for stage, name in STAGE_NAMES.items():
    for unsharded, how in ((False, "every backward"), (True, "no_sync")):
        want = zero.formula_traffic(stage, PSI, N_ACC, micro_batches=M, accumulate_unsharded=unsharded) / half
        got = f"{accumulated[stage, unsharded]['received'] / half:.3f}" if wire else "n/a"
        rows.append((f"{name}, M = {M}, {how} (halves)", f"{want:g}", got))
print(f"{'quantity':44} {'formula':22} {'measured':>10}")
for what, formula, got in rows:
    print(f"{what:44} {formula:22} {got:>10}")

# %% [markdown]
# **Next**: the exercises (`my_exercises/07_zero.ipynb`) build the padded shard, AdamW on a shard, the
# ZeRO-1 step and the ZeRO-2 gradient hook.
