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
# # 02 · Data parallel: the model replicated, the data split
#
# The simplest way to train on N devices: **every rank holds a full copy of the model, and each
# rank gets a different slice (shard) of every batch.** Each rank runs forward and backward on its
# shard; then the ranks agree on one gradient, every rank applies the same update, and the N
# copies stay identical.
#
# ```
#                global batch of B samples
#   ┌────────────┬────────────┬────────────┬────────────┐
#   │  shard 0   │  shard 1   │  shard 2   │  shard 3   │   B/N samples each
#   └─────┬──────┴─────┬──────┴─────┬──────┴─────┬──────┘
#      rank 0       rank 1       rank 2       rank 3        the same Ψ parameters on every rank
#    fwd + bwd    fwd + bwd    fwd + bwd    fwd + bwd       local gradients g₀ … g₃
#         └────────────┴── mean of the gᵣ ─┴────────────┘   communication: the only new part
#      step         step         step         step          same update → same replicas
# ```
#
# Notation: **N** ranks, a global batch of **B** samples, **Ψ** parameters (4Ψ bytes in fp32),
# **M** micro-batches. This chapter builds two ways to agree on the gradient — a **parameter
# server** and an **all-reduce** — checks both equal to single-process training (and to PyTorch's
# own `DistributedDataParallel`), measures what each sends, and then looks at gradient
# accumulation and at what data parallelism costs in memory.
#
# The finished code lives in `course_lib/dp.py`; the cells below show its source as they use it.

# %%
import inspect

import torch
import torch.distributed as dist
import torch.nn.functional as F

from course_lib import dp, launch, models
from course_lib.viz import CourseFigure

# %% [markdown]
# ## 1. Why it is exact: the mean of the shard gradients is the full-batch gradient
#
# The loss of a batch is the **mean** of its samples' losses. Split B samples into N shards of
# B/N: the batch loss is the mean of the N shard losses, L = (1/N)·Σᵣ Lᵣ, and since the gradient
# is linear, **∇L = (1/N)·Σᵣ ∇Lᵣ**. So if every rank computes ∇Lᵣ on its shard and the ranks
# average, each holds exactly the gradient one process would have computed on the whole batch.
# (That needs equal shards; with unequal ones the mean must be weighted by shard size.)
#
# Checked here in one process, no ranks yet:

# %%
model = models.make_mlp(d_model=16, d_hidden=64)
x, y = models.regression_data(32)

F.mse_loss(model(x), y).backward()
full = [p.grad.clone() for p in model.parameters()]

N = 4
shard_grads = []
for r in range(N):
    model.zero_grad()
    F.mse_loss(model(models.shard(x, r, N)), models.shard(y, r, N)).backward()
    shard_grads.append([p.grad.clone() for p in model.parameters()])
mean = [torch.stack(gs).mean(0) for gs in zip(*shard_grads)]

print("shard 0 vs shard 1 gradient, largest difference:",
      f"{max((a - b).abs().max().item() for a, b in zip(shard_grads[0], shard_grads[1])):.3g}")
print("mean of shards vs full batch, largest difference:",
      f"{max((a - b).abs().max().item() for a, b in zip(mean, full)):.3g}")

# %% [markdown]
# ## 2. The single-process baseline
#
# Twenty steps of momentum SGD on a small MLP (Ψ = 2,128), one fresh batch of B = 32 samples per
# step. The optimizer is `dp.SGD`, a few lines that do what `torch.optim.SGD(lr=0.1, momentum=0.9)`
# does, so that its state — one momentum buffer per parameter — is in plain sight.

# %%
print(inspect.getsource(dp.train_single_process))

# %%
STEPS, B = 20, 32
batches = dp.make_batches(STEPS, B)
baseline = models.make_mlp()
baseline_losses = dp.train_single_process(baseline, batches)
baseline_params = dp.parameters(baseline)
print(f"loss: step 1 {baseline_losses[0]:.4f} → step {STEPS} {baseline_losses[-1]:.4f}; "
      f"Ψ = {models.num_params(baseline):,} parameters")

# %% [markdown]
# Every data-parallel run below is compared with this one: every parameter of every rank, after
# the last step, to `torch.testing.assert_close(rtol=1e-5, atol=1e-5)` (fp32 sums in a different
# order differ in the last bits, never by more).

# %%
def train_on_ranks(batches, sync, accumulation_steps=1, sync_every_micro_batch=False):
    """Runs on every rank: the same seeded model, trained data-parallel; this rank's losses and weights."""
    model = models.make_mlp()
    losses = dp.train_data_parallel(model, batches, sync, accumulation_steps, sync_every_micro_batch)
    return losses, dp.parameters(model)


def equals_baseline(label, results):
    """Assert every rank's parameters equal the baseline's; return the mean loss over ranks per step."""
    worst = 0.0
    for rank, (_, params) in enumerate(results):
        for name, p in params.items():
            torch.testing.assert_close(p, baseline_params[name], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{label}, rank {rank}, {name}: {m}")
            worst = max(worst, (p - baseline_params[name]).abs().max().item())
    print(f"✔ {label}: all {len(results)} ranks equal single-process training "
          f"(largest difference {worst:.1e})")
    # Equal shards: the mean of the ranks' shard losses is the full-batch loss.
    return [sum(step) / len(results) for step in zip(*(losses for losses, _ in results))]

# %% [markdown]
# ## 3. (a) A parameter server
#
# The oldest design (DistBelief, 2012; the "parameter server" of 2014): one rank — the **server**,
# here rank 0 — owns the optimizer. Each step, every **worker** sends its gradient up, the server
# averages, steps, and sends the new parameters down:

# %%
print(inspect.getsource(dp.parameter_server_step))

# %% [markdown]
# Why send *parameters* down rather than the averaged gradient? Either works and both cost Ψ per
# worker. With parameters, the workers need no optimizer at all — its state lives on the server
# only — and they can never drift apart. Sending gradients would mean every worker runs the same
# optimizer on the same numbers: that is exactly the all-reduce design of the next section.

# %%
ps_results = launch.run(train_on_ranks, 4, batches, "parameter-server")
ps_losses = equals_baseline("parameter server, N = 4", ps_results)

# %% [markdown]
# ## 4. (b) All-reduce: every rank averages
#
# No server: one **all-reduce** per gradient tensor leaves the sum on every rank, each divides by
# N, and every rank runs its own (identical) optimizer step.

# %%
print(inspect.getsource(dp.average_gradients_allreduce))

# %%
ar_results = launch.run(train_on_ranks, 4, batches, "all-reduce")
ar_losses = equals_baseline("all-reduce, N = 4", ar_results)

# %% [markdown]
# ## 5. A second reference: PyTorch's `DistributedDataParallel`
#
# `torch.nn.parallel.DistributedDataParallel` (DDP) is the all-reduce design, industrialised: when
# it wraps the model it broadcasts rank 0's weights, and during `backward()` it all-reduces the
# gradients in buckets while the rest of backward is still running (chapter 03 builds that). It
# runs on gloo on the CPU too. Same model, same data, same optimizer:

# %%
ddp_results = launch.run(train_on_ranks, 4, batches, "ddp")
ddp_losses = equals_baseline("torch DDP, N = 4", ddp_results)

# %% [markdown]
# One step of all three, as `course_lib/dp.py` writes it (the `sync` argument picks the design):

# %%
print(inspect.getsource(dp.data_parallel_step))

# %%
fig = CourseFigure(figsize=(7, 3.6), layout="constrained")
ax = fig.subplots()
steps = range(1, STEPS + 1)
ax.plot(steps, baseline_losses, "-", color="0.75", linewidth=6, label="single process, full batch")
ax.plot(steps, ps_losses, "o", color="tab:orange", markersize=12, markerfacecolor="none",
        markeredgewidth=2, label="parameter server, N = 4")
ax.plot(steps, ar_losses, "x", color="tab:blue", markersize=9, markeredgewidth=2, label="all-reduce, N = 4")
ax.plot(steps, ddp_losses, "+", color="black", markersize=12, label="torch DDP, N = 4")
ax.set_xlabel("step")
ax.set_ylabel("training loss (MSE)")
ax.set_xticks(range(0, STEPS + 1, 5))
ax.set_title("Same curve four ways: data parallel = full-batch training", fontsize=10)
ax.grid(True, alpha=0.3)
ax.legend()
fig

# %% [markdown]
# ## 6. What each design sends: measured beside the formulas
#
# One gradient sync of a Ψ-parameter fp32 model (4Ψ bytes):
#
# | | rank 0 | every other rank |
# |---|---|---|
# | parameter server | receives (N−1)·4Ψ, sends (N−1)·4Ψ | sends 4Ψ, receives 4Ψ |
# | ring all-reduce | sends and receives 2(N−1)/N·4Ψ | the same |
#
# The server's link carries N−1 times what a worker's does, and it grows with N; the all-reduce
# spreads the same work evenly, and each rank's share stays below 2·4Ψ however large N gets.
#
# `course_lib.comm.count_traffic()` measures it inside a rank: the exact **payload** of every
# `send`/`recv` (the parameter server uses those), and the **wire** bytes each rank's TCP sockets
# really moved, read from the kernel — which also sees inside gloo's built-in all-reduce. One
# step of a larger MLP (d_model = 64, d_hidden = 256: Ψ = 33,088, 4Ψ = 132,352 bytes):

# %%
print(inspect.getsource(dp.measure_sync_traffic))

# %%
rows = []  # (design, N, rank, traffic, expected (sent, received))
for n in (2, 4):
    for sync in ("parameter-server", "all-reduce"):
        for rank, (traffic, psi_bytes) in enumerate(launch.run(dp.measure_sync_traffic, n, sync)):
            rows.append((sync, n, rank, traffic, dp.expected_traffic(sync, n, rank, psi_bytes)))

print(f"{'design':<17} {'N':>2} {'rank':>4} {'sent':>9} {'received':>9} {'formula':>9} "
      f"{'received/formula':>16} {'payload sent/received (send/recv)':>34}")
for sync, n, rank, t, (exp_sent, exp_received) in rows:
    payload = f"{t.payload_sent:,} / {t.payload_received:,}" if sync == "parameter-server" else "—"
    print(f"{sync:<17} {n:>2} {rank:>4} {t.sent:>9,} {t.received:>9,} {exp_received:>9,.0f} "
          f"{t.received / exp_received:>16.3f} {payload:>34}")

# %%
fig = CourseFigure(figsize=(10, 3.8), layout="constrained")
axes = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [2, 4]})
colors = {"parameter-server": "tab:orange", "all-reduce": "tab:blue"}
for ax, n in zip(axes, (2, 4)):
    for i, sync in enumerate(colors):
        mine = [r for r in rows if r[0] == sync and r[1] == n]
        xs = [rank + (i - 0.5) * 0.36 for _, _, rank, _, _ in mine]
        ax.bar(xs, [t.received / 1024 for *_, t, _ in mine], width=0.34, color=colors[sync],
               label=f"{sync}, measured")
        ax.hlines([e[1] / 1024 for *_, e in mine], [x - 0.15 for x in xs], [x + 0.15 for x in xs],
                  color="black", linewidth=2.5, label="formula" if i == 0 else None)
    ax.set_xticks(range(n), [f"rank {r}" + ("\n(server for PS)" if r == 0 else "") for r in range(n)])
    ax.set_title(f"N = {n}", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
axes[0].set_ylabel("KiB received, one sync")
axes[1].legend(fontsize=9, loc="upper right")
fig.suptitle("What each rank receives for one gradient sync of 4Ψ = 129 KiB: (N−1)·4Ψ at the server, "
             "2(N−1)/N·4Ψ everywhere with all-reduce", fontsize=10)
fig

# %% [markdown]
# What to read:
#
# * The server's **payload** is exactly (N−1)·4Ψ each way and a worker's exactly 4Ψ: 132,352 bytes
#   is 4 · 33,088. The **wire** figure is 0.1 % higher — gloo's few bytes of header per message.
# * The all-reduce's wire bytes are 2(N−1)/N·4Ψ on every rank plus 2–4 %: gloo's per-call
#   overhead, paid here once per parameter tensor (4 calls). Fewer, larger calls pay it less —
#   one reason DDP packs gradients into buckets (chapter 03).
# * Bytes **sent** mirror bytes received (see the table), but the kernel's sent counter also
#   includes TCP retransmissions — a worker's bytes that waited while the server read another
#   worker can be sent twice — so received is the figure to trust.
# * At N = 2 both designs move the same bytes. At N = 4 the server moves 3·4Ψ, the others 1.5·4Ψ.
#   Scale it up: a 1-billion-parameter fp32 model (4 GB) on N = 64 ranks puts 63 × 4 GB = 252 GB
#   through the server's link each way, **every step** — 10 s at 25 GB/s — while a ring
#   all-reduce moves about 8 GB per rank, in parallel on every link.
#
# ## 7. Gradient accumulation, and not syncing on accumulation steps
#
# When B/N samples do not fit in a rank's memory at once, each rank splits its shard into **M
# micro-batches**: forward and backward on each, letting the gradients **add up** in `p.grad`,
# each loss divided by M so the sum is the shard's mean. The optimizer steps once, after the last.
#
# The ranks only need to agree on the gradient **once**, before that step: averaging is linear,
# so all-reducing after every micro-batch gives the same numbers for M times the traffic. torch's
# DDP offers `with ddp.no_sync():` for the first M−1 backward passes; `dp.data_parallel_step`
# above does the same with its `accumulation_steps` argument (look for `communicate`).
#
# Same global batches, same baseline: N = 4 ranks × M = 4 micro-batches of 2 samples.

# %%
once = launch.run(train_on_ranks, 4, batches, "all-reduce", 4)
equals_baseline("all-reduce, N = 4, M = 4, one sync per step", once)
every = launch.run(train_on_ranks, 4, batches, "all-reduce", 4, True)
equals_baseline("all-reduce, N = 4, M = 4, a sync after every micro-batch", every)
ddp_once = launch.run(train_on_ranks, 4, batches, "ddp", 4)
_ = equals_baseline("torch DDP with no_sync, N = 4, M = 4", ddp_once)

# %% [markdown]
# Equal all three. What the sync after every micro-batch costs, measured (N = 4, M = 4, one step):

# %%
M = 4
for label, every_micro_batch in (("one sync per step", False), ("a sync per micro-batch", True)):
    traffic, psi_bytes = launch.run(dp.measure_sync_traffic, 4, "all-reduce", accumulation_steps=M,
                                    sync_every_micro_batch=every_micro_batch)[0]
    syncs = M if every_micro_batch else 1
    _, expected = dp.expected_traffic("all-reduce", 4, 0, psi_bytes, syncs)
    print(f"{label:<24} rank 0 received {traffic.received:>9,} bytes   formula {syncs} × 2(N−1)/N·4Ψ = "
          f"{expected:>9,.0f}   ({traffic.count('all_reduce')} all-reduce calls)")

# %% [markdown]
# Skipping the sync on accumulation steps saves (M−1)/M of the traffic — 75 % here — and costs
# nothing in accuracy.
#
# ## 8. The cost: every rank holds everything
#
# Data parallelism divides the **compute** by N but not the **memory**: every rank holds all Ψ
# parameters, all Ψ gradients and the whole optimizer state. Counted on a trained replica
# (fp32, our momentum SGD):

# %%
replica = models.make_mlp(64, 256)
optimizer = dp.SGD(replica.parameters())
F.mse_loss(replica(torch.randn(8, 64)), torch.randn(8, 64)).backward()
optimizer.step()
held = {
    "parameters": sum(p.numel() * p.element_size() for p in replica.parameters()),
    "gradients": sum(p.grad.numel() * p.grad.element_size() for p in replica.parameters()),
    "optimizer state (momentum)": sum(b.numel() * b.element_size() for b in optimizer.momentum_buffers),
}
psi = models.num_params(replica)
for what, nbytes in held.items():
    print(f"{what:<28} {nbytes:>9,} bytes = {nbytes / psi:g} bytes × Ψ")
total = sum(held.values())
print(f"{'per rank':<28} {total:>9,} bytes = {total / psi:g}Ψ;  on N = 64 ranks: 64 identical copies")

# %% [markdown]
# With Adam the state is two moments, 8 bytes per parameter: **4 + 4 + 8 = 16 bytes per
# parameter on every rank** (the same 16Ψ as the mixed-precision table: 2 + 2 + 12). A
# 7-billion-parameter model needs 112 GB per rank — more than one GPU has — no matter how many
# ranks share the work. N copies of the same numbers is the redundancy that **ZeRO** (chapter 07)
# removes by giving each rank 1/N of the optimizer state, gradients and parameters: 16Ψ/N per rank.
# (The parameter server kept the optimizer state on one rank only — at the price of its link.)
#
# ## 9. PyTorch's two data-parallel classes
#
# * **`nn.DataParallel`** (the old one): **one process**, one thread per GPU. Every step it
#   *scatters* the batch from GPU 0, *replicates* the model from GPU 0 to every GPU, runs the
#   forward passes in threads, *gathers* the outputs back on GPU 0 to compute the loss, and sums
#   the gradients onto GPU 0, where the optimizer runs. GPU 0 is a parameter server — the
#   bottleneck of section 6 — and Python's global interpreter lock serialises the threads. It works
#   on one machine only, and PyTorch recommends against it.
# * **`nn.parallel.DistributedDataParallel`**: **one process per GPU** (as `course_lib.launch` runs
#   ranks), weights broadcast once at the start, gradients **all-reduced** in buckets that overlap
#   with backward, every process running its own optimizer. Multi-machine, and what everyone uses;
#   section 5 checked it equal to ours.
#
# ## Summary
#
# * Data parallel = the model replicated, the data split, the gradient averaged. With equal shards
#   the average is exactly the full-batch gradient: N ranks train exactly like one.
# * A parameter server funnels (N−1)·4Ψ bytes through one rank each way; an all-reduce moves
#   2(N−1)/N·4Ψ per rank, evenly — measured above, within a few % of the formulas.
# * Gradient accumulation needs one sync per optimizer step, not one per micro-batch (`no_sync`).
# * Every rank holds 16Ψ bytes (Adam) — the memory that ZeRO shards.
#
# **Next**: the exercises (`exercises/02_data_parallel.ipynb`) build the shard, the gradient
# average, a parameter-server step and gradient accumulation. Chapter 03 builds the ring
# all-reduce itself and DDP's gradient buckets.
