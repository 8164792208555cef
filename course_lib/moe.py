"""Mixture of experts: routing with capacity, and expert parallelism over all-to-all.

    routing = route(gate(x), k=2, capacity_factor=1.25)   # who goes where, who is dropped
    layer = MoELayer.from_dense(gate, experts, k=2, capacity_factor=1.25)
    y = layer(x)                                           # x: this rank's T tokens (T×D)

Notation: E experts, k experts per token, T tokens (on this rank), D features,
N ranks. Each expert has a buffer of C = ceil(k·cf·T/E) slots; an assignment
(token t, choice j) that finds its expert's buffer full is dropped and
contributes nothing. Rank r holds experts [r·E/N, (r+1)·E/N); tokens travel to
their experts and back by an all-to-all built here from send/recv.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from course_lib.models import MLP
from course_lib.p2p import global_rank

#: Switch Transformer's scale for the load-balancing loss.
AUX_LOSS_WEIGHT = 0.01


@dataclass
class Routing:
    """Where each of T tokens goes; every (T, k) tensor is indexed [token, choice]."""

    expert_index: torch.Tensor  # (T, k) int64: the chosen experts, most probable first
    slot: torch.Tensor  # (T, k) int64: position in that expert's buffer, -1 where dropped
    weight: torch.Tensor  # (T, k): combine weights, 0 where dropped (differentiable)
    tokens_per_expert: torch.Tensor  # (E,) int64: assignments to each expert before dropping
    num_dropped: int  # (token, choice) assignments that found their expert full
    aux_loss: torch.Tensor  # scalar: E·Σᵢ fᵢ·Pᵢ, 1.0 when perfectly balanced
    capacity: int  # C, slots per expert


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """C = ceil(k·cf·T/E) slots per expert."""
    # The small epsilon keeps float noise (1.1·10 = 11.000000000000002) from adding a slot.
    return max(0, math.ceil(k * capacity_factor * num_tokens / num_experts - 1e-9))


def top_k_gate(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert_index, weight), both T×k: softmax over E, the k most probable experts.

    k = 1 keeps the probability itself as the weight (Switch: the gate's
    confidence scales the output, which is how the gate gets a gradient);
    k ≥ 2 renormalises the chosen k probabilities to sum to 1.
    """
    probs = logits.softmax(dim=-1)
    top_probs, expert_index = probs.topk(k, dim=-1)
    weight = top_probs if k == 1 else top_probs / top_probs.sum(dim=-1, keepdim=True)
    return expert_index, weight


def assign_slots(expert_index: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Buffer slot of every (token, choice), -1 where the expert is already full.

    Priority: every token's first choice before any second choice, and within
    one choice earlier tokens first. So a token loses its second expert before
    any token loses its first one.
    """
    slot = torch.full_like(expert_index, -1)
    filled = torch.zeros(num_experts, dtype=torch.long)  # slots taken so far, per expert
    for choice in range(expert_index.shape[1]):
        one_hot = F.one_hot(expert_index[:, choice], num_experts)  # T×E
        position = (filled + one_hot.cumsum(dim=0) - 1).gather(1, expert_index[:, choice : choice + 1])[:, 0]
        slot[:, choice] = torch.where(position < capacity, position, -1)
        filled += one_hot.sum(dim=0)
    return slot


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """Switch's auxiliary loss E·Σᵢ fᵢ·Pᵢ.

    fᵢ: share of tokens whose top-1 is expert i (counted, no gradient);
    Pᵢ: mean probability of expert i (differentiable). Minimal, 1.0, when
    both are uniform; pushing it down moves probability off crowded experts.
    """
    num_tokens, num_experts = probs.shape
    f = torch.bincount(expert_index[:, 0], minlength=num_experts).to(probs.dtype) / num_tokens
    return num_experts * (f * probs.mean(dim=0)).sum()


def route(logits: torch.Tensor, k: int, capacity_factor: float) -> Routing:
    """Route T tokens (``logits``: T×E from the gate) to k experts each, with capacity."""
    num_tokens, num_experts = logits.shape
    if not 1 <= k <= num_experts:
        raise ValueError(f"k={k} experts per token must be between 1 and E={num_experts}")
    expert_index, weight = top_k_gate(logits, k)
    capacity = expert_capacity(num_tokens, num_experts, k, capacity_factor)
    slot = assign_slots(expert_index, num_experts, capacity)
    dropped = slot < 0
    return Routing(
        expert_index=expert_index,
        slot=slot,
        weight=weight.masked_fill(dropped, 0.0),
        tokens_per_expert=torch.bincount(expert_index.flatten(), minlength=num_experts),
        num_dropped=int(dropped.sum()),
        aux_loss=load_balancing_loss(logits.softmax(dim=-1), expert_index),
        capacity=capacity,
    )


def routing_table(routing: Routing, probs: torch.Tensor) -> str:
    """One line per token: each choice's expert (with its probability), slot or DROPPED, weight."""
    k = routing.expert_index.shape[1]
    lines = ["token | " + " | ".join(f"choice {j + 1}: expert, slot, weight" for j in range(k))]
    for t in range(routing.expert_index.shape[0]):
        cells = []
        for j in range(k):
            e, s = int(routing.expert_index[t, j]), int(routing.slot[t, j])
            where = f"slot {s}" if s >= 0 else "DROPPED"
            cells.append(f"e{e} (p={probs[t, e]:.2f}), {where:>7}, w={routing.weight[t, j]:.2f}")
        lines.append(f"  t{t}  | " + " | ".join(cells))
    return "\n".join(lines)


def round_robin_logits(num_tokens: int, num_experts: int, k: int) -> torch.Tensor:
    """Logits of a perfectly even router: token t's choices are experts t, t+1, ..., t+k-1 (mod E),
    in that order, so every expert gets exactly k·T/E assignments when E divides T."""
    logits = torch.zeros(num_tokens, num_experts)
    for j in range(k):
        logits[torch.arange(num_tokens), (torch.arange(num_tokens) + j) % num_experts] = float(k - j)
    return logits


# ----------------------------------------------------------------------------
# all-to-all from point-to-point


def _rank_and_size(group=None) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1  # one process, no process group: everything stays here
    return dist.get_rank(group), dist.get_world_size(group)


def _exchange_counts(send_counts: list[int], group=None) -> list[int]:
    """Tell every rank how many rows it gets from me; learn how many I get from each."""
    rank, n = _rank_and_size(group)
    mine = torch.tensor(send_counts, dtype=torch.int64)
    theirs = mine.clone()  # theirs[j]: rows rank j will send me (my own entry is already right)
    requests = [
        dist.isend(mine[j : j + 1], global_rank(group, j), group=group) for j in range(n) if j != rank
    ]
    for j in range(n):
        if j != rank:
            dist.recv(theirs[j : j + 1], global_rank(group, j), group=group)
    for request in requests:
        request.wait()
    return theirs.tolist()


def all_to_all(
    rows: torch.Tensor,
    send_counts: Sequence[int] | torch.Tensor,
    group: dist.ProcessGroup | None = None,
    recv_counts: Sequence[int] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Send ``rows[first send_counts[0]]`` to rank 0, the next ``send_counts[1]`` to rank 1, ...

    Returns ``(received, recv_counts)``: the rows from rank 0, then from rank 1,
    ...; ``recv_counts[j]`` of them from rank j. Splits may be uneven and zero.
    Without ``recv_counts`` the ranks first exchange their counts (N−1 small
    messages each) so that every receiver can size its buffer.
    Only isend/recv are used; empty pieces are not sent at all.
    """
    rank, n = _rank_and_size(group)
    send_counts = [int(c) for c in send_counts]
    if len(send_counts) != n or sum(send_counts) != rows.shape[0]:
        raise ValueError(
            f"send_counts={send_counts} must have one entry per rank (N={n}) "
            f"summing to the {rows.shape[0]} rows to send"
        )
    if recv_counts is None:
        recv_counts = _exchange_counts(send_counts, group) if n > 1 else send_counts
    recv_counts = [int(c) for c in recv_counts]
    # send/recv move data, not gradients (_AllToAll below adds those): work on plain tensors.
    rows = rows.detach()
    outgoing = rows.contiguous().split(send_counts)
    received = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
    incoming = received.split(recv_counts)
    # All sends are posted first (non-blocking), so no pair of ranks waits on each other.
    requests = [
        dist.isend(outgoing[j], global_rank(group, j), group=group)
        for j in range(n)
        if j != rank and send_counts[j]
    ]
    incoming[rank].copy_(outgoing[rank])
    for j in range(n):
        if j != rank and recv_counts[j]:
            dist.recv(incoming[j], global_rank(group, j), group=group)
    for request in requests:
        request.wait()
    return received, recv_counts


def builtin_all_to_all(
    rows: torch.Tensor, send_counts: Sequence[int] | torch.Tensor, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, list[int]]:
    """The same as :func:`all_to_all` with torch's ``dist.all_to_all_single`` (the reference)."""
    rank, n = _rank_and_size(group)
    send_counts = [int(c) for c in send_counts]
    counts = torch.empty(n, dtype=torch.int64)
    dist.all_to_all_single(counts, torch.tensor(send_counts, dtype=torch.int64), group=group)
    recv_counts = counts.tolist()
    received = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
    dist.all_to_all_single(
        received,
        rows.contiguous(),
        output_split_sizes=recv_counts,
        input_split_sizes=send_counts,
        group=group,
    )
    return received, recv_counts


class _AllToAll(torch.autograd.Function):
    """all_to_all with a gradient: the backward is the same exchange run in reverse."""

    @staticmethod
    def forward(ctx, rows, send_counts, recv_counts, group):
        ctx.counts, ctx.group = (send_counts, recv_counts), group
        return all_to_all(rows, send_counts, group, recv_counts)[0]

    @staticmethod
    def backward(ctx, grad):
        send_counts, recv_counts = ctx.counts
        return all_to_all(grad, recv_counts, ctx.group, send_counts)[0], None, None, None


# ----------------------------------------------------------------------------
# the layer


def make_moe(
    d_model: int = 8, num_experts: int = 4, d_hidden: int = 16, seed: int = 0
) -> tuple[nn.Linear, nn.ModuleList]:
    """A gate (Linear D→E) and E expert MLPs, identical on every rank for one seed."""
    torch.manual_seed(seed)
    gate = nn.Linear(d_model, num_experts, bias=False)
    return gate, nn.ModuleList(MLP(d_model, d_hidden) for _ in range(num_experts))


class MoELayer(nn.Module):
    """Expert-parallel MoE: a replicated gate, this rank's E/N experts, two all-to-alls.

    The gate's gradient on a rank comes from its own tokens only (average it
    over ranks like any data-parallel weight); an expert's gradient collects
    every rank's tokens that reached it, through the reverse all-to-all.
    """

    def __init__(
        self, gate: nn.Module, local_experts, num_experts: int, k: int, capacity_factor: float, group=None
    ):
        super().__init__()
        self.gate, self.experts = gate, nn.ModuleList(local_experts)
        self.num_experts, self.k, self.capacity_factor, self.group = num_experts, k, capacity_factor, group
        self.last_routing: Routing | None = None

    @classmethod
    def from_dense(
        cls,
        gate: nn.Module,
        experts: Sequence[nn.Module] | nn.ModuleList,
        k: int,
        capacity_factor: float,
        group: dist.ProcessGroup | None = None,
    ) -> MoELayer:
        """Keep experts [r·E/N, (r+1)·E/N) of the full list ``experts`` on rank r (shared, not copied)."""
        rank, n = _rank_and_size(group)
        num_experts = len(experts)
        if num_experts % n:
            raise ValueError(
                f"E={num_experts} experts do not split evenly over N={n} ranks; "
                f"use a number of experts divisible by {n}"
            )
        per_rank = num_experts // n
        return cls(
            gate,
            list(experts)[rank * per_rank : (rank + 1) * per_rank],
            num_experts,
            k,
            capacity_factor,
            group,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.last_routing = route(self.gate(x), self.k, self.capacity_factor)
        n = _rank_and_size(self.group)[1]
        per_rank = self.num_experts // n

        # Dispatch order: kept assignments sorted by expert, then by slot, so the
        # rows for rank j (experts of j) are one contiguous piece.
        token, choice = (routing.slot >= 0).nonzero(as_tuple=True)
        expert = routing.expert_index[token, choice]
        order = (expert * (routing.capacity + 1) + routing.slot[token, choice]).argsort()
        token, choice, expert = token[order], choice[order], expert[order]
        per_expert = torch.bincount(expert, minlength=self.num_experts)
        send_counts = per_expert.view(n, per_rank).sum(dim=1).tolist()

        # Every rank learns how many rows each rank sends to each of its experts.
        from_each, _ = all_to_all(per_expert.view(-1, 1), [per_rank] * n, self.group, [per_rank] * n)
        from_each = from_each.view(n, per_rank)  # [source rank, local expert]
        recv_counts = from_each.sum(dim=1).tolist()
        inbox = _AllToAll.apply(x[token], send_counts, recv_counts, self.group)

        # The inbox is grouped by source rank, then by expert: regroup by expert to run each once.
        local_expert = torch.arange(per_rank).repeat(n).repeat_interleave(from_each.flatten())
        by_expert = local_expert.argsort(stable=True)
        pieces = inbox[by_expert].split(from_each.sum(dim=0).tolist())
        outputs = torch.cat([e(piece) for e, piece in zip(self.experts, pieces)])
        outbox = outputs[by_expert.argsort()]

        back = _AllToAll.apply(outbox, recv_counts, send_counts, self.group)
        combined = back * routing.weight[token, choice].unsqueeze(1)
        return x.new_zeros((x.shape[0], back.shape[1])).index_add(0, token, combined)


def dense_moe(
    x: torch.Tensor,
    gate: nn.Module,
    experts: Sequence[nn.Module] | nn.ModuleList,
    k: int,
    capacity_factor: float,
) -> torch.Tensor:
    """The reference: one process, a loop over tokens and their kept choices."""
    routing = route(gate(x), k, capacity_factor)
    rows = []
    for t in range(x.shape[0]):
        row = x.new_zeros(x.shape[1])
        for j in range(k):
            if routing.slot[t, j] >= 0:  # a dropped assignment contributes nothing
                row = row + routing.weight[t, j] * experts[int(routing.expert_index[t, j])](x[t : t + 1])[0]
        rows.append(row)
    return torch.stack(rows)


def traffic_formula(
    num_tokens: int, k: int, d_model: int, world_size: int, bytes_per_element: int = 4
) -> int:
    """Bytes one rank sends in one all-to-all when routing is balanced and nothing is dropped.

    k·T rows of D elements leave the gate; a share (N−1)/N of them belongs to
    other ranks' experts. The return trip sends as many back, so a forward pass
    costs twice this (and a backward pass twice again).
    """
    return (world_size - 1) * k * num_tokens * d_model * bytes_per_element // world_size
