"""Checks for chapter 05b: context parallelism (ring attention, zig-zag, Ulysses).

5b.1–5b.3 are plain functions, called here on small seeded tensors; 5b.4 and 5b.5 run on
N = 2 and 4 ranks. Results are compared with ``course_lib.context_parallel`` computed in
one process (rtol = atol = 1e-5); the course's own functions of each exercise are switched
off while the learner's code runs. Typical wrong answers are named in the message.
"""

from __future__ import annotations

import contextlib
import types
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from course_lib import context_parallel as cp
from course_lib.checks import Mismatch, builtins_switched_off, compare, exercise, learner_in_rank, run_learner

if TYPE_CHECKING:
    from collections.abc import Callable

WORLD_SIZES = (2, 4)
TIMEOUT = 20.0
_COURSE = ("merge_partials", "block_attention", "ring_attention", "shard_sequence", "positions", "chunks_of")


def _switched_off(learner, ex_id: str, names=_COURSE):
    own = isinstance(learner, (types.FunctionType, type)) and learner.__module__.startswith("course_lib.")
    if own:
        raise Mismatch(
            f"exercise {ex_id} asks you to build this yourself: you passed course_lib's own function"
        )
    return builtins_switched_off(
        learner,
        names,
        f"exercise {ex_id} asks you to build this yourself",
        namespaces=(cp,),
        shown_as="cp",
    )


def _data(shape, salt: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(salt)
    return torch.randn(shape, generator=g) * scale


def _same(got, expected) -> bool:
    return (
        isinstance(got, torch.Tensor)
        and got.shape == expected.shape
        and torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    )


def _pair(result, what: str):
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise Mismatch(f"{what} should return a pair (out, lse), got {type(result).__name__}")
    return result


# ----------------------------------------------------------------------------
# 5b.1 merge two partial softmax results


@exercise("5b.1", "merge two partial softmax results (online softmax)")
def merge_partials(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(out_a, lse_a, out_b, lse_b) -> (out, lse)`` against the whole softmax."""
    q = _data((2, 3, 5, 4), 1)
    k, v = _data((2, 3, 7, 4), 2), _data((2, 3, 7, 4), 3)
    for scale, label in ((1.0, "ordinary scores"), (300.0, "scores in the thousands")):
        a = cp.block_attention(q * scale, k[..., :3, :], v[..., :3, :])
        b = cp.block_attention(q * scale, k[..., 3:, :], v[..., 3:, :])
        expected = cp.block_attention(q * scale, k, v)
        with _switched_off(learner_fn, "5b.1"):
            out, lse = _pair(learner_fn(*a, *b), "merge")
        if isinstance(out, torch.Tensor) and not torch.isfinite(out).all() and scale > 1:
            raise Mismatch(
                f"{label}: your output has inf/nan — exp(lse) overflows float32 beyond about 88: "
                "subtract the running max m = max(lse_a, lse_b) before exponentiating"
            )
        hints = [
            (
                (a[0] + b[0]) / 2,
                "you averaged the two outputs: weight each by its share of the "
                "softmax mass, exp(lse_a − lse) and exp(lse_b − lse)",
            ),
            (
                a[0] + b[0],
                "you added the two outputs without rescaling: each is normalised over its "
                "own block, weight it by exp(lse_block − lse_total) (the running max keeps it finite)",
            ),
            (cp.merge_partials(b[0], a[1], a[0], b[1])[0], "the weights are swapped: out_a goes with lse_a"),
        ]
        _compare_with_hints(out, expected[0], f"{label}: out", hints)
        _compare_with_hints(
            lse,
            expected[1],
            f"{label}: lse",
            [
                (
                    torch.maximum(a[1], b[1]),
                    "lse is the running max alone: add log(exp(lse_a − m) + exp(lse_b − m))",
                ),
                (
                    a[1] + b[1],
                    "lse_a + lse_b multiplies the masses: the merged mass is their sum, "
                    "lse = m + log(exp(lse_a − m) + exp(lse_b − m))",
                ),
            ],
        )


def _compare_with_hints(got, expected, what: str, hints=()) -> None:
    try:
        compare(got, expected, what)
    except Mismatch as exc:
        hint = next((h for wrong, h in hints if _same(got, wrong)), "")
        raise Mismatch(f"{exc}" + (f" — {hint}" if hint else "")) from None


# ----------------------------------------------------------------------------
# 5b.2 one block under the causal mask


@exercise("5b.2", "one block of causal attention")
def causal_block(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(q, k, v, q_chunk, k_chunk)``: (out, lse) of this chunk pair, or None."""
    c = 4
    q, k, v = (_data((1, 2, c, 8), salt) for salt in (4, 5, 6))
    for q_chunk, k_chunk in ((2, 0), (1, 1), (0, 3), (3, 2)):
        with _switched_off(learner_fn, "5b.2"):
            got = learner_fn(q, k, v, q_chunk, k_chunk)
        where = f"q chunk {q_chunk}, k chunk {k_chunk}"
        if k_chunk > q_chunk:
            if got is not None:
                raise Mismatch(
                    f"{where}: every key comes after every query, so every score is masked — "
                    "return None (skip the block) instead of computing it"
                )
            continue
        if got is None:
            raise Mismatch(f"{where}: you skipped a block that has unmasked scores (k chunk ≤ q chunk)")
        out, lse = _pair(got, "causal_block")
        diagonal = q_chunk == k_chunk
        expected = cp.block_attention(q, k, v, diagonal)
        if isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
            raise Mismatch(
                f"{where}: your output has nan — a row with every score masked: on the diagonal block "
                "a position still sees itself (mask j > i, triu(1), not j ≥ i)"
            )
        scores = q @ k.transpose(-2, -1) / 8**0.5
        below = torch.ones(c, c, dtype=torch.bool).tril(-1)
        wrong_triangle = torch.softmax(scores.masked_fill(below, float("-inf")), -1) @ v
        hints = [
            (
                cp.block_attention(q, k, v, not diagonal)[0],
                "the diagonal block (q chunk == k chunk) needs the causal mask inside"
                if diagonal
                else "a block below the diagonal (k chunk < q chunk) is entirely visible: mask only the diagonal block",
            ),
            (
                wrong_triangle,
                "you masked the wrong triangle: position i sees j ≤ i, mask the scores above the diagonal",
            ),
        ]
        _compare_with_hints(out, expected[0], f"{where}: out", hints)
        _compare_with_hints(lse, expected[1], f"{where}: lse (log-sum-exp of the unmasked scores)")


# ----------------------------------------------------------------------------
# 5b.3 zig-zag positions


@exercise("5b.3", "zig-zag shard positions")
def zigzag_positions(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(rank, world_size, seq_len)`` -> the positions rank holds, in shard order."""
    for n, s in ((1, 4), (2, 8), (4, 16), (3, 12)):
        chunk = s // (2 * n)
        for r in range(n):
            with _switched_off(learner_fn, "5b.3"):
                got = learner_fn(r, n, s)
            got = [int(p) for p in (got.tolist() if isinstance(got, torch.Tensor) else list(got))]
            expected = cp.positions(r, n, s).tolist()
            if got == expected:
                continue

            def span(*chunks):
                return [p for c_ in chunks for p in range(c_ * chunk, (c_ + 1) * chunk)]

            hint = {
                tuple(range(r * s // n, (r + 1) * s // n)): "that is the contiguous layout: zig-zag cuts "
                "2N chunks and rank r takes chunks r and 2N−1−r",
                tuple(span(2 * n - 1 - r, r)): "the pair is swapped: chunk r first, then chunk 2N−1−r",
                tuple(span(r, n + r)): "chunks r and N+r: the second chunk mirrors the first, 2N−1−r",
                tuple(span(n - 1 - r, n + r)): "the chunk pair belongs to rank N−1−r: rank r holds "
                "chunks r and 2N−1−r",
            }.get(tuple(got), "")
            raise Mismatch(
                f"N={n}, s={s}, rank {r}: expected positions {expected}, got {got}"
                + (f" — {hint}" if hint else "")
            )


# ----------------------------------------------------------------------------
# 5b.4 one ring step, posted before computing


class _Events(TorchFunctionMode):
    """Records, in order, when a matmul runs (the block computation)."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("matmul", "__matmul__", "bmm", "einsum", "baddbmm", "softmax", "exp"):
            self.log.append("compute")
        return func(*args, **(kwargs or {}))


class _Work:
    def __init__(self, work, log):
        self.work, self.log = work, log

    def wait(self, *args, **kwargs):
        self.log.append("wait")
        return self.work.wait(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.work, name)


@contextlib.contextmanager
def _recording(log):
    saved = {name: getattr(dist, name) for name in ("isend", "irecv", "send", "recv", "batch_isend_irecv")}

    def posting(name):
        def post(*args, **kwargs):
            log.append(name)
            result = saved[name](*args, **kwargs)
            if isinstance(result, list):
                return [_Work(w, log) for w in result]
            return _Work(result, log) if result is not None and name != "recv" else result

        return post

    try:
        for name in saved:
            setattr(dist, name, posting(name))
        with _Events(log):
            yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def _ring_rank(payload, q, k, v):
    learner = learner_in_rank(payload)
    rank, n = dist.get_rank(), dist.get_world_size()
    mine = [t.chunk(n, dim=2)[rank].clone() for t in (q, k, v)]
    partial, kv, first_step, received = None, (mine[1], mine[2]), [], None
    with _switched_off(learner, "5b.4", ("ring_attention",)):
        for step in range(n):
            log = []
            with _recording(log):
                partial, k_next, v_next = learner(mine[0], *kv, partial)
            if step == 0:
                first_step, received = log, k_next.clone()
            kv = (k_next, v_next)
    out = partial[0] if isinstance(partial, (tuple, list)) else partial
    return {"out": out, "log": first_step, "received": received}


@exercise("5b.4", "one ring step, transfer posted before computing")
def ring_step(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(q, k, v, partial) -> (partial, k_next, v_next)`` run N times on N ranks."""
    q, k, v = (_data((1, 2, 8, 4), salt) for salt in (7, 8, 9))
    expected = cp.block_attention(q, k, v)[0]
    for n in WORLD_SIZES:
        got = run_learner(
            n,
            _ring_rank,
            learner_fn,
            q,
            k,
            v,
            timeout=TIMEOUT,
            backend="gloo",
            deadlock_hint=" — post isend to the right and irecv from the left before waiting",
        )
        for r, res in enumerate(got):
            log = res["log"]
            if "send" in log or "recv" in log:
                raise Mismatch(
                    f"N={n}: rank {r}: blocking send/recv — post dist.isend/dist.irecv (or batch_isend_irecv) "
                    "so the transfer travels while the block is computed"
                )
            posts = [i for i, e in enumerate(log) if e in ("isend", "irecv", "batch_isend_irecv")]
            computes = [i for i, e in enumerate(log) if e == "compute"]
            waits = [i for i, e in enumerate(log) if e == "wait"]
            if not posts:
                raise Mismatch(f"N={n}: rank {r}: no transfer posted in a ring step")
            if computes and computes[0] < posts[0]:
                raise Mismatch(
                    f"N={n}: rank {r}: the transfer was posted after the block was computed — post "
                    "isend/irecv first, then compute, then wait, so communication overlaps computation"
                )
            if computes and waits and waits[0] < computes[0]:
                raise Mismatch(
                    f"N={n}: rank {r}: you waited for the transfer before computing the block — compute "
                    "first, wait after, or nothing overlaps"
                )
            left = k.chunk(n, dim=2)[(r - 1) % n]
            right = k.chunk(n, dim=2)[(r + 1) % n]
            if n > 2 and _same(res["received"], right):
                raise Mismatch(
                    f"N={n}: rank {r}: after one step you hold rank {(r + 1) % n}'s k — blocks travel to "
                    f"the right: send to rank r+1, receive from rank r−1"
                )
            compare(res["received"], left, f"N={n}: rank {r}: k after one step (rank r−1's)")
            compare(res["out"], expected.chunk(n, dim=2)[r], f"N={n}: rank {r}: output after N steps")


# ----------------------------------------------------------------------------
# 5b.5 Ulysses: sequence -> heads


def _ulysses_rank(payload, x):
    learner = learner_in_rank(payload)
    rank, n = dist.get_rank(), dist.get_world_size()
    mine = x.chunk(n, dim=2)[rank].contiguous()
    with _switched_off(learner, "5b.5", ("seq_to_heads", "heads_to_seq", "ulysses_attention")):
        return {"out": learner(mine)}


@exercise("5b.5", "Ulysses: sequence shard to head shard (all-to-all)")
def seq_to_heads(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(x_shard) -> (b, a/N, s, d)``: every position of this rank's a/N heads."""
    b, a, s, d = 2, 4, 8, 3
    x = _data((b, a, s, d), 10)
    for n in WORLD_SIZES:
        got = run_learner(n, _ulysses_rank, learner_fn, x, timeout=TIMEOUT, backend="gloo")
        for r, res in enumerate(got):
            expected = x[:, r * a // n : (r + 1) * a // n]
            out = res["out"]
            if isinstance(out, torch.Tensor) and out.shape == expected.shape and not _same(out, expected):
                for j in range(n):
                    if j != r and _same(out, x[:, j * a // n : (j + 1) * a // n]):
                        raise Mismatch(
                            f"N={n}: rank {r}: you hold head group {j} — rank r keeps head group r "
                            "(send head group j to rank j)"
                        )
                pieces = [
                    x[:, r * a // n : (r + 1) * a // n, j * s // n : (j + 1) * s // n] for j in range(n)
                ]
                if n > 1 and _same(out, torch.cat(pieces[::-1], dim=2)):
                    raise Mismatch(
                        f"N={n}: rank {r}: positions out of order — the piece from rank j is block j of "
                        "the sequence: concatenate in rank order"
                    )
            compare(out, expected, f"N={n}: rank {r}: the head shard")
