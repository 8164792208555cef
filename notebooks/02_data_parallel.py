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
# The finished code lives in `course_lib/data_parallel.py`; the cells below show its source as they use it.

# %%
import inspect

import torch
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

shards_differ = max((a - b).abs().max().item() for a, b in zip(shard_grads[0], shard_grads[1]))
mean_vs_full = max((a - b).abs().max().item() for a, b in zip(mean, full))
print(f"shard 0 vs shard 1 gradient, largest difference: {shards_differ:.3g}")
print(f"mean of shards vs full batch, largest difference: {mean_vs_full:.3g}")
assert shards_differ > 1e-3  # each shard alone gives a different gradient ...
for a, b in zip(mean, full):  # ... and their mean is the full-batch gradient, up to fp32 rounding
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

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
print(
    f"loss: step 1 {baseline_losses[0]:.4f} → step {STEPS} {baseline_losses[-1]:.4f}; "
    f"Ψ = {models.num_params(baseline):,} parameters"
)
assert models.num_params(baseline) == 2128 and baseline_losses[-1] < baseline_losses[0]

# %% [markdown]
# Every data-parallel run below is compared with this one: every parameter of every rank, after
# the last step, to `torch.testing.assert_close(rtol=1e-5, atol=1e-5)` (fp32 sums taken in a
# different order differ in the last bits).


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
            torch.testing.assert_close(
                p,
                baseline_params[name],
                rtol=1e-5,
                atol=1e-5,
                msg=lambda m: f"{label}, rank {rank}, {name}: {m}",
            )
            worst = max(worst, (p - baseline_params[name]).abs().max().item())
    print(
        f"✔ {label}: all {len(results)} ranks equal single-process training (largest difference {worst:.1e})"
    )
    # Equal shards: the mean of the ranks' shard losses is the full-batch loss.
    return [sum(step) / len(results) for step in zip(*(losses for losses, _ in results))]


# %% [markdown]
# ## 3. (a) A parameter server
#
# The design of the first large-scale systems (Google's DistBelief, 2012; the parameter-server
# framework of Li et al., 2014): **server** processes own the parameters and the optimizer,
# **workers** push gradients to them and pull parameters back. Start with the simplest form — one
# server, rank 0, and a synchronous step: every worker sends its gradient up, the server
# averages, steps, and sends the new parameters down (section 6 shards the server):

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
# One step of all three, as `course_lib/data_parallel.py` writes it (the `sync` argument picks the design):

# %%
print(inspect.getsource(dp.data_parallel_step))

# %%
fig = CourseFigure(figsize=(7, 3.6), layout="constrained")
ax = fig.subplots()
steps = range(1, STEPS + 1)
ax.plot(steps, baseline_losses, "-", color="0.75", linewidth=6, label="single process, full batch")
ax.plot(
    steps,
    ps_losses,
    "o",
    color="tab:orange",
    markersize=12,
    markerfacecolor="none",
    markeredgewidth=2,
    label="parameter server, N = 4",
)
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

print(
    f"{'design':<17} {'N':>2} {'rank':>4} {'sent':>9} {'received':>9} {'formula':>9} "
    f"{'received/formula':>16} {'payload sent/received (send/recv)':>34}"
)
for sync, n, rank, t, (_exp_sent, exp_received) in rows:
    payload = f"{t.payload_sent:,} / {t.payload_received:,}" if sync == "parameter-server" else "—"
    print(
        f"{sync:<17} {n:>2} {rank:>4} {t.sent:>9,} {t.received:>9,} {exp_received:>9,.0f} "
        f"{t.received / exp_received:>16.3f} {payload:>34}"
    )

psi_bytes = rows[0][3].payload_received  # N = 2: the server receives exactly one 4Ψ
wire = all(t.received is not None for *_, t, _ in rows)  # None where TCP bytes cannot be read
for sync, n, rank, t, (exp_sent, exp_received) in rows:
    if sync == "parameter-server":  # send/recv payloads: exactly the formula
        assert (t.payload_sent, t.payload_received) == (exp_sent, exp_received), (n, rank)
    if wire:  # wire bytes: the formula plus a few % of gloo's headers and per-call overhead
        assert 1.0 <= t.received / exp_received < 1.06, (sync, n, rank, t.received / exp_received)
assert psi_bytes == 4 * 33_088

# %%
fig = CourseFigure(figsize=(10, 3.8), layout="constrained")
axes = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [2, 4]})
colors = {"parameter-server": "tab:orange", "all-reduce": "tab:blue"}
for ax, n in zip(axes, (2, 4)):
    for i, sync in enumerate(colors):
        mine = [r for r in rows if r[0] == sync and r[1] == n]
        xs = [rank + (i - 0.5) * 0.36 for _, _, rank, _, _ in mine]
        ax.bar(
            xs,
            [t.received / 1024 for *_, t, _ in mine],
            width=0.34,
            color=colors[sync],
            label=f"{sync}, measured",
        )
        ax.hlines(
            [e[1] / 1024 for *_, e in mine],
            [x - 0.15 for x in xs],
            [x + 0.15 for x in xs],
            color="black",
            linewidth=2.5,
            label="formula" if i == 0 else None,
        )
    ax.set_xticks(range(n), [f"rank {r}" + ("\n(server for PS)" if r == 0 else "") for r in range(n)])
    ax.set_title(f"N = {n}", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
axes[0].set_ylabel("KiB received, one sync")
axes[1].legend(fontsize=9, loc="upper right")
fig.suptitle(
    "What each rank receives for one gradient sync of 4Ψ = 129 KiB: (N−1)·4Ψ at the server, "
    "2(N−1)/N·4Ψ everywhere with all-reduce",
    fontsize=10,
)
fig

# %% [markdown]
# What to read (the cell above asserts each point):
#
# * The server's **payload** is exactly (N−1)·4Ψ each way and a worker's exactly 4Ψ: 132,352 bytes
#   is 4 · 33,088. The **wire** figure is a fraction of a percent higher: gloo's headers.
# * The all-reduce's wire bytes are 2(N−1)/N·4Ψ on every rank plus a few %: gloo's per-call
#   overhead, paid here once per parameter tensor (4 calls). Fewer, larger calls pay it less —
#   one reason DDP packs gradients into buckets (chapter 03).
# * Bytes **sent** mirror bytes received (see the table), but the kernel's sent counter also counts
#   bytes TCP had to send again, so it can come out higher; received is the figure to trust.
# * At N = 2 both designs move the same bytes. At N = 4 the server moves 3·4Ψ, the others 1.5·4Ψ.
#   Scale it up: a 1-billion-parameter fp32 model (4 GB) on N = 64 ranks puts 63 × 4 GB = 252 GB
#   through one server's link each way, **every step** — 10 s at 25 GB/s — while a ring
#   all-reduce moves about 8 GB per rank, in parallel on every link.
#
# ### Real parameter servers are sharded
#
# That (N−1)·4Ψ bottleneck is the **single-server** case. Real parameter servers split the
# parameters over many server nodes — DistBelief over "parameter server shards", Li et al.'s
# framework by key ranges over a server group — and every worker talks to every server, each
# about its own range. With S servers each owns 4Ψ/S bytes; a server receives (N−1)·4Ψ/S for its
# range, plus (S−1)·4Ψ/S as a worker when it is also one of the N ranks; a worker still sends and
# receives 4Ψ. `dp.sharded_parameter_server_step` puts the servers on ranks 0 … S−1 (S = 1 is
# the server above):

# %%
print(inspect.getsource(dp.sharded_parameter_server_step))

# %%
sharded = {}  # servers -> per rank (Traffic, Ψ bytes)
for servers in (1, 2, 4):
    sharded[servers] = launch.run(dp.measure_sync_traffic, 4, "sharded-parameter-server", servers=servers)
print(f"{'servers S':>9} {'rank':>4} {'received (payload)':>19} {'formula':>9} {'on the wire':>12}")
for servers, per_rank in sharded.items():
    for rank, (t, psi_b) in enumerate(per_rank):
        _, expected = dp.expected_traffic("sharded-parameter-server", 4, rank, psi_b, servers=servers)
        wire_text = "n/a" if t.received is None else f"{t.received:,}"
        print(f"{servers:>9} {rank:>4} {t.payload_received:>19,} {expected:>9,.0f} {wire_text:>12}")
        assert t.payload_received == round(expected), (servers, rank)
busiest = {servers: max(t.payload_received for t, _ in per_rank) for servers, per_rank in sharded.items()}
assert busiest[4] == round(2 * 3 / 4 * psi_bytes)  # S = N: the all-reduce's 2(N−1)/N·4Ψ
sps_results = launch.run(train_on_ranks, 4, batches, "sharded-parameter-server")
_ = equals_baseline("parameter server sharded over all 4 ranks", sps_results)

# %% [markdown]
# The busiest link falls from (N−1)·4Ψ with one server to 2(N−1)/N·4Ψ with a server on every
# rank — exactly the all-reduce's bytes. It is the same algorithm: pushing range s to server s
# is a **reduce-scatter**, pulling every range back is an **all-gather**, and a ring all-reduce
# is those two. (With the optimizer state split over the servers too, it is also ZeRO-1's
# pattern of ZeRO stages 1 and 2 — chapter 07.)
#
# One more difference from what real parameter servers did: ours is **synchronous** — the server
# waits for every worker each step, so N ranks train exactly like one process. DistBelief's
# Downpour SGD was **asynchronous**: each worker pushed gradients and pulled parameters on its
# own schedule, never waiting for the others, so it computed on parameters that other workers
# had meanwhile moved on. That tolerates slow machines but is no longer equal to single-process
# training; large-model training today uses the synchronous all-reduce form.
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
_ = equals_baseline("all-reduce, N = 4, M = 4, one sync per step", once)
every = launch.run(train_on_ranks, 4, batches, "all-reduce", 4, True)
_ = equals_baseline("all-reduce, N = 4, M = 4, a sync after every micro-batch", every)
ddp_once = launch.run(train_on_ranks, 4, batches, "ddp", 4)
_ = equals_baseline("torch DDP with no_sync, N = 4, M = 4", ddp_once)

# %% [markdown]
# Equal all three. What the sync after every micro-batch costs, measured (N = 4, M = 4, one step):

# %%
M = 4
accumulation = {}  # sync after every micro-batch? -> (rank 0's Traffic, formula)
for label, every_micro_batch in (("one sync per step", False), ("a sync per micro-batch", True)):
    traffic, psi_b = launch.run(
        dp.measure_sync_traffic,
        4,
        "all-reduce",
        accumulation_steps=M,
        sync_every_micro_batch=every_micro_batch,
    )[0]
    syncs = M if every_micro_batch else 1
    _, expected = dp.expected_traffic("all-reduce", 4, 0, psi_b, syncs)
    accumulation[every_micro_batch] = (traffic, expected)
    received = "n/a" if traffic.received is None else f"{traffic.received:,}"
    print(
        f"{label:<24} rank 0 received {received:>9} bytes   formula {syncs} × 2(N−1)/N·4Ψ = "
        f"{expected:>9,.0f}   ({traffic.count('all_reduce')} all-reduce calls)"
    )
    assert traffic.count("all_reduce") == 4 * syncs  # one call per parameter tensor per sync
    if traffic.received is not None:
        assert 1.0 <= traffic.received / expected < 1.06

# %% [markdown]
# Skipping the sync on accumulation steps saves (M−1)/M of the traffic — 75 % here — and costs
# nothing in accuracy.
#
# That saving needs every rank to keep the **whole** gradient while it accumulates. ZeRO-2 and
# ZeRO-3 (chapter 07) keep only a 1/N shard of the gradients, so they cannot wait: each
# micro-batch's gradient must be reduce-scattered to its owners before the next backward pass
# overwrites it — **M times** data parallelism's gradient traffic per step — unless they
# accumulate full, unsharded gradients first and give back part of the memory they saved (what
# FSDP's `no_sync` does). Chapter 07 measures such an M = 4 step.
#
# ## 8. The cost: every rank holds everything
#
# Data parallelism divides the **compute** by N but not the **memory**: every rank holds all Ψ
# parameters, all Ψ gradients and the whole optimizer state. Counted on a replica after one step
# (fp32; our momentum SGD, and torch's Adam beside it):

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

adam_replica = models.make_mlp(64, 256)
adam = torch.optim.Adam(adam_replica.parameters())
F.mse_loss(adam_replica(torch.randn(8, 64)), torch.randn(8, 64)).backward()
adam.step()
adam_state = sum(
    t.numel() * t.element_size()
    for state in adam.state.values()
    for t in (state["exp_avg"], state["exp_avg_sq"])
)
adam_total = held["parameters"] + held["gradients"] + adam_state
print(
    f"{'Adam: exp_avg + exp_avg_sq':<28} {adam_state:>9,} bytes = {adam_state / psi:g} bytes × Ψ;  "
    f"with parameters and gradients: {adam_total / psi:g}Ψ"
)
assert total == 12 * psi and adam_state == 8 * psi and adam_total == 16 * psi

# %% [markdown]
# With Adam the state is two moments, 8 bytes per parameter: **4 + 4 + 8 = 16 bytes per
# parameter on every rank**. (Mixed-precision training with Adam also comes to 16 bytes per
# parameter, split differently — 16-bit parameters and gradients, fp32 master weights and
# moments; chapter 07 counts it.) A 7-billion-parameter model then needs 7 × 16 = 112 GB on every
# rank before a single activation is stored: more than an 80 GB A100 or H100 holds, and most of a
# 141 GB H200 — however many ranks share the work. N copies of the same numbers is the redundancy
# that **ZeRO** (chapter 07) removes by giving each rank 1/N of the optimizer state, gradients and
# parameters: 16Ψ/N per rank. (A parameter server kept the optimizer state on the servers only —
# at the price of their links.)
#
# ## 9. PyTorch's two data-parallel classes
#
# * **`nn.DataParallel`** (the old one): **one process**, one thread per GPU. Every step it
#   *scatters* the batch from GPU 0, *replicates* the model from GPU 0 to every GPU, runs the
#   forward passes in threads, *gathers* the outputs back on GPU 0 to compute the loss, and sums
#   the gradients onto GPU 0, where the optimizer runs. GPU 0 is a parameter server — the
#   bottleneck of section 6 — and the threads contend for Python's global interpreter lock. It
#   works on one machine only, and PyTorch's documentation recommends DDP instead, even there.
# * **`nn.parallel.DistributedDataParallel`**: **one process per GPU** (as `course_lib.launch` runs
#   ranks), weights broadcast once at the start, gradients **all-reduced** in buckets that overlap
#   with backward, every process running its own optimizer. Multi-machine, and what everyone uses;
#   section 5 checked it equal to ours.
#
# ## Summary
#
# * Data parallel = the model replicated, the data split, the gradient averaged. With equal shards
#   the average is exactly the full-batch gradient: N ranks train exactly like one.
# * A single parameter server funnels (N−1)·4Ψ bytes through one rank each way; an all-reduce
#   moves 2(N−1)/N·4Ψ per rank, evenly — measured above, within a few % of the formulas.
#   Sharding the server over all N ranks turns it into reduce-scatter + all-gather: the same bytes.
# * Gradient accumulation needs one sync per optimizer step, not one per micro-batch (`no_sync`)
#   — as long as every rank keeps its whole gradient (ZeRO-2/3 do not: chapter 07).
# * Every rank holds 16Ψ bytes (Adam) — the memory that ZeRO shards.
#
# ## What you measured
#
# Each formula of this chapter beside the number your run produced (Ψ = 33,088 for the traffic,
# 4Ψ = 132,352 bytes; "received" is payload for send/recv, wire bytes for all-reduce).


# %%
def received(sync, n, rank):
    t = next(t for s, nn, r, t, _ in rows if (s, nn, r) == (sync, n, rank))
    return t.payload_received if sync == "parameter-server" else t.received


def show(value):
    return "n/a" if value is None else f"{value:,}"


summary = [
    ("mean of N shard gradients vs full batch", "equal (fp32)", f"largest difference {mean_vs_full:.1e}"),
    ("DP training (PS, all-reduce, DDP) vs 1 process", "equal, rtol = atol = 1e-5", "asserted above"),
    ("PS server receives, N = 4", f"(N−1)·4Ψ = {3 * psi_bytes:,}", show(received("parameter-server", 4, 0))),
    ("PS worker receives, N = 4", f"4Ψ = {psi_bytes:,}", show(received("parameter-server", 4, 1))),
    (
        "all-reduce, rank 0 receives, N = 4",
        f"2(N−1)/N·4Ψ = {1.5 * psi_bytes:,.0f}",
        show(received("all-reduce", 4, 0)),
    ),
    ("sharded PS, busiest rank, S = 2 of N = 4", f"(N+S−2)·4Ψ/S = {2 * psi_bytes:,}", f"{busiest[2]:,}"),
    ("sharded PS, busiest rank, S = N = 4", f"2(N−1)/N·4Ψ = {1.5 * psi_bytes:,.0f}", f"{busiest[4]:,}"),
    (
        "M = 4, one sync per step (rank 0)",
        f"2(N−1)/N·4Ψ = {accumulation[False][1]:,.0f}",
        show(accumulation[False][0].received),
    ),
    (
        "M = 4, a sync per micro-batch (rank 0)",
        f"M·2(N−1)/N·4Ψ = {accumulation[True][1]:,.0f}",
        show(accumulation[True][0].received),
    ),
    ("memory per rank, momentum SGD (fp32)", "4 + 4 + 4 = 12Ψ", f"{total / psi:g}Ψ"),
    ("memory per rank, Adam (fp32)", "4 + 4 + 8 = 16Ψ", f"{adam_total / psi:g}Ψ"),
]
print(f"{'quantity':<46}  {'formula':<30}  {'measured':>24}")
for quantity, formula_text, value in summary:
    print(f"{quantity:<46}  {formula_text:<30}  {value:>24}")

# %% [markdown]
# **Next**: the exercises (`my_exercises/02_data_parallel.ipynb`) build the shard, the gradient
# average, a parameter-server step and gradient accumulation. Chapter 03 builds the ring
# all-reduce itself and DDP's gradient buckets.
