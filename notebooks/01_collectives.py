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
# # 01 · Collectives: how ranks talk
#
# Every way of training one model on many devices — data, tensor, pipeline, sequence and expert
# parallelism, ZeRO — is ordinary single-device training plus a few **communication patterns**
# between the devices. This chapter meets all of them, runs each on real processes, and
# measures how fast they are.
#
# Notation used in the whole course: **N** ranks (processes, one per device), each holding a
# tensor; **K** elements in the full array; rank `r` is one of 0 … N−1.
#
# * **Point-to-point**: one rank sends, one rank receives (`send`/`recv`).
# * **Collectives**: *every* rank of the group makes the same call, and data moves among all of
#   them: broadcast, reduce, all-reduce, all-gather, reduce-scatter, all-to-all.
#
# `launch.run(fn, N)` runs `fn` on N ranks, each its own process with a `torch.distributed`
# process group (gloo on a laptop's CPU, NCCL when there is one GPU per rank), and returns every
# rank's return value. Printed lines come back prefixed with `[rank r]`.

# %%
import inspect
import math

import torch
import torch.distributed as dist

from course_lib import alpha_beta, collectives, launch, viz

# %% [markdown]
# ## Point-to-point: send and recv
#
# `dist.send(tensor, dst)` ships a tensor to rank `dst`; `dist.recv(tensor, src)` waits for one
# from rank `src` and writes it **into** the tensor it is given (which must already have the right
# shape and dtype). Here rank 0 sends three numbers to rank 1:


# %%
def send_to_rank_1():
    t = torch.zeros(3, device=launch.device())  # the rank's device: cuda:r under NCCL
    if dist.get_rank() == 0:
        t = torch.tensor([1.0, 2.0, 3.0], device=launch.device())
        dist.send(t, dst=1)
    else:
        dist.recv(t, src=0)
    print("after:", t.tolist())
    return t


launch.run(send_to_rank_1, 2)

# %% [markdown]
# A blocking `send` may wait until its `recv` is posted. When every rank sends *and* receives in
# the same step — each rank passing its data to the right neighbour, the step every ring algorithm
# repeats — use the non-blocking `isend`, then `recv`, then wait for the send.
#
# The pictures below show **one row per rank** and one cell per element, before and after. A
# cell's colour says which rank its value came from; rank r starts with the values 10·r, 10·r+1, …
# so that sums can be read off.

# %%
viz.show_collective("send/recv", 4)

# %% [markdown]
# ## Broadcast
#
# One rank, the **root** (`src`), has a tensor; afterwards every rank has a copy. Used to start all
# ranks from the same initial weights.

# %%
viz.show_collective("broadcast", 4, root=1)

# %% [markdown]
# ## Reduce
#
# Every rank contributes a tensor; the root (`dst`) ends with their element-wise **sum** (or max,
# …). The other ranks' tensors are left undefined (gloo uses them as scratch), so the picture
# shows "no result" there. A striped cell is a sum: one stripe per rank added into it.

# %%
viz.show_collective("reduce", 4, root=0)

# %% [markdown]
# ## All-reduce
#
# Reduce, but **every** rank ends with the sum. This is the collective of data parallelism: each
# rank computes gradients on its own shard of the batch, one all-reduce sums them, and every rank
# applies the same update. A ring all-reduce sends 2(N−1)/N·K elements per rank — almost 2K, no matter how
# large N is (a later chapter builds it).

# %%
viz.show_collective("all-reduce", 4)

# %% [markdown]
# ## All-gather
#
# Each rank holds one **shard** of K/N elements; afterwards every rank holds the whole array of
# K, shards in rank order. Used to reassemble sharded weights (ZeRO-3/FSDP) and sharded
# activations (tensor and sequence parallelism). A ring all-gather sends (N−1)/N·K per rank.

# %%
viz.show_collective("all-gather", 4)

# %% [markdown]
# ## Reduce-scatter
#
# The mirror image of all-gather: every rank starts with a full array of K, the arrays are summed,
# and rank r keeps only **chunk r** of the sum (K/N elements). Also (N−1)/N·K per rank on a ring.
# Chaining the two gives an all-reduce: **all-reduce = reduce-scatter + all-gather**, which is
# exactly how the ring all-reduce works, and why ZeRO can keep only a shard of the gradients
# without sending more per step than data parallelism does (chapter 07).

# %%
viz.show_collective("reduce-scatter", 4)

# %% [markdown]
# ## All-to-all
#
# Every rank splits its array into N chunks and sends chunk j to rank j; rank r ends with chunk r
# from every rank, in rank order — a transpose of the (rank × chunk) grid. Mixture-of-experts uses
# it to send each token to the rank that holds its expert, and again to bring the results back.

# %%
viz.show_collective("all-to-all", 4)

# %% [markdown]
# ## The code behind the pictures
#
# Each picture comes from the function below, run on every rank (`course_lib/collectives.py`);
# `inp` and `out` are this rank's input and output tensors. Sizes follow nccl-tests: K is the
# number of elements of the **full** array, so all-gather's input is K/N and reduce-scatter's
# output is K/N.

# %%
print(inspect.getsource(collectives.collective))

# %% [markdown]
# A quick check of the identity above, on 4 ranks: an all-reduce of K = 8 elements gives the same
# numbers as a reduce-scatter followed by an all-gather.


# %%
def all_reduce_two_ways():
    rank = dist.get_rank()
    x = 10.0 * rank + torch.arange(8.0, device=launch.device())
    direct = x.clone()
    dist.all_reduce(direct)
    shard = torch.empty(8 // dist.get_world_size(), device=x.device)
    collectives.collective("reduce-scatter", x, shard)
    gathered = torch.empty(8, device=x.device)
    collectives.collective("all-gather", shard, gathered)
    return torch.equal(direct, gathered)


same = launch.run(all_reduce_two_ways, 4)
assert all(same), (
    f"all-reduce ≠ reduce-scatter + all-gather on ranks {[r for r, ok in enumerate(same) if not ok]}"
)
print("✔ on every rank, all-reduce = reduce-scatter followed by all-gather")

# %% [markdown]
# ## Try it: any collective, any N
#
# Pick a collective and the number of ranks N; for broadcast and reduce, also the root (its
# slider goes up to N−1, and it hides for collectives that have no root). Each change launches
# N fresh processes and redraws the picture. (The widget's code is `viz.collective_explorer`.)

# %%
viz.collective_explorer("all-to-all", 4)

# %% [markdown]
# ## Where the later chapters use them
#
# | collective | used by |
# |---|---|
# | broadcast | the same initial weights on every replica (data parallelism, DDP) |
# | all-reduce | data parallelism (gradients), Megatron tensor parallelism (f and g) |
# | all-gather / reduce-scatter | tensor + sequence parallelism, ZeRO and FSDP (weights and gradients) |
# | all-to-all | mixture of experts (tokens to experts and back) |
# | send / recv | pipeline parallelism (activations and gradients between stages), rings |
#
# ## How fast? One message first: the α–β model
#
# The simplest useful model of communication time: one message of S bytes takes
#
# $$t(S) = \alpha + S/\beta$$
#
# **α** (latency) is the fixed cost of any message — software on both ends, waking the receiver,
# the wire's delay; **β** (bandwidth) is the bytes per second the link carries. Small messages pay
# mostly α, large ones mostly S/β. Every later time estimate in the course is written with these
# two numbers, so first measure them here: rank 0 and rank 1 bounce a message back and forth
# (one-way time = round trip / 2), for S from 64 B to 16 MiB.
#
# Timing on a laptop is noisy: other programs, and the ranks themselves, share a few cores, and a
# message that arrives while its receiver waits for a core takes longer. So each size is run in 7
# batches, the sizes taking turns so that a busy moment hits them all alike. Interference only
# ever **adds** time, so the **best** batch is the least disturbed, and the model is fitted to it:
# α from the small messages (the median of those up to 4 KiB), β from the large ones.

# %%
pp = alpha_beta.measure_point_to_point([64, 1024, 4096, 64 * 1024, 1 << 20, 16 << 20], min_seconds=0.05)
model = alpha_beta.fit(pp.nbytes, pp.fastest)
print(pp.table())
print("fitted to the best batches:", model.describe())
assert model.alpha > 0 and model.beta > 0

# %%
viz.plot_alpha_beta(pp, model)

# %% [markdown]
# The red line is the model; the crosses (best batches) are what it was fitted to, the dots and
# bars show how much a busy machine spreads the rest. Where the dots sit far above the crosses,
# other work was competing for the cores — the model describes the link, not the crowd.
#
# Run the cell again and the two numbers move. On the course's quiet 2-core virtual machine, five
# runs gave β within about 20 % of each other (2.5–3.0 GB/s) but α within only a factor of about
# 2 (82–177 µs); on another day the same machine gave α 48–77 µs and β 3.2–4.8 GB/s, each set of
# five runs within a factor of 1.1–1.6 and 1.2–1.4 (three sets; `benchmarks/bench_alpha_beta.py`
# repeats the fit; longer or more batches did not narrow it much). A small message's time
# includes waking the process that waits for it, and how long that takes changes from run to run
# and from day to day. So a prediction dominated by α is good to a factor of about 2, one
# dominated by S/β to about 20–30 %.
#
# With α and β in hand, an algorithm that sends r messages one after another, each of S′ bytes,
# costs about r·(α + S′/β). The collectives below are such algorithms.
#
# ## Collectives: time and bus bandwidth
#
# Time one collective of S bytes (the full array) on N ranks, for S from 4 KiB to 4 MiB. Two
# numbers, following nccl-tests (PERFORMANCE.md):
#
# * **algorithm bandwidth** algbw = S / t — bytes of the array per second;
# * **bus bandwidth** busbw = algbw × factor, with factor = 2(N−1)/N for all-reduce,
#   (N−1)/N for all-gather, reduce-scatter and all-to-all, and 1 for broadcast and reduce.
#
# The factor is what a bandwidth-optimal algorithm must push through each rank's link, in units
# of S: a ring all-reduce sends 2(N−1)/N·S bytes per rank, so t ≥ 2(N−1)/N·S / B for a link of
# B bytes/s, i.e. busbw ≤ B. That makes busbw comparable across N and across collectives, and
# against the hardware's link speed — *if* the library uses such an algorithm (measured below).
#
# Each size runs in 7 batches of about 0.1 s in all; a batch lasts as long as its slowest rank.
# The plot shows the median batch with a band from the best to the worst, and, dashed, what the
# α–β model predicts for a ring: 2(N−1)·(α + S/(N·β)) for all-reduce, (N−1)·(α + S/(N·β)) for
# all-gather.

# %%
sizes = [4 * 1024 * 4**i for i in range(6)]  # 4 KiB, 16 KiB, ..., 4 MiB
timings = [collectives.time_collective("all-reduce", n, sizes) for n in (2, 4)]
timings.append(collectives.time_collective("all-gather", 4, sizes))
for t in timings:
    print(t.table(), end="\n\n")

# %%
viz.plot_timing(timings, predict=lambda t: collectives.predict(model, t))

# %%
print(
    f"{'collective':<11} {'N':>2} {'S':>8} {'α–β prediction':>15} {'best batch':>11} {'median':>9}  "
    f"{'median / prediction':>19}"
)
for t in timings:
    predicted = collectives.predict(model, t)
    for i in (0, len(sizes) - 1):
        print(
            f"{t.name:<11} {t.world_size:>2} {collectives.format_bytes(t.nbytes[i]):>8} "
            f"{predicted[i] * 1e3:>12.3f} ms {t.fastest[i] * 1e3:>8.3f} ms {t.seconds[i] * 1e3:>6.3f} ms  "
            f"{t.seconds[i] / predicted[i]:>19.1f}"
        )

# %% [markdown]
# What to read. Your numbers differ from run to run, so what follows is what the model says and
# what can make a run disagree with it — check each point against your own plot and table.
#
# * Small arrays: the model says a ring all-reduce pays 2(N−1) α's per call however small S is,
#   so its time is flat in S and busbw is tiny. NCCL between GPUs pays a few microseconds per step.
# * Large arrays: the model says time grows like S/β and busbw approaches what the "link" carries
#   (here, memory copies through the kernel's loopback network).
# * The model was fitted to **one** pair of ranks talking while the rest idled. A collective keeps
#   every rank busy at once; where there are more ranks than free cores (N = 4 on a laptop with
#   few cores, or any N beside other busy programs), ranks take turns on the cores and each step
#   can wait for one. Measured times then come out above the dashed predictions, most of all for
#   small arrays, where those waits are most of the time.
# * The band is the noise: where it is wide, one measurement alone would have said little, and a
#   bump in the median line means nothing more than that.
#
# Fewer, larger messages pay fewer α's: this is why data parallelism groups gradients into
# buckets before all-reducing them (chapter 03), and why the cost models of later chapters are
# written as "α per message + bytes / β".
#
# ## What each rank really sends: the busbw factor, measured
#
# The factor of each collective is a lower bound: for example, in an all-gather every rank must
# receive the N−1 shards it lacks, (N−1)/N·S bytes, whatever the algorithm. Whether a library
# reaches the bound depends on its algorithm — so count. `course_lib.comm.count_traffic` reads the
# bytes each rank's TCP sockets moved from the kernel (gloo talks over TCP; NCCL's traffic is
# invisible to it). One call of every collective, N = 4 ranks, S = 1 MiB:

# %%
WIRE_N, WIRE_S = 4, 1 << 20
wire = collectives.wire_bytes(collectives.COLLECTIVES, WIRE_N, WIRE_S)
if wire is None:
    print("wire bytes cannot be read here (NCCL, or not Linux): skipped")
else:
    print(f"N = {WIRE_N}, S = {collectives.format_bytes(WIRE_S)}; bytes per rank in units of S")
    print(
        f"{'collective':<15} {'factor (bound)':>14} {'most received':>14} {'most sent':>10}   sent by rank 0…N−1"
    )
    for name, w in wire.items():
        print(
            f"{name:<15} {collectives.bus_factor(name, WIRE_N):>14.3f} {max(w.received) / w.nbytes:>14.3f} "
            f"{max(w.sent) / w.nbytes:>10.3f}   " + " ".join(f"{x / w.nbytes:.2f}" for x in w.sent)
        )

# %% [markdown]
# gloo (torch 2.13) reaches the bound for all-reduce, all-gather and all-to-all: those busbw
# numbers mean what nccl-tests means by them. For the other three it does more than the bound, and
# the table shows how:
#
# * **broadcast** is a **binomial tree**: the root sends the whole array ⌈log₂N⌉ times (2·S at
#   N = 4), rank 1 forwards it once. A pipelined chain would need only S per link, the factor 1.
# * **reduce** is a reduce-scatter followed by a gather of the reduced chunks to the root, which
#   receives 2(N−1)/N·S.
# * **reduce-scatter** moves as much as an **all-reduce**, 2(N−1)/N·S per rank — twice the
#   (N−1)/N·S a ring reduce-scatter needs (NCCL's reaches it). On gloo, ZeRO's reduce-scatters
#   cost what all-reduces cost.
#
# So on gloo a busbw of broadcast, reduce or reduce-scatter understates how busy the links were.
# The checks below hold for every collective, and for gloo's algorithms as just described:

# %%
if wire is not None:
    S, log2n = wire["all-reduce"].nbytes, math.ceil(math.log2(WIRE_N))
    for name, w in wire.items():  # received counts each byte once (sent may count a resend twice)
        bound = collectives.bus_factor(name, WIRE_N)
        assert max(w.received) / S >= 0.99 * bound or name == "broadcast", name
    assert min(wire["broadcast"].received[1:]) >= 0.99 * S  # broadcast: every non-root receives S
    for name in ("all-reduce", "all-gather", "all-to-all"):  # at the bound, give or take headers
        assert max(wire[name].received) / S <= 1.03 * collectives.bus_factor(name, WIRE_N), name
    assert log2n - 0.01 <= wire["broadcast"].sent[0] / S < log2n + 0.5  # the tree's root
    assert (
        2 * (WIRE_N - 1) / WIRE_N * 0.99 <= wire["reduce"].received[0] / S <= 2 * (WIRE_N - 1) / WIRE_N * 1.03
    )
    assert min(wire["reduce-scatter"].received) / S >= 0.99 * 2 * (WIRE_N - 1) / WIRE_N
    print(
        "✔ every collective moves at least its factor × S through some link;",
        "gloo's broadcast root sends ⌈log₂N⌉·S, its reduce-scatter moves an all-reduce's bytes",
    )

# %% [markdown]
# Time every collective too, N = 4, a small and a larger array (7 batches each). Read busbw
# with the byte counts above in mind: where gloo moves more than the factor assumes (broadcast,
# reduce, reduce-scatter), busbw understates how busy the links were.

# %%
every = collectives.time_collectives(collectives.COLLECTIVES, 4, [64 * 1024, 1 << 20], min_seconds=0.03)
for t in every.values():
    print(t.table(), end="\n\n")

# %% [markdown]
# ## Trees: ⌈log₂N⌉ rounds instead of N−1
#
# A broadcast built the simple way — the root sends to each rank in turn (exercise 1.1) — makes
# the root send N−1 messages one after another: (N−1)·(α + S/β). In a **binomial tree** every
# rank that already has the data sends it on, so the number of holders doubles each round: 1, 2,
# 4, … — all N after **⌈log₂N⌉ rounds**, ⌈log₂N⌉·(α + S/β). (gloo's broadcast moved bytes
# exactly as such a tree does, above.)
#
# Count the rounds on real ranks: `collectives.trace_point_to_point()` records every send and recv
# of a rank, in order; `collectives.count_rounds` replays them the α–β way (a rank sends one
# message at a time and receives one at a time; a message takes one round) and returns the round
# in which the last message arrives.

# %%
traces, rounds = {}, {}
for n in (3, 4, 5, 8):
    for algorithm, per_rank in collectives.trace_broadcast(("tree", "flat"), n).items():
        traces[algorithm, n] = per_rank
        rounds[algorithm, n] = collectives.count_rounds(per_rank)
print(f"{'N':>2} {'tree rounds':>11} {'⌈log₂N⌉':>8} {'flat rounds':>11} {'N−1':>4}")
for n in (3, 4, 5, 8):
    print(f"{n:>2} {rounds['tree', n]:>11} {math.ceil(math.log2(n)):>8} {rounds['flat', n]:>11} {n - 1:>4}")
    assert rounds["tree", n] == math.ceil(math.log2(n)) and rounds["flat", n] == n - 1

# %%
viz.plot_rounds({"flat broadcast, N = 8": traces["flat", 8], "tree broadcast, N = 8": traces["tree", 8]})

# %% [markdown]
# Now the time, beside the α–β predictions, for a latency-bound 4 KiB and a bandwidth-bound
# 1 MiB on N = 8 (the tree and the flat broadcast are `collectives.tree_broadcast` and
# `collectives.flat_broadcast`, a dozen lines of send/recv; gloo's own beside them):

# %%
bcast = {8: collectives.time_broadcasts(8, [4096, 1 << 20], min_seconds=0.03)}
print(
    f"{'N':>2} {'S':>7} {'algorithm':<15} {'rounds':>6} {'α–β prediction':>15} {'best batch':>11} {'median':>9}"
)
for n, by_name in bcast.items():
    for i, nbytes in enumerate(by_name["tree"].nbytes):
        for name, t in by_name.items():
            r = n - 1 if name == "flat" else math.ceil(math.log2(n))
            print(
                f"{n:>2} {collectives.format_bytes(nbytes):>7} {name:<15} {r:>6} "
                f"{model.rounds(r, nbytes) * 1e3:>12.3f} ms {t.fastest[i] * 1e3:>8.3f} ms "
                f"{t.seconds[i] * 1e3:>6.3f} ms"
            )

# %% [markdown]
# Read your own table: the rounds counted above are exact on any machine, the times are not.
# Two things the model leaves out can move the measurements away from the predictions. With 8
# ranks on a few cores, each round can also wait for its receiver to get a core, which adds
# time. And the model charges the flat broadcast's root a full α for each of its N−1 sends,
# though part of α is time on the way, which back-to-back sends overlap — so for small arrays the
# flat broadcast can do better than (N−1)·α, and the tree's advantage on a quiet machine is
# smaller than the ratio of rounds, (N−1)/⌈log₂N⌉.
#
# All-reduce has the same trade-off between rings (2(N−1) rounds, each moving only S/N) and trees
# (fewer rounds, each moving the whole array); chapter 03 builds the ring and measures its rounds.
#
# ## What you measured
#
# Each formula of this chapter beside the number your run produced.

# %%
ar4, ag4 = timings[1], timings[2]
rows = [
    ("one message, 64 B … 16 MiB", "t = α + S/β", model.describe()),
    ("all-reduce = reduce-scatter + all-gather", "equal on every rank", f"{sum(same)}/{len(same)} ranks"),
    (
        "all-reduce N=4, 4 MiB: time",
        f"2(N−1)(α+S/(Nβ)) = {collectives.predict(model, ar4)[-1] * 1e3:.2f} ms",
        f"{ar4.seconds[-1] * 1e3:.2f} ms",
    ),
    (
        "all-gather N=4, 4 MiB: time",
        f"(N−1)(α+S/(Nβ)) = {collectives.predict(model, ag4)[-1] * 1e3:.2f} ms",
        f"{ag4.seconds[-1] * 1e3:.2f} ms",
    ),
]
if wire is not None:
    for name in collectives.COLLECTIVES[1:]:
        rows.append(
            (
                f"{name} N=4: most received / S",
                f"factor ≥ {collectives.bus_factor(name, WIRE_N):.3f}",
                f"{max(wire[name].received) / WIRE_S:.3f}",
            )
        )
    rows.append(
        (
            "broadcast N=4: root sent / S",
            f"tree: ⌈log₂N⌉ = {math.ceil(math.log2(WIRE_N))}",
            f"{wire['broadcast'].sent[0] / WIRE_S:.3f}",
        )
    )
for name, t in every.items():
    rows.append(
        (
            f"{name} N=4, 1 MiB: busbw",
            f"S/t × {collectives.bus_factor(name, 4):.3g}",
            f"{t.busbw[-1] / 1e9:.3f} GB/s",
        )
    )
rows += [
    ("tree broadcast N=8: rounds", "⌈log₂N⌉ = 3", f"{rounds['tree', 8]}"),
    ("flat broadcast N=8: rounds", "N−1 = 7", f"{rounds['flat', 8]}"),
    (
        "tree broadcast N=8, 4 KiB: time",
        f"⌈log₂N⌉(α+S/β) = {model.tree(8, 4096) * 1e3:.2f} ms",
        f"{bcast[8]['tree'].seconds[0] * 1e3:.2f} ms",
    ),
    (
        "flat broadcast N=8, 4 KiB: time",
        f"(N−1)(α+S/β) = {model.chain(8, 4096) * 1e3:.2f} ms",
        f"{bcast[8]['flat'].seconds[0] * 1e3:.2f} ms",
    ),
]
print(f"{'quantity':<40}  {'formula':<34}  {'measured':>22}")
for quantity, formula_text, value in rows:
    print(f"{quantity:<40}  {formula_text:<34}  {value:>22}")

# %% [markdown]
# **Next**: the exercises (`my_exercises/01_collectives.ipynb`) build broadcast, a ring all-gather, a
# tree reduce and an all-reduce from nothing but send and recv.
