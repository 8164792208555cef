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
# Notation: **N** ranks in the tensor-parallel group (Megatron's papers call it t), rank **r**;
# activations `(b, s, h)` = (batch, sequence, d_model); the MLP's hidden size **H** = 4h.
# `nn.Linear` stores its weight as `(out, in)` and computes `x @ weight.T + bias`, so Megatron's
# matrix **A** of the first layer is `fc1.weight.T` and **B** is `fc2.weight.T`. The ranks here
# run on the CPU with gloo (`backend="gloo"`) even on a GPU machine: the models are tiny, and the
# traffic counter reads gloo's TCP sockets.

# %%
import inspect

import torch
import torch.distributed as dist
import torch.nn.functional as F
from matplotlib.patches import Patch, Rectangle

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
print("row split:    |GeLU(X1A1 + X2A2) - (GeLU(X1A1) + GeLU(X2A2))| max =",
      f"{(F.gelu(X1 @ A1 + X2 @ A2) - (F.gelu(X1 @ A1) + F.gelu(X2 @ A2))).abs().max():.3f}")
Ac1, Ac2 = A[:, :16], A[:, 16:]  # column split of A
print("column split: |GeLU(XA) - [GeLU(XA1), GeLU(XA2)]|        max =",
      f"{(F.gelu(X @ A) - torch.cat([F.gelu(X @ Ac1), F.gelu(X @ Ac2)], dim=1)).abs().max():.3g}")

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
# The picture below is not drawn by hand: every weight of a dense MLP and attention is filled
# with its own element number, `tp.TensorParallelMLP.from_dense` and
# `tp.TensorParallelAttention.from_dense` run on 4 ranks, and each element is coloured by the
# rank(s) that hold it afterwards.

# %%
def holdings(d_model, d_hidden, n_heads):
    """Each dense element's number, as held by this rank after from_dense."""
    block = make_block(d_model, n_heads, d_hidden)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.arange(p.numel(), dtype=p.dtype).view_as(p))
    mlp = tp.TensorParallelMLP.from_dense(block.mlp)
    attn = tp.TensorParallelAttention.from_dense(block.attn)
    return {**{f"mlp.{k}": p for k, p in mlp.named_parameters()},
            **{f"attn.{k}": p for k, p in attn.named_parameters()}}


def owners(shape, held):
    """For each element of a dense tensor: the rank holding it, or -1 when every rank does."""
    count, owner = torch.zeros(shape).view(-1), torch.zeros(shape).view(-1)
    for rank, t in enumerate(held):
        count[t.long().view(-1)] += 1
        owner[t.long().view(-1)] = rank
    owner[count > 1] = -1
    return owner.view(shape if len(shape) == 2 else (shape[0], 1))


def draw_matrix(ax, x0, owner, n, title, split_every=None):
    """One cell per element, coloured by its owner; gray for replicated."""
    rows, cols = owner.shape
    image = [[viz.rank_color(int(o), n) if o >= 0 else (0.75, 0.75, 0.75, 1.0) for o in row] for row in owner]
    ax.imshow(image, extent=(x0, x0 + cols, rows, 0), interpolation="nearest")
    for y in range(1, rows):  # faint lines between elements
        ax.plot([x0, x0 + cols], [y, y], color="white", linewidth=0.3)
    for x in range(1, cols):
        ax.plot([x0 + x, x0 + x], [0, rows], color="white", linewidth=0.3)
    ax.add_patch(Rectangle((x0, 0), cols, rows, fill=False, edgecolor="black", linewidth=0.8))
    for y in range(split_every or rows, rows, split_every or rows):
        ax.plot([x0, x0 + cols], [y, y], color="black", linewidth=1.2)
    ax.text(x0 + cols / 2, -1.0, title, ha="center", va="bottom", fontsize=9)


def layout_figure(n=4, d_model=8, d_hidden=32, n_heads=4):
    held = launch.run(holdings, n, d_model, d_hidden, n_heads, backend="gloo")
    dense = make_block(d_model, n_heads, d_hidden)
    shapes = {k: tuple(p.shape) for k, p in dense.named_parameters()}
    fig = viz.CourseFigure(figsize=(11, 6.2), layout="constrained")
    ax_mlp, ax_attn = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[58, 32]))
    x0 = 0
    panels = [(ax_mlp, "mlp.fc1.weight", "fc1.weight (H×h)\nrows split\n(= A's columns)", None),
              (ax_mlp, "mlp.fc1.bias", "fc1.bias\n\n", None),
              (ax_mlp, "mlp.fc2.weight", "fc2.weight (h×H)\ncolumns split\n(= B's rows)", None),
              (ax_mlp, "mlp.fc2.bias", "fc2.bias\n(whole)\n", None),
              (ax_attn, "attn.qkv.weight", "qkv.weight (3h×h)\nq, k, v stacked:\nheads split", d_model),
              (ax_attn, "attn.qkv.bias", "qkv.bias\n\n", d_model),
              (ax_attn, "attn.proj.weight", "proj.weight (h×h)\ncolumns split\n", None),
              (ax_attn, "attn.proj.bias", "proj.bias\n(whole)\n", None)]
    for ax, name, title, split in panels:
        x0 = 0 if name in ("mlp.fc1.weight", "attn.qkv.weight") else x0
        owner = owners(shapes[name], [h[name] for h in held])
        draw_matrix(ax, x0, owner, n, title, split)
        x0 += owner.shape[1] + 4
    for ax, label in ((ax_mlp, "MLP"), (ax_attn, f"attention ({n_heads} heads)")):
        ax.set_xlim(-1, ax.get_xlim()[1] + 1)
        ax.set_ylim(max(d_hidden, 3 * d_model) + 0.5, -8)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(label, fontsize=11)
    for i, part in enumerate("qkv"):
        ax_attn.text(-0.6, d_model * (i + 0.5), part, ha="right", va="center", fontsize=10)
    handles = [Patch(color=viz.rank_color(r, n), label=f"rank {r}") for r in range(n)]
    handles.append(Patch(color=(0.75, 0.75, 0.75), label="every rank (replicated)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=n + 1, fontsize=9, frameon=False)
    fig.suptitle(f"Who holds which weight, N = {n}, h = {d_model}, H = {d_hidden}: "
                 "one cell per element", fontsize=11)
    return fig


layout_figure()

# %% [markdown]
# ## f and g: two autograd functions carry all the communication
#
# Rank r's columns of `X A` depend on the whole input X, so X must be the same on every rank —
# and its gradient is a **sum over ranks**, because the loss depends on X through every rank's
# columns. After the second layer it is the reverse: the ranks hold partial sums that must be
# added, while the gradient of the sum is simply passed to every part. Megatron names the two
# operations:
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
# and every rank runs exactly this code. Here they are, from `course_lib/tp.py`:

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
    for n in (1, 2, 4):
        per_rank = launch.run(differences, n, kind, backend="gloo")
        worst = {k: max(d[k] for d in per_rank) for k in per_rank[0]}
        print(f"{kind}, N = {n}: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
        assert max(worst.values()) < 1e-5, worst


show_differences("mlp")

# %% [markdown]
# ## Attention with the heads split
#
# Heads are independent until the output projection mixes them: rank r runs its H/N heads on the
# whole sequence (its rows of `qkv` are column-parallel, preceded by f) and multiplies their
# outputs by its block of columns of `proj` (row-parallel, followed by g). Same pattern, same
# two communications — and again equal to the dense attention on every rank:

# %%
show_differences("attention")

# %% [markdown]
# ## Measured: one all-reduce each way, 1/N of the parameters
#
# Now a wider MLP (h = 128, H = 512) on an activation of b·s·h = 2·32·128 = 8192 floats (32 KiB):
# the traffic counter (`course_lib.comm.count_traffic`) records every `torch.distributed` call on
# each rank, and the bytes that really crossed its TCP connections. A ring all-reduce of K floats
# sends 2(N−1)/N·4K bytes per rank (chapter 01); gloo adds small message headers.

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
    return dict(fwd=forward.count("all_reduce"), bwd=backward.count("all_reduce"),
                fwd_calls=len(forward.calls), bwd_calls=len(backward.calls), sent=forward.sent,
                ring=2 * (n - 1) / n * 4 * b * s * h,
                dense_bytes=sum(p.numel() * p.element_size() for p in dense.parameters()),
                rank_bytes=sum(p.numel() * p.element_size() for p in ours.parameters()),
                replicated=ours.fc2.bias.nbytes if kind == "mlp" else ours.proj.bias.nbytes)


print(f"{'':10} {'N':>2} {'all-reduces fwd/bwd':>20} {'other calls':>11} {'sent fwd (B)':>13} "
      f"{'ring 2(N-1)/N·4K':>17} {'params/rank (B)':>16} {'(dense-bias)/N+bias':>20}")
for kind in ("mlp", "attention"):
    for n in (2, 4):
        m = launch.run(measure, n, kind, backend="gloo")[0]
        formula = (m["dense_bytes"] - m["replicated"]) / n + m["replicated"]
        print(f"{kind:10} {n:>2} {m['fwd']:>9} / {m['bwd']:<8} "
              f"{m['fwd_calls'] + m['bwd_calls'] - m['fwd'] - m['bwd']:>11} {m['sent']:>13,} "
              f"{m['ring']:>17,.0f} {m['rank_bytes']:>16,} {formula:>20,.0f}")
        assert (m["fwd"], m["bwd"]) == (1, 1) and m["rank_bytes"] == formula

# %% [markdown]
# Exactly one all-reduce in the forward pass (g) and one in the backward pass (f), and no other
# communication, per MLP and per attention block; the bytes on the wire are the ring's
# 2(N−1)/N·4K plus gloo's headers (under 4 %). The communication does **not** shrink as N grows:
# every rank sends about 2·b·s·h·4 bytes per all-reduce whatever N is — the price of keeping the
# activations whole on every rank.
#
# Per-rank parameter bytes are 1/N of the dense layer's **plus** the bias of the row-parallel
# layer (`fc2.bias`, `proj.bias`: h numbers), which every rank keeps whole because it is added
# once, after the all-reduce. For real sizes that bias is negligible (h out of ~8h² numbers).
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
    theirs = parallelize_module(make_mlp(D_MODEL, D_HIDDEN, seed=0), mesh,
                                {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    g = torch.Generator().manual_seed(2)
    x, upstream = torch.randn(2, 5, D_MODEL, generator=g), torch.randn(2, 5, D_MODEL, generator=g)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_theirs = ours(x_ours), theirs(x_theirs)
    (out_ours * upstream).sum().backward()
    (out_theirs * upstream).sum().backward()
    diff = {"output": (out_ours - out_theirs).abs().max(),
            "x.grad": (x_ours.grad - x_theirs.grad).abs().max()}
    mine = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        diff[f"{name}.grad"] = (mine[name].grad - local).abs().max()
    return {k: float(v.detach()) for k, v in diff.items()}


per_rank = launch.run(ours_vs_torch, 2, backend="gloo")  # try 4: slower to start, same result
worst = {k: max(d[k] for d in per_rank) for k in per_rank[0]}
print("ours vs parallelize_module, N = 2: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
assert max(worst.values()) < 1e-5, worst

# %% [markdown]
# Torch's `ColwiseParallel` cuts `fc1.weight` by rows and `RowwiseParallel` cuts `fc2.weight` by
# columns into the same contiguous blocks, and keeps `fc2.bias` replicated: the layouts agree
# shard for shard.
#
# ## Beyond 1D: 2D, 2.5D and 3D tensor parallelism
#
# Megatron's split is called **1D** because each weight is cut along one dimension, and the
# activations between layers stay whole on every rank. Two consequences you measured above: the
# all-reduce moves about 2·b·s·h per layer whatever N is, and activation memory at the layer
# boundaries does not shrink with N. Colossal-AI's 2D, 2.5D and 3D methods (built on SUMMA, the
# scalable matrix-multiplication algorithm) also cut the activations, by arranging the P devices
# in a grid and splitting *both* the input and the weight into blocks:
#
# * **2D** (P = q×q): X and A are q×q block matrices; the product takes q steps, in each of which
#   a column of X blocks is broadcast along the grid rows and a row of A blocks along the grid
#   columns. Each device holds 1/P of the weights *and* of the activations.
# * **2.5D** (P = q×q×d): d stacked 2D grids, the batch split across the d layers of the stack
#   and the weight blocks repeated in each. More devices for the same q, hence less traffic per
#   device than 2D, paid for with d copies of the weights.
# * **3D** (P = q×q×q): inputs and weights are spread over a cube; each device all-gathers the
#   blocks it needs along two axes of the cube, multiplies, and reduce-scatters along the third.
#   The traffic per device shrinks fastest with P.
#
# | | devices | weights per device | activations per device | traffic per device per layer (large P) | steps |
# |---|---|---|---|---|---|
# | 1D (Megatron) | P | 1/P | whole (replicated between layers) | ≈ 2× the activation, flat in P | 2(P−1) per all-reduce |
# | 2D | P = q² | 1/P | 1/P | ∝ (activation + weight)/√P | O(q) |
# | 2.5D | P = q²·d | d/P | 1/P | below 2D for the same P | O(q) |
# | 3D | P = q³ | 1/P | 1/P | ∝ (activation + weight)/P^(2/3) | O(q) |
#
# (Orders of magnitude from the 2D/2.5D/3D papers — Optimus, Tesseract and Bian et al., 2021 —
# not measured here.) In practice 1D wins inside one machine: N stays small (≤ 8) and fast links
# make the flat all-reduce cheap; the grid methods pay off only when P is large, at the cost of
# many more, smaller messages and a more rigid device count. The activation problem of 1D is
# attacked differently in chapter 05: **sequence parallelism** splits the activations that 1D
# leaves whole, without adding traffic.
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
#
# Glossary: 张量并行 tensor parallelism · 列并行 column parallel · 行并行 row parallel ·
# 模型并行 model parallelism · 全归约 all-reduce · 激活 activation.
#
# Next: the exercises (`exercises/04_tensor_parallel.ipynb`) have you build the column-parallel
# layer, f, g, the row-parallel layer and the whole MLP yourself.
