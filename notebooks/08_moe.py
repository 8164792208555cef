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
# # 08 · Mixture of experts: routing, capacity and expert parallelism
#
# A transformer block spends most of its parameters in its MLP. A **mixture of experts** (MoE,
# 混合专家模型) layer replaces that one MLP with **E** MLPs, the **experts** (专家), and a small
# **gate** (门控网络, also *router*, 路由器) that picks **k** of them for each token. Switch
# Transformer used k = 1, GShard and Mixtral k = 2 (Mixtral: 8 experts); DeepSeek-V3 routes each
# token to k = 8 of E = 256 small routed experts and, besides, through one shared expert (共享专家)
# that every token passes. Each token is processed by its k experts only, so the parameters grow
# with E while the work per token stays that of k expert MLPs.
#
# **Expert parallelism** (专家并行) puts the experts on different ranks: with N ranks, rank r holds
# experts r·E/N … (r+1)·E/N − 1. Every rank has its own T tokens; after the gate, each token must
# travel to the rank of its expert and its result must travel back. Both trips are one
# **all-to-all** (全对全) each. The price of all this is paid twice:
#
# * **communication**: two all-to-alls per layer forward (and two in backward), moving k·T·D
#   numbers per rank each time — most of them to other ranks;
# * **load imbalance** (负载不均衡): the gate decides how many tokens each expert gets. An expert
#   that gets too many either makes its rank the slowest one, or — what Switch Transformer and
#   GShard do, with a fixed buffer of **capacity** (容量) C per expert — **drops** (丢弃) the tokens
#   that do not fit. (DeepSeek-V3 drops none: it keeps the load even with a per-expert bias that
#   is added to the routing scores only to choose the top k, and limits each token to experts on
#   at most 4 machines.)
#
# This chapter builds the routing with capacity, the all-to-all from send/recv, and a whole
# expert-parallel layer; checks it against a one-process loop (outputs and every gradient); and
# measures the load, the drops, the bytes, and what the load-balancing loss does in training.
#
# Notation: **E** experts, **k** experts per token, **T** tokens on a rank, **D** features,
# **N** ranks, **cf** the capacity factor.

# %%
import inspect

import torch
import torch.distributed as dist
import torch.nn.functional as F

from course_lib import launch, models, moe, viz
from course_lib.comm import count_traffic

# This kernel's own small models and plots: one thread. Tiny matmuls gain nothing from more, and
# on a busy laptop extra threads spin while waiting for each other (we measured 40× slower).
torch.set_num_threads(1)
torch.manual_seed(0)

# %% [markdown]
# ## 1. Routing: top-k, slots and drops — a worked example
#
# The gate is one linear layer: `logits = gate(x)`, shape (T, E). For each token:
#
# 1. **probabilities**: softmax over the E experts;
# 2. **top-k**: the k most probable experts, most probable first (choice 1, choice 2, …);
# 3. **combine weights**: for k = 1 the probability itself (Switch Transformer: a less sure gate
#    scales the output down, which is also how the gate receives a gradient); for k ≥ 2 the k
#    chosen probabilities renormalised to sum to 1;
# 4. **capacity**: each expert has a buffer of **C = ceil(k·cf·T/E)** slots. k·T/E is the share of
#    a perfectly even split; a capacity factor cf above 1 adds slack, one below 1 forces drops
#    (Switch Transformer works well with cf = 1.0 to 1.25). Assignments claim slots in a
#    fixed priority — **all first choices before any second choice, earlier tokens first** — and an
#    assignment that finds its expert full is **dropped**: it contributes nothing (in a transformer
#    the residual connection still carries the token past the layer unchanged).
#
# Eight tokens, E = 4, k = 2, cf = 1, so C = ceil(2·1·8/4) = 4 slots per expert. Expert 0 is
# popular: five tokens want it first.

# %%
probs = torch.tensor(
    [
        [0.60, 0.25, 0.10, 0.05],
        [0.50, 0.10, 0.30, 0.10],
        [0.20, 0.55, 0.15, 0.10],
        [0.45, 0.35, 0.10, 0.10],
        [0.20, 0.10, 0.60, 0.10],
        [0.55, 0.05, 0.10, 0.30],
        [0.40, 0.30, 0.20, 0.10],
        [0.10, 0.20, 0.10, 0.60],
    ]
)
example = moe.route(probs.log(), k=2, capacity_factor=1.0)  # log-probabilities are valid logits
print(f"C = {example.capacity} slots per expert\n")
print(moe.routing_table(example, probs))
print(
    "\ntokens_per_expert (before dropping):",
    example.tokens_per_expert.tolist(),
    f"  dropped assignments: {example.num_dropped} of {probs.shape[0] * 2}",
)

# %% [markdown]
# The same routing as the experts' buffers (`viz.plot_expert_buffers`): one row per expert, one
# box per slot. Blue boxes are first choices, orange ones second choices; on the right, in red,
# the assignments that arrived after the buffer was full.

# %%
viz.plot_expert_buffers(example, f"E = 4 experts, k = 2, T = 8, cf = 1 → C = {example.capacity} slots each")

# %% [markdown]
# Follow the priority. First choices, token by token: tokens 0, 1, 3 and 5 fill expert 0's four
# slots, so **token 6 loses its first choice**. Then second choices, token by token: token 2's and
# token 4's second choice is expert 0 again — full, dropped. Token 6's second choice (expert 1)
# still fits, and takes expert 1's last slot, so **token 7's second choice is dropped** because an
# earlier token got there first. Token 6 is now served by its second expert alone, with weight
# 0.30/(0.40 + 0.30) = 0.43: the weights were renormalised over the k choices before dropping, and a
# drop sets its own weight to 0 without renormalising the rest.

# %%
dropped = sorted((int(t), int(j)) for t, j in (example.slot < 0).nonzero())
print("dropped (token, choice):", dropped, f"  token 6's weights: {example.weight[6].tolist()}")
assert example.capacity == 4 and dropped == [(2, 1), (4, 1), (6, 0), (7, 1)]
assert example.weight[6, 0] == 0 and abs(example.weight[6, 1] - 0.30 / 0.70) < 1e-6

# %% [markdown]
# Why first choices before second choices? A token that loses its second expert still gets most
# of its output; one that loses its first loses the larger part. Why a fixed C at all? So that
# every expert's buffer — and every message of the all-to-all — has a size known in advance, and
# no rank waits for one overloaded expert to work through an unbounded queue.
#
# ## 2. The load-balancing loss
#
# Nothing in the task loss stops the gate from sending most tokens to a few experts, and there is a
# feedback loop: an expert that gets more tokens learns faster, becomes better, and is chosen even
# more. The Switch Transformer adds an auxiliary loss
#
# $$\text{aux} = E \sum_{i=1}^{E} f_i \, P_i, \qquad f_i = \text{share of tokens whose first choice is } i, \quad
# P_i = \text{mean gate probability of } i,$$
#
# scaled by **α = 0.01** and added to the task loss. It is 1 when both are uniform and up to E when
# everything goes to one expert. The counts fᵢ have no gradient; Pᵢ does, so minimising it lowers
# the probability of exactly the experts that are crowded. In the example above:

# %%
f = torch.bincount(example.expert_index[:, 0], minlength=4) / 8
P = probs.mean(dim=0)
print("f =", f.tolist(), "  P =", [round(p, 3) for p in P.tolist()])
print(f"E·Σ f·P = {4 * (f * P).sum():.4f}   route(...).aux_loss = {example.aux_loss:.4f}")
even = moe.load_balancing_loss(torch.full((8, 4), 0.25), (torch.arange(8) % 4).view(8, 1))
collapsed = moe.load_balancing_loss(torch.eye(4)[[0] * 8], torch.zeros(8, 1, dtype=torch.long))
print(f"perfectly even: {even:.4f} (formula: 1)   everything to expert 0: {collapsed:.4f} (formula: E = 4)")
assert torch.allclose(4 * (f * P).sum(), example.aux_loss)
assert torch.allclose(even, torch.tensor(1.0)) and torch.allclose(collapsed, torch.tensor(4.0))

# %% [markdown]
# The routing in `course_lib/moe.py`, top to bottom (the exercises rebuild `top_k_gate` and
# `assign_slots`):

# %%
for fn in (moe.expert_capacity, moe.top_k_gate, moe.assign_slots, moe.route):
    print(inspect.getsource(fn))

# %% [markdown]
# ## 3. All-to-all from send/recv
#
# After routing, rank r holds, for every other rank j, a block of rows for j's experts — of a size
# decided by the gate, different for every pair of ranks. An all-to-all with **uneven splits**
# moves them: the first `send_counts[0]` rows to rank 0, the next `send_counts[1]` to rank 1, … A
# receiver cannot size its buffer before it knows how much comes, so the course's version first
# exchanges the counts (one small message to every rank), then the rows. Every send is posted
# non-blocking first, so no two ranks wait on each other.

# %%
print(inspect.getsource(moe.all_to_all))


# %% [markdown]
# Is it the same as torch's `dist.all_to_all_single`? Each rank sends a different number of rows
# (some zero) to each rank; row i for rank j holds `[me, j, i]`, so a received row says where it
# came from.


# %%
def both_all_to_alls():
    rank, n = dist.get_rank(), dist.get_world_size()
    counts = [(rank + 2 * j) % 3 for j in range(n)]  # uneven, with zeros
    rows = torch.tensor([[rank, j, i] for j in range(n) for i in range(counts[j])], dtype=torch.float32)
    mine, mine_counts = moe.all_to_all(rows, counts)
    torchs, torch_counts = moe.builtin_all_to_all(rows, counts)
    return torch.equal(mine, torchs) and mine_counts == torch_counts, mine


for n in (1, 2, 3, 4):
    results = launch.run(both_all_to_alls, n)
    assert all(ok for ok, _ in results), f"N={n}: the from-scratch all-to-all differs from all_to_all_single"
    print(f"N={n}: from scratch == all_to_all_single on every rank ✔")
print("rank 1 of 4 received [sender, receiver, index]:", results[1][1].int().tolist())
assert all(row[1] == 1 for row in results[1][1].int().tolist())  # every row received was meant for rank 1

# %% [markdown]
# ## 4. The expert-parallel layer
#
# `MoELayer.from_dense(gate, experts, k, capacity_factor)` keeps the (replicated) gate and experts
# r·E/N … (r+1)·E/N − 1 of the full list on rank r. `layer(x)` on this rank's T tokens:
#
# 1. **route** (capacity from this rank's own T);
# 2. **dispatch**: the kept assignments, sorted by (expert, slot), so each destination rank's rows
#    are one block; the ranks first swap how many rows each sends to each expert (E/N counts per
#    pair of ranks), then the rows travel by all-to-all;
# 3. each local expert runs on the rows it received, from all ranks at once;
# 4. **return**: the reverse all-to-all brings each result back to the rank that owns the token;
# 5. **combine**: y[t] = Σⱼ weight[t, j] · result — dropped assignments have weight 0.
#
# Both all-to-alls are an autograd function whose backward is the same exchange in reverse, so the
# gradient of a result travels back to the expert's rank, and the gradient of a dispatched row
# travels back to its token.

# %%
print(inspect.getsource(moe.MoELayer.forward))

# %% [markdown]
# **Check.** On N = 1, 2 and 4 ranks, every rank builds the same gate and E = 4 experts from a
# seed, keeps its E/N experts, and runs its own tokens (a different T per rank) through the layer;
# loss = Σ y² + aux. One process then runs the same tokens through `moe.dense_moe`, a plain loop
# over tokens and their kept choices, and the same loss. Compared (fp32, rtol = atol = 1e-5): each
# rank's output, the gradient of its tokens x, the gate's gradient summed over ranks (each rank
# holds a replica that saw only its own tokens), and every expert's gradient on the rank that holds
# it.

# %%
D, E, K, CF = 8, 4, 2, 1.0


def rank_tokens(rank):
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(12 + 4 * rank, D, generator=g)


def layer_on_ranks():
    rank = dist.get_rank()
    gate, experts = moe.make_moe(D, E, d_hidden=16, seed=0)
    layer = moe.MoELayer.from_dense(gate, experts, K, CF)
    x = rank_tokens(rank).requires_grad_()
    y = layer(x)
    (y.square().sum() + layer.last_routing.aux_loss).backward()
    expert_grads = {name: p.grad for name, p in layer.experts.named_parameters()}
    return y, x.grad, gate.weight.grad, expert_grads, layer.last_routing.num_dropped


def compare_with_dense(n):
    results = launch.run(layer_on_ranks, n)
    gate, experts = moe.make_moe(D, E, d_hidden=16, seed=0)
    outputs, token_grads = [], []
    for rank in range(n):  # the reference: same tokens, same experts, one process
        x = rank_tokens(rank).requires_grad_()
        y = moe.dense_moe(x, gate, experts, K, CF)
        (y.square().sum() + moe.route(gate(x), K, CF).aux_loss).backward()
        outputs.append(y.detach())
        token_grads.append(x.grad)
    close = lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5)  # noqa: E731
    per_rank = E // n
    experts_ok = all(
        close(
            g,
            dict(experts[rank * per_rank + int(name.split(".")[0])].named_parameters())[
                name.split(".", 1)[1]
            ].grad,
        )
        for rank, r in enumerate(results)
        for name, g in r[3].items()
    )
    report = dict(
        output=all(close(r[0], o) for r, o in zip(results, outputs)),
        token_grads=all(close(r[1], g) for r, g in zip(results, token_grads)),
        gate_grad=close(sum(r[2] for r in results), gate.weight.grad),
        expert_grads=experts_ok,
    )
    drops = [r[4] for r in results]
    print(
        f"N={n}: "
        + ", ".join(f"{k} {'✔' if v else '✘'}" for k, v in report.items())
        + f"   (assignments dropped per rank: {drops})"
    )
    return all(report.values())


assert all(compare_with_dense(n) for n in (1, 2, 4))
try:
    launch.run(lambda: moe.MoELayer.from_dense(*moe.make_moe(D, 6), K, CF), 4)
except launch.RankError as error:
    print("E = 6 on N = 4:", next(line for line in str(error).splitlines() if line.startswith("ValueError")))
else:
    raise AssertionError("E = 6 experts on N = 4 ranks should have been refused")

# %% [markdown]
# ## 5. Measured: the load on each expert and on each rank
#
# Real tokens are not spread evenly: inputs share directions, and the gate maps them to the same
# experts. Here 4 ranks, each with T = 256 tokens of a regression task whose inputs share a
# common offset, go through an **untrained** gate with E = 8, k = 1, cf = 1.25
# (C = ceil(1.25·256/8) = 40 slots per expert per rank). Left: tokens per expert before dropping,
# summed over ranks, split into kept and dropped. Right: the rows each rank's experts receive — the
# work each rank does, which the slowest rank sets for everyone.

# %%
T_LOAD, D_LOAD, E_LOAD = 256, 16, 8


def shifted_tokens(rank, num_tokens=T_LOAD, offset=2.0):
    """Regression inputs plus one shared offset: the gate sees them as alike (skewed routing)."""
    x, y = models.regression_data(num_tokens, D_LOAD, seed=100 + rank)
    shift = torch.randn(D_LOAD, generator=torch.Generator().manual_seed(4))
    return x + offset * shift / shift.norm(), y


def load_on_ranks(k, capacity_factor):
    gate, experts = moe.make_moe(D_LOAD, E_LOAD, d_hidden=32, seed=0)
    layer = moe.MoELayer.from_dense(gate, experts, k, capacity_factor)
    with torch.no_grad():
        layer(shifted_tokens(dist.get_rank())[0])
    r = layer.last_routing
    kept = torch.bincount(r.expert_index[r.slot >= 0], minlength=E_LOAD)
    return r.tokens_per_expert, kept, r.capacity


N_LOAD = 4
load = launch.run(load_on_ranks, N_LOAD, 1, 1.25)
load_assigned = sum(a for a, _, _ in load)
load_kept = sum(k for _, k, _ in load)
load_capacity = load[0][2]
load_per_rank = load_kept.view(N_LOAD, -1).sum(dim=1).float()
print(
    "assignments per expert:",
    load_assigned.tolist(),
    " kept:",
    load_kept.tolist(),
    f" C per rank = {load_capacity}",
)
assert load_capacity == 40 and int(load_assigned.sum()) == N_LOAD * T_LOAD
viz.plot_expert_load(load_assigned, load_kept, load_capacity, N_LOAD)

# %% [markdown]
# ## 6. Measured: drops against the capacity factor
#
# One rank's T = 1024 tokens, E = 8, for cf from 0.25 to 3: the share of assignments dropped.
# There is a floor no router can go below: the E experts have E·C slots for k·T assignments, so
# at least 1 − E·C/(k·T) of them are dropped — with C = k·cf·T/E (a whole number here) that is
# **max(0, 1 − cf)**. A perfectly even router sits exactly on it. Four routers:
#
# * **perfectly even**: token t picks experts t, t + 1, … (mod E) — every expert gets exactly
#   k·T/E assignments (`moe.round_robin_logits`);
# * **random, no preference**: random logits, every expert equally likely — even *on average*,
#   but the counts fluctuate around k·T/E;
# * the untrained gate on the inputs of section 5 **without** the shared offset (near-even),
#   and **with** it (skewed).
#
# Everything above the floor is the price of imbalance. More slack (larger cf) means fewer drops
# but bigger buffers — more memory, and, where buffers are padded to C (as in GShard and Switch
# Transformer), more padding sent and computed.

# %%
T_DROP = 1024
factors = [0.25 * i for i in range(1, 13)]
drop_gate, _ = moe.make_moe(D_LOAD, E_LOAD, d_hidden=32, seed=0)
with torch.no_grad():
    routers = {
        "perfectly even": lambda k: moe.round_robin_logits(T_DROP, E_LOAD, k),
        "random, no preference": lambda k: torch.randn(
            T_DROP, E_LOAD, generator=torch.Generator().manual_seed(1)
        ),
        "gate, near-even inputs": lambda k: drop_gate(shifted_tokens(0, T_DROP, 0.0)[0]),
        "gate, skewed inputs": lambda k: drop_gate(shifted_tokens(0, T_DROP, 2.0)[0]),
    }
    curves = {}
    for label, make_logits in routers.items():
        for k in (1, 2):
            logits = make_logits(k)
            curves[label, k] = [moe.route(logits, k, cf).num_dropped / (T_DROP * k) for cf in factors]

shown = [1.0, 1.25, 2.0]
print(f"{'router':>22} {'k':>2}  " + "  ".join(f"{f'cf={cf:g}':>7}" for cf in shown))
print(f"{'max(0, 1 - cf)':>22} {'':>2}  " + "  ".join(f"{100 * max(0, 1 - cf):>6.1f}%" for cf in shown))
for (label, k), drops in curves.items():
    print(f"{label:>22} {k:>2}  " + "  ".join(f"{100 * drops[factors.index(cf)]:>6.1f}%" for cf in shown))
    for cf, d in zip(factors, drops):
        assert d >= max(0.0, 1 - cf) - 1e-12, "no router drops less than the floor"
        if label == "perfectly even":
            assert abs(d - max(0.0, 1 - cf)) < 1e-12, "a perfectly even router sits on the floor"
assert curves["random, no preference", 1][factors.index(1.0)] > 0  # even on average is not enough
viz.plot_drop_curves(factors, curves, E_LOAD, T_DROP)

# %% [markdown]
# The perfectly even router is the formula, to the last assignment. The random one, even on
# average, still drops a few percent at cf = 1: some experts draw more than k·T/E by chance —
# which is one reason to set cf a little above 1.
# The gates drop far more, the skewed one at any cf shown.
#
# ## 7. Measured: how many bytes the all-to-alls move
#
# With balanced routing and no drops, each rank dispatches k·T rows of D numbers, and a share
# (N−1)/N of them belongs to experts on other ranks. So one all-to-all sends, per rank,
#
# $$\text{bytes} = \frac{N-1}{N}\, k\, T\, D \cdot 4 \quad\text{(fp32)},$$
#
# and a forward pass sends twice that (dispatch + return); the backward pass the same again. On
# top come the counts: E/N numbers (8 bytes each) to each of the N−1 other ranks.
#
# Measured on 4 ranks with T = 256, D = 64, E = 8, k = 2 and cf = 8 (C = k·T: nothing can be
# dropped). `count_traffic` counts the **payload** of every send exactly, and reads the **wire**
# bytes from the kernel's TCP counters (payload plus gloo's message headers). The routing is not
# perfectly even, so the exact payload follows the rows this rank really sent elsewhere; the
# formula is the balanced value.

# %%
T_A2A, D_A2A, K_A2A, E_A2A = 256, 64, 2, 8


def traffic_on_ranks():
    rank = dist.get_rank()
    gate, experts = moe.make_moe(D_A2A, E_A2A, d_hidden=64, seed=0)
    layer = moe.MoELayer.from_dense(gate, experts, K_A2A, capacity_factor=E_A2A)
    # The tokens need a gradient, as the output of an earlier layer would: then backward runs both trips.
    x = torch.randn(T_A2A, D_A2A, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    with count_traffic() as forward:
        y = layer(x)
    with count_traffic() as backward:
        y.square().sum().backward()
    r = layer.last_routing
    kept = torch.bincount(r.expert_index[r.slot >= 0], minlength=E_A2A)  # rows for each expert
    return kept, r.num_dropped, (forward.payload_sent, forward.sent), (backward.payload_sent, backward.sent)


def wire(nbytes):
    return "n/a" if nbytes is None else f"{nbytes:,}"


N_A2A = 4
traffic = launch.run(traffic_on_ranks, N_A2A)
rows_kept = torch.stack([r[0] for r in traffic]).view(N_A2A, N_A2A, E_A2A // N_A2A).sum(dim=2)  # [from, to]
a2a_formula = moe.traffic_formula(T_A2A, K_A2A, D_A2A, N_A2A)
counts_bytes = (N_A2A - 1) * (E_A2A // N_A2A) * 8
balanced_rows = (N_A2A - 1) * K_A2A * T_A2A // N_A2A
print(
    f"formula, one all-to-all: (N-1)/N·k·T·D·4 = {a2a_formula:,} B;  forward: 2 × that + "
    f"{counts_bytes} B of counts = {2 * a2a_formula + counts_bytes:,} B\n"
)
print("rank | rows out, in | exact fwd payload | measured fwd payload | fwd wire | bwd payload | bwd wire")
forward_payloads = []
for rank, (_, dropped_here, (pay_f, wire_f), (pay_b, wire_b)) in enumerate(traffic):
    rows_out = int(rows_kept[rank].sum() - rows_kept[rank, rank])  # my tokens' rows for other ranks' experts
    rows_in = int(rows_kept[:, rank].sum() - rows_kept[rank, rank])  # other ranks' rows for my experts
    exact = (rows_out + rows_in) * D_A2A * 4 + counts_bytes  # dispatch out + results back out + counts
    forward_payloads.append(pay_f)
    print(
        f"  {rank}  |  {rows_out:3d}, {rows_in:3d}   | {exact:>15,} | {pay_f:>18,} | {wire(wire_f):>9} |"
        f" {pay_b:>11,} | {wire(wire_b):>8}"
    )
    assert dropped_here == 0 and pay_f == exact and pay_b == exact - counts_bytes
    assert (
        abs(rows_out - balanced_rows) < 0.2 * balanced_rows
        and abs(rows_in - balanced_rows) < 0.2 * balanced_rows
    )
    assert wire_f is None or wire_f >= pay_f  # headers only add
mean_forward_payload = sum(forward_payloads) / N_A2A

# %% [markdown]
# How to read it: the dispatch sends this rank's rows for other ranks' experts (rows out), the
# return trip sends back the results of the rows other ranks sent here (rows in); with the counts
# that is the exact payload, and the measured payload equals it to the byte. Rows out and in are
# within 20 % of (N−1)/N·k·T = 384 because this router is close to even, so the total stays close
# to the balanced formula. The wire adds gloo's headers (tens of bytes per message). The backward
# moves the same rows again (gradients of the results out, gradients of the tokens back), without
# the counts. Per layer and training step, expert parallelism moves about 4·(N−1)/N·k·T·D numbers
# per rank: independent of E, proportional to k.
#
# ## 8. Measured: the load-balancing loss in training
#
# Train one MoE layer (E = 8, k = 1, cf = 1.25, the skewed inputs of section 5) on the regression
# task for 150 Adam steps of T = 256 tokens, once with the task loss alone and once with
# + α·aux, α = 0.01. After each step: the **load imbalance** max / mean tokens per expert (1 =
# perfectly even), the share of **dropped** assignments, and the task loss. (One process: balance is
# a property of the gate, the same on one rank or many.)


# %%
def train(alpha, steps=150, k=1, num_tokens=256, capacity_factor=1.25):
    gate, experts = moe.make_moe(D_LOAD, E_LOAD, d_hidden=32, seed=0)
    layer = moe.MoELayer.from_dense(gate, experts, k, capacity_factor)  # no process group: N = 1
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x_all, y_all = shifted_tokens(0, 8 * num_tokens)
    history = {"imbalance": [], "dropped": [], "task loss": []}
    for step in range(steps):
        batch = slice((step % 8) * num_tokens, (step % 8 + 1) * num_tokens)
        out = layer(x_all[batch])
        routing = layer.last_routing
        task = F.mse_loss(out, y_all[batch])
        optimizer.zero_grad()
        (task + alpha * routing.aux_loss).backward()
        optimizer.step()
        load = routing.tokens_per_expert.float()
        history["imbalance"].append(float(load.max() / load.mean()))
        history["dropped"].append(100 * routing.num_dropped / (num_tokens * k))
        history["task loss"].append(float(task.detach()))
    return history


def last10(values):
    """Mean of the last 10 steps: the 8 batches repeat, so single steps zigzag."""
    return sum(values[-10:]) / len(values[-10:])


runs = {"task loss only": train(0.0), "with α·aux, α = 0.01": train(moe.AUX_LOSS_WEIGHT)}
for name, history in runs.items():
    print(
        f"{name:>22}: imbalance {history['imbalance'][0]:.2f} → {last10(history['imbalance']):.2f}, "
        f"dropped {history['dropped'][0]:.0f} % → {last10(history['dropped']):.0f} %, "
        f"task loss {history['task loss'][0]:.3f} → {last10(history['task loss']):.3f}"
        "   (step 0 → mean of the last 10 steps)"
    )
plain, balanced = runs.values()
assert last10(plain["dropped"]) > 50, "without the aux loss more than half should end up dropped"
assert sum(balanced["imbalance"][15:25]) / 10 < 0.75 * balanced["imbalance"][0]
assert last10(balanced["imbalance"]) < 0.8 * balanced["imbalance"][0] < last10(plain["imbalance"])
assert 1.5 < last10(balanced["imbalance"]) < 3 and last10(balanced["dropped"]) > 0
assert last10(balanced["task loss"]) < 0.6 * last10(plain["task loss"])
viz.plot_balance_training(runs)

# %% [markdown]
# Without the auxiliary loss the feedback loop wins: the crowded experts get more crowded, more
# than half of the assignments end up dropped, and the task loss stalls, since a dropped token is
# not processed at all. With α = 0.01 the collapse does not happen: within about 20 steps the
# imbalance falls well below where it started and stays there, and the task loss ends at about
# half. The loss term is tiny, but its gradient points exactly at the crowded experts. It does not
# make the load perfectly even (max/mean stays around 2 here, so cf = 1.25 still drops some
# tokens); real systems combine it with a larger cf, more tokens per batch, or both — or, like
# DeepSeek-V3, replace most of it by a bias on each expert's routing score, raised while the
# expert is under-loaded and lowered while it is over-loaded. (The cell above asserts each of
# these claims on your run.)
#
# ## 9. Try it: capacity factor, k, E and a skewed router
#
# T = 512 random tokens; the gate's logits are random plus a bias that favours low-numbered
# experts, scaled by **skew** (0: no preference). Bars: assignments per expert, kept (blue) and
# dropped (red); the dashed line is C.

# %%
viz.routing_explorer()

# %% [markdown]
# Things to try: at skew 0, how small can cf be before drops start? Raise the skew: which cf keeps
# drops under 5 %? Does k = 2 drop more or less than k = 1 at the same cf (C grows with k too)?
#
# ## Summary
#
# | topic | in one line |
# |---|---|
# | routing | softmax, top-k; weight = p (k = 1) or p renormalised over the k (k ≥ 2) |
# | capacity | C = ceil(k·cf·T/E) per expert; first choices before second, earlier tokens first; drops contribute 0 |
# | drops | at least max(0, 1 − cf) of the assignments; a perfectly even router drops exactly that |
# | balance | aux = E·Σᵢ fᵢ·Pᵢ, scaled by α = 0.01; 1 when even, up to E when collapsed |
# | communication | 2 all-to-alls forward, 2 backward; each (N−1)/N·k·T·D numbers per rank when balanced |
# | imbalance | the fullest expert sets the pace (or the drops); cf trades drops for buffer size |
#
# **Terms** — 混合专家模型 mixture of experts · 专家 expert · 共享专家 shared expert · 门控网络 /
# 路由器 gate / router · 专家并行 expert parallelism · 全对全 all-to-all · 容量 capacity · 容量因子
# capacity factor · 词元丢弃 token dropping · 负载不均衡 load imbalance · 负载均衡辅助损失
# load-balancing (auxiliary) loss.
#
# ## What you measured
#
# Each formula of this chapter beside the number your run produced.

# %%
cf_1 = factors.index(1.0)
cf_075 = factors.index(0.75)
rows = [
    ("capacity, T=256, E=8, k=1, cf=1.25", "C = ceil(k·cf·T/E) = 40", f"{load_capacity}"),
    ("aux loss, uniform router", "E·Σ f·P = 1", f"{float(even):.4f}"),
    ("aux loss, everything to one expert", "E·Σ f·P = E = 4", f"{float(collapsed):.4f}"),
    (
        "drops, perfectly even router, cf=0.75",
        "max(0, 1 − cf) = 25.0 %",
        f"{100 * curves['perfectly even', 1][cf_075]:.1f} %",
    ),
    (
        "drops, random router, k=1, cf=1",
        "≥ max(0, 1 − cf) = 0 %",
        f"{100 * curves['random, no preference', 1][cf_1]:.1f} %",
    ),
    (
        "drops, skewed gate, k=1, cf=1",
        "≥ max(0, 1 − cf) = 0 %",
        f"{100 * curves['gate, skewed inputs', 1][cf_1]:.1f} %",
    ),
    (
        "all-to-all fwd payload per rank (mean)",
        f"2·(N−1)/N·k·T·D·4 + counts = {2 * a2a_formula + counts_bytes:,} B",
        f"{mean_forward_payload:,.0f} B",
    ),
    (
        "slowest / mean rank, skewed gate (§5)",
        "1 when balanced",
        f"{float(load_per_rank.max() / load_per_rank.mean()):.2f}",
    ),
    ("imbalance after 150 steps, no aux", "max/mean = 1 when even", f"{last10(plain['imbalance']):.2f}"),
    ("imbalance after 150 steps, α·aux", "max/mean = 1 when even", f"{last10(balanced['imbalance']):.2f}"),
]
print(f"{'quantity':<40}  {'formula':<46}  {'measured':>10}")
for quantity, formula_text, value in rows:
    print(f"{quantity:<40}  {formula_text:<46}  {value:>10}")

# %% [markdown]
# **Next**: the exercises (`my_exercises/08_moe.ipynb`) build the top-k gate, the slot assignment, the
# all-to-all from send/recv, and the expert-parallel forward.
