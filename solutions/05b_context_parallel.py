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
# # 05b · Context parallelism — exercises
#
# Context parallelism splits attention itself along the sequence: each of N ranks holds s/N
# positions of q, k and v, shaped `(batch, heads, local_seq, d_head)`. Ring attention passes the
# k/v blocks around a ring and merges partial results with an online softmax; Ulysses swaps the
# sequence split for a head split with an all-to-all.
#
# How the checks work: 5b.1–5b.3 call your function on small seeded tensors in this kernel;
# 5b.4 and 5b.5 run it on N = 2 and 4 ranks. Each compares with `course_lib.cp` computed in one
# process (rtol = atol = 1e-5) and names typical mistakes. The course's own function for each
# exercise is switched off while yours runs.

# %%
import math

import torch
import torch.distributed as dist

from course_lib import cp
from course_lib.checks import context_parallel as check

# %% [markdown]
# ### A warm-up you can run: attention over one block, with its log-sum-exp
#
# `cp.block_attention(q, k, v)` returns the attention of q over one block of keys, normalised
# over that block only, and `lse`, the log-sum-exp of each query's scores in the block. These
# two numbers per query are all an online softmax needs.

# %%
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 1, 4, 2, generator=g) for _ in range(3))
out_a, lse_a = cp.block_attention(q, k[..., :2, :], v[..., :2, :])
print("lse of block A, one per query:", lse_a[0, 0])

# %% [markdown]
# ## Exercise 5b.1 — merge two partial softmax results
#
# `merge(out_a, lse_a, out_b, lse_b)` gets the results of the same queries over two blocks of
# keys (`out_*` of shape (…, q, d), `lse_*` of shape (…, q)) and returns `(out, lse)` over both
# blocks together. The full softmax mass is exp(lse_a) + exp(lse_b); each output contributes in
# proportion to its block's mass. Subtract the **running max** m = max(lse_a, lse_b) before
# exponentiating: the check also uses scores in the thousands, where exp(lse) overflows.


# %%
def merge(out_a, lse_a, out_b, lse_b):
    """(out, lse) of attention over blocks A and B together, from each block's (out, lse)."""
    ### BEGIN SOLUTION
    m = torch.maximum(lse_a, lse_b)
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = w_a + w_b
    out = (w_a / total).unsqueeze(-1) * out_a + (w_b / total).unsqueeze(-1) * out_b
    return out, m + torch.log(total)
    ### END SOLUTION


# %%
check.merge_partials(merge)

# %% [markdown]
# ## Exercise 5b.2 — one block under the causal mask
#
# Cut the sequence into equal chunks. `causal_block(q, k, v, q_chunk, k_chunk)` gets the queries
# of chunk `q_chunk` and the keys/values of chunk `k_chunk` (all the same length c) and returns
# `(out, lse)` of that block under the causal mask (position i sees positions j ≤ i), or **None**
# when every score of the block is masked (skip it). Three cases: k chunk before the q chunk —
# everything visible; the same chunk — mask inside, above the diagonal; k chunk after — None.
# Scores are `q @ kᵀ / √d`.


# %%
def causal_block(q, k, v, q_chunk, k_chunk):
    """(out, lse) of one chunk pair under the causal mask, or None if it is entirely masked."""
    ### BEGIN SOLUTION
    if k_chunk > q_chunk:
        return None
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if k_chunk == q_chunk:
        above = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    lse = scores.logsumexp(dim=-1)
    return torch.exp(scores - lse.unsqueeze(-1)) @ v, lse
    ### END SOLUTION


# %%
check.causal_block(causal_block)

# %% [markdown]
# ## Exercise 5b.3 — the zig-zag positions
#
# With a causal mask, contiguous shards give the last rank about twice the mean work. Zig-zag
# cuts the sequence into **2N** equal chunks and gives rank r chunks **r and 2N−1−r**, in that
# order. `zigzag_positions(rank, world_size, seq_len)` returns the global positions rank holds,
# in the order its shard stores them (a list or a 1-D tensor of ints).


# %%
def zigzag_positions(rank, world_size, seq_len):
    """The positions of rank's zig-zag shard: chunk r, then chunk 2N−1−r, of 2N."""
    ### BEGIN SOLUTION
    size = seq_len // (2 * world_size)
    chunks = (rank, 2 * world_size - 1 - rank)
    return [p for c in chunks for p in range(c * size, (c + 1) * size)]
    ### END SOLUTION


# %%
check.zigzag_positions(zigzag_positions)

# %% [markdown]
# ## Exercise 5b.4 — one ring step (no mask)
#
# `ring_step(q, k, v, partial)` runs inside every rank. `q` is this rank's queries, `(k, v)` the
# block it holds now, `partial` the `(out, lse)` merged so far (None at the first step). One step:
#
# 1. **post** the transfer: send k and v to the right neighbour (rank r+1 mod N) and receive the
#    next k and v from the left (rank r−1 mod N) with `dist.isend` / `dist.irecv` (into
#    `torch.empty_like` buffers);
# 2. **compute** the attention of q over the block held now (`cp.block_attention` is fine), and
#    merge it into `partial` (your `merge` from 5b.1, or `cp.merge_partials`);
# 3. **wait** for the transfers (`request.wait()`), and return `(partial, k_next, v_next)`.
#
# Posting before computing lets the bytes travel while the block is computed. The check calls
# your step N times on N ranks, and records the order in which you post, compute and wait.


# %%
def ring_step(q, k, v, partial):
    """Post the k/v transfer, attend over the block held now, wait; returns (partial, k_next, v_next)."""
    ### BEGIN SOLUTION
    rank, n = dist.get_rank(), dist.get_world_size()
    right, left = (rank + 1) % n, (rank - 1) % n
    k_next, v_next = torch.empty_like(k), torch.empty_like(v)
    requests = [
        dist.isend(k.contiguous(), right),
        dist.isend(v.contiguous(), right),
        dist.irecv(k_next, left),
        dist.irecv(v_next, left),
    ]
    block = cp.block_attention(q, k, v)
    partial = block if partial is None else merge(*partial, *block)
    for request in requests:
        request.wait()
    return partial, k_next, v_next
    ### END SOLUTION


# %%
check.ring_step(ring_step)

# %% [markdown]
# ## Exercise 5b.5 — Ulysses: from a sequence shard to a head shard
#
# `seq_to_heads(x)` gets this rank's contiguous sequence shard, shape (b, a, s/N, d), and returns
# every position of **its** a/N heads, shape (b, a/N, s, d): head group j (heads j·a/N …) goes to
# rank j, and the piece that arrives from rank j is block j of the sequence. Use one
# `dist.all_to_all_single(out, inp)`: it splits `inp` along dim 0 into N equal parts and sends
# part j to rank j; part j of `out` is what rank j sent. Both must be contiguous.


# %%
def seq_to_heads(x):
    """(b, a, s/N, d) sequence shard -> (b, a/N, s, d): every position of my head group."""
    ### BEGIN SOLUTION
    n = dist.get_world_size()
    b, a, length, d = x.shape
    send = x.reshape(b, n, a // n, length, d).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, a // n, n * length, d)
    ### END SOLUTION


# %%
check.seq_to_heads(seq_to_heads)
