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

import torch
import torch.distributed as dist

from course_lib import launch, tp, viz
from course_lib.comm import count_traffic
from course_lib.models import make_block, make_dropout_block

# %% [markdown]
# ## Who holds what, stage by stage
#
# One transformer sublayer (the MLP half; attention is the same with heads), drawn as the
# activation matrix: positions down, features across. A cell's colour says which rank holds it;
# gray means every rank holds a copy; a striped cell is a partial sum that every rank holds a
# part of. Top: tensor parallelism alone. Bottom: with sequence parallelism, the first and last
# stages hold 1/N each.

# %%
viz.plot_sequence_parallel_holdings(n=4, s=8, h=6, hidden=12)

# %% [markdown]
# ## The code: two more conjugate pairs
#
# | | forward | backward | where |
# |---|---|---|---|
# | `gather_from_sequence_region` | all-gather along the sequence | reduce-scatter | before a column-parallel layer (replaces f) |
# | `reduce_scatter_to_sequence_region` | reduce-scatter along the sequence | all-gather | after a row-parallel layer (replaces g) |
#
# They are each other's transpose, like f and g; Megatron-LM's code has functions of the same
# names with `_parallel_` inserted (`gather_from_sequence_parallel_region`, …). Megatron keeps
# activations as (s, b, h), so its sequence is the first, outermost dimension and each shard is
# one contiguous block of memory; ours are (b, s, h), so `course_lib.tp` moves the sequence to the
# front before each collective (a copy) and back after. `ColumnParallelLinear` and
# `RowParallelLinear` take a `sequence_parallel` flag that picks these instead of f and g, and
# `SequenceParallelBlock` runs its LayerNorms and residual adds on the shard:

# %%
print(inspect.getsource(tp._GatherFromSequence))
print(inspect.getsource(tp._ReduceScatterToSequence))
print(inspect.getsource(tp.TensorParallelBlock.forward))
print(inspect.getsource(tp.SequenceParallelBlock))

# %% [markdown]
# One detail of the reduce-scatter: on the CPU, gloo's own `reduce_scatter` moves at least as many
# bytes as a full all-reduce — 2(N−1)/N of the tensor per rank or more, twice what a
# reduce-scatter needs — which would hide this chapter's point. `course_lib.tp` therefore builds it from an **all-to-all**
# plus a local sum: rank j receives block j from every rank and adds them up, sending (N−1)/N of
# the tensor, like a ring reduce-scatter. Both measured:

# %%
print(inspect.getsource(tp._reduce_scatter))


def reduce_scatter_bytes():
    """Wire bytes this rank sends for one reduce-scatter of a (2, 32, 128) activation, both ways."""
    n = dist.get_world_size()
    x = torch.ones(2, 32, 128)
    blocks = [b.contiguous() for b in x.chunk(n, dim=1)]
    out = torch.empty_like(blocks[0])
    ways = {
        "gloo's dist.reduce_scatter": lambda: dist.reduce_scatter(out, blocks),
        "tp._reduce_scatter": lambda: tp._reduce_scatter(x, 1, None),
    }
    sent = {}
    for name, call in ways.items():
        call()  # connections first
        dist.barrier()
        with count_traffic() as traffic:
            call()
        dist.barrier()
        sent[name] = traffic.sent
    return sent


rs_sent = launch.run(reduce_scatter_bytes, 4, backend="gloo")[0]
S_RS = 4 * 2 * 32 * 128
for name, sent in rs_sent.items():
    share = "n/a (no TCP counters here)" if sent is None else f"{sent / S_RS:.3f} of the tensor"
    print(f"N = 4, {name:<27} sends {share} per rank")
print("a reduce-scatter needs (N−1)/N = 0.750; an all-reduce sends 2(N−1)/N = 1.500")
ABBREVIATIONS = {"all_reduce": "AR", "all_gather_single": "AG", "all_to_all_single": "A2A"}


def short(calls):
    """{'all_gather_single': 2, 'all_to_all_single': 2} -> '2 AG + 2 A2A'."""
    return " + ".join(f"{count} {ABBREVIATIONS.get(op, op)}" for op, count in calls.items())


if rs_sent["tp._reduce_scatter"] is not None:
    assert rs_sent["gloo's dist.reduce_scatter"] > 1.4 * S_RS and rs_sent["tp._reduce_scatter"] < 0.8 * S_RS

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
    diff = {
        "output": (out_shard - out_dense[:, mine]).abs().max(),
        "x.grad": (x_shard.grad - x_dense.grad[:, mine]).abs().max(),
    }
    dense_params = dict(dense.named_parameters())
    for name, p in ours.named_parameters():
        diff[name] = (p.grad - matching_slice(name, dense_params[name].grad, rank, n)).abs().max()
    return {k: float(v.detach()) for k, v in diff.items()}


sp_largest = {}
for n in (1, 2, 4):
    per_rank = launch.run(sp_differences, n, backend="gloo")
    worst = {k: max(d[k] for d in per_rank) for k in per_rank[0]}
    sp_largest[n] = max(worst.values())
    print(
        f"N = {n}: largest |ours - dense| over {len(worst)} tensors (output, x.grad, every parameter's "
        f"grad) = {sp_largest[n]:.1e}"
    )
    assert sp_largest[n] < 1e-5, worst

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
    # bytes received: the kernel's steadier counter (a retransmitted segment counts twice as sent)
    return dict(
        fwd_calls=names(forward),
        bwd_calls=names(backward),
        fwd=forward.received,
        bwd=backward.received,
        sync=sync.received,
        ideal=4 * (n - 1) / n * 4 * b * s * h,
    )


KINDS = ("tensor parallel", "sequence parallel", "sequence parallel, re-gather")
sp_traffic = {(kind, n): launch.run(traffic, n, kind, backend="gloo")[0] for n in (2, 4) for kind in KINDS}
print("calls: AR = all-reduce, AG = all-gather, A2A = all-to-all (our reduce-scatter)")
print(
    f"{'':30} {'N':>2} {'recv fwd':>9} {'recv bwd':>9} {'ring ideal':>10}   {'calls fwd':<12} {'calls bwd':<12}"
)
for (kind, n), m in sp_traffic.items():
    wire = f"{m['fwd']:>9,} {m['bwd']:>9,}" if m["fwd"] is not None else f"{'n/a':>9} {'n/a':>9}"
    print(
        f"{kind:30} {n:>2} {wire} {m['ideal']:>10,.0f}   {short(m['fwd_calls']):<12} {short(m['bwd_calls']):<12}"
    )
    if kind == "sequence parallel, re-gather" and m["sync"] is not None:
        print(f"{'  + sync_replicated_grads (SP)':30} {n:>2} {m['sync']:>9,} (once per step)")
for n in (2, 4):
    tp_calls, sp_calls = sp_traffic["tensor parallel", n], sp_traffic["sequence parallel", n]
    regather = sp_traffic["sequence parallel, re-gather", n]
    assert tp_calls["fwd_calls"] == tp_calls["bwd_calls"] == {"all_reduce": 2}
    assert sp_calls["fwd_calls"] == sp_calls["bwd_calls"] == {"all_gather_single": 2, "all_to_all_single": 2}
    assert regather["bwd_calls"] == {
        "all_gather_single": 4,
        "all_to_all_single": 2,
    }  # + 1 gather per sublayer
    for kind in KINDS[:2]:
        m = sp_traffic[kind, n]
        if m["fwd"] is not None:  # the same bytes, up to gloo's headers
            assert m["ideal"] <= m["fwd"] <= 1.06 * m["ideal"] and m["ideal"] <= m["bwd"] <= 1.06 * m["ideal"]
    if regather["bwd"] is not None:  # two more all-gathers: half an all-reduce's worth each, per sublayer
        assert 1.5 * regather["ideal"] <= regather["bwd"] <= 1.06 * 1.5 * regather["ideal"]

# %% [markdown]
# Tensor and sequence parallelism send the same bytes per pass, and both match the ring's
# 2·2(N−1)/N·4K ideal (two sublayers, each an all-reduce's worth) within a few percent (asserted:
# within 6 %): gloo's message headers, and the occasional small message that the TCP counters
# catch as well. The "re-gather" variant (below) pays one more all-gather per sublayer in the
# backward pass (asserted: 4 all-gathers instead of 2, and 1.5 times the bytes).
# `sync_replicated_grads` adds one small all-reduce per training step, of the 6h numbers of the
# LayerNorms and row-parallel biases — like data parallelism's gradient all-reduce, over the
# tensor-parallel group.
#
# ## Measured: activation memory per rank
#
# What a layer costs in memory during training is mostly what autograd **saves for backward**:
# the inputs of the matrix multiplications, GELU's input, softmax's output, LayerNorm's input.
# `tp.saved_activation_bytes(model, x)` runs the forward pass with
# `torch.autograd.graph.saved_tensors_hooks`, which sees every tensor as it is saved, and adds up
# the bytes of each distinct storage (parameters excluded), charged to the innermost module that
# was running:

# %%
print(inspect.getsource(tp.saved_activation_bytes))


REGIONS = {
    "LayerNorms (ln1, ln2)": ("ln1", "ln2"),
    "inputs of qkv and fc1": ("attn.qkv", "mlp.fc1"),
    "inside attention and MLP": ("attn", "attn.proj", "mlp", "mlp.fc2"),
}
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
    by_module = tp.saved_activation_bytes(model, x)
    return {region: sum(by_module.get(m, 0) for m in modules) for region, modules in REGIONS.items()}


configs = [
    ("dense", 1),
    ("TP", 2),
    ("TP", 4),
    ("TP+SP", 2),
    ("TP+SP", 4),
    ("TP+SP, re-gather", 2),
    ("TP+SP, re-gather", 4),
]
measured = {(kind, n): launch.run(activation_bytes, n, kind, backend="gloo")[0] for kind, n in configs}

# %% [markdown]
# Rank 0's bytes, by region (every rank holds the same amount):

# %%
sbh, sb = S * B * H, S * B
print(f"s={S}, b={B}, h={H}, a={HEADS}: s·b·h = {sbh} numbers = {4 * sbh:,} bytes in fp32\n")
print(f"{'':22} {'t':>2} " + " ".join(f"{r:>25}" for r in REGIONS) + f" {'total':>9}")
for (kind, n), regions in measured.items():
    print(
        f"{kind:22} {n:>2} "
        + " ".join(f"{v:>25,}" for v in regions.values())
        + f" {sum(regions.values()):>9,}"
    )
norms = {n: measured[("TP+SP", n)]["LayerNorms (ln1, ln2)"] for n in (2, 4)}
dense_norms = measured[("dense", 1)]["LayerNorms (ln1, ln2)"]
print(
    f"\nLayerNorm region per rank, TP+SP vs TP: t=2 → {norms[2] / dense_norms:.3f}, "
    f"t=4 → {norms[4] / dense_norms:.3f} of the whole"
)
assert all(norms[n] * n == dense_norms for n in (2, 4))

# %% [markdown]
# The LayerNorm region holds exactly 1/t per rank with sequence parallelism, and the whole
# activation under tensor parallelism alone — the whole point of the method.
#
# ### Set beside the formulas
#
# Korthikanti et al. (2022) count what one transformer layer saves the way large models are
# trained: activations in a **16-bit** format (fp16 or bf16, 2 bytes per number — chapter 07
# covers this mixed-precision training) and with **dropout**, whose masks take 1 byte per
# element. In bytes, their count is **s·b·h·(34 + 5·a·s/h)** for one device,
# **s·b·h·(10 + 24/t + 5·a·s/(h·t))** with tensor parallelism over t devices, and
# **s·b·h·(34 + 5·a·s/h)/t** with tensor and sequence parallelism. The 34 and the 5 are bytes per
# s·b·h: 2 for every activation of width h, 8 for one of width 4h, 1 for a mask of width h, and
# 2·a·s/h for a 2-byte a×s×s attention matrix per sequence. Where they come from, and what our
# block has of them:
#
# | saved for backward | Korthikanti et al. (bytes / sbh) | our block (numbers / sbh) | split by TP | split by SP |
# |---|---|---|---|---|
# | LayerNorm inputs (2 norms) | 2 + 2 = 4 | 2 | no | yes |
# | qkv and fc1 inputs | 2 + 2 = 4 | 2 | no | only with re-gather |
# | q, k, v; attention output (proj input) | 2·3 + 2 = 8 | 4 | yes | — |
# | softmax output | 2·a·s/h | a·s/h | yes | — |
# | GELU input, fc2 input (4h each) | 8 + 8 = 16 | 8 | yes | — |
# | dropout masks after attention and after the MLP (1 byte) | 1 + 1 = 2 | — (no dropout) | no | yes |
# | attention dropout: its mask (1 byte) and its output (2 bytes) | 3·a·s/h | — (no dropout) | yes | — |
#
# Sum the first column: 4 + 4 + 8 + 16 + 2 = 34, and 2 + 3 = 5 times a·s/h. Without TP, only the
# LayerNorm inputs, qkv and fc1 inputs and the two output masks (10) are not split: that is the 10
# in the TP formula. This course measures in fp32, 4 bytes per number, and its blocks have no
# dropout, so the same rows cost our block 4·(16 + a·s/h) bytes per sbh instead of 34 + 5·a·s/h.
#
# The count itself can be checked to the byte: `models.make_dropout_block` is the dense block in
# bf16 with dropout where Megatron-LM has it (on the attention probabilities, and on the
# attention's and the MLP's outputs). Its dropout keeps a 1-byte mask, as the fused GPU kernel
# does; `nn.Dropout` on the CPU would keep its mask in the activation's own dtype.

# %%
megatron_block = make_dropout_block(H, HEADS, p=0.1).to(torch.bfloat16)
x16 = torch.randn(B, S, H, dtype=torch.bfloat16, requires_grad=True)
saved16 = tp.saved_activation_bytes(megatron_block, x16)
korthikanti = sbh * (34 + 5 * HEADS * S / H)
layer_norm_stats = sum(saved16.values()) - korthikanti
print(
    f"dense block, bf16, with dropout: {sum(saved16.values()):,} bytes saved; "
    f"s·b·h·(34 + 5·a·s/h) = {korthikanti:,.0f}; the rest, {layer_norm_stats:,.0f} bytes, is LayerNorm's mean "
    f"and 1/std (2 numbers per token per norm = {layer_norm_stats / (4 * sb):.0f} bytes each)"
)
assert layer_norm_stats in (2 * 2 * sb * 2, 2 * 2 * sb * 4)  # 4·s·b numbers, in bf16 or fp32

# %% [markdown]
# Korthikanti et al.'s 34 + 5·a·s/h, to the byte (they leave out LayerNorm's per-token mean and
# 1/std, which are tiny: 4·s·b numbers against 34·s·b·h bytes). The tensor-parallel versions below
# use our fp32, dropout-free blocks: 4·s·b·h·(16 + a·s/h) bytes dense, plus 16·s·b for LayerNorm's
# statistics, and the same row-by-row bookkeeping for TP and TP+SP:


# %%
def ours(kind, t):
    """Bytes per rank our block should save, from the table above (fp32, no dropout)."""
    stats = 16 * sb  # LayerNorm mean and 1/std
    per_sbh = {
        "dense": 16 + HEADS * S / H,
        "TP": 4 + 12 / t + HEADS * S / (H * t),
        "TP+SP": 2 + 14 / t + HEADS * S / (H * t),
        "TP+SP, re-gather": (16 + HEADS * S / H) / t,
    }[kind]
    return 4 * sbh * per_sbh + (stats if kind in ("dense", "TP") else stats / t)


def megatron(kind, t):
    """Korthikanti et al.'s bytes (16-bit, with dropout) for the same s, b, h, a.

    Their TP+SP formula assumes the re-gather; without it, the 4 bytes per sbh of
    qkv and fc1 inputs stay whole: s·b·h·(4 + 30/t + 5·a·s/(h·t)).
    """
    return {
        "dense": sbh * (34 + 5 * HEADS * S / H),
        "TP": sbh * (10 + 24 / t + 5 * HEADS * S / (H * t)),
        "TP+SP": sbh * (4 + 30 / t + 5 * HEADS * S / (H * t)),  # qkv, fc1 inputs whole
        "TP+SP, re-gather": sbh * (34 + 5 * HEADS * S / H) / t,
    }[kind]


print(
    f"{'':22} {'t':>2} {'measured':>9} {'our formula':>12} {'vs dense':>9} "
    f"{'Megatron formula':>17} {'vs dense':>9}"
)
for (kind, n), regions in measured.items():
    got = sum(regions.values())
    print(
        f"{kind:22} {n:>2} {got:>9,} {ours(kind, n):>12,.0f} {got / ours('dense', 1):>9.3f} "
        f"{megatron(kind, n):>17,.0f} {megatron(kind, n) / megatron('dense', 1):>9.3f}"
    )
    assert got == ours(kind, n)

# %% [markdown]
# Measured and our formula agree to the byte, for every configuration. The ratios to the dense
# layer (the "vs dense" columns) tell the story the same way in both bookkeepings:
#
# * **TP alone** shrinks only the parts inside the attention and MLP; the 10 bytes (ours: 4 numbers) per sbh of
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
viz.plot_saved_activations(
    measured,
    {key: ours(*key) for key in measured},
    f"One transformer block, s = {S}, b = {B}, h = {H}, a = {HEADS}, fp32: measured with "
    "saved_tensors_hooks; tick = our formula",
)

# %% [markdown]
# ## And dropout?
#
# The blocks this chapter checks for equality have no dropout, to keep "equal to the dense model"
# an exact statement (the dropout block above only measured memory). In a real
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
#   by t: s·b·h·(34 + 5·a·s/h)/t in Korthikanti et al.'s 16-bit count with dropout (its dense
#   34 + 5·a·s/h measured to the byte in bf16), and our fp32, dropout-free version measured to
#   the byte for every t.
# * The replicated parameters (LayerNorms, row-parallel biases) see only their rank's tokens:
#   one small all-reduce of their gradients per step.

# %% [markdown]
# ## What you measured
#
# Each formula of this chapter beside the number your run produced (traffic: b·s·h = 2·32·128,
# K = b·s·h floats; memory: s = 32, b = 2, h = 64, a = 4).

# %%
rows = [("SP block vs dense, N = 1, 2, 4", "equal (1e-5)", f"{max(sp_largest.values()):.1e}")]
ours_rs, gloo_rs = rs_sent["tp._reduce_scatter"], rs_sent["gloo's dist.reduce_scatter"]
if ours_rs is not None:
    rows += [
        ("reduce-scatter, N=4: sent / tensor", "(N−1)/N = 0.750", f"{ours_rs / S_RS:.3f}"),
        (
            "gloo's reduce_scatter, N=4: sent / tensor",
            "≥ all-reduce's 2(N−1)/N = 1.500",
            f"{gloo_rs / S_RS:.3f}",
        ),
    ]
for kind, label, calls in zip(
    KINDS, ("TP", "SP", "SP, re-gather"), ("2 AR, one per sublayer", "2 AG + 2 RS (A2A)", "4 AG + 2 RS (A2A)")
):
    m = sp_traffic[kind, 4]
    rows.append((f"{label}, N=4: backward calls", calls, short(m["bwd_calls"])))
    if m["fwd"] is not None:
        rows.append(
            (f"{label}, N=4: received, forward", f"2·2(N−1)/N·4K = {m['ideal']:,.0f}", f"{m['fwd']:,}")
        )
m = sp_traffic["sequence parallel, re-gather", 4]
if m["bwd"] is not None:
    rows.append(
        (
            "SP, re-gather, N=4: received, backward",
            f"+ 2 AG = 3·2(N−1)/N·4K = {1.5 * m['ideal']:,.0f}",
            f"{m['bwd']:,}",
        )
    )
for n in (2, 4):
    rows.append(
        (
            f"LayerNorm activations, TP+SP, t={n}",
            f"1/t of dense = {1 / n:.3f}",
            f"{norms[n] / dense_norms:.3f}",
        )
    )
rows.append(
    (
        "dense, bf16 + dropout: bytes saved",
        f"sbh(34 + 5as/h) = {korthikanti:,.0f}",
        f"{sum(saved16.values()) - layer_norm_stats:,.0f}",
    )
)
for (kind, n), regions in measured.items():
    formula_text = {
        "dense": "4sbh(16 + as/h) + 16sb",
        "TP": "4sbh(4 + 12/t + as/(ht)) + 16sb",
        "TP+SP": "4sbh(2 + 14/t + as/(ht)) + 16sb/t",
        "TP+SP, re-gather": "4sbh(16 + as/h)/t + 16sb/t",
    }[kind]
    rows.append(
        (
            f"{kind}, t={n}: saved per rank",
            f"{formula_text} = {ours(kind, n):,.0f}",
            f"{sum(regions.values()):,}",
        )
    )
print(f"{'quantity':<42}  {'formula':<44}  {'measured':>12}")
for quantity, formula_text, value in rows:
    print(f"{quantity:<42}  {formula_text:<44}  {value:>12}")

# %% [markdown]
# Glossary: 序列并行 sequence parallelism · 张量并行 tensor parallelism · 激活显存 activation
# memory · 全收集 all-gather · 归约散射 reduce-scatter · 层归一化 LayerNorm · 重计算 recomputation.
#
# Next: the exercises (`my_exercises/05_sequence_parallel.ipynb`) have you build the sequence shard,
# both conjugate pairs and a sequence-parallel LayerNorm + MLP sublayer.
