"""Checks for chapter 08: mixture of experts.

8.1 and 8.2 are plain tensor code and run in the notebook's process on a few
hand-made and seeded cases; 8.3 and 8.4 run on N ranks. Every check compares
with ``course_lib.moe`` (the course's reference) and, on a difference, names
the token, the choice, the expert and the slot (or the rank and the row).
Inside a check the library function that the exercise rebuilds is switched off.
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn

from course_lib import moe
from course_lib.checks import (
    BuiltinUsed,
    Mismatch,
    builtins_switched_off,
    exercise,
    learner_in_rank,
    run_learner,
    send_recv_only,
)

if TYPE_CHECKING:
    from collections.abc import Callable

#: Seconds one launch may take; a learner's deadlock is reported after about this long.
TIMEOUT = 20.0
A2A_WORLD_SIZES = (1, 2, 3, 4)
LAYER_WORLD_SIZES = (1, 2, 4)
D_MODEL, NUM_EXPERTS, D_HIDDEN, SEED = 6, 4, 12, 8
LAYER_CASES = ((2, 1.0), (1, 1.0))  # (k, capacity factor): both drop some assignments


@contextlib.contextmanager
def _library_switched_off(ex_id: str, learner_fn, names):
    """Make ``course_lib.moe.<name>`` raise while the learner's code runs (also if imported by name)."""
    why = f"exercise {ex_id} asks you to write this yourself"

    def refuse_layer(*args, **kwargs):
        raise BuiltinUsed(f"{why}: you called moe.MoELayer")

    layer_forward = moe.MoELayer.forward
    with builtins_switched_off(learner_fn, names, why, namespaces=(moe,), shown_as="moe"):
        moe.MoELayer.forward = refuse_layer
        try:
            yield
        finally:
            moe.MoELayer.forward = layer_forward


def _one_thread(check):
    """Run a check with one intra-op thread: its tensors are tiny, and on a busy machine the
    notebook process's thread pool made them ten times slower."""

    @functools.wraps(check)
    def single_threaded(*args, **kwargs):
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return check(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return single_threaded


def _call(ex_id, learner_fn, names, *args):
    """Run a learner's local function; a refused library call becomes a Mismatch."""
    try:
        with _library_switched_off(ex_id, learner_fn, names):
            return learner_fn(*args)
    except BuiltinUsed as exc:
        raise Mismatch(str(exc)) from None


def _pair(result, what: str):
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise Mismatch(f"return a pair {what}; got {type(result).__name__}")
    return result


def _tensor(value, shape, what: str, integer: bool) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise Mismatch(f"{what} should be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise Mismatch(f"{what} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    if integer and (value.is_floating_point() or value.is_complex()):
        raise Mismatch(f"{what} should hold integers (torch.long), got {value.dtype}")
    return value.long() if integer else value


# ----------------------------------------------------------------------------
# 8.1 top-k gate


def _gate_cases():
    for num_tokens, num_experts, k, seed in ((10, 4, 1, 0), (12, 6, 2, 1), (9, 5, 3, 2), (1, 3, 2, 3)):
        g = torch.Generator().manual_seed(seed)
        yield torch.randn(num_tokens, num_experts, generator=g) * 2, k


@exercise("8.1", "top-k gate: experts and combine weights")
@_one_thread
def top_k_gate(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(logits, k) -> (expert_index, weight)``, both T×k."""
    for logits, k in _gate_cases():
        num_tokens, num_experts = logits.shape
        want_index, want_weight = moe.top_k_gate(logits, k)
        given = logits.clone().requires_grad_()
        got_index, got_weight = _pair(
            _call("8.1", learner_fn, ("top_k_gate", "route"), given, k), "(expert_index, weight)"
        )
        case = f"T={num_tokens}, E={num_experts}, k={k}"
        got_index = _tensor(got_index, (num_tokens, k), f"{case}: expert_index", integer=True)
        got_weight = _tensor(got_weight, (num_tokens, k), f"{case}: weight", integer=False)
        differentiable, got_weight = got_weight.requires_grad, got_weight.detach().float()
        for t, j in (got_index != want_index).nonzero().tolist()[:1]:
            hint = (
                " — sort the k choices most probable first"
                if set(got_index[t].tolist()) == set(want_index[t].tolist())
                else ""
            )
            raise Mismatch(
                f"{case}: token {t}, choice {j}: expert expected {int(want_index[t, j])}, "
                f"got {int(got_index[t, j])}{hint}"
            )
        bad = ~torch.isclose(got_weight, want_weight, rtol=1e-5, atol=1e-6)
        for t, j in bad.nonzero().tolist()[:1]:
            e, got, want = int(want_index[t, j]), float(got_weight[t, j]), float(want_weight[t, j])
            prob = float(logits.softmax(-1)[t, e])
            if k == 1 and abs(got - 1) < 1e-6:
                hint = " — for k = 1 the weight is the probability itself (Switch), not renormalised to 1"
            elif k > 1 and abs(got - prob) < 1e-6:
                hint = " — for k ≥ 2 divide the chosen probabilities by their sum (they must add up to 1)"
            elif abs(got - float(logits[t, e])) < 1e-6:
                hint = " — that is the logit: take the softmax over the E experts first"
            else:
                hint = ""
            raise Mismatch(
                f"{case}: token {t}, choice {j} (expert {e}): weight expected {want:.4f}, got {got:.4f}{hint}"
            )
        if not differentiable:
            raise Mismatch(
                f"{case}: weight carries no gradient back to the logits — compute it from them "
                "(no .detach(), .item() or torch.no_grad): the gate learns through it"
            )


# ----------------------------------------------------------------------------
# 8.2 capacity: slots and drops


def _slots_token_major(expert_index, capacity):
    """The wrong priority (all choices of token 0, then token 1, ...), to recognise it."""
    filled, slot = {}, torch.full_like(expert_index, -1)
    for t, row in enumerate(expert_index.tolist()):
        for j, e in enumerate(row):
            position = filled[e] = filled.get(e, -1) + 1
            if position < capacity:
                slot[t, j] = position
    return slot


def _slot_cases():
    yield torch.tensor([[0, 1], [0, 1], [1, 0], [0, 2]]), 3, 2  # worked example of the lesson
    g = torch.Generator().manual_seed(5)
    yield torch.randint(0, 4, (12, 1), generator=g), 4, 2
    logits = torch.randn(16, 4, generator=g) * 2
    yield moe.top_k_gate(logits, 2)[0], 4, 5
    yield moe.top_k_gate(logits, 3)[0], 4, 20  # room for everyone


def _name_slot(value: int) -> str:
    return "-1 (dropped)" if value < 0 else str(value)


@exercise("8.2", "capacity: buffer slots and drops")
@_one_thread
def assign_slots(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(expert_index, num_experts, capacity) -> slot`` (T×k, -1 where dropped)."""
    for expert_index, num_experts, capacity in _slot_cases():
        num_tokens, k = expert_index.shape
        want = moe.assign_slots(expert_index, num_experts, capacity)
        got = _call("8.2", learner_fn, ("assign_slots", "route"), expert_index.clone(), num_experts, capacity)
        case = f"E={num_experts}, C={capacity}, k={k}"
        got = _tensor(got, (num_tokens, k), f"{case}: slot", integer=True)
        for t, j in (got != want).nonzero().tolist()[:1]:
            e = int(expert_index[t, j])
            if torch.equal(got, _slots_token_major(expert_index, capacity)):
                hint = " — give every token's first choice a slot before any token's second choice"
            elif want[t, j] < 0 and got[t, j] >= capacity:
                hint = f" — expert {e} has only C={capacity} slots (0..{capacity - 1}); the rest are dropped (-1)"
            elif want[t, j] < 0:
                hint = f" — expert {e}'s {capacity} slots were already taken"
            elif got[t, j] < 0:
                hint = f" — expert {e} still had a free slot"
            else:
                hint = ""
            raise Mismatch(
                f"{case}: token {t}, choice {j} (expert {e}): slot expected "
                f"{_name_slot(int(want[t, j]))}, got {_name_slot(int(got[t, j]))}{hint}"
            )


# ----------------------------------------------------------------------------
# 8.3 all-to-all from send/recv (on N ranks)


def _a2a_counts(n: int, rank: int) -> list[int]:
    """Uneven splits with zeros: rank r sends a few rows to every rank, none to some."""
    g = torch.Generator().manual_seed(100 * n + rank)
    counts = torch.randint(0, 4, (n,), generator=g)
    counts[rank] += 1  # a piece that stays here, also for N = 1
    if n > 2:
        counts[(rank + 1) % n] = 0
    return counts.tolist()


def _a2a_rows(n: int, rank: int) -> torch.Tensor:
    """Row i for rank j is [rank, j, i]: a received row says who sent it and which it was."""
    counts = _a2a_counts(n, rank)
    rows = [[rank, dst, i] for dst in range(n) for i in range(counts[dst])]
    return torch.tensor(rows, dtype=torch.float32).view(-1, 3)


def _a2a_rank(payload):
    learner = learner_in_rank(payload)
    rank, n = dist.get_rank(), dist.get_world_size()
    with (
        send_recv_only("8.3", learner),
        _library_switched_off("8.3", learner, ("all_to_all", "builtin_all_to_all")),
    ):
        result = learner(_a2a_rows(n, rank), _a2a_counts(n, rank))
    if isinstance(result, (tuple, list)) and len(result) == 2:
        received, counts = result
        return received, [int(c) for c in counts] if isinstance(
            counts, (list, tuple, torch.Tensor)
        ) else counts
    return result


#: Said after a deadlock: in an all-to-all it is nearly always a recv that no send matches.
DEADLOCK_HINT = (
    " — every recv needs a matching send: does each rank expect exactly the rows the others send it?"
)


def _launch(n: int, rank_fn, learner_fn, *args):
    return run_learner(n, rank_fn, learner_fn, *args, timeout=TIMEOUT, deadlock_hint=DEADLOCK_HINT)


def _describe_row(row: list) -> str:
    src, dst, i = (int(v) for v in row)
    return f"[{src}, {dst}, {i}] = row {i} that rank {src} sent to rank {dst}"


@exercise("8.3", "all-to-all with uneven splits from send/recv")
def all_to_all(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(rows, send_counts) -> (received, recv_counts)`` on N = 1..4 ranks."""
    for n in A2A_WORLD_SIZES:
        results = _launch(n, _a2a_rank, learner_fn)
        for rank, result in enumerate(results):
            received, counts = _pair(result, "(received, recv_counts)")
            want_counts = [_a2a_counts(n, src)[rank] for src in range(n)]
            if counts != want_counts:
                raise Mismatch(
                    f"N={n}, rank {rank}: recv_counts expected {want_counts} (rows from rank 0, "
                    f"1, ...), got {counts}"
                )
            want = torch.tensor(
                [[src, rank, i] for src in range(n) for i in range(want_counts[src])], dtype=torch.float32
            ).view(-1, 3)
            if not isinstance(received, torch.Tensor) or received.shape != want.shape:
                shape = (
                    tuple(received.shape) if isinstance(received, torch.Tensor) else type(received).__name__
                )
                raise Mismatch(
                    f"N={n}, rank {rank}: received {shape}, expected {tuple(want.shape)} "
                    f"({' + '.join(f'{c} from rank {j}' for j, c in enumerate(want_counts))})"
                )
            for i in (received != want).any(dim=1).nonzero()[:1, 0].tolist():
                raise Mismatch(
                    f"N={n}, rank {rank}: received row {i} expected {_describe_row(want[i])}, "
                    f"got {[float(v) for v in received[i]]}{_row_hint(received[i], want[i], n)}"
                )


def _row_hint(got, want, n: int) -> str:
    """Name the row that arrived instead, when it is one that some rank sent."""
    values = got.tolist()
    if not all(float(v).is_integer() for v in values):
        return ""
    src, dst, i = (int(v) for v in values)
    if not (0 <= src < n and 0 <= dst < n and 0 <= i < _a2a_counts(n, src)[dst]):
        return ""
    if dst != int(want[1]):
        hint = f"; it was meant for rank {dst}: piece j of rows goes to rank j"
    elif src != int(want[0]):
        hint = "; rows come in source-rank order: all of rank 0's, then rank 1's, ..."
    else:
        hint = "; keep each sender's rows in the order it sent them"
    return f" ({_describe_row(values)}){hint}"


# ----------------------------------------------------------------------------
# 8.4 the expert-parallel forward (on N ranks)


def _tokens(rank: int) -> torch.Tensor:
    """Rank r's own tokens; T differs per rank, so capacity must come from this rank's T."""
    g = torch.Generator().manual_seed(50 + rank)
    return torch.randn(6 + 2 * rank, D_MODEL, generator=g)


def _layer_rank(payload, k, capacity_factor):
    learner = learner_in_rank(payload)
    rank, n = dist.get_rank(), dist.get_world_size()
    gate, experts = moe.make_moe(D_MODEL, NUM_EXPERTS, D_HIDDEN, SEED)
    per_rank = NUM_EXPERTS // n
    local = nn.ModuleList(experts[rank * per_rank : (rank + 1) * per_rank])
    # Forward only: send/recv carry no gradient (MoELayer wraps its all-to-all in autograd for that).
    with _library_switched_off("8.4", learner, ("dense_moe",)), torch.no_grad():
        return learner(_tokens(rank), gate, local, k, capacity_factor)


def _token_story(routing, t: int, n: int) -> str:
    """Where token t went: 'expert 2 (rank 1, slot 0, weight 0.613), expert 0 dropped'."""
    per_rank = NUM_EXPERTS // n
    parts = []
    for j in range(routing.expert_index.shape[1]):
        e, s = int(routing.expert_index[t, j]), int(routing.slot[t, j])
        parts.append(
            f"expert {e} dropped"
            if s < 0
            else f"expert {e} (rank {e // per_rank}, slot {s}, weight {float(routing.weight[t, j]):.3f})"
        )
    return ", ".join(parts)


def _layer_hint(x, gate, experts, routing, t: int, got_row) -> str:
    with torch.no_grad():
        outs = [experts[int(e)](x[t : t + 1])[0] for e in routing.expert_index[t]]
        kept = [o for o, s in zip(outs, routing.slot[t]) if s >= 0]
    if not kept and got_row.abs().max() > 1e-6:
        return " — all its choices were dropped, so its output must be zero"
    if kept and got_row.abs().max() < 1e-8:
        return " — nothing came back for it (check the return all-to-all and where you put the rows)"
    if kept and torch.allclose(got_row, sum(kept), atol=1e-5):
        return " — multiply each expert's output by its combine weight"
    if len(kept) < len(outs) and torch.allclose(
        got_row, moe.top_k_gate(gate(x), len(outs))[1][t] @ torch.stack(outs), atol=1e-5
    ):
        return (
            f" — your output includes its dropped choice: with this rank's T={x.shape[0]}, "
            f"C = ceil(k·cf·T/E) = {routing.capacity} and that expert was full, so it adds nothing"
        )
    return ""


@exercise(
    "8.4", "expert-parallel forward: dispatch, experts, return, combine", builds_on=("8.1", "8.2", "8.3")
)
@_one_thread
def moe_forward(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(x, gate, local_experts, k, capacity_factor) -> T×D`` on N = 1, 2, 4 ranks."""
    gate, experts = moe.make_moe(D_MODEL, NUM_EXPERTS, D_HIDDEN, SEED)
    for k, capacity_factor in LAYER_CASES:
        for n in LAYER_WORLD_SIZES:
            results = _launch(n, _layer_rank, learner_fn, k, capacity_factor)
            for rank, got in enumerate(results):
                case = f"N={n}, k={k}, cf={capacity_factor}: rank {rank}"
                x = _tokens(rank)
                with torch.no_grad():
                    want = moe.dense_moe(x, gate, experts, k, capacity_factor)
                    routing = moe.route(gate(x), k, capacity_factor)
                got = _tensor(got, want.shape, f"{case}: output", integer=False).detach().float()
                bad = ~torch.isclose(got, want, rtol=1e-5, atol=1e-5)
                for t, i in bad.nonzero()[:1].tolist():
                    raise Mismatch(
                        f"{case}: token {t} output[{t}, {i}] expected {float(want[t, i]):.4g}, "
                        f"got {float(got[t, i]):.4g}; token {t} → {_token_story(routing, t, n)}"
                        + _layer_hint(x, gate, experts, routing, t, got[t])
                    )
