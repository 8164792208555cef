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
# send and recv, in three ways, and measures why the third one — the **ring** — is what gloo and
# NCCL use for large arrays. Then it wraps the all-reduce into **buckets** that run while backward is
# still computing, the way PyTorch's `DistributedDataParallel` does.
#
# Notation: **N** ranks, each holding a tensor of **K** elements (S = 4K bytes in fp32); all-reduce
# leaves the element-wise sum on every rank.
#
# | algorithm | what happens | sent per rank |
# |---|---|---|
# | naive (parameter server) | everyone sends K to rank 0, which adds and sends the sum back | root: (N−1)·K, others: K |
# | unchunked ring | N−1 steps; each passes a whole tensor of K to its right neighbour | (N−1)·K |
# | ring | cut into N chunks: reduce-scatter (N−1 steps) + all-gather (N−1 steps), one chunk of K/N per step | 2(N−1)/N·K |
#
# The naive root and the unchunked ring move more data per rank the more ranks join; the ring's
# 2(N−1)/N·K stays below 2K for any N, and every rank does the same work.

# %%
import inspect

import ipywidgets as widgets
import matplotlib
import torch
import torch.distributed as dist
import torch.nn.functional as F
from IPython.display import display
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from torch.nn.parallel import DistributedDataParallel

from course_lib import comm, ddp, launch, models, viz
from course_lib.collectives import format_bytes

# %% [markdown]
# ## 1. Three all-reduces from send/recv, all correct
#
# All three live in `course_lib/comm.py` and sum a tensor in place, like `dist.all_reduce`. On
# whole numbers the sums must be *exactly* equal to the built-in's; K = 10 on N = 4 ranks also
# tests chunks of unequal size (3, 3, 2, 2 elements).

# %%
def compare_with_builtin(k):
    rank = dist.get_rank()
    x = torch.randint(-100, 100, (k,), generator=torch.Generator().manual_seed(rank))
    expected = x.clone()
    dist.all_reduce(expected)
    return {name: torch.equal(fn(x.clone()), expected) for name, fn in comm.ALL_REDUCES.items()}


launch.run(compare_with_builtin, 4, 10)[0]

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
# To watch the real code (`comm.ring_all_reduce`) run, each rank below takes a copy of its tensor
# every time the ring calls `dist.isend`, i.e. at the start of every step. (The ring posts all its
# receives up front — section 6 says why — so the spy also holds each arriving chunk back until
# the ring waits for it; otherwise a fast neighbour's chunk could show up a step early.) With
# K = N, each chunk is one number. Rank r starts with 10·r + c in chunk c; a cell's stripes are
# the ranks whose numbers have been added into it.

# %%
class LandsOnWait:
    """A receive request whose data reaches its tensor only when it is waited for."""

    def __init__(self, request, staging, target):
        self.request, self.staging, self.target = request, staging, target

    def wait(self, *args, **kwargs):
        self.request.wait(*args, **kwargs)
        self.target.copy_(self.staging)
        return True


def ring_snapshots():
    """Run comm.ring_all_reduce on K = N elements; record this rank's tensor at the start of every step."""
    rank, n = dist.get_rank(), dist.get_world_size()
    real_isend, real_irecv = dist.isend, dist.irecv
    recorded = []
    # First the values, then 2**rank: sums of powers of two say who contributed (a bit mask).
    for data in (10.0 * rank + torch.arange(n), torch.full((n,), 2**rank)):
        states, sent = [], []

        def is_chunk(tensor):
            return tensor.untyped_storage().data_ptr() == data.untyped_storage().data_ptr()

        def recording_isend(tensor, *args, **kwargs):
            if is_chunk(tensor):  # not the header
                states.append(data.clone())
                sent.append(tensor.storage_offset())  # K = N: the element index is the chunk index
            return real_isend(tensor, *args, **kwargs)

        def staged_irecv(tensor, *args, **kwargs):
            if not is_chunk(tensor):
                return real_irecv(tensor, *args, **kwargs)
            staging = torch.empty_like(tensor)
            return LandsOnWait(real_irecv(staging, *args, **kwargs), staging, tensor)

        dist.isend, dist.irecv = recording_isend, staged_irecv
        try:
            comm.ring_all_reduce(data)
        finally:
            dist.isend, dist.irecv = real_isend, real_irecv
        recorded.append((states + [data.clone()], sent))
    return recorded


_snapshots = {}


def snapshots(n):
    """Every rank's states and sends on n ranks (cached: each N launches once)."""
    if n not in _snapshots:
        _snapshots[n] = launch.run(ring_snapshots, n)
    return _snapshots[n]


def draw_ring_step(ax, snaps, step, notes=True):
    """Every rank's chunks after `step` of the 2(N−1) steps; the chunks that just arrived outlined."""
    n = len(snaps)
    values = [rank_snaps[0][0][step] for rank_snaps in snaps]
    masks = [rank_snaps[1][0][step] for rank_snaps in snaps]
    phase = "start" if step == 0 else "reduce-scatter" if step <= n - 1 else "all-gather"
    title = f"after step {step} of {2 * (n - 1)}: {phase}" if step else "before step 1"
    viz.draw_rank_rows(ax, values, masks, n, title, lambda r: f"rank {r}")
    if step:
        for rank in range(n):
            left = (rank - 1) % n
            chunk = snaps[left][0][1][step - 1]  # what the left neighbour sent in this step
            y = n - 1 - rank
            ax.add_patch(Rectangle((chunk, y + 0.05), 1, 0.9, fill=False, edgecolor="black", linewidth=2.5))
            if notes:
                verb = "+=" if step <= n - 1 else "="
                ax.text(n + 0.15, y + 0.5, f"chunk {chunk} {verb} rank {left}'s", va="center", fontsize=9)
    if notes:  # the title over the chunks, not over the notes beside them
        ax.set_title("")
        ax.set_title(title, loc="left", fontsize=10)
    ax.set_xlim(0, n + (2.6 if notes else 0))
    ax.set_xticks([c + 0.5 for c in range(n)], [f"chunk {c}" for c in range(n)], fontsize=8)
    ax.tick_params(bottom=False)


def rank_legend(fig, n):
    fig.legend(handles=[Patch(color=viz.rank_color(r, n), label=f"from rank {r}") for r in range(n)],
               loc="outside lower center", ncols=n, fontsize=8, frameon=False)


def ring_figure(n, step):
    fig = viz.CourseFigure(figsize=(0.9 * n + 4.2, 0.5 * n + 1.7), layout="constrained")
    draw_ring_step(fig.subplots(), snapshots(n), step)
    rank_legend(fig, n)
    return fig


def ring_all_steps(n):
    """Small multiples: the state before the ring and after each of its 2(N−1) steps."""
    steps = 2 * (n - 1) + 1
    fig = viz.CourseFigure(figsize=(2.3 * steps, 0.5 * n + 1.5), layout="constrained")
    for step, ax in enumerate(fig.subplots(1, steps)):
        draw_ring_step(ax, snapshots(n), step, notes=False)
        ax.set_title(ax.get_title().replace(": ", "\n"), fontsize=9)
        if step:
            ax.set_yticks([])
    fig.suptitle(f"ring all-reduce on N = {n}: outlined = the chunk each rank just received "
                 f"(added in reduce-scatter, copied in all-gather)", fontsize=10)
    rank_legend(fig, n)
    return fig


ring_all_steps(3)

# %% [markdown]
# Step through it yourself: choose N, then drag the step slider or press ▶ to play. After
# N−1 steps the diagonal (rank r, chunk r) holds the finished sums — that is the reduce-scatter;
# the all-gather then copies them around.

# %%
n_slider = widgets.IntSlider(value=4, min=2, max=6, description="N ranks")
step_slider = widgets.IntSlider(value=0, min=0, max=6, description="step")
play = widgets.Play(value=0, min=0, max=6, interval=900, description="play")
widgets.jslink((play, "value"), (step_slider, "value"))


def new_world_size(change):
    step_slider.max = play.max = 2 * (change["new"] - 1)


n_slider.observe(new_world_size, names="value")
ring_picture = widgets.interactive_output(
    lambda n, step: display(ring_figure(n, min(step, 2 * (n - 1)))), dict(n=n_slider, step=step_slider))
display(widgets.HBox([n_slider, play, step_slider]), ring_picture)

# %% [markdown]
# ## 3. Bytes per rank, measured
#
# `comm.count_traffic()` counts, inside a rank, the **payload** bytes each send/recv call was asked
# to move (exact), and the **wire** bytes that crossed the rank's TCP connections, read from the
# kernel (they include gloo's small message headers). Each algorithm sums K = 13 440 floats
# (S = 52.5 KiB; 13 440 is divisible by every N from 2 to 8) on N = 2 … 8 ranks. Every rank of
# these algorithms receives as much as it sends, so wire bytes *received* — the steadier of the
# kernel's two counters — stand for both. All three also send a tiny header
# (`comm.HEADER_BYTES` = 80 B) to the right neighbour first, so that ranks holding different
# shapes or dtypes fail with a clear error instead of a wrong sum.

# %%
K = 13_440


def traffic_of_each_algorithm(k):
    result = {}
    for name in ("ring", "unchunked ring", "naive"):
        x = torch.ones(k)
        dist.barrier()  # nobody's earlier bytes are still on their way
        with comm.count_traffic() as traffic:
            comm.ALL_REDUCES[name](x)
        result[name] = (traffic.payload_sent, traffic.received)
    return result


world_sizes = list(range(2, 9))
traffic = {n: launch.run(traffic_of_each_algorithm, n, K) for n in world_sizes}

S = 4 * K
formula = {  # bytes sent by (algorithm, which rank)
    ("ring", "every rank"): lambda n: 2 * (n - 1) / n * S + comm.HEADER_BYTES,
    ("unchunked ring", "every rank"): lambda n: (n - 1) * S + comm.HEADER_BYTES,
    ("naive", "root"): lambda n: (n - 1) * S + comm.HEADER_BYTES,
    ("naive", "others"): lambda n: S + comm.HEADER_BYTES,
}
print("payload bytes sent per rank (the largest over the ranks in each column); ✔ = equal to the formula")
print(f"{'N':>2} {'ring':>14} {'unchunked ring':>16} {'naive: root':>16} {'naive: others':>16}")
for n in world_sizes:
    cells = []
    for (name, who), f in formula.items():
        ranks = [0] if who == "root" else range(1, n) if who == "others" else range(n)
        measured = max(traffic[n][r][name][0] for r in ranks)
        cells.append(f"{measured:>10,} {'✔' if measured == f(n) else '✘':>2}   ")
    print(f"{n:>2} " + "".join(cells))

# %%
def plot_bytes_per_rank():
    fig = viz.CourseFigure(figsize=(8.5, 4.6), layout="constrained")
    ax = fig.subplots()
    # (colour, line style, x offset): the unchunked ring and the naive root send the same, side by side.
    styles = {("ring", "every rank"): ("tab:green", "-", 0), ("unchunked ring", "every rank"): ("tab:red", "--", -0.1),
              ("naive", "root"): ("tab:purple", "-", 0.1), ("naive", "others"): ("tab:gray", "-", 0)}
    series = []
    for (name, who), (color, linestyle, dx) in styles.items():
        ranks = (lambda n: [0]) if who == "root" else (lambda n: range(1, n)) if who == "others" \
            else (lambda n: range(n))
        xs = [n + dx for n in world_sizes]
        ax.plot(world_sizes, [(formula[name, who](n) - comm.HEADER_BYTES) / S for n in world_sizes],
                linestyle=linestyle, color=color, alpha=0.7)
        ax.plot(xs, [max(traffic[n][r][name][0] for r in ranks(n)) / S for n in world_sizes], "o", color=color)
        ax.plot(xs, [max(traffic[n][r][name][1] for r in ranks(n)) / S for n in world_sizes], "x", color=color,
                markersize=9)
        series.append(Line2D([], [], color=color, linestyle=linestyle, label=f"{name}, {who}"))
    kinds = [Line2D([], [], color="0.3", label="formula"),
             Line2D([], [], color="0.3", marker="o", linestyle="", label="payload sent, measured"),
             Line2D([], [], color="0.3", marker="x", markersize=9, linestyle="", label="wire bytes received, measured")]
    ax.add_artist(ax.legend(handles=series, loc="upper left", fontsize=8.5, title="algorithm", title_fontsize=8.5))
    ax.legend(handles=kinds, loc="center left", fontsize=8.5)
    ax.set_xlabel("N ranks")
    ax.set_ylabel("bytes per rank / S")
    ax.set_title(f"one all-reduce of S = {format_bytes(S)}; ring: 2(N−1)/N·S, unchunked ring and naive "
                 "root: (N−1)·S, naive others: S", fontsize=10)
    ax.grid(True, alpha=0.3)
    return fig


plot_bytes_per_rank()

# %% [markdown]
# The ring's line flattens toward 2·S: adding ranks barely adds bytes per rank. The unchunked
# ring and the naive root grow linearly. The naive root also *receives* (N−1)·S, through one
# link; the others send only S — but they all wait for the root. The wire figures sit a little
# above the payload: gloo wraps each message in a small header.
#
# ## 4. Time: our ring against the built-in
#
# Bytes are not time. On a laptop the ranks are processes sharing a few CPU cores, and every step
# of our ring goes through Python and wakes up the next rank; `dist.all_reduce` (gloo's C++ ring)
# does the same arithmetic without those round trips. The bus bandwidth (chapter 01) of both,
# for S = 4 KiB … 4 MiB on N = 2 and 4, taking turns batch by batch:

# %%
sizes = [4 * 1024 * 4**i for i in range(6)]  # 4 KiB … 4 MiB
timings = {n: comm.time_all_reduce(n, sizes, min_seconds=0.04, batches=3) for n in (2, 4)}
for n, by_name in timings.items():
    ratio = [r / b for r, b in zip(by_name["ring"].busbw, by_name["dist.all_reduce"].busbw)]
    print(f"N={n}: ring / built-in busbw per size: " + ", ".join(f"{x:.2f}" for x in ratio))

# %%
def plot_ring_vs_builtin(timings):
    """viz.plot_timing, one colour per N: solid = our ring, dashed = dist.all_reduce."""
    order = [(n, name) for n in timings for name in ("ring", "dist.all_reduce")]
    fig = viz.plot_timing([timings[n][name] for n, name in order])
    for ax in fig.axes:
        for line, (n, name) in zip(ax.get_lines(), order):
            line.set_color(viz.rank_color(list(timings).index(n)))
            line.set_linestyle("-" if name == "ring" else "--")
            backend = timings[n][name].backend
            line.set_label(f"{'our ring' if name == 'ring' else f'dist.all_reduce ({backend})'}, N = {n}")
    fig.axes[1].legend(fontsize=8, loc="upper left")
    fig.axes[1].set_title("busbw = S/t × 2(N−1)/N", fontsize=10)
    return fig


plot_ring_vs_builtin(timings)

# %% [markdown]
# What to read (your numbers will differ, and on a busy machine from run to run):
#
# * **Small S**: our ring is several times slower. It makes 2(N−1) + 1 round trips through
#   Python, each waiting for a neighbour process to be scheduled; gloo needs far fewer wake-ups.
#   Latency, not bandwidth, decides here.
# * **Large S**: both spend their time copying bytes through the kernel and adding chunks, and
#   the gap closes: `make bench` (up to 64 MiB, several rounds) measured our ring at roughly
#   0.8–1.2× of gloo's bus bandwidth at 16–64 MiB on a busy 2-core machine, using no more CPU
#   time per call than gloo. Two details mattered. Allocating the receive buffer afresh on every
#   call cost page faults that made the ring use ~1.5× gloo's CPU time: `comm` keeps one buffer.
#   And posting every receive up front lets a neighbour's next chunk arrive while this rank is
#   still adding the previous one; waiting to post each receive until its step made N = 4
#   noticeably slower. (gloo also cuts chunks into segments, so a large chunk's addition overlaps
#   its transfer; ours moves whole chunks.)
#
# ## 5. Bucketed DDP: all-reduce while backward runs
#
# Chapter 02 all-reduced the gradients **after** backward. But backward produces gradients from
# the last layer to the first, and the last layer's gradient is final long before the first
# layer's. DDP therefore groups parameters, in **reverse** order, into buckets of about
# `bucket_cap_mb` and starts an **asynchronous** all-reduce (`async_op=True`) for each bucket the
# moment its last gradient arrives, while autograd computes the next ones. When backward
# finishes, it waits for the buckets and writes the averaged gradients back: `p.grad` is final
# when `loss.backward()` returns.
#
# * One bucket per parameter: many small messages (latency-bound, as in section 4).
# * One bucket for everything: nothing overlaps, all communication after backward.
#
# `course_lib.ddp.BucketedDDP(module, bucket_cap_mb=25.0)` does this with a hook per parameter
# (`register_post_accumulate_grad_hook`). The bucket rule, last parameter first, closing a bucket
# once it holds `bucket_cap_mb`:

# %%
print(inspect.getsource(ddp.assign_buckets))
mlp = models.make_mlp(d_model=16, d_hidden=64)
sizes_bytes = [p.numel() * 4 for p in mlp.parameters()]
print("parameters:", [name for name, _ in mlp.named_parameters()], "bytes:", sizes_bytes)
print("buckets with a 4000-byte cap:", ddp.assign_buckets(sizes_bytes, 4000))

# %% [markdown]
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
for cap in caps:
    vs_ddp = vs_single = 0.0
    for reference, ours in results:  # every rank
        buckets, grads = ours[cap]
        for a, b, p in zip(grads, reference, single.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-5)
            vs_ddp = max(vs_ddp, (a - b).abs().max().item())
            vs_single = max(vs_single, (a - p.grad).abs().max().item())
    print(f"bucket_cap_mb={cap:<6g} {buckets} bucket{'s' * (buckets > 1)}: every gradient on every rank equal; "
          f"largest difference to torch DDP {vs_ddp:.1e}, to one process {vs_single:.1e}")

# %% [markdown]
# ### A timeline of one backward pass
#
# `BucketedDDP` records, for its last backward pass, when each gradient appeared, when each
# bucket was **ready** (its last gradient in), when its all-reduce was **launched** and when it
# **finished** (a callback on the all-reduce's future). An 8-layer MLP of 4.2 M parameters
# (16 MiB of gradients) on N = 2 ranks, with 2 MiB buckets and with one 100 MiB bucket:

# %%
def backward_timelines(caps, steps=4):
    rank, n = dist.get_rank(), dist.get_world_size()
    x, y = models.regression_data(64 * n, d_model=256)
    x, y = models.shard(x, rank, n), models.shard(y, rank, n)
    result = {}
    for cap in caps:
        model = ddp.BucketedDDP(models.make_stack(depth=8, d_model=256, d_hidden=1024), bucket_cap_mb=cap)
        for _ in range(steps):  # the first steps set things up; keep the last one's timeline
            dist.barrier()
            F.mse_loss(model(x), y).backward()
            model.zero_grad(set_to_none=True)
        result[cap] = model.timeline
    return result


timelines = launch.run(backward_timelines, 2, (2.0, 100.0))


def plot_timelines(timelines_of_rank, rank=0):
    caps = list(timelines_of_rank)
    rows = [len(timelines_of_rank[c].buckets) + 1 for c in caps]
    fig = viz.CourseFigure(figsize=(10, 0.32 * sum(rows) + 1.8), layout="constrained")
    axes = fig.subplots(len(caps), 1, sharex=True, gridspec_kw=dict(height_ratios=rows))
    for ax, cap in zip(axes, caps):
        t = timelines_of_rank[cap]
        ms = 1e3
        ax.barh(0, t.backward_done * ms, left=0, height=0.6, color="0.75", label="backward (autograd computing)")
        for _, when in t.grads:
            ax.plot([when * ms] * 2, [-0.3, 0.3], color="0.35", linewidth=1)
        for b in t.buckets:
            y = 1 + b.index
            color = matplotlib.colormaps["tab10"](b.index % 10)
            ax.barh(y, (b.finished - b.launched) * ms, left=b.launched * ms, height=0.6, color=color)
            ax.plot(b.ready * ms, y, "k|", markersize=10)
        ax.axvline(t.synced * ms, color="black", linestyle="--", linewidth=1)
        ax.text(t.synced * ms, -0.75, " backward() returns", fontsize=8, va="top")
        ax.set_yticks(range(len(t.buckets) + 1),
                      ["backward"] + [f"bucket {b.index} ({b.nbytes / 2**20:.1f} MiB)" for b in t.buckets],
                      fontsize=8)
        ax.set_ylim(len(t.buckets) + 0.6, -1.1)
        ax.set_title(f"bucket_cap_mb = {cap:g}, {len(t.buckets)} bucket{'s' * (len(t.buckets) > 1)}: autograd "
                     f"computes for {t.backward_done * ms:.0f} ms, backward() returns "
                     f"{(t.synced - t.backward_done) * ms:.0f} ms later", fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    axes[-1].set_xlabel(f"ms since backward started (rank {rank}); ticks: a gradient computed; "
                        "|: bucket ready; bar: its all-reduce")
    return fig


plot_timelines(timelines[0])

# %% [markdown]
# Read the two titles: the time from the end of autograd to `backward()` returning is the
# communication that was **not** hidden. With 2 MiB buckets most all-reduces run under the grey
# bar, while autograd computes the earlier layers; with one bucket nothing can start before the
# very last gradient exists, so all of it comes after. On a laptop the gain is small, and varies
# from run to run: both ranks, their gloo threads and everything else share a few CPU cores, so
# communicating during backward also slows backward down (the grey bar stretches, its ticks
# spread out). On GPUs compute and NCCL use different hardware and the overlap is nearly free.
# `make bench` compares a training step of `BucketedDDP` with torch's DDP on the same model.
#
# ## 6. The code
#
# The whole ring, as `course_lib/comm.py` has it: the public function checks its input and agrees
# with its left neighbour on shape and dtype, then runs the two phases. Unlike the step-by-step
# version of the exercises, each phase posts all its receives first (`dist.irecv` returns at
# once), then works through the steps as the chunks arrive.

# %%
for fn in (comm.ring_all_reduce, comm._reduce_scatter, comm._all_gather):
    print(inspect.getsource(fn))

# %% [markdown]
# **Next**: the exercises (`exercises/03_ring_allreduce.ipynb`) have you write the reduce-scatter,
# the all-gather, the ring all-reduce and DDP's bucket assignment yourself.
