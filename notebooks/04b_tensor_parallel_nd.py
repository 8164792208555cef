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
# # 04b · Tensor parallelism in 2D, 2.5D and 3D: cutting a layer over a grid of ranks
#
# Chapter 04 split each weight matrix along **one** dimension (Megatron's split, which
# Colossal-AI calls **1D**). You measured its two costs: every rank keeps the activations between
# layers *whole*, and every MLP costs an all-reduce of that whole activation each way, 2(N−1)/N of
# it per rank — a figure that does not fall as N grows.
#
# This chapter arranges the N ranks in a **grid** and cuts the activations *and* the weights into
# blocks, so that each rank holds 1/N of both. Three parallel matrix-multiplication algorithms do
# the arithmetic:
#
# * **2D**, N = q·q: **SUMMA** (van de Geijn and Watts, 1997) — the basis of Colossal-AI's 2D
#   tensor parallelism (Optimus, Xu et al. 2021);
# * **2.5D**, N = q·q·d: **Solomonik and Demmel's 2.5D algorithm** (2011) — d copies of the 2D grid,
#   each running q/d of SUMMA's steps;
# * **3D**, N = q·q·q: **Agarwal et al.'s 3D algorithm** (1995) — the basis of Colossal-AI's 3D tensor
#   parallelism (Bian et al. 2021).
#
# You will run each on real ranks, check it equal to the dense MLP (output and every gradient),
# and measure per rank what it stores and what it sends beside each algorithm's formula.
#
# **Notation.** N ranks; a linear layer computes **Y = X·B** with X the (M, K) activations — M =
# b·s rows (batch × sequence) — and **B = weight.T** of shape (K, F), because `nn.Linear` stores
# `weight` as (F, K). The MLP is h → H → h (H = 4h). Grids: q ranks per side, depth d.
# Every "per rank" figure is bytes of fp32 numbers (4 bytes each) on one rank.

# %%
import inspect

import torch

from course_lib import alpha_beta, launch, tp_nd
from course_lib import viz_tensor_parallel_nd as viz
from course_lib.models import make_mlp
from course_lib.traffic import count_traffic

# %% [markdown]
# ## Blocks on a grid
#
# On the **q×q grid** rank r sits at row i = r // q and column j = r % q, and holds block (i, j)
# of X and block (i, j) of B: `X_ij` is rows i·M/q … (i+1)·M/q and columns j·K/q … (j+1)·K/q of X.
# Its output block is `Y_ij` — the same layout, so the next layer can start from it.
#
# On the **q×q×q cube** rank r sits at (a, b, c) with r = a·q² + b·q + c. It holds X's row block a
# and column block c, but only piece b (of q) of those rows; and the weight's output block b and
# input block c, but only piece a of those rows. Every element has exactly one owner again.
#
# The pictures are not drawn by hand: `tp_nd.owner_maps` numbers every element of X and of the
# weight, cuts them with `tp_nd.owned_2d` / `tp_nd.owned_3d` — the functions the layers below cut
# their blocks with — and reads back which rank got each number.

# %%
owners_2d = tp_nd.owner_maps("2d", q=3, m=6, k=6, f=9)
owners_3d = tp_nd.owner_maps("3d", q=2, m=8, k=4, f=8)
for owners in (owners_2d, owners_3d):  # every element has exactly one owner
    assert all((o >= 0).all() for o in owners.values())
viz.plot_blocks(
    [
        ("2D, 3×3: X (M×K)", owners_2d["x"]),
        ("2D, 3×3: B = weight.T (K×F)", owners_2d["weight"].T),
        ("3D, 2×2×2: X (M×K)", owners_3d["x"]),
        ("3D, 2×2×2: weight (F×K)", owners_3d["weight"]),
    ],
    n=9,
)

# %% [markdown]
# ## SUMMA: q steps of broadcasts
#
# Rank (i, j) needs `Y_ij = Σ_k X_ik · B_kj`: row i of X's blocks and column j of B's. SUMMA
# brings them in q steps. In **step k**, rank (i, k) broadcasts `X_ik` to its grid row and rank
# (k, j) broadcasts `B_kj` to its grid column; every rank then adds one product to its block. The
# broadcasts run on **process groups** built from the grid: one group per grid row, one per grid
# column (`tp_nd.make_grid`).

# %%
viz.plot_summa_steps(3)

# %% [markdown]
# The same sum on one process first, with the blocks cut by `tp_nd.block`:

# %%
torch.manual_seed(0)
X, B, q = torch.randn(6, 9), torch.randn(9, 12), 3
for i in range(q):
    for j in range(q):
        y_ij = sum(tp_nd.block(X, q, i, k) @ tp_nd.block(B, q, k, j) for k in range(q))
        assert torch.allclose(y_ij, tp_nd.block(X @ B, q, i, j), atol=1e-5)
print("Σ_k X_ik·B_kj = (X·B)_ij for every block of a 3×3 grid")

# %% [markdown]
# And here it is on ranks, from `course_lib/tensor_parallel_nd.py`. `summa_step_blocks` makes
# step k's two broadcasts; a rank multiplies only after both returned (a broadcast returns once
# its data has arrived).

# %%
print(inspect.getsource(tp_nd.summa_step_blocks))
print(inspect.getsource(tp_nd.summa))

# %% [markdown]
# **Backward** is SUMMA again, on the transposed products: `dX_ik = Σ_j dY_ij · B_kjᵀ` and
# `dB_kj = Σ_i X_ikᵀ · dY_ij`. Step k broadcasts the same blocks as the forward did; each rank
# multiplies them with its own gradient block, and a **reduce** along row i sums the pieces of
# `dX_ik` onto rank (i, k), one along column j those of `dB_kj` onto rank (k, j). (The forward
# saved only the rank's own blocks, so the backward broadcasts them again: SUMMA trades those
# bytes for memory.)

# %%
print(inspect.getsource(tp_nd.summa_backward))

# %% [markdown]
# ## 2.5D: d copies of the grid, each doing q/d of the steps
#
# Solomonik and Demmel's observation: SUMMA's q steps are independent sums, so d copies
# ("layers") of the q×q grid, **each holding all the blocks**, can run q/d steps each — layer l
# runs steps l·q/d … (l+1)·q/d − 1 — and one all-reduce along the **depth** (the d ranks at the same
# (i, j)) adds the layers' partial sums. Each rank then moves about 1/d of 2D's broadcast bytes
# for its grid, paid for with d copies of every block. On N = q·q·d ranks that is √d fewer bytes
# than 2D on the same N — Solomonik and Demmel's result that c copies of the data cut the words
# each processor moves by √c.
#
# In the layer, two of chapter 04's operators do the depth's work: **f**
# (`copy_to_tp_region`: identity forward, all-reduce backward) on X_ij and B_ij, whose copies
# on the d layers each get only part of the gradient, and **g** (`reduce_from_tp_region`:
# all-reduce forward) on the partial sums. The bias block b_j is added once, after the sum, on
# every rank of column j, and its gradient is summed over the column — f again.
#
# (Colossal-AI's 2.5D, Tesseract, uses the same q·q·d grid differently: it splits X's rows over the
# d layers and runs a whole SUMMA in each, like data parallelism over the depth. The one built here
# is Solomonik and Demmel's.)

# %%
print(inspect.getsource(tp_nd.Linear2D.forward))

# %% [markdown]
# ## 3D: all-gather, multiply, reduce-scatter
#
# On the cube, rank (a, b, c) all-gathers its X pieces **along b** into `X_ac`, its weight pieces
# **along a** into `W_bc` (output block b, input block c), multiplies them into its share of
# `Y_ab = Σ_c X_ac · W_bcᵀ`, and **reduce-scatters along c**: the sum over c lands split in q pieces
# along the c axis. The output block (row block a, column block b, pieces along c) has the input's
# layout with the roles of b and c swapped, so the second linear layer runs the same code with the
# two axes swapped — and its output has the first layer's input layout. The backward is
# all-gather of dY along c, then reduce-scatters of dX along b and of dW along a. One collective
# per matrix each way, whatever q is.

# %%
print(inspect.getsource(tp_nd._Linear3D))

# %% [markdown]
# ## Equal to the dense MLP, forward and every gradient
#
# `tp_nd.parallel_mlp(dense_mlp, mode)` builds the grid (`depth` picks d for 2.5D), cuts the
# blocks, and returns a module whose `forward(x)` takes the whole input — the same on every rank
# — keeps this rank's block, runs the layer block to block (`forward_sharded`), and gathers the
# whole output onto every rank. `gathered_grads()` assembles every parameter's gradient in the
# dense MLP's shapes. Each rank compares with the dense MLP it also computes; the same launch
# then measures the layer itself, block to block, as it runs between layers of a real network:
# parameter and activation bytes held, and the traffic counter on the forward and the backward.
#
# One launch per rank count: N = 8 (1D, 2.5D on 2×2×2 and 3D on 2×2×2) and N = 9 (1D and 2D
# on 3×3; no 2D grid has 8 ranks, no cube 9). The MLP: h = 72, H = 288, b·s = 4·36 = 144 rows.

# %%
B_SZ, SEQ, D_MODEL, D_HIDDEN = 4, 36, 72, 288
M_ROWS = B_SZ * SEQ


def run_modes(modes):
    g = torch.Generator().manual_seed(0)
    x, upstream = torch.randn(B_SZ, SEQ, D_MODEL, generator=g), torch.randn(B_SZ, SEQ, D_MODEL, generator=g)
    dense = make_mlp(D_MODEL, D_HIDDEN, seed=1)
    x_dense = x.clone().requires_grad_()
    out_dense = dense(x_dense)
    (out_dense * upstream).sum().backward()
    results = {}
    for mode in modes:
        mlp = tp_nd.parallel_mlp(make_mlp(D_MODEL, D_HIDDEN, seed=1), mode)
        x_ours = x.clone().requires_grad_()
        out = mlp(x_ours)
        (out * upstream).sum().backward()
        pairs = {"output": (out, out_dense), "x.grad": (x_ours.grad, x_dense.grad)}
        dense_grads = {name: p.grad for name, p in dense.named_parameters()}
        pairs |= {f"{name}.grad": (g, dense_grads[name]) for name, g in mlp.gathered_grads().items()}
        # the course's tolerance (fp32): |ours − dense| ≤ 1e-5 + 1e-5·|dense| for every element
        close = all(torch.allclose(a.detach(), b, rtol=1e-5, atol=1e-5) for a, b in pairs.values())
        difference = max(float((a - b).detach().abs().max()) for a, b in pairs.values())
        # the layer itself, block to block: this rank's block of the input in, its block out
        rows, up_rows = x.reshape(M_ROWS, D_MODEL), upstream.reshape(M_ROWS, D_MODEL)
        if mode == "1d":
            mine, up_mine = x.clone(), upstream
        else:
            where = mlp.grid.activation_blocks(M_ROWS, D_MODEL)[mlp.grid.rank]
            mine, up_mine = rows[where].clone(), up_rows[where]
        mine.requires_grad_()  # a middle layer: its input's gradient is needed too
        with count_traffic() as forward:
            y = mlp.forward_sharded(mine)
        with count_traffic() as backward:
            y.backward(up_mine)
        results[mode] = {
            "difference": difference,
            "close": close,
            "parameters": sum(p.numel() * p.element_size() for p in mlp.parameters()),
            "activations": sum(mlp.held_activation_bytes.values()),
            "forward": forward.received,
            "backward": backward.received,
            "forward calls": len(forward.calls),
            "backward calls": len(backward.calls),
        }
    return results


RUNS = {8: ("1d", "2.5d", "3d"), 9: ("1d", "2d")}
measured = {}
for n, modes in RUNS.items():
    per_rank = launch.run(run_modes, n, modes, backend="gloo")
    for mode in modes:
        ranks = [r[mode] for r in per_rank]
        m = {k: sum(r[k] for r in ranks) / n for k in ("forward", "backward")}  # mean over ranks
        m |= {k: max(r[k] for r in ranks) for k in ("difference", "parameters", "activations")}
        m["close"] = all(r["close"] for r in ranks)
        m |= {k: ranks[0][k] for k in ("forward calls", "backward calls")}
        assert all(r["forward calls"] == m["forward calls"] for r in ranks)  # the same calls on every rank
        measured[(mode, n)] = m
        print(
            f"{mode:>4} on N = {n}: largest |ours − dense| over output, x.grad and 4 gradients "
            f"= {m['difference']:.1e}, within rtol = atol = 1e-5 on every rank: {m['close']}"
        )
        assert m["close"], m

# %% [markdown]
# Every mode computes the dense MLP's output and every gradient to float rounding (within the
# course's fp32 tolerance, rtol = atol = 1e-5), on every rank.
#
# ## Memory per rank, beside the formulas
#
# Per rank, for the MLP h → H → h with biases (elements; × 4 bytes):
#
# | | parameters | activations held (input + hidden + output blocks) |
# |---|---|---|
# | 1D | 2hH/N + H/N + h | 2Mh + MH/N |
# | 2D, N = q² | 2hH/N + (H + h)/q | (2Mh + MH)/N |
# | 2.5D, N = q²d | d·2hH/N + (H + h)/q | d·(2Mh + MH)/N |
# | 3D, N = q³ | 2hH/N + (H + h)/q | (2Mh + MH)/N |
#
# The bias terms are the small replicated part: a bias block is added once, after the sum, by
# every rank that holds a block of that output column. `tp_nd.predicted` writes these formulas
# (and the traffic below) in code:

# %%
print(inspect.getsource(tp_nd.predicted))

# %%
print(f"{'mode':>5} {'N':>3} {'params/rank':>12} {'formula':>10} {'activations/rank':>17} {'formula':>10}")
for (mode, n), m in measured.items():
    f = tp_nd.predicted(mode, n, M_ROWS, D_MODEL, D_HIDDEN)
    print(
        f"{mode:>5} {n:>3} {m['parameters']:>12,} {f['parameters']:>10,.0f} "
        f"{m['activations']:>17,} {f['activations']:>10,.0f}"
    )
    assert m["parameters"] == f["parameters"] and m["activations"] == f["activations"]
one_d, three_d = measured[("1d", 8)], measured[("3d", 8)]
print(
    f"N = 8: 3D holds {one_d['activations'] / three_d['activations']:.1f}× fewer activation bytes than 1D, "
    f"2.5D {measured[('2.5d', 8)]['activations'] / three_d['activations']:.0f}× more than 3D (its d = 2 copies)"
)
assert three_d["activations"] < measured[("2.5d", 8)]["activations"] < one_d["activations"]

# %% [markdown]
# Measured equals formula, byte for byte. At the same N the grid methods hold 1/N of the
# activations where 1D holds the input and output whole; 2.5D holds d copies of its blocks, the
# memory it spends to save communication.
#
# ## Communication per rank, beside the formulas
#
# Bytes each rank **receives** (mean over the ranks; gloo's wire bytes), for one linear layer
# (M, K) → F, with S_X = MK/q², S_B = KF/q², S_Y = MF/q²:
#
# | | forward | backward | calls fwd / bwd |
# |---|---|---|---|
# | 1D (the whole MLP) | 2(N−1)/N·Mh | 2(N−1)/N·Mh | 1 / 1 |
# | 2D | (q−1)(S_X + S_B) | (q−1)(S_X + S_B) + (q²−1)/q·(S_X + S_B) + 2(q−1)/q·F/q | 2q / 4q + 1 |
# | 2.5D | (q−1)/d·(S_X + S_B) + 2(d−1)/d·S_Y | (q−1)/d·(S_X + S_B) + (q²−1)/(qd)·(S_X + S_B) + 2(d−1)/d·(S_X + S_B) + 2(q−1)/q·F/q | 2q/d + 1 / 4q/d + 3 |
# | 3D | (q−1)/q³·(MK + KF + MF) | (q−1)/q³·(MK + KF + MF) + 4(q−1)/q·F/q | 3 / 5 |
#
# Where the terms come from: a broadcast to g ranks delivers S to each of the g−1 others, so the
# mean over a row is (g−1)/g·S per step; gloo builds `reduce` from a ring reduce-scatter and a
# gather to the root, (g²−1)/g²·S per rank on average; all-gather and reduce-scatter (g−1)/g·S;
# a ring all-reduce 2(g−1)/g·S. The last backward term is the bias gradients' all-reduce.
# Leading orders, as the papers state them: 2D's words per rank fall as 1/√N (SUMMA), 2.5D's as
# 1/√(N·d) (Solomonik and Demmel), 3D's as 1/N^(2/3) — a factor N^(1/6) under 2D (Agarwal et al.) —
# while 1D's stay flat at ~4Mh.
#
# The measured bytes include gloo's own message headers: a few hundred bytes per message, which
# the table shows per collective call.

# %%
print(
    f"{'mode':>5} {'N':>3} {'fwd recv':>9} {'formula':>9} {'bwd recv':>9} {'formula':>9} "
    f"{'calls':>7} {'formula':>7} {'extra/call':>10}"
)
for (mode, n), m in measured.items():
    f = tp_nd.predicted(mode, n, M_ROWS, D_MODEL, D_HIDDEN)
    calls = m["forward calls"] + m["backward calls"]
    extra = (m["forward"] + m["backward"] - f["forward"] - f["backward"]) / calls
    print(
        f"{mode:>5} {n:>3} {m['forward']:>9,.0f} {f['forward']:>9,.0f} {m['backward']:>9,.0f} "
        f"{f['backward']:>9,.0f} {m['forward calls']:>3}/{m['backward calls']:<3} "
        f"{f['forward calls']:>3}/{f['backward calls']:<3} {extra:>9,.0f}B"
    )
    assert (m["forward calls"], m["backward calls"]) == (f["forward calls"], f["backward calls"])
    for kind in ("forward", "backward"):  # the formula, plus at most 8 % of headers
        assert f[kind] <= m[kind] <= 1.08 * f[kind], (mode, n, kind, m[kind], f[kind])

# %% [markdown]
# Every rank makes exactly the calls the formulas count, and receives the formula's bytes plus
# gloo's headers (under 8 %, asserted).
#
# ## Over N: where each one wins
#
# The formulas at every N where a grid exists (2.5D with d = 2), for this MLP, with the measured
# points on them. Left, bytes received per rank for one forward and backward; right, the number
# of collective calls — each one pays the α of the α–β model (chapter 01), t ≈ calls·α + bytes/β.


# %%
def curve(mode, ns):
    ns = [n for n in ns if tp_nd._shape(n, mode, 2 if mode == "2.5d" else None)]
    fs = [
        tp_nd.predicted(mode, n, M_ROWS, D_MODEL, D_HIDDEN, depth=2 if mode == "2.5d" else None) for n in ns
    ]
    return (
        ns,
        [f["forward"] + f["backward"] for f in fs],
        [f["forward calls"] + f["backward calls"] for f in fs],
    )


candidates = sorted(
    {2**k for k in range(1, 13)}
    | {q * q for q in range(2, 65)}
    | {2 * q * q for q in range(2, 46, 2)}
    | {q**3 for q in range(2, 17)}
)
curves = {mode: curve(mode, [n for n in candidates if n <= 4096]) for mode in tp_nd.MODES}
points = {}
for (mode, n), m in measured.items():
    points.setdefault(mode, []).append(
        (n, m["forward"] + m["backward"], m["forward calls"] + m["backward calls"])
    )
viz.plot_costs(
    curves, points, f"MLP h = {D_MODEL}, H = {D_HIDDEN}, M = b·s = {M_ROWS}: per rank, one forward + backward"
)

# %%
total = {mode: dict(zip(c[0], c[1])) for mode, c in curves.items()}
first_2d = min(n for n in total["2d"] if total["2d"][n] < total["1d"][n])
first_3d = min(n for n in total["3d"] if total["3d"][n] < total["1d"][n])
print(f"2D sends fewer bytes than 1D from N = {first_2d}; 3D from N = {first_3d}")
print(
    "at N = 4096, per rank:",
    ", ".join(f"{m} {total[m][4096] / 1024:.1f} KiB" for m in ("1d", "2d", "3d")),
)
assert first_3d < first_2d and total["3d"][4096] < total["2d"][4096] < total["1d"][4096]
calls_2d = dict(zip(curves["2d"][0], curves["2d"][2]))
assert calls_2d[4096] > 100 * 2  # 2D's calls grow with q; 1D makes 2, 3D 16, at every N

# %% [markdown]
# ### The latency side, in seconds
#
# Calls and bytes become time with the α–β model of chapter 01, fitted here to this machine's own
# send/recv: t ≈ calls·α + bytes/β per rank (each collective call pays at least one α; a tree or
# ring inside it pays more, so this is a lower bound on the latency term). For this MLP:

# %%
ping = alpha_beta.measure_point_to_point([64, 4096, 256 * 1024, 4 << 20], min_seconds=0.02, batches=3)
model = alpha_beta.fit(ping.nbytes, ping.fastest)
print(model.describe())
print(f"{'mode':>5} {'N':>5} {'calls·α':>10} {'bytes/β':>10}   which dominates")
seconds = {}
for mode, n in (("1d", 64), ("2d", 64), ("3d", 64), ("1d", 4096), ("2d", 4096), ("3d", 4096)):
    ns, nbytes, ncalls = curves[mode]
    i = ns.index(n)
    latency, transfer = ncalls[i] * model.alpha, nbytes[i] / model.beta
    seconds[mode, n] = (latency, transfer)
    print(
        f"{mode:>5} {n:>5} {latency * 1e3:>8.2f}ms {transfer * 1e3:>8.2f}ms   {'α' if latency > transfer else 'β'}"
    )
# SUMMA's latency term grows with q = √N while 3D's stays at 16 calls: at N = 4096, 2D pays more α than 3D.
assert seconds["2d", 4096][0] > seconds["3d", 4096][0] and seconds["2d", 4096][0] > seconds["2d", 64][0]

# %% [markdown]
# For this small MLP — M = 144 rows is only twice h — 1D's all-reduce of the activation is cheap
# and the grid methods pay mostly for moving weight blocks, so 2D overtakes 1D only at tens of
# ranks and 3D already at 27. In a large model M = b·s runs into the thousands and the activation
# terms dominate: every grid method then gains sooner, and its advantage grows as 1/√N or
# 1/N^(2/3) while 1D's bytes stay flat. The right panel is the other side: SUMMA's 12q + 2 calls per
# MLP (2q broadcasts per linear layer forward, 4q + 1 calls backward) grow with √N, and each
# pays a latency α — on small messages that, not the bytes, sets the time. 3D's 16 calls do not
# grow with N at all.
#
# ## Bad input, clear errors
#
# A rank count that has no grid, or a size that does not split over the grid:

# %%
for mode, n in (("2d", 8), ("3d", 9), ("2.5d", 6)):
    try:
        tp_nd.grid_shape(n, mode)
    except ValueError as err:
        print(err)


try:
    tp_nd.check_sizes("3d", 8, d_model=6, d_hidden=24)  # what parallel_mlp checks first
except ValueError as err:
    print(err)

# %% [markdown]
# ## Summary
#
# * **2D** (SUMMA): rank (i, j) holds X_ij and B_ij; q steps of one broadcast along the grid row
#   and one along the grid column; backward the same with reduces. 1/N of the weights *and*
#   activations per rank; bytes falling as 1/√N, calls growing as √N.
# * **2.5D** (Solomonik–Demmel): d copies of the grid split SUMMA's steps; one all-reduce along the
#   depth adds them; √d fewer bytes than 2D at d times the memory.
# * **3D** (Agarwal et al.): all-gather X along one axis, W along another, reduce-scatter along the
#   third; 1/N of everything, bytes falling as 1/N^(2/3), a fixed number of calls.
# * All three equal the dense MLP on every rank, and every per-rank byte count equals its formula
#   (plus gloo's headers on the wire), measured.

# %% [markdown]
# ## What you measured
#
# Each claim beside the number your run produced (MLP h = 72, H = 288, M = 144 rows, fp32).

# %%
rows = [("Σ_k X_ik·B_kj = (X·B)_ij, 3×3 blocks", "exact (1e-5)", "ok")]
for (mode, n), m in measured.items():
    f = tp_nd.predicted(mode, n, M_ROWS, D_MODEL, D_HIDDEN)
    rows += [
        (f"{mode}, N={n}: vs dense (output, all grads)", "equal (rtol=atol=1e-5)", f"{m['difference']:.1e}"),
        (f"{mode}, N={n}: parameter bytes / rank", f"{f['parameters']:,.0f}", f"{m['parameters']:,}"),
        (f"{mode}, N={n}: activation bytes / rank", f"{f['activations']:,.0f}", f"{m['activations']:,}"),
        (
            f"{mode}, N={n}: bytes received fwd / bwd",
            f"{f['forward']:,.0f} / {f['backward']:,.0f}",
            f"{m['forward']:,.0f} / {m['backward']:,.0f}",
        ),
        (
            f"{mode}, N={n}: collective calls fwd / bwd",
            f"{f['forward calls']} / {f['backward calls']}",
            f"{m['forward calls']} / {m['backward calls']}",
        ),
    ]
rows += [
    ("2D beats 1D in bytes from N =", "formula", f"{first_2d}"),
    ("3D beats 1D in bytes from N =", "formula", f"{first_3d}"),
    (
        "α per call, β (fitted on this machine)",
        "α–β model",
        f"{model.alpha * 1e6:.0f} µs, {model.beta / 1e9:.2g} GB/s",
    ),
    (
        "calls·α at N = 4096: 2D / 3D",
        "(12q+2)·α / 16·α",
        f"{seconds['2d', 4096][0] * 1e3:.1f} / {seconds['3d', 4096][0] * 1e3:.1f} ms",
    ),
]
print(f"{'quantity':<44}  {'formula':<22}  {'measured':>22}")
for quantity, formula_text, value in rows:
    print(f"{quantity:<44}  {formula_text:<22}  {value:>22}")

# %% [markdown]
# Glossary: 2D 张量并行 2D tensor parallelism (SUMMA) · 2.5D 张量并行 2.5D tensor parallelism ·
# 3D 张量并行 3D tensor parallelism · 网格 grid · 广播 broadcast · 归约 reduce.
#
# Next: the exercises (`my_exercises/04b_tensor_parallel_nd.ipynb`) have you find each rank's
# blocks on the 2D grid, write SUMMA, and map ranks to chunks on the 3D cube.
