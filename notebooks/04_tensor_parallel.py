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
# # 04 · Tensor parallelism: splitting one layer across ranks
#
# Data parallelism (chapter 02) gives every rank the whole model. When one layer's weights no
# longer fit on one device, or one device is too slow for one layer, the layer itself has to be
# split: **tensor parallelism** (张量并行) cuts each weight matrix into blocks, one per rank, and
# the ranks compute one layer together. (Pipeline parallelism, chapter 06, splits *between*
# layers instead; both are "model parallelism" (模型并行).)
#
# This chapter builds Megatron-LM's version, the "1D" split, on the transformer's MLP and
# attention, checks that it computes exactly what the dense layer computes — forward output and
# every gradient — and measures what it costs.
#
# Notation: **N** ranks in the tensor-parallel group (Megatron's later papers, Narayanan et al.
# 2021 and Korthikanti et al. 2022, call it t), rank **r**; activations `(b, s, h)` = (batch,
# sequence, d_model); the MLP's hidden size **H** = 4h; **a** attention heads.
# `nn.Linear` stores its weight as `(out, in)` and computes `x @ weight.T + bias`, so Megatron's
# matrix **A** of the first layer is `fc1.weight.T` and **B** is `fc2.weight.T`. The ranks here
# run on the CPU with gloo (`backend="gloo"`) even on a GPU machine: the models are tiny, and the
# traffic counter reads gloo's TCP sockets.

# %%
import inspect

import torch
import torch.distributed as dist
import torch.nn.functional as F

from course_lib import launch, tp, viz
from course_lib.comm import count_traffic
from course_lib.models import make_block, make_mlp

# %% [markdown]
# ## Which way to cut A? GELU decides
#
# The MLP computes `Z = GeLU(X A) B`. There are two ways to split the first product over two
# ranks:
#
# * **by rows of A** (and columns of X): `X A = X₁A₁ + X₂A₂`. Each rank has one term, but
#   GELU is not linear, so `GeLU(X₁A₁ + X₂A₂) ≠ GeLU(X₁A₁) + GeLU(X₂A₂)`: the ranks would have
#   to add their terms (an all-reduce) *before* GELU — an extra synchronisation in every layer.
# * **by columns of A**: `X [A₁ A₂] = [X A₁, X A₂]`. GELU acts element by element, so
#   `GeLU(X A) = [GeLU(X A₁), GeLU(X A₂)]`: each rank applies GELU to its own columns, no
#   communication at all.
#
# The numbers, on one process:

# %%
torch.manual_seed(0)
X, A = torch.randn(6, 8), torch.randn(8, 32)
X1, X2, A1, A2 = X[:, :4], X[:, 4:], A[:4], A[4:]  # row split of A, column split of X
row_error = (F.gelu(X1 @ A1 + X2 @ A2) - (F.gelu(X1 @ A1) + F.gelu(X2 @ A2))).abs().max()
Ac1, Ac2 = A[:, :16], A[:, 16:]  # column split of A
column_error = (F.gelu(X @ A) - torch.cat([F.gelu(X @ Ac1), F.gelu(X @ Ac2)], dim=1)).abs().max()
print(f"row split:    |GeLU(X1A1 + X2A2) - (GeLU(X1A1) + GeLU(X2A2))| max = {row_error:.3f}")
print(f"column split: |GeLU(XA) - [GeLU(XA1), GeLU(XA2)]|        max = {column_error:.3g}")
assert row_error > 0.1 and column_error < 1e-5  # the row split is wrong, the column split exact

# %% [markdown]
# The column split is exact (up to float rounding, ~1e-7). Its output is already split by hidden
# features, which is just what the second layer needs if **B is split by rows**: `Y B = Y₁B₁ + Y₂B₂`. Each rank multiplies
# its own block and holds one partial sum; a single all-reduce adds them. So the whole MLP needs
# **one all-reduce in the forward pass**, after the second matrix.
#
# ## The shard layout
#
# Rank r keeps a contiguous block (the Megatron layout): rows `r·H/N … (r+1)·H/N` of
# `fc1.weight` (= A's columns) and of `fc1.bias`, and the same block of **columns** of
# `fc2.weight` (= B's rows). `fc2.bias` is kept whole on every rank and added once, after the
# all-reduce. In attention the unit is a **head**: the fused `qkv` weight stacks `[q; k; v]`, and
# rank r keeps its heads' rows in each of the three, so it can run whole heads alone; `proj` is
# split by columns like `fc2`.
#
# The picture below is not drawn by hand: `tp.who_holds_what` fills every weight of a dense MLP
# and attention with its own element numbers, runs `tp.TensorParallelMLP.from_dense` and
# `tp.TensorParallelAttention.from_dense` on 4 ranks, and reads back which numbers each rank
# kept; each element is coloured by the rank that holds it.

# %%
owners = tp.who_holds_what(world_size=4, d_model=8, d_hidden=32, n_heads=4)
# every element of fc1 and fc2's weights has exactly one owner; the row-parallel biases are everywhere
assert all((owners[f"mlp.{name}.weight"] >= 0).all() for name in ("fc1", "fc2"))
assert (owners["mlp.fc2.bias"] == -1).all() and (owners["attn.proj.bias"] == -1).all()
viz.plot_tp_layout(owners, n=4, d_model=8, d_hidden=32, n_heads=4)

# %% [markdown]
# ## f and g: two autograd functions carry all the communication
#
# Rank r's columns of `X A` depend on the whole input X, so X must be the same on every rank —
# and its gradient is a **sum over ranks**, because the loss depends on X through every rank's
# columns. After the second layer it is the reverse: the ranks hold partial sums that must be
# added, while the gradient of the sum is simply passed to every part. The Megatron-LM paper
# (Shoeybi et al., 2019) names the two operations **f** and **g**; its code calls them
# `copy_to_tensor_model_parallel_region` and `reduce_from_tensor_model_parallel_region`, and
# `course_lib.tp` shortens that to:
#
# | | forward | backward | where |
# |---|---|---|---|
# | **f** `copy_to_tp_region` | identity | all-reduce | before the column-parallel layer |
# | **g** `reduce_from_tp_region` | all-reduce | identity | after the row-parallel layer |
#
# Each is the other's transpose: copying one tensor to N ranks (f) has the sum (g's forward) as
# its backward, and vice versa. The MLP is then
#
# ```
# x ─▶ f ─▶ x @ A_r + a_r ─▶ GELU ─▶ (·) @ B_r ─▶ g ─▶ + b ─▶ z      (same on every rank)
# ```
#
# and every rank runs exactly this code. Here they are, from `course_lib/tensor_parallel.py`:

# %%
print(inspect.getsource(tp._CopyToTPRegion))
print(inspect.getsource(tp._ReduceFromTPRegion))
print(inspect.getsource(tp.TensorParallelMLP))

# %% [markdown]
# ## Equal to the dense MLP: output and every gradient, N = 1, 2, 4
#
# Each rank builds the same seeded dense MLP, cuts its shard with `from_dense`, runs forward and
# backward on the same input, and compares with the dense layer it also computes: the output and
# the input's gradient must be equal on **every** rank, and each shard's weight and bias
# gradients must equal the matching block of the dense gradients. The table shows the largest
# difference found over all ranks.

# %%
D_MODEL, D_HIDDEN, N_HEADS = 16, 64, 4


def block_of(size, rank, n):
    return slice(rank * size // n, (rank + 1) * size // n)


def matching_slice(name, dense_grad, rank, n):
    """The block of a dense gradient that rank r's shard of parameter ``name`` corresponds to."""
    if name in ("fc2.bias", "proj.bias"):
        return dense_grad  # replicated
    if name in ("fc1.weight", "fc1.bias"):
        return dense_grad[block_of(dense_grad.shape[0], rank, n)]
    if name in ("fc2.weight", "proj.weight"):
        return dense_grad[:, block_of(dense_grad.shape[1], rank, n)]
    # qkv.weight / qkv.bias: my heads' rows of each of q, k and v
    return torch.cat([part[block_of(part.shape[0], rank, n)] for part in dense_grad.chunk(3)])


def differences(kind):
    """Max |ours - dense| for the output, x.grad and every parameter's gradient on this rank."""
    rank, n = dist.get_rank(), dist.get_world_size()
    if kind == "mlp":
        dense = make_mlp(D_MODEL, D_HIDDEN, seed=0)
        ours = tp.TensorParallelMLP.from_dense(dense)
    else:
        dense = make_block(D_MODEL, N_HEADS, D_HIDDEN, seed=0).attn
        ours = tp.TensorParallelAttention.from_dense(dense)
    g = torch.Generator().manual_seed(1)
    x, upstream = torch.randn(2, 5, D_MODEL, generator=g), torch.randn(2, 5, D_MODEL, generator=g)
    x_dense, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_dense, out_ours = dense(x_dense), ours(x_ours)
    (out_dense * upstream).sum().backward()
    (out_ours * upstream).sum().backward()
    diff = {"output": (out_ours - out_dense).abs().max(), "x.grad": (x_ours.grad - x_dense.grad).abs().max()}
    dense_grads = dict(dense.named_parameters())
    for name, p in ours.named_parameters():
        expected = matching_slice(name, dense_grads[name].grad, rank, n)
        diff[f"{name}.grad"] = (p.grad - expected).abs().max()
    return {k: float(v.detach()) for k, v in diff.items()}


def show_differences(kind):
    """Largest |ours − dense| over every rank and tensor, per N (printed per tensor)."""
    largest = {}
    for n in (1, 2, 4):
        per_rank = launch.run(differences, n, kind, backend="gloo")
        worst = {k: max(d[k] for d in per_rank) for k in per_rank[0]}
        print(f"{kind}, N = {n}: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
        assert max(worst.values()) < 1e-5, worst
        largest[n] = max(worst.values())
    return largest


mlp_differences = show_differences("mlp")

# %% [markdown]
# ## Attention with the heads split
#
# Heads are independent until the output projection mixes them: rank r runs its a/N heads (each
# of h/a features) on the whole sequence — its rows of `qkv` are column-parallel, preceded by f —
# and multiplies their outputs by its block of columns of `proj` (row-parallel, followed by g).
# So N must divide the number of heads a, as it must divide H in the MLP. Same pattern, same two
# communications — and again equal to the dense attention on every rank:

# %%
attention_differences = show_differences("attention")

# %% [markdown]
# ## Measured: one all-reduce each way, 1/N of the parameters
#
# Now a wider MLP (h = 128, H = 512) and attention (a = 8 heads) on an activation of
# b·s·h = 2·32·128 = 8192 floats (32 KiB): the traffic counter (`course_lib.comm.count_traffic`)
# records every `torch.distributed` call on each rank, and the bytes that really crossed its TCP
# connections. A ring all-reduce of K floats sends and receives 2(N−1)/N·4K bytes per rank
# (chapter 03); gloo's ring does too, plus small message headers. The table shows bytes
# *received*, the steadier of the kernel's two counters (a retransmitted segment counts twice as
# sent, once as received).


# %%
def measure(kind, b=2, s=32, h=128):
    n = dist.get_world_size()
    if kind == "mlp":
        dense = make_mlp(h, 4 * h)
        ours = tp.TensorParallelMLP.from_dense(dense)
    else:
        dense = make_block(h, 8, 4 * h).attn
        ours = tp.TensorParallelAttention.from_dense(dense)
    x = torch.randn(b, s, h, requires_grad=True)
    with count_traffic() as forward:
        out = ours(x)
    with count_traffic() as backward:
        out.sum().backward()
    return dict(
        fwd=forward.count("all_reduce"),
        bwd=backward.count("all_reduce"),
        other=len(forward.calls)
        + len(backward.calls)
        - forward.count("all_reduce")
        - backward.count("all_reduce"),
        wire_fwd=forward.received,
        wire_bwd=backward.received,
        ring=2 * (n - 1) / n * 4 * b * s * h,
        dense_bytes=sum(p.numel() * p.element_size() for p in dense.parameters()),
        rank_bytes=sum(p.numel() * p.element_size() for p in ours.parameters()),
        replicated=ours.fc2.bias.nbytes if kind == "mlp" else ours.proj.bias.nbytes,
    )


tp_measured = {
    (kind, n): launch.run(measure, n, kind, backend="gloo")[0]
    for kind in ("mlp", "attention")
    for n in (2, 4)
}
print(
    f"{'':10} {'N':>2} {'all-reduces fwd/bwd':>19} {'other calls':>11} {'recv fwd':>9} {'recv bwd':>9} "
    f"{'2(N−1)/N·4bsh':>14} {'params/rank':>12} {'(dense−bias)/N+bias':>20}"
)
for (kind, n), m in tp_measured.items():
    params_formula = (m["dense_bytes"] - m["replicated"]) / n + m["replicated"]
    wire = (
        f"{m['wire_fwd']:>9,} {m['wire_bwd']:>9,}" if m["wire_fwd"] is not None else f"{'n/a':>9} {'n/a':>9}"
    )
    print(
        f"{kind:10} {n:>2} {m['fwd']:>9} / {m['bwd']:<7} {m['other']:>11} {wire} {m['ring']:>14,.0f} "
        f"{m['rank_bytes']:>12,} {params_formula:>20,.0f}"
    )
    assert (m["fwd"], m["bwd"], m["other"]) == (1, 1, 0) and m["rank_bytes"] == params_formula
    if m["wire_fwd"] is not None:  # wire bytes: the ring's, plus gloo's headers
        assert (
            m["ring"] <= m["wire_fwd"] <= 1.05 * m["ring"] and m["ring"] <= m["wire_bwd"] <= 1.05 * m["ring"]
        )

# %% [markdown]
# Exactly one all-reduce in the forward pass (g) and one in the backward pass (f), and no other
# communication, per MLP and per attention block; the bytes on the wire are the ring's
# 2(N−1)/N·4K plus gloo's headers (under 5 %, asserted). The communication does **not** shrink as
# N grows: every rank sends 2(N−1)/N·b·s·h·4 bytes per all-reduce, which even *grows* toward
# 2·b·s·h·4 as N grows — the price of keeping the activations whole on every rank.
#
# Per-rank parameter bytes are 1/N of the dense layer's **plus** the bias of the row-parallel
# layer (`fc2.bias`, `proj.bias`: h numbers), which every rank keeps whole because it is added
# once, after the all-reduce. For real sizes that bias is negligible (h out of the MLP's ~8h²
# numbers).
#
# ## Against torch's own tensor parallelism
#
# PyTorch ships the same idea as `parallelize_module` with `ColwiseParallel` (for fc1) and
# `RowwiseParallel` (for fc2) over a `DeviceMesh`; its parameters become `DTensor`s whose local
# shard is what this rank holds. It runs on gloo on the CPU, so we can compare: same output,
# same input gradient, and the same gradient on every local shard. (Its first launch takes a
# few seconds more: the ranks import torch's DTensor machinery.)


# %%
def ours_vs_torch():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    ours = tp.TensorParallelMLP.from_dense(make_mlp(D_MODEL, D_HIDDEN, seed=0))
    theirs = parallelize_module(
        make_mlp(D_MODEL, D_HIDDEN, seed=0), mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}
    )
    g = torch.Generator().manual_seed(2)
    x, upstream = torch.randn(2, 5, D_MODEL, generator=g), torch.randn(2, 5, D_MODEL, generator=g)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_theirs = ours(x_ours), theirs(x_theirs)
    (out_ours * upstream).sum().backward()
    (out_theirs * upstream).sum().backward()
    diff = {
        "output": (out_ours - out_theirs).abs().max(),
        "x.grad": (x_ours.grad - x_theirs.grad).abs().max(),
    }
    mine = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        diff[f"{name}.grad"] = (mine[name].grad - local).abs().max()
    return {k: float(v.detach()) for k, v in diff.items()}


per_rank = launch.run(ours_vs_torch, 2, backend="gloo")  # try 4: slower to start, same result
vs_torch = {k: max(d[k] for d in per_rank) for k in per_rank[0]}
print("ours vs parallelize_module, N = 2: " + ", ".join(f"{k} {v:.1e}" for k, v in vs_torch.items()))
assert max(vs_torch.values()) < 1e-5, vs_torch

# %% [markdown]
# Torch's `ColwiseParallel` cuts `fc1.weight` by rows and `RowwiseParallel` cuts `fc2.weight` by
# columns into the same contiguous blocks, and keeps `fc2.bias` replicated: the layouts agree
# shard for shard.
#
# ## Beyond 1D: 2D, 2.5D and 3D tensor parallelism (built in chapter 04b)
#
# Colossal-AI calls Megatron's split **1D**: each weight is cut along one dimension, and the
# activations between layers stay whole on every rank. Two consequences you measured above: each
# all-reduce sends 2(N−1)/N·b·s·h numbers per rank, which does not fall as N grows, and the
# activations at the layer boundaries do not shrink with N. This chapter builds and measures 1D.
# Three methods that also cut the activations — by arranging the P devices in a grid and
# splitting *both* the input and the weight into blocks — are outlined here, each resting on a
# parallel matrix-multiplication algorithm; chapter 04b (`04b_tensor_parallel_nd`) builds all
# three on CPU ranks and measures their memory and traffic beside these formulas:
#
# * **2D** (Optimus, Xu et al. 2021), P = q×q, on **SUMMA** (van de Geijn and Watts, 1997): X and
#   A are q×q block matrices; the product takes q steps, in each of which a column of X's blocks
#   is broadcast along the grid rows and a row of A's blocks along the grid columns. Each device
#   holds 1/P of the weights *and* of the activations.
# * **2.5D** (Tesseract, Wang et al. 2021), P = q×q×d, on **Solomonik and Demmel's 2.5D matrix
#   multiplication** (2011): d stacked q×q grids; the activations' rows (batch and sequence) are
#   split across the d layers of the stack, and every layer holds a copy of the weight blocks.
#   Solomonik and Demmel showed that c copies of the data cut the words each processor must move
#   by √c; here the copies are d copies of the weights.
# * **3D** (Bian et al. 2021), P = q×q×q, on **Agarwal et al.'s 3D matrix multiplication**
#   (1995): inputs and weights are spread over a cube; each device all-gathers the blocks it needs
#   along two axes of the cube, multiplies, and reduce-scatters along the third. The words moved
#   per device fall as P^(2/3), the fastest of the four.
#
# | | devices | weights per device | activations per device | words moved per device per layer (large P) | steps |
# |---|---|---|---|---|---|
# | 1D (Megatron) | P | 1/P | whole (replicated between layers) | ≈ 2× the activation, flat in P | 2(P−1) per ring all-reduce |
# | 2D (SUMMA) | P = q² | 1/P | 1/P | ∝ (activation + weight)/√P | O(q) |
# | 2.5D (Solomonik–Demmel) | P = q²·d | d/P | 1/P | 2D's divided by about √d | O(q) |
# | 3D (Agarwal et al.) | P = q³ | 1/P | 1/P | ∝ (activation + weight)/P^(2/3) | O(q) |
#
# (Orders of growth from those papers; chapter 04b measures them.) In practice large models use 1D
# inside one server: Narayanan et al. (2021) recommend tensor parallelism up to the number of GPUs
# in a server (typically 8, joined by NVLink) and other kinds of parallelism across servers. The
# grid methods pay off only for large P, and pay for it with many more, smaller messages and a
# device count that must be a square or a cube. Chapter 05 attacks 1D's activation problem
# differently: **sequence parallelism** splits the activations that 1D leaves whole, without
# adding traffic.
#
# ## Summary
#
# * Split A by columns and B by rows: GELU then needs no communication, and the MLP (or the
#   attention, split by heads) costs **one all-reduce forward (g) and one backward (f)**,
#   measured.
# * Every rank computes exactly the dense output, and each shard's gradient is the matching block
#   of the dense gradient — checked for N = 1, 2, 4, and against torch's `parallelize_module`.
# * Per rank: 1/N of the parameters (plus the small replicated bias), but the whole activation
#   at the layer boundaries, and an all-reduce of it per layer that does not shrink with N —
#   which is why tensor parallelism stays inside a machine.

# %% [markdown]
# ## What you measured
#
# Each formula of this chapter beside the number your run produced (h = 128, b·s·h = 8192 floats
# for the traffic; d_model 16, H = 64 for the equality checks).

# %%
rows = [
    ("GeLU after a column split", "exact", f"{column_error:.1e}"),
    ("GeLU after a row split", "wrong: GeLU is not linear", f"{row_error:.2f}"),
    ("TP MLP vs dense, N = 1, 2, 4", "equal (1e-5)", f"{max(mlp_differences.values()):.1e}"),
    ("TP attention vs dense, N = 1, 2, 4", "equal (1e-5)", f"{max(attention_differences.values()):.1e}"),
    ("TP MLP vs parallelize_module, N = 2", "equal (1e-5)", f"{max(vs_torch.values()):.1e}"),
]
for (kind, n), m in tp_measured.items():
    rows.append(
        (
            f"{kind}, N={n}: all-reduces fwd / bwd",
            "1 (g) / 1 (f), 0 other",
            f"{m['fwd']} / {m['bwd']}, {m['other']} other",
        )
    )
    if m["wire_fwd"] is not None:
        rows.append(
            (
                f"{kind}, N={n}: bytes received per all-reduce",
                f"2(N−1)/N·4bsh = {m['ring']:,.0f}",
                f"{m['wire_fwd']:,}",
            )
        )
    rows.append(
        (
            f"{kind}, N={n}: parameter bytes per rank",
            f"(dense−bias)/N + bias = {(m['dense_bytes'] - m['replicated']) / n + m['replicated']:,.0f}",
            f"{m['rank_bytes']:,}",
        )
    )
print(f"{'quantity':<45}  {'formula':<35}  {'measured':>14}")
for quantity, formula_text, value in rows:
    print(f"{quantity:<45}  {formula_text:<35}  {value:>14}")

# %% [markdown]
# Glossary: 张量并行 tensor parallelism · 列并行 column parallel · 行并行 row parallel ·
# 模型并行 model parallelism · 全归约 all-reduce · 激活 activation.
#
# Next: the exercises (`my_exercises/04_tensor_parallel.ipynb`) have you build the column-parallel
# layer, f, g, the row-parallel layer and the whole MLP yourself.
