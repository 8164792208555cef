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
# # 05 · Sequence parallelism: split what tensor parallelism leaves whole
#
# Tensor parallelism (chapter 04) splits the attention and the MLP, but between them every rank
# holds the **whole** activation: the LayerNorms, the residual adds (and, in real models, the
# dropouts) run identically on all N ranks, on all b·s·h numbers. That is wasted memory, and it
# does not shrink with N. These operations work on each token alone, so they can just as well
# run on a **shard of the sequence**: rank r takes positions `r·s/N … (r+1)·s/N`. This is
# Megatron's **sequence parallelism** (序列并行, Korthikanti et al., 2022).
#
# The switch costs no extra communication. Where a sequence shard enters a tensor-parallel
# region, an **all-gather** rebuilds the whole sequence (instead of f's identity); where it
# leaves, a **reduce-scatter** sums the partial results and keeps each rank's positions (instead
# of g's all-reduce). Since an all-reduce *is* a reduce-scatter followed by an all-gather, the
# bytes on the wire stay the same; only where the halves happen moves. (Some notes describe
# sequence parallelism as "adding an all-gather": in this Megatron form it does not add traffic.
# Other methods with the same name — ring attention, DeepSpeed-Ulysses — also split the attention
# itself along the sequence; they are not this chapter's topic.)
#
# Notation as in chapter 04: **N** ranks (t in Megatron's formulas), activations `(b, s, h)`,
# **a** attention heads; the sequence is dim 1. The ranks run on the CPU with gloo
# (`backend="gloo"`) even on a GPU machine: the models are tiny, and the traffic counter reads
# gloo's TCP sockets.

# %%
import inspect
from collections import defaultdict

import torch
import torch.distributed as dist
from matplotlib.patches import FancyArrowPatch, Patch, Rectangle

from course_lib import launch, tp, viz
from course_lib.comm import count_traffic
from course_lib.models import make_block

# %% [markdown]
# ## Who holds what, stage by stage
#
# One transformer sublayer (the MLP half; attention is the same with heads), drawn as the
# activation matrix: positions down, features across. A cell's colour says which rank holds it;
# gray means every rank holds a copy; a striped cell is a partial sum that every rank holds a
# part of. Top: tensor parallelism alone. Bottom: with sequence parallelism, the first and last
# stages hold 1/N each.

# %%
def holding_figure(n=4, s=8, h=6, hidden=12):
    stages = {
        "tensor parallel": [("LayerNorm, residual:\nwhole on every rank", "whole", h),
                            ("f (identity):\nstill whole", "whole", h),
                            ("fc1, GELU:\nmy columns", "columns", hidden),
                            ("fc2: my partial sum\nof everything", "partial", h),
                            ("g (all-reduce):\nwhole on every rank", "whole", h)],
        "tensor + sequence parallel": [("LayerNorm, residual:\nmy positions", "rows", h),
                                       ("all-gather:\nwhole sequence", "whole", h),
                                       ("fc1, GELU:\nmy columns", "columns", hidden),
                                       ("fc2: my partial sum\nof everything", "partial", h),
                                       ("reduce-scatter:\nmy positions of the sum", "rows", h)]}
    gray = (0.75, 0.75, 0.75)
    fig = viz.CourseFigure(figsize=(12, 6.2), layout="constrained")
    axes = fig.subplots(2, 1)
    for ax, (label, row) in zip(axes, stages.items()):
        x0 = 0
        for i, (title, kind, width) in enumerate(row):
            for y in range(s):
                for x in range(width):
                    owners = {"rows": [y * n // s], "columns": [x * n // width],
                              "partial": list(range(n))}.get(kind)
                    if owners is None:
                        ax.add_patch(Rectangle((x0 + x, y), 1, 1, color=gray, linewidth=0))
                    for k, r in enumerate(owners or []):
                        ax.add_patch(Rectangle((x0 + x + k / len(owners), y), 1 / len(owners), 1,
                                               color=viz.rank_color(r, n), linewidth=0))
                    ax.add_patch(Rectangle((x0 + x, y), 1, 1, fill=False, edgecolor="white", linewidth=0.6))
            ax.text(x0 + width / 2, -0.6, title, ha="center", va="bottom", fontsize=9)
            if i:
                ax.add_patch(FancyArrowPatch((x0 - 3.2, s / 2), (x0 - 0.5, s / 2), arrowstyle="-|>",
                                             mutation_scale=14, color="0.3"))
            x0 += width + 4
        ax.set_xlim(-0.5, x0 - 3.5)
        ax.set_ylim(s + 0.5, -4.2)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(label, fontsize=11, loc="left")
    handles = [Patch(color=viz.rank_color(r, n), label=f"rank {r}") for r in range(n)]
    handles.append(Patch(color=gray, label="every rank (a copy)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=n + 1, fontsize=9, frameon=False)
    fig.suptitle(f"One MLP sublayer on N = {n} ranks: positions down, features across", fontsize=11)
    return fig


holding_figure()

# %% [markdown]
# ## The code: two more conjugate pairs
#
# | | forward | backward | where |
# |---|---|---|---|
# | `gather_from_sequence_region` | all-gather along the sequence | reduce-scatter | before a column-parallel layer (replaces f) |
# | `reduce_scatter_to_sequence_region` | reduce-scatter along the sequence | all-gather | after a row-parallel layer (replaces g) |
#
# They are each other's transpose, like f and g. `ColumnParallelLinear` and `RowParallelLinear`
# take a `sequence_parallel` flag that picks them instead of f and g, and
# `SequenceParallelBlock` runs its LayerNorms and residual adds on the shard:

# %%
print(inspect.getsource(tp._GatherFromSequence))
print(inspect.getsource(tp._ReduceScatterToSequence))
print(inspect.getsource(tp.TensorParallelBlock.forward))
print(inspect.getsource(tp.SequenceParallelBlock))

# %% [markdown]
# One detail of the reduce-scatter: on the CPU, gloo's own `reduce_scatter` is implemented as a
# full all-reduce (measured: it sends 2(N−1)/N of the tensor, twice what a reduce-scatter needs),
# which would hide this chapter's point. `course_lib.tp` therefore builds it from an
# **all-to-all** plus a local sum: rank j receives block j from every rank and adds them up,
# sending (N−1)/N of the tensor, like a ring reduce-scatter:

# %%
print(inspect.getsource(tp._reduce_scatter))

# %% [markdown]
# ## Equal to the dense block: output and every gradient, N = 1, 2, 4
#
# Every rank builds the same seeded `TransformerBlock` (pre-norm: `x + attn(ln1(x))`, then
# `+ mlp(ln2(x))`), takes its shard of the input sequence, and compares with the dense block run
# on the whole sequence:
#
# * its output shard with the dense output's rows for its positions, and its input shard's
#   gradient likewise;
# * its shards of the qkv, proj, fc1 and fc2 weights' gradients with the matching blocks of the
#   dense gradients (as in chapter 04);
# * the replicated parameters — both LayerNorms and the row-parallel biases — trained on this
#   rank's tokens only, so their gradients are parts of a sum: `sync_replicated_grads()`
#   all-reduces them (one small all-reduce per step), after which they equal the dense gradients.

# %%
D_MODEL, N_HEADS = 16, 4


def dense_block_of(size, rank, n):
    return slice(rank * size // n, (rank + 1) * size // n)


def matching_slice(name, dense_grad, rank, n):
    """The block of a dense gradient that this rank's parameter ``name`` corresponds to."""
    part = name.split(".", 1)[1]
    if part in ("fc1.weight", "fc1.bias"):
        return dense_grad[dense_block_of(dense_grad.shape[0], rank, n)]
    if part in ("fc2.weight", "proj.weight"):
        return dense_grad[:, dense_block_of(dense_grad.shape[1], rank, n)]
    if part in ("qkv.weight", "qkv.bias"):
        return torch.cat([p[dense_block_of(p.shape[0], rank, n)] for p in dense_grad.chunk(3)])
    return dense_grad  # replicated: LayerNorms, proj.bias, fc2.bias


def sp_differences():
    rank, n = dist.get_rank(), dist.get_world_size()
    dense = make_block(D_MODEL, N_HEADS, seed=0)
    ours = tp.SequenceParallelBlock.from_dense(dense)
    g = torch.Generator().manual_seed(1)
    x, upstream = torch.randn(2, 8, D_MODEL, generator=g), torch.randn(2, 8, D_MODEL, generator=g)
    mine = dense_block_of(8, rank, n)
    x_dense, x_shard = x.clone().requires_grad_(), x[:, mine].clone().requires_grad_()
    out_dense, out_shard = dense(x_dense), ours(x_shard)
    (out_dense * upstream).sum().backward()
    (out_shard * upstream[:, mine]).sum().backward()
    ours.sync_replicated_grads()
    diff = {"output": (out_shard - out_dense[:, mine]).abs().max(),
            "x.grad": (x_shard.grad - x_dense.grad[:, mine]).abs().max()}
    dense_params = dict(dense.named_parameters())
    for name, p in ours.named_parameters():
        diff[name] = (p.grad - matching_slice(name, dense_params[name].grad, rank, n)).abs().max()
    return {k: float(v.detach()) for k, v in diff.items()}


for n in (1, 2, 4):
    per_rank = launch.run(sp_differences, n, backend="gloo")
    worst = {k: max(d[k] for d in per_rank) for k in per_rank[0]}
    print(f"N = {n}: largest |ours - dense| over {len(worst)} tensors (output, x.grad, every parameter's "
          f"grad) = {max(worst.values()):.1e}")
    assert max(worst.values()) < 1e-5, worst

# %% [markdown]
# ## Measured: the same bytes as tensor parallelism
#
# The same block, wider (h = 128, 8 heads, b·s·h = 2·32·128 = 8192 floats = 32 KiB per
# activation), once tensor-parallel (`TensorParallelBlock`, whole sequence on every rank) and once
# sequence-parallel, with the traffic counter on each rank. Per forward pass, tensor parallelism
# makes 2 all-reduces (one per sublayer), each sending 2(N−1)/N·4K bytes on a ring; sequence
# parallelism makes 2 all-gathers and 2 reduce-scatters (the all-to-alls), each (N−1)/N·4K. The
# backward pass mirrors the forward. The "ring ideal" column is 2·2(N−1)/N·4K.

# %%
def traffic(kind, b=2, s=32, h=128, heads=8):
    rank, n = dist.get_rank(), dist.get_world_size()
    dense = make_block(h, heads, seed=0)
    x = torch.randn(b, s, h)
    if kind == "tensor parallel":
        block = tp.TensorParallelBlock.from_dense(dense)
    else:
        block = tp.SequenceParallelBlock.from_dense(dense, recompute_gather=kind.endswith("re-gather"))
        x = x[:, dense_block_of(s, rank, n)]
    x.requires_grad_()
    with count_traffic() as forward:
        out = block(x)
    with count_traffic() as backward:
        out.sum().backward()
    with count_traffic() as sync:
        if kind != "tensor parallel":
            block.sync_replicated_grads()
    names = lambda t: dict(sorted({op: t.count(op) for op in {c.op for c in t.calls}}.items()))  # noqa: E731
    return dict(fwd_calls=names(forward), bwd_calls=names(backward), fwd=forward.sent, bwd=backward.sent,
                sync=sync.sent, ideal=4 * (n - 1) / n * 4 * b * s * h)


print(f"{'':34} {'N':>2} {'sent fwd (B)':>13} {'sent bwd (B)':>13} {'ring ideal':>11}   calls fwd | bwd")
for n in (2, 4):
    for kind in ("tensor parallel", "sequence parallel", "sequence parallel, re-gather"):
        m = launch.run(traffic, n, kind, backend="gloo")[0]
        print(f"{kind:34} {n:>2} {m['fwd']:>13,} {m['bwd']:>13,} {m['ideal']:>11,.0f}   "
              f"{m['fwd_calls']} | {m['bwd_calls']}")
    print(f"{'  + sync_replicated_grads (SP)':34} {n:>2} {m['sync']:>13,} {'(once per step)':>13}")

# %% [markdown]
# Tensor and sequence parallelism send the same bytes per pass, and both match the ring's
# 2·2(N−1)/N·4K ideal (two sublayers, each an all-reduce's worth) within a few percent: gloo's
# message headers, and the occasional small message that the TCP counters catch as well. The
# "re-gather" variant (below) pays one more all-gather per sublayer in the backward pass.
# `sync_replicated_grads` adds one small all-reduce per training step, of the 6h numbers of the
# LayerNorms and row-parallel biases — like data parallelism's gradient all-reduce, over the
# tensor-parallel group.
#
# ## Measured: activation memory per rank
#
# What a layer costs in memory during training is mostly what autograd **saves for backward**:
# the inputs of the matrix multiplications, GELU's input, softmax's output, LayerNorm's input.
# `torch.autograd.graph.saved_tensors_hooks` sees every tensor as it is saved; the helper below
# adds up the bytes of each distinct storage (parameters excluded), charged to the innermost
# module that was running.

# %%
def saved_bytes_by_module(model, *inputs):
    """Bytes of activations autograd saves while model(*inputs) runs, by module name."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    running, seen, saved = ["(outside)"], set(), defaultdict(int)

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())  # a view of a saved tensor costs nothing more
            saved[running[-1]] += storage.nbytes()
        return t

    hooks = []
    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_pre_hook(lambda m, a, name=name: running.append(name)))
            hooks.append(module.register_forward_hook(lambda m, a, out: running.pop() and None))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return dict(saved)


REGIONS = {"LayerNorms (ln1, ln2)": ("ln1", "ln2"),
           "inputs of qkv and fc1": ("attn.qkv", "mlp.fc1"),
           "inside attention and MLP": ("attn", "attn.proj", "mlp", "mlp.fc2")}
B, S, H, HEADS = 2, 32, 64, 4


def activation_bytes(kind):
    rank, n = dist.get_rank(), dist.get_world_size()
    dense = make_block(H, HEADS, seed=0)
    x = torch.randn(B, S, H, requires_grad=True)
    if kind == "dense":
        model = dense
    elif kind == "TP":
        model = tp.TensorParallelBlock.from_dense(dense)
    else:
        model = tp.SequenceParallelBlock.from_dense(dense, recompute_gather=kind == "TP+SP, re-gather")
        x = x[:, dense_block_of(S, rank, n)].detach().clone().requires_grad_()  # its own storage
    by_module = saved_bytes_by_module(model, x)
    return {region: sum(by_module.get(m, 0) for m in modules) for region, modules in REGIONS.items()}


configs = [("dense", 1), ("TP", 2), ("TP", 4), ("TP+SP", 2), ("TP+SP", 4),
           ("TP+SP, re-gather", 2), ("TP+SP, re-gather", 4)]
measured = {(kind, n): launch.run(activation_bytes, n, kind, backend="gloo")[0] for kind, n in configs}

# %% [markdown]
# Rank 0's bytes, by region (every rank holds the same amount):

# %%
sbh, sb = S * B * H, S * B
print(f"s={S}, b={B}, h={H}, a={HEADS}: s·b·h = {sbh} numbers = {4 * sbh:,} bytes in fp32\n")
print(f"{'':22} {'t':>2} " + " ".join(f"{r:>25}" for r in REGIONS) + f" {'total':>9}")
for (kind, n), regions in measured.items():
    print(f"{kind:22} {n:>2} " + " ".join(f"{v:>25,}" for v in regions.values())
          + f" {sum(regions.values()):>9,}")
norms = {n: measured[("TP+SP", n)]["LayerNorms (ln1, ln2)"] for n in (2, 4)}
dense_norms = measured[("dense", 1)]["LayerNorms (ln1, ln2)"]
print(f"\nLayerNorm region per rank, TP+SP vs TP: t=2 → {norms[2] / dense_norms:.3f}, "
      f"t=4 → {norms[4] / dense_norms:.3f} of the whole")
assert all(norms[n] * n == dense_norms for n in (2, 4))

# %% [markdown]
# The LayerNorm region holds exactly 1/t per rank with sequence parallelism, and the whole
# activation under tensor parallelism alone — the whole point of the method.
#
# ### Set beside the formulas
#
# Korthikanti et al. count the bytes one transformer layer saves, with 16-bit activations and
# dropout: **s·b·h·(34 + 5·a·s/h)** for one device; **s·b·h·(10 + 24/t + 5·a·s/(h·t))** with
# tensor parallelism over t devices; **s·b·h·(34 + 5·a·s/h)/t** with tensor and sequence
# parallelism. Where the 34 comes from, and what our block has of it:
#
# | saved for backward | Megatron (bytes / sbh) | our block (numbers / sbh) | split by TP | split by SP |
# |---|---|---|---|---|
# | LayerNorm inputs (2 norms) | 4 | 2 | no | yes |
# | qkv and fc1 inputs | 4 | 2 | no | only with re-gather |
# | q, k, v; attention output (proj input) | 8 | 4 | yes | — |
# | softmax output | 2·a·s/h | a·s/h | yes | — |
# | GELU input, fc2 input (4h each) | 16 | 8 | yes | — |
# | dropout masks (1 byte) and the attention dropout's output | 2 + 3·a·s/h | — (no dropout) | | |
#
# Our block has no dropout and keeps 4-byte floats, so its formula is 4·s·b·h·(16 + a·s/h) bytes,
# plus LayerNorm's per-token mean and 1/std (2 numbers per token per norm, 16·s·b bytes, which
# Megatron leaves out). The same bookkeeping gives its TP and TP+SP versions:

# %%
def ours(kind, t):
    """Bytes per rank our block should save, from the table above (fp32, no dropout)."""
    stats = 16 * sb  # LayerNorm mean and 1/std
    per_sbh = {"dense": 16 + HEADS * S / H,
               "TP": 4 + 12 / t + HEADS * S / (H * t),
               "TP+SP": 2 + 14 / t + HEADS * S / (H * t),
               "TP+SP, re-gather": (16 + HEADS * S / H) / t}[kind]
    return 4 * sbh * per_sbh + (stats if kind in ("dense", "TP") else stats / t)


def megatron(kind, t):
    """Korthikanti et al.'s bytes (16-bit, with dropout) for the same s, b, h, a.

    Their TP+SP formula assumes the re-gather; without it, the 4 bytes per sbh of
    qkv and fc1 inputs stay whole: s·b·h·(4 + 30/t + 5·a·s/(h·t)).
    """
    return {"dense": sbh * (34 + 5 * HEADS * S / H),
            "TP": sbh * (10 + 24 / t + 5 * HEADS * S / (H * t)),
            "TP+SP": sbh * (4 + 30 / t + 5 * HEADS * S / (H * t)),  # qkv, fc1 inputs whole
            "TP+SP, re-gather": sbh * (34 + 5 * HEADS * S / H) / t}[kind]


print(f"{'':22} {'t':>2} {'measured':>9} {'our formula':>12} {'vs dense':>9} "
      f"{'Megatron formula':>17} {'vs dense':>9}")
for (kind, n), regions in measured.items():
    got = sum(regions.values())
    print(f"{kind:22} {n:>2} {got:>9,} {ours(kind, n):>12,.0f} {got / ours('dense', 1):>9.3f} "
          f"{megatron(kind, n):>17,.0f} {megatron(kind, n) / megatron('dense', 1):>9.3f}")
    assert got == ours(kind, n)

# %% [markdown]
# Measured and our formula agree to the byte, for every configuration. The ratios to the dense
# layer (the "vs dense" columns) tell the story the same way in both bookkeepings:
#
# * **TP alone** shrinks only the parts inside the attention and MLP; the 10 (ours: 4) per sbh of
#   LayerNorm inputs, qkv/fc1 inputs and dropout masks stay whole on every rank, so memory stalls
#   at that floor however large t is.
# * **TP+SP, re-gather** divides *everything* by t: Megatron's s·b·h·(34 + 5·a·s/h)/t, here to the
#   byte. It keeps only the sequence shard of each all-gathered input (qkv's, fc1's) and gathers it
#   again in backward — this is what Megatron does, paying the extra all-gather measured above
#   (usually overlapped with computation).
# * **TP+SP** as the plain autograd composition saves the gathered qkv and fc1 inputs whole
#   (2 of our 16 numbers per sbh): between the two, and with the same traffic as TP.
#
# The picture: bytes per rank, by region, with our formula as a black tick.

# %%
def memory_figure():
    fig = viz.CourseFigure(figsize=(10, 4.2), layout="constrained")
    ax = fig.subplots()
    labels = [f"{kind}\nt = {n}" if kind != "dense" else "dense\n(one rank)" for kind, n in measured]
    bottoms = [0.0] * len(measured)
    colors = ["tab:purple", "tab:olive", "tab:cyan"]
    for color, region in zip(colors, REGIONS):
        values = [regions[region] / 1024 for regions in measured.values()]
        ax.bar(labels, values, bottom=bottoms, color=color, label=region, width=0.6)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.scatter(labels, [ours(kind, n) / 1024 for kind, n in measured], marker="_", s=900, color="black",
               linewidths=2, label="our formula", zorder=3)
    ax.set_ylabel("saved activations per rank (KiB)")
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, markerscale=0.4)
    ax.set_title(f"One transformer block, s = {S}, b = {B}, h = {H}, a = {HEADS}, fp32: measured with "
                 "saved_tensors_hooks", fontsize=10)
    return fig


memory_figure()

# %% [markdown]
# ## And dropout?
#
# Our models have no dropout, to keep "equal to the dense model" an exact statement. In a real
# block the dropouts after attention and after the MLP sit in the sequence-parallel region, next to
# the residual adds, and shard the same way: each rank draws the mask of its own s/N positions, so
# the masks (Megatron's 2 bytes per sbh) shrink by 1/t too. Reproducing a dense run bit for bit
# would then need each rank to draw exactly the dense mask's rows for its positions; Megatron
# instead keeps separate random-number streams — one shared by the tensor-parallel group for
# replicated regions, one per rank for sharded ones — and accepts that the masks differ from a
# single-device run.
#
# ## Summary
#
# * LayerNorm, residual adds and dropout work token by token: sequence parallelism runs them on
#   s/N positions per rank, so their activations shrink by 1/t (measured: exactly 1/t).
# * An all-gather before the column-parallel layer and a reduce-scatter after the row-parallel one
#   replace f and g. They move the same bytes as TP's all-reduces (measured), because an
#   all-reduce is a reduce-scatter plus an all-gather.
# * With Megatron's re-gather of the column-parallel inputs, the whole layer's activations divide
#   by t: s·b·h·(34 + 5·a·s/h)/t — our fp32, dropout-free version measured to the byte.
# * The replicated parameters (LayerNorms, row-parallel biases) see only their rank's tokens:
#   one small all-reduce of their gradients per step.
#
# Glossary: 序列并行 sequence parallelism · 张量并行 tensor parallelism · 激活显存 activation
# memory · 全收集 all-gather · 归约散射 reduce-scatter · 层归一化 LayerNorm · 重计算 recomputation.
#
# Next: the exercises (`exercises/05_sequence_parallel.ipynb`) have you build the sequence shard,
# both conjugate pairs and a sequence-parallel LayerNorm + MLP sublayer.
