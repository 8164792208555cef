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
# # 07b · FSDP: per-unit sharding, prefetch, mixed precision
#
# Chapter 07 built ZeRO-3: every layer's parameters sharded over N ranks, gathered around its
# forward and backward. **FSDP** (*Fully Sharded Data Parallel*, 全分片数据并行) is that idea as
# PyTorch runs it at scale (Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded Data
# Parallel", VLDB 2023, arXiv 2304.11277), with three additions this chapter builds and measures:
#
# 1. **Units you choose.** You say which submodules form a *unit* (a block, a layer); each unit's
#    parameters are one flat, padded buffer sharded 1/N per rank. After wrapping,
#    `model.parameters()` yields this rank's **fp32 shards**, so `torch.optim.AdamW` works unchanged.
# 2. **Prefetch** (预取). While unit i computes, the all-gather of the next unit is already in flight
#    (forward: i+1; backward: i−1, in the reverse of the order the forward ran).
# 3. **Mixed precision** (混合精度) with **fp32 master weights** (主权重): the shards stay fp32 and
#    the optimizer updates them; the gather sends a bf16 copy, the unit computes in bf16, and the
#    gradient is cast back to fp32 before it is reduce-scattered.
#
# `course_lib.fsdp.fully_shard` is the implementation (one file); the lesson checks it against
# one process and against PyTorch's own FSDP2 (`torch.distributed.fsdp.fully_shard`), and
# measures memory, time and traffic beside their formulas. Notation: **N** ranks, **Ψ** parameters.

# %%
import contextlib
import inspect
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from course_lib import fsdp, launch, viz_fsdp, zero
from course_lib.models import make_mlp, make_stack, num_params, regression_data, shard
from course_lib.traffic import count_traffic

# %% [markdown]
# ## Units, flat buffers and padding
#
# A unit's parameters are laid end to end in one flat buffer, zero-padded to a multiple of N
# (`zero.padded_size`, chapter 07), and rank r keeps elements [r·S, (r+1)·S), S = padded/N.
# One gather per unit instead of one per parameter tensor: fewer, larger messages. (This is
# FSDP1's *flat parameter*; FSDP2 instead shards each parameter tensor along its first dimension
# and gathers a unit's tensors together — the same bytes on the wire, a different bookkeeping.)
#
# The model of this section has units of **unequal** size, none a multiple of 4:


# %%
def uneven():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.GELU(), make_mlp(7, 9, 1), nn.Linear(7, 3))


def units_on_ranks():
    model = fsdp.fully_shard(uneven())  # units: the children that hold parameters
    return fsdp.units_of(model), [name for name, _ in model.named_parameters()]


for n in (3, 4):
    units, names = launch.run(units_on_ranks, n)[0]
    print(f"N={n}: model.parameters() after wrapping: {names}")
    for u in units:
        print(f"  unit {u['name']!r}: {u['numel']} elements -> padded {u['padded']}, shard {u['shard']}")
        assert u["padded"] == zero.padded_size(u["numel"], n) and u["shard"] * n == u["padded"]

# %% [markdown]
# ## The code: four hooks
#
# Before a unit's forward: gather it (or wait for the prefetch already in flight), then start the
# next unit's gather without waiting. After its forward: free it (`reshard_after_forward`), and ask
# to be told when the gradient reaches the unit's output — the moment just before its backward.
# Freeing resizes the buffer's storage to 0 bytes; the tensors autograd saved are views of the same
# storage and see the data again when the backward gathers it back (chapter 07's trick).

# %%
print(inspect.getsource(fsdp._State.pre_forward))
print(inspect.getsource(fsdp._State.post_forward))

# %% [markdown]
# Before the backward of a unit: gather it, prefetch the unit that ran before it in the forward.
# When every parameter of the unit has its gradient (a `register_post_accumulate_grad_hook` per
# parameter counts them down), the gradient is flattened **in `reduce_dtype`**, reduce-scattered
# without waiting (an all-to-all, as `zero.reduce_scatter`: gloo's own reduce-scatter is an
# all-reduce underneath, chapter 07), and the unit is freed. At most one reduce-scatter is in
# flight: its send and receive buffers are each as large as the unit.

# %%
print(inspect.getsource(fsdp._State.pre_backward))
print(inspect.getsource(fsdp._State.unit_backward_done))
print(inspect.getsource(fsdp._State.finish_reduce))

# %% [markdown]
# ## Same numbers as one process, and as FSDP2
#
# Three steps of AdamW on N = 1 … 4 ranks (each on its shard of the batch) must end where one
# process on the whole batch ends, for every setting of `prefetch` and `reshard_after_forward`.
# The fp32 master weights are read back with `fsdp.full_state_dict`, by their original names.

# %%
HYPER = dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.1)


def batches():
    x, y = regression_data(72, 5)
    return list(zip(x.split(24), y[:, :3].split(24)))


def train(make=uneven, group=None, **options):
    rank, n = dist.get_rank(), dist.get_world_size()
    model = fsdp.fully_shard(make(), group, **options)
    opt = torch.optim.AdamW(model.parameters(), **HYPER)
    for x, y in batches():
        F.mse_loss(model(shard(x, rank, n)).float(), shard(y, rank, n)).backward()
        opt.step()
        opt.zero_grad()
    return fsdp.full_state_dict(model)


def every_setting():
    return {
        (pf, rs): train(prefetch=pf, reshard_after_forward=rs) for pf in (True, False) for rs in (True, False)
    }


reference = uneven()
adamw = torch.optim.AdamW(reference.parameters(), **HYPER)
for x, y in batches():
    F.mse_loss(reference(x), y).backward()
    adamw.step()
    adamw.zero_grad()
expected = {name: p.detach() for name, p in reference.named_parameters()}


def largest_difference(got, want):
    return max((got[k] - want[k]).abs().max().item() for k in want)


worst_vs_adamw = 0.0
for n in (1, 2, 3, 4):
    for settings in launch.run(every_setting, n):
        for params in settings.values():
            assert list(params) == list(expected)
            worst_vs_adamw = max(worst_vs_adamw, largest_difference(params, expected))
print(
    f"largest |FSDP − one process with torch.optim.AdamW| over N = 1…4 and 4 settings: {worst_vs_adamw:.1e}"
)
assert worst_vs_adamw < 1e-5

# %% [markdown]
# Now against PyTorch's FSDP2 on the same ranks (gloo on the CPU; a `fully_shard` per unit and one
# on the root), in fp32 and in bf16 mixed precision (`MixedPrecisionPolicy(param_dtype=bf16,
# reduce_dtype=fp32)`: both run on CPU/gloo in torch 2.13). N = 3 pads every unit. These ranks
# import more of torch, so this cell takes a few seconds longer.


# %%
def with_fsdp2():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    rank, n = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (n,))
    result = {}
    for bf16 in (False, True):
        model = uneven()
        policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        opt = torch.optim.AdamW(model.parameters(), **HYPER)
        for x, y in batches():
            F.mse_loss(model(shard(x, rank, n)).float(), shard(y, rank, n)).backward()
            opt.step()
            opt.zero_grad()
        theirs = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
        ours = train(mixed_precision=fsdp.MixedPrecision() if bf16 else None)
        result["bf16" if bf16 else "fp32"] = largest_difference(ours, theirs)
    return result


vs_fsdp2 = launch.run(with_fsdp2, 3)[0]
for precision, diff in vs_fsdp2.items():
    print(f"{precision}: largest |fsdp.fully_shard − torch FSDP2 fully_shard| on N=3: {diff:.1e}")
    assert diff < 1e-5

# %% [markdown]
# Equal in both precisions to fp32 rounding (often bit for bit): both cast the fp32 shard to bf16,
# gather, compute, cast the bf16 gradient to fp32 and average it over ranks.
#
# ## Memory over one step, sampled at every hook
#
# `fsdp.track_memory(model, opt)` records at every hook the bytes this rank holds: the sharded
# fp32 parameters, gradients and Adam states (16Ψ/N together: chapter 07's ZeRO-3 row), the
# gathered units, the unsharded gradients (including the buffers of a reduce-scatter in flight),
# and the activations autograd saved for the backward (counted through `saved_tensors_hooks`).
# A model of 4 equal units on N = 4 ranks, second step (Adam's states exist), with and without
# prefetch, and with `reshard_after_forward=False`. The claims: at most **one** unit gathered at
# a time without prefetch, **two** with it, all of them when the forward does not reshard.

# %%
MEDIUM = dict(depth=4, d_model=64, d_hidden=256, seed=0)
PSI = num_params(make_stack(**MEDIUM))
UNIT = PSI // MEDIUM["depth"]
SETTINGS = {
    "no prefetch": dict(prefetch=False),
    "prefetch": dict(prefetch=True),
    "prefetch, reshard_after_forward=False": dict(reshard_after_forward=False),
}


def one_step(**options):
    rank, n = dist.get_rank(), dist.get_world_size()
    x, y = regression_data(16 * n, MEDIUM["d_model"])
    x, y = shard(x, rank, n), shard(y, rank, n)
    model = fsdp.fully_shard(make_stack(**MEDIUM), **options)
    opt = torch.optim.AdamW(model.parameters())
    F.mse_loss(model(x).float(), y).backward()
    opt.step()
    opt.zero_grad()
    with fsdp.track_memory(model, opt) as tracker, count_traffic() as traffic:
        F.mse_loss(model(x).float(), y).backward()
        opt.step()
    return tracker.samples, traffic.received


def measure_settings(settings):
    return {name: one_step(**options) for name, options in settings.items()}


N_MEM = 4
memory = launch.run(measure_settings, N_MEM, SETTINGS)[0]
print(f"Ψ = {PSI:,} in {MEDIUM['depth']} units of {UNIT:,}; N = {N_MEM}; rank 0, bytes / (4 B × one unit):")
peak_units = {}
for name, (samples, _) in memory.items():
    peak_units[name] = max(s["gathered params"] for _, s in samples) / (4 * UNIT)
    states = samples[-1][1]
    sharded = states["sharded params"] + states["sharded grads"] + states["optimizer"]
    print(
        f"  {name:40} gathered at once, at most: {peak_units[name]:.0f} units;  sharded states "
        f"{sharded / PSI:.3f}·Ψ B (16Ψ/N = {16 / N_MEM:.3f}·Ψ)"
    )
    assert abs(sharded / (16 * PSI / N_MEM) - 1) < 0.001  # plus Adam's step counters
assert peak_units == {"no prefetch": 1, "prefetch": 2, "prefetch, reshard_after_forward=False": 4}

# %%
viz_fsdp.plot_memory_timeline({name: samples for name, (samples, _) in memory.items()})

# %% [markdown]
# Read the plot left to right. In the forward the activations (brown) grow unit by unit while the
# gathered parameters (orange) come and go: one unit's worth without prefetch, two with it (the
# running unit and the next). The backward gathers again, from the last unit to the first; after
# each unit's backward its activations are gone and its gradient is in flight (red: the
# reduce-scatter's send and receive buffers, one unit each) until it lands, 1/N of it, in the
# sharded gradients (green). Without resharding, all four units stay gathered from the forward to
# their backward: N times the memory of one unit, in exchange for one gather fewer.
#
# Per rank, the peak is the sharded states plus what is gathered and in flight plus activations:

# %%
for name, (samples, _) in memory.items():
    peak = max(sum(s.values()) for _, s in samples)
    print(f"  {name:40} peak {peak / 2**20:6.2f} MiB  = {peak / PSI:5.2f} B per parameter")
peaks = {name: max(sum(s.values()) for _, s in samples) for name, (samples, _) in memory.items()}
assert peaks["no prefetch"] < peaks["prefetch"] < peaks["prefetch, reshard_after_forward=False"]

# %% [markdown]
# ## Traffic per step: 3Ψ·(N−1)/N, or 2Ψ without resharding
#
# Every unit is gathered twice (forward, backward) and its gradient reduce-scattered once; each
# moves Ψ·(N−1)/N elements per rank: **3Ψ·(N−1)/N** per step (chapter 07's ZeRO-3 figure,
# `zero.formula_traffic(3, …)`). `reshard_after_forward=False` keeps the units from the forward
# to the backward: **2Ψ·(N−1)/N**. Measured in the same step (wire bytes received by rank 0):

# %%
wire = memory["prefetch"][1] is not None
traffic_rows = {}
for name, options in SETTINGS.items():
    reshard = options.get("reshard_after_forward", True)
    want = fsdp.formula_traffic(PSI, N_MEM, reshard_after_forward=reshard)
    if reshard:
        assert want == zero.formula_traffic(3, PSI, N_MEM)
    got = memory[name][1]
    traffic_rows[name] = (got, want)
    shown = f"{got / want:.3f}" if wire else "n/a (no wire counters here)"
    print(f"  {name:40} {want / (4 * PSI):.3f}·Ψ·4 B by the formula; measured / formula = {shown}")
    if wire:
        assert 1 <= got / want < 1.03  # gloo's message headers add a little

# %% [markdown]
# ## One step on a time axis: what prefetch overlaps
#
# `fsdp.record_timeline(model)` records when every all-gather and reduce-scatter starts and ends
# (gloo runs them on its own threads; the end is when the work completes) and when every unit
# computes. Two ranks, a model large enough that gathers take time, a few steps each way, the
# picture of the last one:

# %%
TIMED = dict(depth=4, d_model=256, d_hidden=1024, seed=0)


def timed_steps(prefetch, steps=4):
    rank, n = dist.get_rank(), dist.get_world_size()
    x, y = regression_data(64 * n, TIMED["d_model"])
    x, y = shard(x, rank, n), shard(y, rank, n)
    model = fsdp.fully_shard(make_stack(**TIMED), prefetch=prefetch)
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        with fsdp.record_timeline(model) as timeline:
            F.mse_loss(model(x), y).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), timeline.events


def both_ways():
    return {prefetch: timed_steps(prefetch) for prefetch in (False, True)}


timed = launch.run(both_ways, 2)
step = {pf: max(r[pf][0] for r in timed) for pf in (False, True)}  # a step lasts as long as its slowest rank
viz_fsdp.plot_step_timelines(
    {
        f"prefetch={pf}: {step[pf] * 1e3:.1f} ms per forward + backward": [r[pf][1] for r in timed]
        for pf in (False, True)
    }
)

# %%
saved = step[False] - step[True]
print(
    f"forward + backward, median of 3 steps: {step[False] * 1e3:.1f} ms without prefetch, "
    f"{step[True] * 1e3:.1f} ms with: {saved * 1e3:+.1f} ms saved ({saved / step[False]:+.0%})"
)


def overlapped(events):
    """Units whose forward gather began before the previous unit's compute ended."""
    forward = [e for e in events if e.phase == "forward"]
    gathers = {e.unit: e for e in forward if e.kind == "all-gather"}
    computes = [e for e in forward if e.kind == "compute"]
    return [b.unit for a, b in zip(computes, computes[1:]) if gathers[b.unit].start < a.end]


for pf in (False, True):
    print(
        f"prefetch={pf}: forward gathers in flight while the previous unit computed: {overlapped(timed[0][pf][1])}"
    )
assert overlapped(timed[0][True][1]) == ["1", "2", "3"] and overlapped(timed[0][False][1]) == []

# %% [markdown]
# With prefetch each gather starts while the unit before it computes (the cell asserts it for the
# forward). How much time that saves depends on how much of a gather's time the compute can hide:
# on a laptop's CPU the ranks' compute and gloo's copies share the same few cores, so the saving
# is small and varies from run to run (the number above is yours); on GPUs, where NCCL moves the
# bytes while the SMs compute, this overlap is what makes FSDP nearly as fast as plain data
# parallelism. Prefetch costs one more gathered unit of memory (the plot above).
#
# ## Mixed precision: bf16 compute, fp32 master weights
#
# The ZeRO paper counts mixed-precision Adam as 2 (fp16/bf16 parameters) + 2 (their gradients) +
# 12 (fp32 master copy, m, v) = 16 bytes per parameter, and chapter 07's table shards them:
# 16Ψ → 4Ψ + 12Ψ/N → 2Ψ + 14Ψ/N → 16Ψ/N. Here that table with real tensors: a bf16 copy of the
# model runs a backward (real bf16 parameters and gradients), an fp32 master copy takes a real
# `AdamW` step (its m and v), and each stage keeps whole or 1/N of each, counted by storage:


# %%
def zero_table_with_real_tensors(n):
    master = make_stack(**MEDIUM)
    low = make_stack(**MEDIUM).to(torch.bfloat16)
    x, y = regression_data(32, MEDIUM["d_model"])
    F.mse_loss(low(x.bfloat16()).float(), y).backward()
    for p, q in zip(master.parameters(), low.parameters()):
        p.grad = q.grad.float()
    opt = torch.optim.AdamW(master.parameters())
    opt.step()
    kinds = {
        "params": [p.detach().reshape(-1) for p in low.parameters()],
        "grads": [p.grad.reshape(-1) for p in low.parameters()],
        "optimizer": [p.detach().reshape(-1) for p in master.parameters()]
        + [t.reshape(-1) for s in opt.state.values() for k, t in s.items() if k != "step"],
    }
    sharded_from = {"params": 3, "grads": 2, "optimizer": 1}
    table = {}
    for stage in zero.STAGES:
        held = 0
        for kind, tensors in kinds.items():
            flat = torch.cat(tensors)
            if stage >= sharded_from[kind]:
                flat = flat[: zero.padded_size(flat.numel(), n) // n].clone()  # one rank's shard
            held += zero.storage_bytes([flat])
        table[stage] = held
    return table


print(f"Ψ = {PSI:,}; bytes per rank / Ψ, measured (formula), mixed precision:")
print("N   " + "".join(f"{viz_name:>22}" for viz_name in ("DP", "ZeRO-1", "ZeRO-2", "ZeRO-3")))
mixed_table = {}
for n in (1, 2, 4, 8):
    mixed_table[n] = zero_table_with_real_tensors(n)
    cells = []
    for stage in zero.STAGES:
        formula = sum(zero.formula_bytes(stage, PSI, n, "mixed").values()) / PSI
        got = mixed_table[n][stage] / PSI
        cells.append(f"{got:7.3f} ({formula:.3f})")
        assert abs(got - formula) < 1e-3 * formula, (n, stage, got, formula)
    print(f"{n:<4}" + "".join(c.rjust(22) for c in cells))

# %% [markdown]
# Byte for byte the table (the shards here divide evenly). FSDP's mixed precision keeps a
# slightly different 16 bytes: it holds **no** persistent bf16 copy (the bf16 parameters exist
# only while a unit is gathered, cast from the fp32 shard at each gather) and keeps the sharded
# gradient in fp32 (it was reduced in fp32): 4 + 4 + 8 = 16Ψ/N between steps, plus bf16 units
# and bf16 gradients while they are in use. Measured with `fully_shard(..., mixed_precision=...)`:


# %%
def mixed_step():
    return {
        "fp32": one_step(prefetch=True),
        "bf16": one_step(prefetch=True, mixed_precision=fsdp.MixedPrecision()),
    }


mixed = launch.run(mixed_step, N_MEM)[0]
for name, (samples, received) in mixed.items():
    states = samples[-1][1]
    gathered = max(s["gathered params"] for _, s in samples)
    width = 2 if name == "bf16" else 4
    sharded = states["sharded params"] + states["sharded grads"] + states["optimizer"]
    want = fsdp.formula_traffic(PSI, N_MEM, gather_bytes=width)
    shown = f"{received / want:.3f}" if wire else "n/a"
    print(
        f"  {name}: sharded states {sharded / PSI:.3f}·Ψ B; two gathered units {gathered / UNIT:.0f} B per "
        f"element; traffic (2·{width} + 4)·Ψ·(N−1)/N, measured / formula {shown}"
    )
    assert gathered == 2 * width * UNIT and abs(sharded / (16 * PSI / N_MEM) - 1) < 0.001
    if wire:
        assert 1 <= received / want < 1.03

# %% [markdown]
# The gathers move half the bytes in bf16 (2 per element instead of 4); the reduce-scatter still
# moves 4, because it reduces in fp32: traffic (2·2 + 4)Ψ·(N−1)/N = 8Ψ·(N−1)/N bytes instead of 12.
#
# ### Why the master weights stay fp32, and where the sums happen
#
# bf16 keeps fp32's 8 exponent bits but only 8 bits of significand (7 stored): numbers near 4 are
# 2⁻⁵ = 0.03125 apart. Add 0.01 to a running sum again and again: in bf16 the sum stops growing
# once 0.01 is less than half that spacing, and the exact answer is far away. An optimizer step is
# such an addition: a small update to a large weight. Right: one model trained three ways,
# single process — fp32 throughout; bf16 compute with fp32 master weights (what FSDP does); and
# bf16 weights updated in bf16.

# %%
terms = torch.full((2000,), 0.01)
running = {
    "fp32": torch.cumsum(terms, 0),
    "bf16": torch.tensor([0.0] * 2000),
}
acc = torch.tensor(0.0, dtype=torch.bfloat16)
for i, t in enumerate(terms):
    acc = acc + t.bfloat16()
    running["bf16"][i] = acc.float()
print(f"2000 × 0.01: fp32 {running['fp32'][-1]:.3f}, bf16 {running['bf16'][-1]:.3f}")
assert abs(running["fp32"][-1] - 20) < 1e-3 and running["bf16"][-1] < 5


def train_precision(kind, steps=300, lr=1e-4):
    """One model trained with Adam: fp32 throughout, bf16 compute with an fp32 master, or bf16 weights."""
    torch.manual_seed(0)
    master = make_stack(depth=2, d_model=32, d_hidden=64)
    x, y = regression_data(256, 32)
    work = make_stack(depth=2, d_model=32, d_hidden=64).to(torch.bfloat16) if kind != "fp32" else master
    opt = torch.optim.Adam(master.parameters() if kind != "bf16 weights" else work.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        if kind == "bf16 compute, fp32 master":  # what FSDP does: cast the master for each step
            work.load_state_dict({k: v.bfloat16() for k, v in master.state_dict().items()})
        loss = F.mse_loss(work(x if kind == "fp32" else x.bfloat16()).float(), y)
        work.zero_grad()
        loss.backward()
        if kind == "bf16 compute, fp32 master":
            for p, q in zip(master.parameters(), work.parameters()):
                p.grad = q.grad.float()
        opt.step()
        losses.append(loss.item())
    return losses


losses = {kind: train_precision(kind) for kind in ("fp32", "bf16 compute, fp32 master", "bf16 weights")}
for kind, curve in losses.items():
    print(f"  {kind:28} loss {curve[0]:.4f} -> {curve[-1]:.4f}")
assert losses["bf16 weights"][-1] > 1.2 * losses["bf16 compute, fp32 master"][-1]
assert abs(losses["bf16 compute, fp32 master"][-1] / losses["fp32"][-1] - 1) < 0.02
viz_fsdp.plot_precision({"fp32 running sum": running["fp32"], "bf16 running sum": running["bf16"]}, losses)

# %% [markdown]
# Adam's update is at most about lr = 10⁻⁴ per element, less than half the spacing of bf16 numbers
# from 2⁻⁵ ≈ 0.031 up (2⁻¹² ≈ 0.00024 between 0.031 and 0.0625, wider above): such an update to a
# weight kept in bf16 rounds back to the old weight, and that run learns far less (the cell asserts its loss ends at least 20 % higher). With
# the fp32 master the bf16 compute costs almost nothing (the cell asserts within 2 % of fp32): the
# bf16 copy only has to be good enough for one forward and backward.
#
# The same reasoning places the other fp32 parts of mixed precision. A **sum across separate
# operations** (over ranks, over micro-batches, over optimizer steps) rounds after every term, as
# the running sum above did: so FSDP reduces gradients in `reduce_dtype` = fp32, and `fsdp.no_sync`
# accumulates in fp32 too. Inside one kernel, PyTorch's CPU reductions on bf16 tensors already
# accumulate in fp32 (4096 ones summed as bf16 give exactly 4096, below), so what bf16 loses there
# is the precision of the inputs and of the stored result. That matters most for **LayerNorm**
# (it subtracts a row's mean and divides by its spread) and **softmax** (exponentials, whose
# relative differences bf16 rounds away): PyTorch's CUDA autocast runs `layer_norm`, `softmax` and
# `log_softmax` in fp32 for this reason, and a hand-written bf16 model should cast up around them.
# Measured: a row of 100 + N(0, 1), normalised from its fp32 values and from its bf16 values (which
# sit on a grid 0.5 apart near 100):

# %%
ones = torch.ones(4096, dtype=torch.bfloat16)
row = 100 + torch.randn(1, 4096, generator=torch.Generator().manual_seed(0))
layer_norm_error = (
    (F.layer_norm(row.bfloat16().float(), (4096,)) - F.layer_norm(row, (4096,))).abs().max().item()
)
print(
    f"4096 ones summed as bf16: {ones.sum().item():g};  LayerNorm of the row from bf16 values: "
    f"off by up to {layer_norm_error:.2f} (in units of the row's standard deviation)"
)
assert ones.sum().item() == 4096 and layer_norm_error > 0.1

# %% [markdown]
# ## Gradient accumulation: reduce every micro-batch, or once
#
# With M micro-batches per step, FSDP reduce-scatters every backward by default: 3M halves of
# Ψ·(N−1)/N in fp32 (two gathers and one reduce-scatter per micro-batch), and a rank never holds
# more than a unit of unsharded gradient. Inside `fsdp.no_sync(model)` a backward adds each unit's
# gradient to an **unsharded fp32 buffer** instead (FSDP2's `set_requires_gradient_sync(False)`),
# and the first backward outside reduces the sum once: 2M + 1 halves, but 4Ψ bytes of unsharded
# gradients held between micro-batches. Measured with M = 4 on N = 2, final parameters compared:

# %%
M, N_ACC = 4, 2


def accumulate():
    rank, n = dist.get_rank(), dist.get_world_size()
    x, y = regression_data(4 * n * M, MEDIUM["d_model"])
    x, y = shard(x, rank, n), shard(y, rank, n)
    result = {}
    for unsharded in (False, True):
        model = fsdp.fully_shard(make_stack(**MEDIUM))
        with fsdp.track_memory(model) as tracker, count_traffic() as traffic:
            for i in range(M):
                with fsdp.no_sync(model) if unsharded and i < M - 1 else contextlib.nullcontext():
                    (F.mse_loss(model(shard(x, i, M)), shard(y, i, M)) / M).backward()
        done = [s for label, s in tracker.samples if label == "backward done"]
        held = done[0]["unsharded grads"] + done[0]["sharded grads"]  # after the first micro-batch
        result[unsharded] = dict(
            received=traffic.received, held=held, grad=[u.shard.grad.clone() for u in model._fsdp_state.units]
        )
    for a, b in zip(result[False]["grad"], result[True]["grad"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    return result


accumulated = launch.run(accumulate, N_ACC)[0]
half = PSI * 4 * (N_ACC - 1) / N_ACC
for unsharded, how in ((False, "reduce every backward"), (True, "no_sync for M − 1")):
    r = accumulated[unsharded]
    want = fsdp.formula_traffic(PSI, N_ACC, micro_batches=M, accumulate_unsharded=unsharded)
    shown = f"{r['received'] / half:.3f}" if wire else "n/a"
    print(
        f"  {how:24} traffic {shown} halves (formula {want / half:g}); gradient bytes held between "
        f"micro-batches {r['held'] / (4 * PSI):.2f} × 4Ψ"
    )
    if wire:
        assert 1 <= r["received"] / want < 1.03
    assert r["held"] == 4 * PSI // (1 if unsharded else N_ACC)

# %% [markdown]
# 12 halves against 9, for 2Ψ bytes more held between micro-batches on 2 ranks (the full fp32
# gradient instead of its half); the summed gradient shards agree either way (the cell compares
# them). Which to pick depends on which is scarcer, exactly as for ZeRO-2 in chapter 07.
#
# ## HSDP: shard within a group, replicate across groups
#
# Sharding over all N ranks makes every gather cross the slowest links of a cluster. **HSDP**
# (hybrid sharding) shards each copy of the model over a group of S ranks (a node, say) and keeps
# R = N/S copies: gathers and reduce-scatters stay inside a group, and only the gradient shard,
# Ψ/S elements, is all-reduced across the R copies. Per rank per step:
# 3Ψ·(S−1)/S + 2·(Ψ/S)·(R−1)/R elements. `fsdp.hsdp_groups(S)` builds the two groups;
# `fully_shard(model, (shard_group, replicate_group))` uses them. N = 4, S = R = 2:


# %%
def hsdp():
    shard_group, replicate_group = fsdp.hsdp_groups(2)
    rank, n = dist.get_rank(), dist.get_world_size()
    x, y = regression_data(4 * n, MEDIUM["d_model"])
    model = fsdp.fully_shard(make_stack(**MEDIUM), (shard_group, replicate_group))
    with count_traffic() as traffic:
        F.mse_loss(model(shard(x, rank, n)), shard(y, rank, n)).backward()
    return train(group=(shard_group, replicate_group)), traffic.received


hsdp_runs = launch.run(hsdp, 4)
hsdp_diff = max(largest_difference(params, expected) for params, _ in hsdp_runs)
want_hsdp = fsdp.formula_traffic(PSI, 2, replicas=2)
want_flat = fsdp.formula_traffic(PSI, 4)
print(f"HSDP 2 × 2: largest |difference| from one process {hsdp_diff:.1e}")
assert hsdp_diff < 1e-5
for rank, (_, received) in enumerate(hsdp_runs):
    shown = (
        f"{received / (4 * PSI):.3f}·Ψ·4 B, measured / formula {received / want_hsdp:.3f}" if wire else "n/a"
    )
    print(f"  rank {rank}: {shown}")
    if wire:
        assert 1 <= received / want_hsdp < 1.05
print(
    f"formula: HSDP {want_hsdp / (4 * PSI):.3f}·Ψ·4 B per rank; FSDP over all 4 ranks {want_flat / (4 * PSI):.3f}·Ψ·4 B"
)
assert want_hsdp == 2.0 * 4 * PSI and want_flat == 2.25 * 4 * PSI

# %% [markdown]
# By the formulas HSDP moves 2.0Ψ per rank here against 2.25Ψ for FSDP over all four ranks, and
# three quarters of it (1.5Ψ) stays inside the shard group; in exchange each rank holds 16Ψ/S
# instead of 16Ψ/N of states.
#
# ## Summary
#
# | | each rank holds between steps | traffic per step (elements) |
# |---|---|---|
# | FSDP, `reshard_after_forward=True` | 16Ψ/N (+ 1 unit gathered, 2 with prefetch) | 3Ψ·(N−1)/N |
# | FSDP, `reshard_after_forward=False` | 16Ψ/N (+ every unit during the step) | 2Ψ·(N−1)/N |
# | mixed precision (bf16 gathers, fp32 reduce) | 16Ψ/N | (2·2 + 4)Ψ·(N−1)/N bytes |
# | M micro-batches, `no_sync` for M − 1 | + 4Ψ of unsharded fp32 gradient | (2M + 1)Ψ·(N−1)/N |
# | HSDP, S ranks per shard group, R groups | 16Ψ/S | 3Ψ·(S−1)/S + 2(Ψ/S)·(R−1)/R |
#
# Glossary (术语): FSDP 全分片数据并行 · unit 单元 · mixed precision 混合精度 · master weights
# 主权重 · prefetch 预取 · reshard 重新分片 · gradient accumulation 梯度累积 · HSDP 混合分片数据并行.
#
# ## What you measured

# %%
rows = [
    ("|FSDP − AdamW|, N = 1…4, 4 settings", "float rounding", f"{worst_vs_adamw:.1e}"),
    *[(f"|FSDP − torch FSDP2|, {p}, N = 3", "float rounding", f"{d:.1e}") for p, d in vs_fsdp2.items()],
    *[
        (
            f"units gathered at once, {name}",
            {"no prefetch": "1", "prefetch": "2"}.get(name, "all (4)"),
            f"{u:.0f}",
        )
        for name, u in peak_units.items()
    ],
    (
        "sharded states per rank, N = 4",
        f"16Ψ/N = {16 / N_MEM:.3f}·Ψ",
        f"{sum(memory['prefetch'][0][-1][1][k] for k in ('sharded params', 'sharded grads', 'optimizer')) / PSI:.3f}·Ψ",
    ),
]
for name, (got, want) in traffic_rows.items():
    rows.append(
        (
            f"traffic / formula, {name}",
            f"{want / (4 * PSI):.3f}·Ψ·4 B",
            f"{got / want:.3f}" if wire else "n/a",
        )
    )
for stage, label in zip(zero.STAGES, ("16Ψ", "4Ψ + 12Ψ/N", "2Ψ + 14Ψ/N", "16Ψ/N")):
    rows.append(
        (f"mixed-precision ZeRO-{stage} table, N = 8 (× Ψ B)", label, f"{mixed_table[8][stage] / PSI:.3f}")
    )
rows += [
    ("forward overlap with prefetch (units)", "1, 2, 3", ", ".join(overlapped(timed[0][True][1]))),
    ("step time saved by prefetch", "≥ 0 when compute hides gathers", f"{saved * 1e3:+.1f} ms"),
    ("2000 × 0.01 summed in bf16", "20 in fp32", f"{running['bf16'][-1]:.3f}"),
    *[
        (
            f"accumulation M = {M}, {'no_sync' if u else 'every backward'} (halves)",
            f"{fsdp.formula_traffic(PSI, N_ACC, micro_batches=M, accumulate_unsharded=u) / half:g}",
            f"{accumulated[u]['received'] / half:.3f}" if wire else "n/a",
        )
        for u in (False, True)
    ],
    ("HSDP 2 × 2 vs one process", "float rounding", f"{hsdp_diff:.1e}"),
    (
        "HSDP traffic per rank / formula (rank 0)",
        f"{want_hsdp / (4 * PSI):.3f}·Ψ·4 B",
        f"{hsdp_runs[0][1] / want_hsdp:.3f}" if wire else "n/a",
    ),
]
print(f"{'quantity':48} {'formula':30} {'measured':>10}")
for what, formula, got in rows:
    print(f"{what:48} {formula:30} {got:>10}")

# %% [markdown]
# **Next**: the exercises (`exercises/07b_fsdp.ipynb`) build a unit's shard ranges with padding, the
# gather and free hooks, the fp32 reduce-scatter and master update, and the order of one step's
# collectives with prefetch.
