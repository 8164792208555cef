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
# # 03 · Ring all-reduce and bucketed DDP
#
# Data parallelism (chapter 02) spends its communication on one collective: an **all-reduce** of
# the gradients after every backward pass. This chapter builds that all-reduce from nothing but
# send and recv, in four ways, and measures why one of them — the **ring** — is what gloo and
# NCCL use for large arrays. Then it wraps the all-reduce into **buckets** that run while backward is
# still computing, the way PyTorch's `DistributedDataParallel` does.
#
# Notation: **N** ranks, each holding a tensor of **K** elements (S = 4K bytes in fp32); all-reduce
# leaves the element-wise sum on every rank.
#
# | algorithm | what happens | sent per rank | rounds |
# |---|---|---|---|
# | naive (parameter server) | everyone sends K to rank 0, which adds and sends the sum back | root: (N−1)·K, others: K | 2(N−1) |
# | unchunked ring | N−1 steps; each passes a whole tensor of K to its right neighbour | (N−1)·K | N−1 |
# | tree | chapter 01's binomial tree twice: reduce to rank 0, broadcast back | rank 0: ⌈log₂N⌉·K | 2⌈log₂N⌉ |
# | **ring** | cut into N chunks: reduce-scatter (N−1 steps) + all-gather (N−1 steps), one chunk of K/N per step | 2(N−1)/N·K | 2(N−1) |
#
# The naive root, the unchunked ring and the tree's root move more data per rank the more ranks
# join; the ring's 2(N−1)/N·K stays below 2K for any N, and every rank does the same work. A
# **round** is one message time: in a round a rank sends at most one message and receives at
# most one, and a message that needs what an earlier one brought goes in a later round. Rounds
# are what the latency α of chapter 01's α–β model is paid for: the tree's grow with log₂N, the
# ring's with N, so on small arrays and many ranks the tree wins (section 4).

# %%
import inspect
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from course_lib import alpha_beta, comm, ddp, launch, models, viz
from course_lib.collectives import format_bytes, time_algorithms

# %% [markdown]
# ## 1. Four all-reduces from send/recv, all correct
#
# All four live in `course_lib/ring_allreduce.py` and sum a tensor in place, like `dist.all_reduce`. On
# whole numbers the sums must be *exactly* equal to the built-in's; K = 10 on N = 4 ranks also
# tests chunks of unequal size (3, 3, 2, 2 elements).


# %%
def compare_with_builtin(k):
    rank = dist.get_rank()
    x = torch.randint(-100, 100, (k,), generator=torch.Generator().manual_seed(rank))
    expected = x.clone()
    dist.all_reduce(expected)
    return {name: torch.equal(fn(x.clone()), expected) for name, fn in comm.ALL_REDUCES.items()}


equal = launch.run(compare_with_builtin, 4, 10)
print("equal to dist.all_reduce on every rank:", {name: all(r[name] for r in equal) for name in equal[0]})
assert all(all(r.values()) for r in equal), equal

# %% [markdown]
# ## 2. The ring, step by step
#
# Cut each rank's tensor into N chunks. **Reduce-scatter**, N−1 steps: at step s, rank r sends
# chunk (r−s−1) mod N to its right neighbour and *adds* the chunk arriving from its left. Every
# chunk travels around the ring collecting one rank's contribution per hop, and after N−1 steps
# rank r holds the finished sum of chunk r. **All-gather**, N−1 more steps: each rank passes the
# finished chunks on; now arriving chunks *replace* what was there. In every one of the 2(N−1)
# steps every rank sends one chunk and receives one, so no link and no rank is busier than another.
#
# The pictures are the real code at work: `comm.record_ring_steps(N)` runs `comm.ring_all_reduce`
# on N ranks with K = N (one number per chunk) and copies each rank's tensor whenever the ring
# starts a step (a step begins with a send). Rank r starts with 10·r + c in chunk c; a cell's
# stripes are the ranks whose numbers have been added into it.

# %%
ring_steps = comm.record_ring_steps(3)
assert all(
    torch.equal(ring_steps.values[r][-1], ring_steps.values[0][-1]) for r in range(3)
)  # one sum everywhere
viz.plot_ring_steps(ring_steps)

# %% [markdown]
# Step through it yourself: choose N, then drag the step slider or press ▶ to play. After
# N−1 steps the diagonal (rank r, chunk r) holds the finished sums — that is the reduce-scatter;
# the all-gather then copies them around. (Each new N launches its ranks once.)

# %%
viz.ring_explorer(world_size=4)

# %% [markdown]
# ## 3. Bytes per rank, measured
#
# `comm.count_traffic()` counts, inside a rank, the **payload** bytes each send/recv call was asked
# to move (exact), and the **wire** bytes that crossed the rank's TCP connections, read from the
# kernel (they include gloo's small message headers). Each algorithm sums K = 13 440 floats
# (S = 52.5 KiB; 13 440 is divisible by every N from 2 to 8) on N = 2 … 8 ranks. Every rank of
# these algorithms receives as much as it sends, so wire bytes *received* — the steadier of the
# kernel's two counters — stand for both. All four also send a tiny header
# (`comm.HEADER_BYTES` = 80 B) to the right neighbour — the ring beside its first chunk, the others
# before any data — so that ranks holding different shapes or dtypes fail with a clear error
# instead of a wrong sum.

# %%
K = 13_440


def traffic_of_each_algorithm(k):
    result = {}
    for name in ("ring", "unchunked ring", "naive", "tree"):
        x = torch.ones(k)
        dist.barrier()  # nobody's earlier bytes are still on their way
        with comm.count_traffic() as traffic:
            comm.ALL_REDUCES[name](x)
        result[name] = (traffic.payload_sent, traffic.received)
    return result


world_sizes = list(range(2, 9))
traffic = {n: launch.run(traffic_of_each_algorithm, n, K) for n in world_sizes}

S = 4 * K
formula = {  # bytes sent by (algorithm, which ranks), without the header
    ("ring", "every rank"): lambda n: 2 * (n - 1) / n * S,
    ("unchunked ring", "every rank"): lambda n: (n - 1) * S,
    ("naive", "root"): lambda n: (n - 1) * S,
    ("naive", "others"): lambda n: S,
    ("tree", "rank 0"): lambda n: math.ceil(math.log2(n)) * S,
}
RANKS = {
    "every rank": lambda n: range(n),
    "root": lambda n: [0],
    "rank 0": lambda n: [0],
    "others": lambda n: range(1, n),
}


def measured_sent(name, who, n):
    """The largest payload any of these ranks sent (without the header), and its wire bytes received."""
    ranks = RANKS[who](n)
    payload = max(traffic[n][r][name][0] for r in ranks) - comm.HEADER_BYTES
    wire = max(traffic[n][r][name][1] for r in ranks) if traffic[n][0][name][1] is not None else None
    return payload, wire


print("payload bytes sent per rank, header left out (the largest over the ranks in each column)")
COLUMNS = ["ring", "unchunked ring", "naive: root", "naive: others", "tree: rank 0"]
print(f"{'N':>2} " + "".join(f"{c:>15}" for c in COLUMNS))
for n in world_sizes:
    row = [measured_sent(name, who, n)[0] for name, who in formula]
    print(f"{n:>2} " + "".join(f"{got:>15,}" for got in row))
    for (name, who), got in zip(formula, row):
        assert got == formula[name, who](n), (n, name, who, got)
print("every number above equals its formula")

# %%
series = {
    (name, who): dict(
        formula=[f(n) for n in world_sizes],
        payload=[measured_sent(name, who, n)[0] for n in world_sizes],
        wire=None
        if measured_sent(name, who, 2)[1] is None
        else [measured_sent(name, who, n)[1] for n in world_sizes],
    )
    for (name, who), f in formula.items()
}
viz.plot_bytes_per_rank(world_sizes, S, series)

# %% [markdown]
# The ring's line flattens toward 2·S: adding ranks barely adds bytes per rank. The unchunked
# ring and the naive root grow linearly, the tree's root with ⌈log₂N⌉. The naive root also
# *receives* (N−1)·S, through one link; the others send only S — but they all wait for the
# root. The wire figures sit a little above the payload: gloo wraps each message in a small header.
#
# ## 4. Time: rounds pay α, bytes pay 1/β
#
# Chapter 01's α–β model charges a message of S bytes α + S/β. An algorithm that needs R rounds,
# each moving S′ bytes per rank, takes about R·(α + S′/β):
#
# | | rounds | bytes per round | α–β time |
# |---|---|---|---|
# | ring | 2(N−1) | S/N | 2(N−1)·α + 2(N−1)/N·S/β |
# | tree (reduce, then broadcast) | 2⌈log₂N⌉ | S | 2⌈log₂N⌉·α + 2⌈log₂N⌉·S/β |
#
# Each half of the tree — a reduce or a broadcast — takes ⌈log₂N⌉ rounds (chapter 01), so its
# latency term grows with log₂N where the ring's grows with N: trees win on small, latency-bound
# arrays; the ring, whose bytes per rank stay below 2S, wins on large ones. (NCCL's trees cut the
# array into small pieces and pipeline them down and up a pair of binary trees, which keeps the
# logarithmic latency without paying ⌈log₂N⌉·S; ours moves the whole array in every round.)
#
# **Rounds, counted exactly.** Our ring posts its receives ahead of time, so the order of its
# calls does not say when it waits. `comm.count_rounds` therefore stamps every message with the
# round it is sent in (an 8-byte stamp ahead of it); a receiver learns the round when it waits
# for the message, and its next send goes in a later round. The largest round over all ranks is
# exact on any machine, however loaded. (Both algorithms send a shape header to a neighbour: one
# more message, the + 1. The tree waits for it before its first round; the ring sends it just
# ahead of its first chunk, so it costs the ring a message, not a round trip.)

# %%
rounds = {n: comm.count_rounds(n, names=("ring", "tree")) for n in (2, 3, 4, 5, 8)}
print(f"{'N':>2} {'ring rounds':>11} {'2(N−1)+1':>9} {'tree rounds':>11} {'2⌈log₂N⌉+1':>11}")
for n, got in rounds.items():
    ring_formula, tree_formula = 2 * (n - 1) + 1, 2 * math.ceil(math.log2(n)) + 1
    print(f"{n:>2} {got['ring']:>11} {ring_formula:>9} {got['tree']:>11} {tree_formula:>11}")
    assert got["ring"] == ring_formula and got["tree"] == tree_formula, (n, got)

# %% [markdown]
# **Times, predicted and measured.** First α and β for this machine, fitted as in chapter 01 (to
# the best of 7 batches, a few sizes to stay quick; the ranks' threads run as SCHED_BATCH while
# they measure, as during our all-reduces — see "Where the ring's time goes" below for why),
# then each all-reduce timed for S = 4 KiB …
# 4 MiB on N = 2 and 4, and at 4 KiB on N = 8, where the ring needs 15 rounds and the tree 7.
# Each size runs in 7 batches that take turns between the algorithms, so a busy moment hits all
# alike; the table shows the α–β prediction beside the best batch and the median.

# %%
pp = alpha_beta.measure_point_to_point(
    [64, 4096, 256 * 1024, 4 << 20], min_seconds=0.05, batch_scheduling=True
)
model = alpha_beta.fit(pp.nbytes, pp.fastest)
print("fitted to the best batches:", model.describe())


def predict(name, n, nbytes):
    """α–β seconds, the shape check's extra round included; None for gloo's own."""
    header = model.message(comm.HEADER_BYTES)
    if name == "ring":
        return model.ring_all_reduce(n, nbytes) + header
    if name == "tree":
        return 2 * model.tree(n, nbytes) + header
    return None


ALGORITHMS = ("ring", "tree", "dist.all_reduce")
times = {
    n: comm.time_all_reduce(
        n, [4096, 64 * 1024, 1 << 20, 4 << 20], names=ALGORITHMS, min_seconds=0.1, batches=7
    )
    for n in (2, 4)
}
times[8] = comm.time_all_reduce(8, [4096], names=ALGORITHMS, min_seconds=0.1, batches=7)

print(f"{'N':>2} {'S':>7} {'algorithm':<16} {'α–β':>9} {'best':>9} {'median':>9}   (ms)")
for n, by_name in times.items():
    for i, nbytes in enumerate(by_name["ring"].nbytes):
        for name, t in by_name.items():
            p = predict(name, n, nbytes)
            print(
                f"{n:>2} {format_bytes(nbytes):>7} {name:<16} {'—' if p is None else f'{p * 1e3:.3f}':>9} "
                f"{t.fastest[i] * 1e3:>9.3f} {t.seconds[i] * 1e3:>9.3f}"
            )

# %%
viz.plot_all_reduce_times(times, predict)

# %% [markdown]
# How to read your numbers (they differ from run to run on a busy machine; the rounds above do not):
#
# * **Small S is latency.** At 4 KiB the bytes cost almost nothing; the time is rounds × the
#   cost of one round. On N = 8 the tree's 7 rounds should beat the ring's 15. But a round here
#   costs more than the fitted α: α was measured between 2 ranks, while 8 ranks on a few cores
#   also wait, every round, for a core to run on.
# * **Large S is bandwidth.** At 4 MiB the model charges the ring 2(N−1)/N·S/β and the tree,
#   whose rounds each move the whole array, 2⌈log₂N⌉·S/β: on N = 4, 1.5·S/β against 4·S/β. The
#   ring also *adds* its chunks, which the model leaves out, and on a laptop the ranks share the
#   cores that do both.
# * **Our ring against gloo's.** `dist.all_reduce` on CPU is gloo's ring too — the same
#   2(N−1)/N·S per rank, in at least as many steps — but in C++, where each step costs far less
#   than a trip through Python and a wake-up of the next rank; gloo also cuts every chunk into
#   segments, so one segment's addition overlaps the next one's transfer (ours cuts chunks over
#   `comm.PIECE_BYTES` = 4 MiB into pieces for the same reason). Below, "Where the ring's time
#   goes" shows what it took for ours to keep up; `make bench` compares them at 4 KiB–64 MiB.
#   With more ranks than cores, gloo's own may even come out slower than ours: our all-reduces
#   run their rank's threads as SCHED_BATCH while they work (explained below) and gloo's run with
#   the default policy. One `make bench` run timed gloo's at N = 4, 4 KiB both ways: 5.3 ms with
#   the default policy, 1.2 ms with *every* thread of every rank SCHED_BATCH.

# %%
busbw_ratio = {
    n: [r / b for r, b in zip(by_name["ring"].busbw, by_name["dist.all_reduce"].busbw)]
    for n, by_name in times.items()
    if n in (2, 4)
}
for n, ratio in busbw_ratio.items():
    print(f"N={n}: our ring's bus bandwidth ÷ gloo's, per size: " + ", ".join(f"{x:.2f}" for x in ratio))

# %% [markdown]
# ### Where the ring's time goes
#
# The unit of our ring is one **step**: send a chunk right, receive one from the left, through
# `dist.isend`/`dist.irecv` (`comm.ring_step`). Timed alone (4 KiB, N = 2, batches as above), one
# step sets the floor: a 2-rank ring needs 2(N−1) = 2 of them one after another, plus its header.

# %%
step = time_algorithms("send/recv", {"step": comm.ring_step}, 2, [4096], min_seconds=0.05, batches=5)["step"]
ring_4k, gloo_4k = times[2]["ring"].seconds[0], times[2]["dist.all_reduce"].seconds[0]
print(f"one ring step (4 KiB send/recv, N=2): {step.seconds[0] * 1e3:.3f} ms (median batch)")
print(f"our ring, N=2, 4 KiB: {ring_4k * 1e3:.3f} ms = {ring_4k / step.seconds[0]:.1f} steps")
print(f"gloo's all-reduce, N=2, 4 KiB: {gloo_4k * 1e3:.3f} ms = {gloo_4k / step.seconds[0]:.1f} steps")

# %% [markdown]
# Measured for issue 21, per call of the ring *as it was before* (a round trip for the
# header, then each phase posting its receives only when it started) and of gloo's
# `dist.all_reduce`, N = 2, 16 KiB, on the course's shared 2-core machine while other programs ran
# (load average 9–16, so every figure is inflated; the comparisons between columns are what
# matter). CPU per thread from `/proc/self/task/*/stat`, system calls from `strace -f -c`, where
# the gloo thread spends its time from `perf record`:
#
# | per call | our ring (before) | gloo `all_reduce` |
# |---|---|---|
# | CPU, our Python thread | 1.3–1.7 ms | 0.23 ms (it only waits) |
# | CPU, gloo's I/O thread (`gloo_tcp_loop`) | 1.3–3.2 ms | 0.57–0.63 ms |
# | CPU, gloo's two worker threads | — | 0.07–0.13 ms each |
# | system calls: futex / epoll_wait / recvfrom / writev | 20 / 15.6 / 16 / 9 | 27 / 10 / 19 / 12 |
# | messages one after another | 3 exchanges (header, reduce-scatter, all-gather) | 2 steps (in segments, in C++) |
#
# * **Not the kernel.** Both make about the same system calls per call.
# * **Spinning, not waiting.** `perf` finds gloo's I/O thread in `epoll_wait` and
#   `pthread_mutex_trylock`, over and over: when data arrives for a connection whose lock our Python
#   thread holds (it takes it inside every `isend`/`irecv`), gloo's loop tries the lock, gives up
#   and asks epoll again at once. A Python thread that burns a millisecond per call is often
#   descheduled *while* holding that lock, and then the I/O thread spins for the rest of the
#   scheduler's time slice, on the same two cores the other rank needs. That is the medians of
#   several ms where the best calls take well under one.
# * **Rounds.** The header's round trip before any data was one more exchange in series.
#
# What changed: the header now travels beside the first chunk (a message, not a round trip);
# every chunk message carries a **tag** computed from the shape and dtype, so a neighbour holding
# another tensor can never land its bytes in our chunks while the header is on its way (the
# header check then raises); receives are posted ahead of the sends that fill them (two steps
# ahead in the reduce-scatter, into two scratch slots taken in turn, as gloo's ring does); chunks
# over 4 MiB go as pieces; and the ring changed how it **waits**, which mattered most.
#
# **What starts the spinning** is the scheduler. gloo's I/O thread sleeps until a message
# arrives; woken, an ordinary Linux thread may *preempt* the thread running on that core — which
# may be its own rank's Python thread, in the middle of an `isend` with the lock held. Linux's
# SCHED_BATCH policy removes exactly that: a SCHED_BATCH thread that wakes does not preempt; it
# runs when the running one blocks or its time slice ends. So each of our all-reduces (ring,
# reduce-scatter, all-gather, unchunked, naive, tree, and `comm.ring_step`) switches every thread
# of its rank to SCHED_BATCH for the call and back after (`_waiting_as_batch` in
# `course_lib/ring_allreduce.py`, about 25 µs a call). gloo's own all-reduce, whose Python thread
# only waits, runs with the default policy, as everything else in the course does. Measured by
# `make bench` on the 2-core machine (four runs, N = 2, 4 KiB, 400 calls in a row): with the
# switch a call of our ring took 0.49–0.58 ms and cost gloo's I/O thread 0.09–0.14 ms of CPU; the
# same ring without it 1.9–3.2 ms and 1.1–2.3 ms (gloo's own all-reduce: 0.66–1.7 ms and
# 0.30–0.85 ms). Interleaved with gloo's at 4–256 KiB, ours took 0.83–1.37× gloo's time on
# N = 2 and 0.27–1.02× on N = 4; without the switch, 0.95–8.6× and 0.88–4.0×. The header message
# costs little now: the same ring without it took 0.70–1.09× gloo's time on N = 2.
#
# **Large messages: the floor.** At 16 and 64 MiB both all-reduces move the same bytes over the
# same TCP connections, and on 2 cores the kernel's copies of those bytes are most of the work.
# `make bench` times the floor of that transport: the ring's 2(N−1) messages with every one
# posted at once, no additions and no step waiting for the one before (no ring can do that).
# gloo's all-reduce reached 0.64–0.89 of the floor's bus bandwidth, ours 0.77–0.93; ours ÷ gloo's
# was 0.92–1.36 over four runs (N = 2 and 4), above 1 in 9 of those 16 figures, and its CPU per call at
# 16 MiB 0.95–1.14× gloo's. The two rings are at parity on this transport; which one is ahead at
# a large size changes from run to run.
#
# The launch can also run *every* thread of every rank as SCHED_BATCH all the time: set
# `COURSE_SCHED_BATCH=1` in the environment before launching (`launch.schedule_as_batch`). It is
# not the default, because it moves every timing the course measures: the multi-rank training
# steps of chapter 09d ran 1.1–1.9× faster with it in the runs measured, and that chapter's
# step-time model, which prices messages with an α–β measured while ranks only exchange, then
# predicted only 35–65 % of their time. The cores were 92–95 % busy during those runs, so the
# model misses CPU work rather than waiting, and the ranks' own Python threads did 86–95 % of
# that work (gloo's threads the rest, with either policy); which of it the model leaves out is
# not yet found.

# %% [markdown]
# ## 5. Bucketed DDP: all-reduce while backward runs
#
# Chapter 02 all-reduced the gradients **after** backward. But backward produces gradients from
# the last layer to the first, and the last layer's gradient is final long before the first
# layer's. DDP therefore groups the gradients into **buckets** of about `bucket_cap_mb` and starts
# an **asynchronous** all-reduce (`async_op=True`) for each bucket the moment its last gradient
# arrives, while autograd computes the next ones. When backward finishes, it waits for the buckets
# and writes the averaged gradients back: `p.grad` is final when `loss.backward()` returns.
#
# * One bucket per parameter: many small messages (latency-bound, as in section 4).
# * One bucket for everything: nothing overlaps, all communication after backward.
#
# `course_lib.ddp.BucketedDDP(module, bucket_cap_mb=25.0)` does this with a hook per parameter
# (`register_post_accumulate_grad_hook`). Its bucket rule: walk the parameters from the last
# registered to the first, closing a bucket once it holds `bucket_cap_mb` or more:

# %%
print(inspect.getsource(ddp.assign_buckets))
mlp = models.make_mlp(d_model=16, d_hidden=64)
sizes_bytes = [p.numel() * 4 for p in mlp.parameters()]
print("parameters:", [name for name, _ in mlp.named_parameters()], "bytes:", sizes_bytes)
print("buckets with a 4000-byte cap:", ddp.assign_buckets(sizes_bytes, 4000))
assert ddp.assign_buckets(sizes_bytes, 4000) == [[3, 2], [1, 0]]

# %% [markdown]
# ### What torch's DDP does instead
#
# Torch's DDP (2.13, default options) does not trust the registration order. Its **first**
# backward pass all-reduces *one* bucket holding every gradient, while it records the order in
# which the gradients became ready. At the next forward it **rebuilds** the buckets by walking
# that recorded order with the same "close once it holds the cap" rule. And when `bucket_cap_mb`
# is left at its default (25 MiB), the first rebuilt bucket closes at just 1 MiB
# (`torch.distributed._DEFAULT_FIRST_BUCKET_BYTES`), so that the first all-reduce starts as early
# as possible; pass `bucket_cap_mb` yourself and every bucket gets that cap. (With
# `find_unused_parameters=True` the first pass is bucketed from the registration order instead.)
# `ddp.torch_ddp_buckets` watches it from a communication hook — DDP calls the hook once per
# bucket, in the order it reduces them — on the 8-layer MLP stack used below:

# %%
for cap in (None, 2.0):
    per_step, assigned = ddp.torch_ddp_buckets(cap, depth=8, d_model=256, d_hidden=1024, steps=2)
    print(
        f"bucket_cap_mb={cap}: torch's DDP, parameters per bucket: pass 1 {[len(b) for b in per_step[0]]}, "
        f"pass 2 {[len(b) for b in per_step[1]]}; first bucket of pass 2: {per_step[1][0]}"
    )
    assert len(per_step[0]) == 1  # the first pass: one bucket for everything
    if cap is None:  # default cap: the rebuilt first bucket closes at 1 MiB (fc2.weight is 1 MiB)
        assert per_step[1][0] == ["7.fc2.bias", "7.fc2.weight"]
    else:  # an explicit cap: after the rebuild, exactly our rule on this model
        assert per_step[1] == assigned
print("assign_buckets with a 2 MiB cap:", [len(b) for b in assigned], "parameters per bucket")

# %% [markdown]
# On this model the gradients become ready in exactly the reverse of the registration order
# (each layer's `fc2.bias`, `fc2.weight`, `fc1.bias`, `fc1.weight`, last layer first), so with an
# explicit cap DDP's rebuilt buckets *are* `assign_buckets`'s. They differ where the two orders
# differ — a model whose `forward` uses its layers in another order than `__init__` registered
# them — and in the first pass, and in the small first bucket at the default cap.
#
# ### Equal to torch's DDP and to one process
#
# Each rank builds the model with a *different* seed — `BucketedDDP` must broadcast rank 0's
# parameters first — and runs one backward on its shard of a batch. Its gradients are compared
# with torch's `DistributedDataParallel` on the same data, and with one process on the whole
# batch, for a tiny cap (one bucket per parameter), a middle one, and one bucket for all.


# %%
def gradients_three_ways(caps):
    rank, n = dist.get_rank(), dist.get_world_size()
    x, y = models.regression_data(8 * n)
    x, y = models.shard(x, rank, n), models.shard(y, rank, n)
    torch_ddp = DistributedDataParallel(models.make_mlp(seed=0))
    F.mse_loss(torch_ddp(x), y).backward()
    reference = [p.grad for p in torch_ddp.parameters()]
    ours = {}
    for cap in caps:
        model = ddp.BucketedDDP(models.make_mlp(seed=rank), bucket_cap_mb=cap)
        F.mse_loss(model(x), y).backward()
        ours[cap] = (len(model.buckets), [p.grad for p in model.parameters()])
    del torch_ddp  # a live DDP wrapper at process-group teardown can hang
    return reference, ours


caps = (1e-6, 0.004, 25.0)
single = models.make_mlp(seed=0)
x_all, y_all = models.regression_data(8 * 3)
F.mse_loss(single(x_all), y_all).backward()
results = launch.run(gradients_three_ways, 3, caps)
largest_difference = 0.0
for cap in caps:
    vs_ddp = vs_single = 0.0
    for reference, ours in results:  # every rank
        buckets, grads = ours[cap]
        for a, b, p in zip(grads, reference, single.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-5)
            vs_ddp = max(vs_ddp, (a - b).abs().max().item())
            vs_single = max(vs_single, (a - p.grad).abs().max().item())
    largest_difference = max(largest_difference, vs_ddp, vs_single)
    print(
        f"bucket_cap_mb={cap:<6g} {buckets} bucket{'s' * (buckets > 1)}: every gradient on every rank equal; "
        f"largest difference to torch DDP {vs_ddp:.1e}, to one process {vs_single:.1e}"
    )

# %% [markdown]
# ### A timeline of one backward pass
#
# `BucketedDDP` records, for its last backward pass, when each gradient appeared, when each
# bucket was **ready** (its last gradient in), when its all-reduce was **launched** and when it
# **finished** (a callback on the all-reduce's future). `ddp.record_timelines` runs an 8-layer MLP
# of 4.2 M parameters (16 MiB of gradients) on N = 2 ranks, with 2 MiB buckets and with one
# 100 MiB bucket:

# %%
timelines = ddp.record_timelines((2.0, 100.0), world_size=2, depth=8, d_model=256, d_hidden=1024)
small, whole = timelines[0][2.0], timelines[0][100.0]
last_gradient = {cap: t.grads[-1][1] for cap, t in timelines[0].items()}
# With 2 MiB buckets the first all-reduce starts while autograd still has gradients to compute;
# with one bucket nothing can start before the last gradient exists.
assert len(small.buckets) == 8 and small.buckets[0].launched < last_gradient[2.0]
assert len(whole.buckets) == 1 and whole.buckets[0].launched >= last_gradient[100.0]
viz.plot_bucket_timelines(timelines[0])

# %% [markdown]
# Read the two titles: the time from the end of autograd to `backward()` returning is the
# communication that was **not** hidden. With 2 MiB buckets the all-reduces start while autograd
# is still computing the earlier layers (asserted above: the first bucket is launched before the
# last gradient exists); with one bucket nothing can start before the very last gradient, so all
# of it comes after. How much is hidden varies from run to run on a laptop: both ranks, their
# gloo threads and everything else share a few CPU cores, so communicating during backward also
# slows backward down (the grey bar stretches, its ticks spread out).
#
# GPUs have the same effect, in smaller measure. NCCL runs each collective as a GPU kernel that
# occupies some of the streaming multiprocessors (how many is configurable: NCCL's `minCTAs` /
# `maxCTAs`) and uses memory bandwidth for its copies and additions, on the same GPU as the
# backward kernels. Overlap therefore hides the communication's *time* but slows the computation
# it runs beside somewhat; it is not free. `make bench` compares a training step of `BucketedDDP`
# with torch's DDP on the same model.
#
# ## 6. The code
#
# The whole ring, as `course_lib/ring_allreduce.py` has it: the public function starts a `_RingCall`
# (the input checked, the header on its way, the tag for this shape and dtype), then runs the two
# phases; each phase compares the left neighbour's header before it first waits for a chunk. Unlike the step-by-step
# version of the exercises, each phase posts all its receives first (`dist.irecv` returns at
# once), then works through the steps as the chunks arrive; posting each receive only at its
# step would make a neighbour's next chunk wait until this rank is done adding the last one. The
# tree beside it, for contrast.

# %%
for fn in (
    comm.ring_all_reduce,
    comm._RingCall,
    comm._reduce_scatter,
    comm._all_gather,
    comm.tree_all_reduce,
):
    print(inspect.getsource(fn))

# %% [markdown]
# ## What you measured
#
# Each formula of this chapter beside the number your run produced (S = 52.5 KiB for the bytes).

# %%
n4, t4 = 4, times[4]
i_small, i_large = 0, len(t4["ring"].nbytes) - 1
rows = [
    (
        "four all-reduces vs dist.all_reduce",
        "equal, exactly",
        f"{sum(all(r.values()) for r in equal)}/4 ranks",
    ),
    (
        "ring bytes sent per rank, N=8",
        f"2(N−1)/N·S = {formula['ring', 'every rank'](8):,.0f} B",
        f"{measured_sent('ring', 'every rank', 8)[0]:,} B",
    ),
    (
        "unchunked ring bytes per rank, N=8",
        f"(N−1)·S = {formula['unchunked ring', 'every rank'](8):,.0f} B",
        f"{measured_sent('unchunked ring', 'every rank', 8)[0]:,} B",
    ),
    (
        "naive: root sends, N=8",
        f"(N−1)·S = {formula['naive', 'root'](8):,.0f} B",
        f"{measured_sent('naive', 'root', 8)[0]:,} B",
    ),
    (
        "tree: rank 0 sends, N=8",
        f"⌈log₂N⌉·S = {formula['tree', 'rank 0'](8):,.0f} B",
        f"{measured_sent('tree', 'rank 0', 8)[0]:,} B",
    ),
    ("ring rounds, N=8", "2(N−1) + 1 = 15", f"{rounds[8]['ring']}"),
    ("tree rounds, N=8", "2⌈log₂N⌉ + 1 = 7", f"{rounds[8]['tree']}"),
    ("α: one small message", "t = α + S/β, S/β ≈ 0", f"{model.alpha * 1e6:.0f} µs"),
    ("β: large messages", "t = α + S/β", f"{model.beta / 1e9:.3g} GB/s"),
]
for n in (4, 8):
    for name in ("ring", "tree"):
        rows.append(
            (
                f"{name}, N={n}, 4 KiB: time (best batch)",
                f"α–β: {predict(name, n, times[n][name].nbytes[0]) * 1e3:.2f} ms",
                f"{times[n][name].fastest[0] * 1e3:.2f} ms",
            )
        )
rows += [
    (
        f"ring, N=4, {format_bytes(t4['ring'].nbytes[i_large])}: time (best batch)",
        f"2(N−1)(α+S/(Nβ))+α = {predict('ring', 4, t4['ring'].nbytes[i_large]) * 1e3:.2f} ms",
        f"{t4['ring'].fastest[i_large] * 1e3:.2f} ms",
    ),
    ("ring ÷ gloo busbw, N=4, 4 KiB", "same ring; ours in Python", f"{busbw_ratio[4][i_small]:.2f}"),
    ("one ring step, N=2, 4 KiB", "the floor: ring ≥ 2 steps", f"{step.seconds[0] * 1e3:.2f} ms"),
    ("ring, N=2, 4 KiB, in steps", "2(N−1) steps + the header", f"{ring_4k / step.seconds[0]:.1f}"),
    (
        f"ring ÷ gloo busbw, N=4, {format_bytes(t4['ring'].nbytes[i_large])}",
        "same ring; ours in Python",
        f"{busbw_ratio[4][i_large]:.2f}",
    ),
    (
        "torch DDP buckets, pass 2, cap 2 MiB",
        "= assign_buckets (reverse order)",
        f"{len(per_step[1])}, {'equal' if per_step[1] == assigned else 'differ'}",
    ),
    ("BucketedDDP vs torch DDP, one process", "equal (1e-5)", f"{largest_difference:.1e}"),
    (
        "not hidden after backward, 2 MiB buckets",
        "part: the rest overlaps backward",
        f"{(small.synced - small.backward_done) * 1e3:.0f} ms",
    ),
    (
        "not hidden after backward, one bucket",
        "all of the all-reduce",
        f"{(whole.synced - whole.backward_done) * 1e3:.0f} ms",
    ),
]
print(f"{'quantity':<42}  {'formula':<38}  {'measured':>12}")
for quantity, formula_text, value in rows:
    print(f"{quantity:<42}  {formula_text:<38}  {value:>12}")

# %% [markdown]
# Glossary: 环形全归约 ring all-reduce · 归约散射 reduce-scatter · 全收集 all-gather · 树形 / 二项树
# tree (binomial) · 延迟–带宽模型 (α–β 模型) α–β model · 梯度桶 bucket · 计算通信重叠
# communication/computation overlap.
#
# **Next**: the exercises (`my_exercises/03_ring_allreduce.ipynb`) have you write the reduce-scatter,
# the all-gather, the ring all-reduce and DDP's bucket assignment yourself.
