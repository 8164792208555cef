"""Checks for chapter 09d: the two formulas the time model adds up.

9d.1 is the FLOPs of one training step of the capstone's GPT (6·Ψ·T plus attention), compared
with :func:`course_lib.step_time.model_flops` on many shapes and with torch's own FLOP counter
on a real model; 9d.2 prices one collective or message with the α–β model, compared with
:func:`course_lib.step_time.call_seconds`. Both are arithmetic: no processes are launched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from course_lib import gpt, step_time
from course_lib.alpha_beta import AlphaBeta
from course_lib.checks import Mismatch, exercise

if TYPE_CHECKING:
    from collections.abc import Callable

#: (vocab_size, seq_len, d_model, n_layers, batch_size)
SHAPES = [(60, 16, 32, 2, 8), (60, 64, 128, 2, 8), (100, 32, 64, 4, 4), (50000, 2048, 4096, 32, 1)]


def _flops_mistakes(v, s, d, L, b) -> dict:
    """Wrong FLOP counts learners often write, with what each got wrong."""
    f = step_time.model_flops(v, s, d, L, b)
    psi, tokens = f["psi"], f["tokens"]
    return {
        f["matmul"]: "attention's two products are missing: add 12·L·s·d per token (q·kᵀ and scores·v, "
        "forward and backward)",
        (2 * psi * tokens + 4 * L * s * d * tokens): "that counts the forward only: the backward does "
        "twice the forward's FLOPs (the input's gradient and the weight's), ×3 in all",
        f["total"]
        - 6 * d * v * tokens: "the head (d × vocabulary) is missing from Ψ: it is a matrix product too",
        f["total"] + 6 * d * (v + s) * tokens: "the embedding tables are in Ψ: a look-up multiplies nothing",
        6 * psi * tokens
        + 6 * L * s * d * tokens: "attention counted as 6·L·s·d per token: q·kᵀ and scores·v "
        "are two products of 2·s·d FLOPs each per token forward, 12·L·s·d with the backward",
        6 * (psi - L * 4 * d * d) * tokens + 12 * L * s * d * tokens: "the attention projections (qkv 3d², "
        "proj d²) are missing from Ψ",
    }


def _hint(got, mistakes: dict, expected) -> str:
    for value, why in mistakes.items():
        if value != expected and got is not None and abs(got - value) <= 1e-9 * abs(value):
            return f" — {why}"
    return ""


@exercise("9d.1", "FLOPs of one training step", refuses=("course_lib.step_time:model_flops",))
def step_flops(learner_fn: Callable[..., Any]) -> None:
    for v, s, d, L, b in SHAPES:
        expected = step_time.model_flops(v, s, d, L, b)["total"]
        got = learner_fn(v, s, d, L, b)
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            raise Mismatch(f"return a number of FLOPs, got {got!r}")
        if abs(got - expected) > 1e-9 * expected:
            raise Mismatch(
                f"vocab {v}, seq {s}, d_model {d}, {L} layers, batch {b}: expected {expected:,.0f} FLOPs, "
                f"got {got:,.0f}{_hint(got, _flops_mistakes(v, s, d, L, b), expected)}"
            )
    v, s, d, L, b = SHAPES[1]
    model = gpt.make_gpt(v, seq_len=s, d_model=d, n_heads=4, n_layers=L)
    x = torch.randint(0, v, (b, s))
    with FlopCounterMode(display=False) as counter:
        gpt.token_loss_sum(model(x), x).backward()
    counted = counter.get_total_flops()
    if abs(learner_fn(v, s, d, L, b) - counted) > 1e-9 * counted:
        raise Mismatch(
            f"torch's FlopCounterMode counted {counted:,} FLOPs for this model; your formula differs"
        )


#: (op, group size, bytes)
CALLS = [
    ("send", 2, 4096),
    ("send", 2, 1 << 20),
    ("all_reduce", 2, 1 << 20),
    ("all_reduce", 4, 1 << 20),
    ("all_reduce", 8, 64),
    ("all_gather", 4, 1 << 20),
    ("reduce_scatter", 8, 1 << 22),
    ("all_to_all", 4, 1 << 20),
    ("all_reduce", 1, 1 << 20),
]
ALPHA, BETA = 50e-6, 2e9


def _call_mistakes(op, n, s) -> dict:
    link = AlphaBeta(ALPHA, BETA)
    ring = link.ring_all_reduce(n, s)
    # on equal values the later entry wins: the ring's rounds come after the 2S/β hint
    return {
        2 * (n - 1) * link.alpha + 2 * s / BETA: "the bandwidth term of a ring all-reduce is 2(n−1)/n·S/β, "
        "not 2S/β",
        link.message(s): "that is one message of S bytes: a collective over n ranks takes rounds",
        2 * (n - 1) * link.message(s): "each round of a ring moves S/n, not the whole array",
        (n - 1) * link.message(s / n) if op == "all_reduce" else ring: (
            "an all-reduce is two passes round the ring (reduce-scatter, then all-gather): 2(n−1) rounds"
            if op == "all_reduce"
            else "that is an all-reduce's price: an all-gather, reduce-scatter or all-to-all takes (n−1) rounds"
        ),
    }


@exercise(
    "9d.2",
    "α–β time of one collective",
    refuses=(
        "course_lib.step_time:call_seconds",
        "course_lib.alpha_beta:AlphaBeta.ring_all_reduce",
        "course_lib.alpha_beta:AlphaBeta.ring_all_gather",
    ),
)
def collective_seconds(learner_fn: Callable[..., Any]) -> None:
    link = AlphaBeta(ALPHA, BETA)
    for op, n, s in CALLS:
        expected = step_time.call_seconds(step_time.Call(op, n, s), link)
        got = learner_fn(op, n, s, ALPHA, BETA)
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            raise Mismatch(f"{op} over {n} ranks: return a number of seconds, got {got!r}")
        if abs(got - expected) > 1e-9 + 1e-9 * expected:
            raise Mismatch(
                f"{op} of {s:,} bytes over {n} ranks (α = {ALPHA * 1e6:.0f} µs, β = {BETA / 1e9:.0f} GB/s): "
                f"expected {expected * 1e6:.2f} µs, got {got * 1e6:.2f} µs"
                f"{_hint(got, _call_mistakes(op, n, s), expected)}"
            )
