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
# # 05b · Context parallelism: ring attention and Ulysses
#
# Sequence parallelism (chapter 05) shards the LayerNorms and residual adds along the sequence,
# but attention still sees the **whole** sequence on every rank: each head forms an s × s matrix
# of scores, and autograd keeps its softmax for backward. That part grows with s²; tensor
# parallelism divides it among the ranks' heads but keeps the s². **Context parallelism** (上下文并行) shards attention too:
# each of N ranks keeps s/N positions of q, k and v, and the ranks cooperate so that every query
# still attends to every key it should. Two ways to do it, both built here from send/recv and
# all-to-all on gloo:
#
# * **Ring attention** (环形注意力; Liu, Zaharia and Abbeel, 2023): q stays put; k and v blocks
#   travel around a ring of ranks, N−1 hops; each rank merges the partial result of every block
#   with an **online softmax** (在线 softmax). Its backward pass is a second trip around the ring.
# * **Ulysses** (DeepSpeed-Ulysses; Jacobs et al., 2023): an all-to-all turns "s/N positions of
#   every head" into "every position of a/N heads", attention runs whole on those heads, and an
#   all-to-all turns it back. It needs the number of heads a to be a multiple of N.
#
# With a causal mask, position i attends only to positions j ≤ i; splitting the sequence into N
# contiguous blocks then gives the last rank far more work than the first. The **zig-zag** layout
# (负载均衡, load balancing: 2N chunks, rank r holds chunks r and 2N−1−r, as the Llama 3 report
# describes) evens it out. Everything below is measured.
#
# Notation: **N** ranks, sequence length **s**, batch **b**, **a** heads of width **d** (h = a·d);
# q, k, v have shape (b, a, s, d) and the sequence is dim 2. Ranks run on the CPU with gloo.

# %%
import inspect

import torch
import torch.distributed as dist
import torch.nn as nn

from course_lib import alpha_beta, cp, launch, tp
from course_lib import viz_context_parallel as viz
from course_lib.models import attention
from course_lib.traffic import count_traffic

# %% [markdown]
# ## Who holds which positions
#
# `cp.shard_sequence(x, rank, N, dim, layout)` cuts the sequence into equal chunks — N for
# `"contiguous"`, 2N for `"zigzag"` — and returns rank r's: chunk r, or chunks r and 2N−1−r
# side by side. `cp.unshard_sequence(shards, dim, layout)` puts every rank's shard back in order.
# Positions 0…15 on N = 4 ranks:

# %%
positions = torch.arange(16)
for layout in cp.LAYOUTS:
    shards = [cp.shard_sequence(positions, r, 4, 0, layout) for r in range(4)]
    print(f"{layout:>10}: " + "   ".join(f"rank {r}: {s.tolist()}" for r, s in enumerate(shards)))
    assert torch.equal(cp.unshard_sequence(shards, 0, layout), positions)
print(inspect.getsource(cp.shard_sequence))

# %% [markdown]
# ## The online softmax: attention over two blocks, merged
#
# Split the keys (and values) into two blocks A and B. Attention over each block alone gives an
# output `out_A` normalised over A only, and the log-sum-exp of its scores, `lse_A = log Σ_{j∈A}
# exp(score_j)`. The whole softmax's mass is exp(lse_A) + exp(lse_B), so the full output is
#
# `out = (exp(lse_A)·out_A + exp(lse_B)·out_B) / (exp(lse_A) + exp(lse_B))`,
# `lse = log(exp(lse_A) + exp(lse_B))`.
#
# Computed literally, exp(lse) overflows float32 as soon as a score passes about 88. The merge
# subtracts the **running max** m = max(lse_A, lse_B) first, so every exponent is ≤ 0 — the
# same trick as FlashAttention's. That is all a rank needs to fold in one more block:

# %%
print(inspect.getsource(cp.block_attention))
print(inspect.getsource(cp.merge_partials))

g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 8, 4, generator=g) for _ in range(3))
for scale in (1.0, 100.0):  # ×100: scores in the thousands, where exp() alone overflows
    whole = attention(q * scale, k, v)
    merged, _ = cp.merge_partials(
        *cp.block_attention(q * scale, k[..., :3, :], v[..., :3, :]),
        *cp.block_attention(q * scale, k[..., 3:, :], v[..., 3:, :]),
    )
    naive = torch.exp(cp.block_attention(q * scale, k, v)[1]).isinf().any().item()
    print(
        f"scores ×{scale:>5}: |merged − whole| = {(merged - whole).abs().max():.1e}; exp(lse) overflows: {naive}"
    )
    torch.testing.assert_close(merged, whole, rtol=1e-5, atol=1e-5)

# %% [markdown]
# ## Ring attention
#
# Each rank starts with its own k/v block. At every step it **posts** the transfer of the block
# it holds to its right neighbour (and the receive of the next one from its left) with
# `isend`/`irecv`, **then** computes attention of its queries over the block it holds, merges the
# result, and only then waits for the transfer: the bytes travel while the block is computed.
# After N−1 hops every rank has seen every block. The figure shows, for N = 4, which block each
# rank holds at each step (left), and, in chunks, which q–k blocks of the causal mask are
# computed, by which rank, at which step (middle: contiguous, right: zig-zag). Hatched blocks lie
# entirely above the diagonal: every score masked, so they are skipped; a diagonal block is masked
# inside (only its lower triangle counts).

# %%
N_PICTURE = 4
viz.plot_ring_schedule(
    N_PICTURE,
    {r: cp.chunks_of(r, N_PICTURE, "contiguous") for r in range(N_PICTURE)},
    {r: cp.chunks_of(r, N_PICTURE, "zigzag") for r in range(N_PICTURE)},
)

# %% [markdown]
# In the contiguous layout rank 0 computes one block and rank 3 four: at three of its four steps
# rank 0 holds a block that lies entirely in its future (hatched in its row). In zig-zag, every
# rank computes its own chunk pair at step 0 (three half-size blocks, two of them diagonal) and
# exactly two half-size blocks at every later step: at step t it holds the block of rank r−t;
# if r−t ≥ 0, both of its chunks see that block's first chunk; if the block wrapped around
# (r−t < 0), its own second chunk sees the whole incoming block. The forward pass, as `course_lib.cp` has it:

# %%
print(inspect.getsource(cp._pairs))
print(inspect.getsource(cp._RingAttention.forward))

# %% [markdown]
# **Backward** is a real ring too, not a gather of the whole sequence. Each rank keeps only its
# q, k, v, its output and the final log-sum-exp of each query. Knowing the final lse, it can
# rebuild any block's softmax probabilities exactly, P = exp(scores − lse), and compute that
# block's share of dq, dk and dv with the usual softmax-backward formula (dS = P ∘ (dP − D),
# D = rowsum(dO ∘ O)). The k/v blocks go around the ring again, and a **dk/dv accumulator travels
# with each block**: every rank adds its contribution and passes it on; after N hops the
# accumulator is back at the rank that owns the block, holding the full gradient.

# %%
print(inspect.getsource(cp._RingAttention.backward))

# %% [markdown]
# ## Equal to one process: output and every gradient
#
# N = 1…4, causal and not, both layouts, and Ulysses (next section) where the 4 heads split:
# every rank shards the same q, k, v, runs its part, and compares its output, dq, dk and dv with
# the matching rows of single-process attention. In float64 the ring agrees to about 1e-15 —
# the method is exact; float32 leaves rounding differences of about 1e-7, because the ring adds
# the softmax's terms in another order. Ulysses does the same arithmetic as one process, head by
# head: its results are bit-identical.


# %%
def differences():
    rank, n = dist.get_rank(), dist.get_world_size()
    worst = {}
    for dtype in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(1)
        q, k, v, up = (torch.randn(2, 4, 4 * n, 8, generator=g, dtype=dtype) for _ in range(4))
        for causal in (True, False):
            dense = [t.clone().requires_grad_() for t in (q, k, v)]
            out = attention(*dense, causal)
            (out * up).sum().backward()
            kinds = [("ring", "zigzag"), ("ring", "contiguous")] + [("ulysses", "contiguous")] * (4 % n == 0)
            for method, layout in kinds:
                mine = [cp.shard_sequence(t, rank, n, 2, layout).clone().requires_grad_() for t in (q, k, v)]
                if method == "ring":
                    o = cp.ring_attention(*mine, causal=causal, layout=layout)
                else:
                    o = cp.ulysses_attention(*mine, causal=causal)
                (o * cp.shard_sequence(up, rank, n, 2, layout)).sum().backward()
                pairs = zip([o, *(t.grad for t in mine)], [out, *(t.grad for t in dense)])
                key = (method, layout, "causal" if causal else "full", str(dtype)[6:])
                worst[key] = max(
                    (a - cp.shard_sequence(b, rank, n, 2, layout)).abs().max().item() for a, b in pairs
                )
    return worst


equal = {}
for n in (1, 2, 3, 4):
    per_rank = launch.run(differences, n, backend="gloo")
    for key in per_rank[0]:
        equal[n, *key] = max(d[key] for d in per_rank)
print(f"{'N':>2} {'method':<8} {'layout':<11} {'mask':<7} {'dtype':<8} {'largest |ours − one process|':>30}")
for key, value in equal.items():
    print(f"{key[0]:>2} {key[1]:<8} {key[2]:<11} {key[3]:<7} {key[4]:<8} {value:>30.1e}")
    assert value < (1e-5 if key[4] == "float32" else 1e-12)
    assert key[1] != "ulysses" or value == 0

# %% [markdown]
# ## Measured: attention activations per rank
#
# What one-process attention keeps for backward, measured with `tp.saved_activation_bytes`
# (chapter 05's saved-tensor hook): q, k and v, and the softmax output, **4·b·a·s²** bytes in fp32
# (a causal mask adds its s × s booleans, 1 byte each). Ring attention keeps q, k, v, the output
# and one lse per query: **4·b·a·(s/N)·(4d + 1)** bytes per rank — no s × s term at all. While it
# runs, it forms one block of scores at a time: at most (s/2N)² entries per head in the zig-zag
# layout (`cp.count_work` records the largest).

# %%
B_, A_, D_, S_ = 1, 4, 16, 64


class Attend(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v):
        return self.fn(q, k, v)


def ring_memory(s, b, a, d):
    rank, n = dist.get_rank(), dist.get_world_size()
    qkv = [cp.shard_sequence(torch.randn(b, a, s, d), rank, n, 2).clone().requires_grad_() for _ in range(3)]
    with cp.count_work() as work:
        saved = tp.saved_activation_bytes(Attend(lambda q, k, v: cp.ring_attention(q, k, v)), *qkv)
    return sum(saved.values()), work.largest


memory = {}
for causal in (False, True):
    qkv = [torch.randn(B_, A_, S_, D_, requires_grad=True) for _ in range(3)]
    saved = tp.saved_activation_bytes(Attend(lambda q, k, v, c=causal: attention(q, k, v, c)), *qkv)
    memory["one process" + (", causal" if causal else "")] = (sum(saved.values()), S_ * S_)
for n in (1, 2, 4):
    memory[f"ring, N={n}"] = launch.run(ring_memory, n, S_, B_, A_, D_, backend="gloo")[0]

print(f"s={S_}, b={B_}, a={A_}, d={D_}, fp32")
print(f"{'':22} {'saved (bytes)':>14} {'formula':>10} {'largest scores/head':>20} {'formula':>8}")
for name, (saved_bytes, largest) in memory.items():
    if name.startswith("one"):
        formula = 4 * B_ * A_ * (3 * S_ * D_ + S_ * S_) + (S_ * S_ if "causal" in name else 0)
        largest_formula = S_**2
    else:
        n = int(name.split("=")[1])
        formula, largest_formula = 4 * B_ * A_ * (S_ // n) * (4 * D_ + 1), (S_ // (2 * n)) ** 2
    print(f"{name:22} {saved_bytes:>14,} {formula:>10,} {largest:>20,} {largest_formula:>8,}")
    assert saved_bytes == formula and largest == largest_formula

# %% [markdown]
# One process keeps q, k, v (3·s·d per head) plus the s² softmax — here the s² term is the larger
# part, and it grows with the square of the context. Ring attention keeps (s/N)·(4d + 1) per head
# and rank, halving with every doubling of N, and never forms more than an (s/2N)² block of
# scores. (One-process attention with a fused kernel such as FlashAttention does not store the s²
# softmax either; what context parallelism adds is that the **s/N** term keeps shrinking with N.)
#
# ## Measured: work per rank under the causal mask
#
# `cp.count_work()` counts the score entries each rank's ring attention computes and keeps. One
# head, s = 64, N = 4. With contiguous chunks of c = s/N positions, rank r keeps
# **r·c² + c(c+1)/2** entries (r full blocks and one triangle); with zig-zag, every rank keeps
# exactly **s(s+1)/(2N)**, the mean.


# %%
def causal_work(layout, s):
    rank, n = dist.get_rank(), dist.get_world_size()
    q = cp.shard_sequence(torch.randn(1, 1, s, 8), rank, n, 2, layout)
    with cp.count_work() as work:
        cp.ring_attention(q, q, q, layout=layout)
    return work.unmasked, work.blocks


N_WORK, S_WORK = 4, 64
work = {layout: launch.run(causal_work, N_WORK, layout, S_WORK, backend="gloo") for layout in cp.LAYOUTS}
c = S_WORK // N_WORK
work_formula = {
    "contiguous": [r * c * c + c * (c + 1) // 2 for r in range(N_WORK)],
    "zigzag": [S_WORK * (S_WORK + 1) // (2 * N_WORK)] * N_WORK,
}
mean_work = S_WORK * (S_WORK + 1) / 2 / N_WORK
for layout in ("contiguous", "zigzag"):
    kept = [w for w, _ in work[layout]]
    print(
        f"{layout:>10}: kept per rank {kept}, blocks {[b for _, b in work[layout]]}; "
        f"last / mean = {kept[-1] / mean_work:.2f}"
    )
    assert kept == work_formula[layout] and sum(kept) == S_WORK * (S_WORK + 1) // 2
last_over_mean = work["contiguous"][-1][0] / mean_work
assert 1.7 < last_over_mean < (2 * N_WORK - 1) / N_WORK and all(w == mean_work for w, _ in work["zigzag"])
viz.plot_work_balance(
    {layout: [w for w, _ in work[layout]] for layout in ("contiguous", "zigzag")},
    work_formula,
    f"Causal attention, s = {S_WORK}, N = {N_WORK}: score entries each rank keeps (tick = formula)",
)

# %% [markdown]
# The last contiguous rank does about **(2N−1)/N times the mean** for long sequences (1.75 at
# N = 4, measured 1.74; → 2 as N grows), the first about 1/(2N−1) of the last — and a ring step takes as long as its slowest rank. Zig-zag
# gives every rank the same s(s+1)/(2N): each rank pairs an early chunk (little to see) with a
# late one (much to see).
#
# ## Measured: traffic per rank, ring vs Ulysses
#
# Let B be the bytes of one rank's q (or k, or v, or output): b·a·(s/N)·d·4. Per attention:
#
# * **ring, forward**: N−1 hops of k and v: **2(N−1)·B** sent per rank.
# * **ring, backward**: k and v again, N−1 hops, and the dk/dv accumulator N hops (the last one
#   brings it home): **2(N−1)·B + 2N·B**.
# * **Ulysses**: four all-to-alls forward (q, k, v in; the output back) and four backward, each
#   sending (N−1)/N of a B-byte tensor: **4(N−1)/N·B** per direction.
#
# The ring's sends are counted exactly (point-to-point payload); Ulysses' all-to-alls are read
# from the TCP counters (so gloo's small headers are included).


# %%
def cp_traffic(b, a, s, d):
    rank, n = dist.get_rank(), dist.get_world_size()
    qkv = [
        cp.shard_sequence(torch.randn(b, a, s, d), rank, n, 2, "contiguous").clone().requires_grad_()
        for _ in range(3)
    ]
    methods = {
        "ring": lambda: cp.ring_attention(*qkv, layout="contiguous"),
        "ulysses": lambda: cp.ulysses_attention(*qkv),
    }
    result = {}
    for name, run in methods.items():
        run().sum().backward()  # connections first
        rounds = []
        for _ in range(2):  # wire bytes: the fewer of two rounds (a stray late packet is not the algorithm's)
            dist.barrier()
            with count_traffic() as forward:
                out = run()
            with count_traffic() as backward:
                out.sum().backward()
            dist.barrier()
            rounds.append((forward, backward))
        forward, backward = rounds[-1]
        wires = [(f.sent, b.sent) for f, b in rounds]
        result[name] = dict(
            fwd_payload=forward.payload_sent,
            bwd_payload=backward.payload_sent,
            fwd_wire=None if forward.sent is None else min(w[0] for w in wires),
            bwd_wire=None if backward.sent is None else min(w[1] for w in wires),
            fwd_calls=forward.count("all_to_all_single"),
            bwd_calls=backward.count("all_to_all_single"),
        )
    return result


TB, TA, TS, TD = 1, 8, 256, 32
traffic = {n: launch.run(cp_traffic, n, TB, TA, TS, TD, backend="gloo")[0] for n in (2, 4)}
print(f"b={TB}, a={TA}, s={TS}, d={TD}: B = b·a·(s/N)·d·4")
for n, t in traffic.items():
    B = TB * TA * (TS // n) * TD * 4
    ring, uly = t["ring"], t["ulysses"]
    print(f"N={n}, B={B:,}")
    print(f"  ring    forward  {ring['fwd_payload']:>9,}  2(N−1)·B        = {2 * (n - 1) * B:>9,}")
    print(f"  ring    backward {ring['bwd_payload']:>9,}  (4N−2)·B        = {(4 * n - 2) * B:>9,}")
    assert ring["fwd_payload"] == 2 * (n - 1) * B and ring["bwd_payload"] == (4 * n - 2) * B
    assert uly["fwd_calls"] == uly["bwd_calls"] == 4
    if uly["fwd_wire"] is not None:
        ideal = 4 * (n - 1) / n * B
        print(f"  Ulysses forward  {uly['fwd_wire']:>9,}  4(N−1)/N·B      = {ideal:>9,.0f}  (wire)")
        print(f"  Ulysses backward {uly['bwd_wire']:>9,}  4(N−1)/N·B      = {ideal:>9,.0f}  (wire)")
        assert ideal <= uly["fwd_wire"] <= 1.03 * ideal and ideal <= uly["bwd_wire"] <= 1.03 * ideal

# %% [markdown]
# Measured equal to the formulas (the ring to the byte; Ulysses within gloo's headers, asserted
# within 3 %). Per rank, the ring sends N/2 times Ulysses' bytes: equal at N = 2, twice at
# N = 4. But the ring's transfers overlap its computation, and it sends N−1 messages where
# Ulysses sends 4(N−1); Ulysses cannot run at all when N does not divide the heads.
#
# Which wins when: the α–β model of chapter 01, fitted here on this machine, predicts the
# communication time of one forward attention for a long sequence (s = 32 768, b = 1, a = 32
# heads of d = 128, bf16), for N = 2…64. Ulysses sends less per rank once N > 2; crosses mark
# the N where 32 heads do not split (here none up to 32, and N = 64 > 32 heads).

# %%
pp = alpha_beta.measure_point_to_point([64, 4096, 256 * 1024, 4 << 20], min_seconds=0.02, batches=3)
model = alpha_beta.fit(pp.nbytes, pp.fastest)
print(model.describe())
LONG_S, LONG_A, LONG_D, WORLD_SIZES = 32768, 32, 128, (2, 4, 8, 16, 32, 64)


def block_bytes(n):
    return LONG_S // n * LONG_A * LONG_D * 2  # one rank's q (or k, v): bf16


ring_s = [model.rounds(n - 1, 2 * block_bytes(n)) for n in WORLD_SIZES]
ulysses_s = [4 * model.rounds(n - 1, block_bytes(n) / n) for n in WORLD_SIZES]
# Bytes per rank (measured above): Ulysses 4(N−1)/N·B against the ring's 2(N−1)·B. Which is
# faster also depends on α, which Ulysses pays 4(N−1) times: the model fitted here says, per N.
print(
    "faster in the model:",
    ", ".join(f"N={n}: {'Ulysses' if u < r else 'ring'}" for n, u, r in zip(WORLD_SIZES, ulysses_s, ring_s)),
)
viz.plot_ring_vs_ulysses(
    WORLD_SIZES,
    ring_s,
    ulysses_s,
    LONG_A,
    f"One attention forward, s = {LONG_S}, a = {LONG_A}, d = {LONG_D}, bf16: communication only\n"
    f"(α–β fitted here: {model.describe()})",
)

# %% [markdown]
# In bytes Ulysses wins for N > 2, and the gap grows with N (the ring sends N/2 times more).
# Two things the plot leaves out favour the ring: its transfers hide behind the block
# computation (each step's matmuls take longer than the transfer when blocks are large), while
# Ulysses' all-to-alls sit on the critical path; and the ring has no limit on N, while Ulysses
# stops at N = a (and at N dividing a). The two combine: USP (Fang and Zhao, 2024) runs Ulysses
# inside a node, where all-to-all is fast, and the ring across nodes.
#
# ## Ulysses: sequence ⇄ heads
#
# Before attention each rank holds (b, a, s/N, d). It cuts its heads into N groups and sends group
# j to rank j; it receives, from every rank, that rank's positions of its own head group, and
# lays them side by side along the sequence: (b, a/N, s, d). After attention the same move in
# reverse. With the contiguous layout, rank j's positions are exactly the j-th block of the
# sequence, so the pieces concatenate in rank order.

# %%
print(inspect.getsource(cp.seq_to_heads))
print(inspect.getsource(cp.heads_to_seq))
print(inspect.getsource(cp.ulysses_attention))


def six_heads_on_four():
    q = torch.zeros(1, 6, 2, 4)
    cp.ulysses_attention(q, q, q)


try:
    launch.run(six_heads_on_four, 4, backend="gloo")
    raise AssertionError("Ulysses should refuse 6 heads on 4 ranks")
except launch.RankError as exc:
    message = str(exc).strip().splitlines()[-2].strip()
    print(message)
    assert "heads % N = 2" in message

# %% [markdown]
# ## torch's own context parallelism on the CPU
#
# torch 2.13 ships `torch.distributed.tensor.experimental.context_parallel`: inside it,
# `F.scaled_dot_product_attention` on sharded buffers becomes ring attention. It does not run on
# the CPU: it swaps in ring versions of the **CUDA** attention kernels only (flash, memory-
# efficient, cuDNN), while on the CPU `scaled_dot_product_attention` calls a different kernel,
# `_scaled_dot_product_flash_attention_for_cpu`, which it has no ring version of. (Tried on
# 2 gloo ranks while writing this chapter, the call inside `context_parallel` did not return
# within 60 s.) Both facts, checked here without running it:

# %%
from torch.distributed.tensor.experimental._context_parallel import _attention as torch_cp  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


with Ops() as ops:
    x = torch.randn(1, 2, 8, 4)
    torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
handled = sorted(str(op) for op in torch_cp.custom_ops)
print("SDPA on the CPU calls:", [n for n in ops.names if "scaled_dot" in n])
print("torch's context_parallel handles:", *handled, sep="\n  ")
cpu_kernel = "aten._scaled_dot_product_flash_attention_for_cpu.default"
assert cpu_kernel in ops.names and cpu_kernel not in handled

# %% [markdown]
# So this chapter checks against single-process attention only (above, to 1e-15 in float64).
#
# ## A context-parallel block, and CP on a grid with DP and TP
#
# `cp.ContextParallelBlock` is the pre-norm transformer block (causal) on a sequence shard: the
# LayerNorms, the projections and the MLP act token by token on s/N positions, attention is ring
# attention (or Ulysses) over the cp group. Every rank trained its parameters on its own tokens
# only, so `sync_grads()` sums their gradients over the cp group — one all-reduce per step, as
# sequence parallelism's `sync_replicated_grads`. With a `tp_group` it also splits the heads and
# the MLP as in chapter 04.
#
# `mesh.RankGrid` has a **cp axis** between tp and dp (Megatron-LM's order tp-cp-dp-pp; cp = 1 by
# default, so chapter 09's grids are unchanged). `cp.train_context_parallel(dp, tp, cp)` trains the
# block for two SGD steps on such a grid, and in the same rank the dense block on the whole batch
# in one process, and compares the losses and every rank's parameters with the dense block's
# matching part. Two grids of 4 ranks:

# %%
print(inspect.getsource(cp.ContextParallelBlock.forward))
print(inspect.getsource(cp.ContextParallelBlock.sync_grads))
grids = {}
for dp_size, tp_size, cp_size in ((2, 1, 2), (1, 2, 2)):
    results = launch.run(cp.train_context_parallel, 4, dp_size, tp_size, cp_size, backend="gloo")
    losses, dense_losses = results[0]["losses"], results[0]["dense_losses"]
    worst = max(r["max_param_diff"] for r in results)
    grids[dp_size, tp_size, cp_size] = worst
    print(
        f"dp={dp_size} × tp={tp_size} × cp={cp_size}: losses {[f'{x:.6f}' for x in losses]}, one process "
        f"{[f'{x:.6f}' for x in dense_losses]}; largest parameter difference {worst:.1e}"
    )
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(dense_losses), rtol=1e-5, atol=1e-6)
    assert worst < 1e-5

# %% [markdown]
# ## Summary
#
# * Context parallelism splits attention itself along the sequence: each rank keeps s/N
#   positions of q, k, v, and no rank ever holds the s × s scores.
# * Ring attention passes k/v blocks N−1 hops around a ring, posting each transfer before
#   computing the current block, and merges blocks with an online softmax (running max,
#   log-sum-exp). Backward rebuilds each block's probabilities from the saved lse and sends
#   dk/dv around the ring with the blocks.
# * Under a causal mask, contiguous chunks leave the last rank about twice the mean work;
#   zig-zag chunks (r and 2N−1−r of 2N) give every rank exactly the mean.
# * Ulysses swaps the sequence split for a head split with all-to-alls: fewer bytes than the
#   ring for N > 2, more messages, nothing to overlap with, and N must divide the heads.
# * Everything equals one process: outputs and gradients (to 1e-15 in float64), and training
#   a block on dp × cp and tp × cp grids.

# %% [markdown]
# ## What you measured

# %%
rows = [
    (
        "ring vs one process, N=1…4, fp32",
        "equal (1e-5)",
        f"{max(v for k, v in equal.items() if k[1] == 'ring' and k[4] == 'float32'):.1e}",
    ),
    (
        "ring vs one process, N=1…4, fp64",
        "equal (1e-12)",
        f"{max(v for k, v in equal.items() if k[4] == 'float64'):.1e}",
    ),
    (
        "Ulysses vs one process, N=1,2,4",
        "bit-identical",
        f"{max(v for k, v in equal.items() if k[1] == 'ulysses'):.1e}",
    ),
]
for name, (saved_bytes, _largest) in memory.items():
    if name.startswith("ring"):
        n = int(name.split("=")[1])
        rows.append(
            (
                f"saved by attention, {name}",
                f"4ba(s/N)(4d+1) = {4 * B_ * A_ * (S_ // n) * (4 * D_ + 1):,}",
                f"{saved_bytes:,}",
            )
        )
    else:
        causal_mask = S_ * S_ if "causal" in name else 0
        dense_formula = 4 * B_ * A_ * (3 * S_ * D_ + S_ * S_) + causal_mask
        label = "4ba(3sd + s²) + s²" if causal_mask else "4ba(3sd + s²)"
        rows.append((f"saved by attention, {name}", f"{label} = {dense_formula:,}", f"{saved_bytes:,}"))
rows.append(("largest score block, ring N=4", f"(s/2N)² = {(S_ // 8) ** 2}", f"{memory['ring, N=4'][1]:,}"))
rows.append(("causal work, contiguous: last / mean", "≈ (2N−1)/N = 1.75", f"{last_over_mean:.2f}"))
rows.append(("causal work, zig-zag: every rank", f"s(s+1)/2N = {mean_work:.0f}", f"{work['zigzag'][0][0]:,}"))
for n, t in traffic.items():
    B = TB * TA * (TS // n) * TD * 4
    rows.append(
        (f"ring forward sent, N={n}", f"2(N−1)·B = {2 * (n - 1) * B:,}", f"{t['ring']['fwd_payload']:,}")
    )
    rows.append(
        (f"ring backward sent, N={n}", f"(4N−2)·B = {(4 * n - 2) * B:,}", f"{t['ring']['bwd_payload']:,}")
    )
    if t["ulysses"]["fwd_wire"] is not None:
        rows.append(
            (
                f"Ulysses forward sent, N={n}",
                f"4(N−1)/N·B = {4 * (n - 1) * B // n:,}",
                f"{t['ulysses']['fwd_wire']:,}",
            )
        )
for (d_, t_, c_), worst in grids.items():
    rows.append((f"CP block training, dp={d_} tp={t_} cp={c_}", "equal (1e-5)", f"{worst:.1e}"))
print(f"{'quantity':<42}  {'formula':<30}  {'measured':>10}")
for quantity, formula_text, value in rows:
    print(f"{quantity:<42}  {formula_text:<30}  {value:>10}")

# %% [markdown]
# Glossary: 上下文并行 context parallelism · 环形注意力 ring attention · 在线 softmax online softmax ·
# 负载均衡 load balancing · 全对全 all-to-all · 因果掩码 causal mask.
#
# Next: the exercises (`my_exercises/05b_context_parallel.ipynb`) have you merge two partial
# softmax results, compute one block under the causal mask, find the zig-zag positions, take one
# ring step, and build Ulysses' sequence ⇄ head all-to-all.
