"""Chapter 05b: ring attention and Ulysses equal one process (forward and every gradient,
causal and not, zig-zag and contiguous, N = 1…4), their traffic and work, the CP axis of
the rank grid, dp × cp and tp × cp training, and the checks."""

import pytest
import torch
import torch.distributed as dist

from course_lib import cp, launch, mesh
from course_lib.models import attention
from course_lib.traffic import count_traffic

B, HEADS, D_HEAD = 2, 4, 8


def test_shard_and_unshard_are_exact_inverses():
    x = torch.arange(2 * 24 * 3).view(2, 24, 3)
    for n in (1, 2, 3, 4):
        for layout in cp.LAYOUTS:
            shards = [cp.shard_sequence(x, r, n, 1, layout) for r in range(n)]
            assert torch.equal(cp.unshard_sequence(shards, 1, layout), x)
            for r, s in enumerate(shards):
                assert torch.equal(s[0, :, 0] // 3, cp.positions(r, n, 24, layout))
    # zig-zag on 4 ranks: 8 chunks of 3, rank r holds chunks r and 7 − r
    assert cp.positions(0, 4, 24).tolist() == [0, 1, 2, 21, 22, 23]
    assert cp.positions(3, 4, 24).tolist() == [9, 10, 11, 12, 13, 14]
    assert cp.chunks_of(1, 4) == (1, 6) and cp.chunks_of(1, 4, "contiguous") == (1,)


def test_bad_inputs_say_what_is_wrong():
    x = torch.zeros(1, 12, 2)
    with pytest.raises(ValueError, match="2N = 8 chunks"):
        cp.shard_sequence(x, 0, 4, 1)
    with pytest.raises(ValueError, match="layout must be"):
        cp.shard_sequence(x, 0, 2, 1, layout="striped")
    with pytest.raises(ValueError, match="rank must be in"):
        cp.shard_sequence(x, 4, 4, 1, "contiguous")
    with pytest.raises(ValueError, match="same shape"):
        cp.unshard_sequence([torch.zeros(1, 2), torch.zeros(1, 4)], 1)
    with pytest.raises(ValueError, match="empty"):
        cp.unshard_sequence([], 1)


def _attention_in_rank():
    rank, n = dist.get_rank(), dist.get_world_size()
    s, results = 4 * n, {}
    for dtype in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(7)
        q, k, v, up = (torch.randn(B, HEADS, s, D_HEAD, generator=g, dtype=dtype) for _ in range(4))
        for causal in (True, False):
            qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
            dense = attention(qd, kd, vd, causal)
            (dense * up).sum().backward()
            methods = [("ring", "zigzag"), ("ring", "contiguous")]
            methods += [("ulysses", "contiguous")] if dtype == torch.float32 and HEADS % n == 0 else []
            for method, layout in methods:

                def mine(t, layout=layout):
                    return cp.shard_sequence(t, rank, n, 2, layout)

                ql, kl, vl = (mine(t).clone().requires_grad_() for t in (q, k, v))
                with count_traffic() as forward, cp.count_work() as work:
                    if method == "ring":
                        out = cp.ring_attention(ql, kl, vl, None, causal, layout)
                    else:
                        out = cp.ulysses_attention(ql, kl, vl, None, causal)
                with count_traffic() as backward:
                    (out * mine(up)).sum().backward()
                results[method, layout, causal, str(dtype)] = {
                    "got": [out.detach(), ql.grad, kl.grad, vl.grad],
                    "expected": [mine(t) for t in (dense.detach(), qd.grad, kd.grad, vd.grad)],
                    "sent": (forward.payload_sent, backward.payload_sent),
                    "calls": (forward.count("all_to_all_single"), backward.count("all_to_all_single")),
                    "blocks": work.blocks,
                    "unmasked": work.unmasked,
                }
    return results


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ring_and_ulysses_equal_one_process(n):
    results = launch.run(_attention_in_rank, n, backend="gloo")
    block_bytes = B * HEADS * 4 * D_HEAD * 4  # one rank's k (or v) in fp32
    for rank, per_case in enumerate(results):
        for (method, layout, causal, dtype), r in per_case.items():
            tolerance = (
                dict(rtol=1e-5, atol=1e-5) if dtype == "torch.float32" else dict(rtol=1e-12, atol=1e-12)
            )
            for name, got, expected in zip(("out", "q.grad", "k.grad", "v.grad"), r["got"], r["expected"]):
                if method == "ulysses":  # the same arithmetic as one process, head by head
                    assert torch.equal(got, expected), (n, rank, name, causal)
                else:
                    torch.testing.assert_close(got, expected, **tolerance, msg=f"{n} {rank} {name} {layout}")
            if method == "ring" and dtype == "torch.float32":
                # forward: N−1 hops of k and v; backward: k/v again, and dk/dv N hops
                assert r["sent"] == (
                    (n - 1) * 2 * block_bytes,
                    (2 * (n - 1) + 2 * n if n > 1 else 0) * block_bytes,
                )
                s, chunk = 4 * n, 4 * n // cp.num_chunks(n, layout)
                if not causal:
                    assert r["blocks"] == n and r["unmasked"] == s * 4
                elif layout == "zigzag":  # every rank the same: 2N + 1 half-chunk blocks, s(s+1)/2N entries
                    assert r["blocks"] == 2 * n + 1 and r["unmasked"] == s * (s + 1) // (2 * n)
                else:  # rank r: r full blocks and one diagonal
                    assert (
                        r["blocks"] == rank + 1
                        and r["unmasked"] == rank * chunk**2 + chunk * (chunk + 1) // 2
                    )
            if method == "ulysses":
                assert r["calls"] == (4, 4)  # q, k, v and the output; their gradients back
                assert r["sent"] == (0, 0)  # no point-to-point: four all-to-alls each way


def _ulysses_with_heads(heads):
    q = torch.zeros(1, heads, 2, 4)
    cp.ulysses_attention(q, q, q)


def test_ulysses_refuses_heads_that_do_not_split():
    with pytest.raises(launch.RankError, match=r"splits the 6 heads over N=4 ranks, but heads % N = 2"):
        launch.run(_ulysses_with_heads, 4, 6, backend="gloo")


def test_grid_with_a_cp_axis():
    layout = mesh.GridLayout(dp=2, cp=2)
    assert layout.groups("cp") == [[0, 1], [2, 3]] and layout.groups("dp") == [[0, 2], [1, 3]]
    layout = mesh.GridLayout(dp=2, tp=2, pp=2, cp=2)  # tp fastest, then cp, dp, pp
    assert layout.coordinates(6) == mesh.Coord(dp=1, tp=0, pp=0, cp=1)
    assert all(layout.rank_at(**vars(layout.coordinates(r))) == r for r in range(16))
    assert layout.groups("tp")[0] == [0, 1] and layout.groups("cp")[0] == [0, 2]
    assert layout.groups("dp")[0] == [0, 4] and layout.groups("pp")[0] == [0, 8]
    for shape in ((2, 2, 2), (3, 1, 2)):  # cp = 1 keeps every rank and group of the 3D grid
        old, new = mesh.GridLayout(*shape), mesh.GridLayout(*shape, cp=1)
        assert [old.coordinates(r) for r in range(old.world_size)] == [
            new.coordinates(r) for r in range(new.world_size)
        ]
    assert repr(mesh.GridLayout(2, 2, 1)) == "GridLayout(dp=2, tp=2, pp=1)"
    with pytest.raises(ValueError, match="cp must be a positive integer"):
        mesh.GridLayout(cp=0)


@pytest.mark.parametrize(
    "grid",
    [(2, 1, 2, "zigzag", "ring"), (1, 2, 2, "zigzag", "ring"), (2, 1, 2, "contiguous", "ulysses")],
    ids=["dp2xcp2-ring", "tp2xcp2-ring", "dp2xcp2-ulysses"],
)
def test_cp_block_trains_equal_to_one_process(grid):
    dp, tp, cp_size, layout, method = grid
    results = launch.run(
        cp.train_context_parallel, dp * tp * cp_size, dp, tp, cp_size, 2, layout, method, backend="gloo"
    )
    for r in results:
        torch.testing.assert_close(
            torch.tensor(r["losses"]), torch.tensor(r["dense_losses"]), rtol=1e-5, atol=1e-6
        )
        assert r["max_param_diff"] < 1e-5


# ----------------------------------------------------------------------------
# the checks: right answers pass, untouched stubs read "not attempted", typical mistakes are named

import math  # noqa: E402

from course_lib.checks import FAILED, NOT_ATTEMPTED, PASSED  # noqa: E402
from course_lib.checks import context_parallel as check  # noqa: E402


def _stub(*args):
    raise NotImplementedError


def _merge_averaged(out_a, lse_a, out_b, lse_b):
    return (out_a + out_b) / 2, torch.logaddexp(lse_a, lse_b)


def _merge_naive(out_a, lse_a, out_b, lse_b):
    w_a, w_b = torch.exp(lse_a), torch.exp(lse_b)  # no running max: overflows
    total = w_a + w_b
    return (w_a / total).unsqueeze(-1) * out_a + (w_b / total).unsqueeze(-1) * out_b, torch.log(total)


def _merge_max_lse(out_a, lse_a, out_b, lse_b):
    return _merge_reference(out_a, lse_a, out_b, lse_b)[0], torch.maximum(lse_a, lse_b)


def _block(q, k, v, q_chunk, k_chunk, mask_when):
    if k_chunk > q_chunk:
        return None
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask_when(q_chunk, k_chunk):
        scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    lse = scores.logsumexp(-1)
    return torch.exp(scores - lse.unsqueeze(-1)) @ v, lse


def _zigzag_swapped(rank, n, s):
    size = s // (2 * n)
    return [p for c in (2 * n - 1 - rank, rank) for p in range(c * size, (c + 1) * size)]


def _ring_step_late(q, k, v, partial):  # computes first, posts after: nothing overlaps
    rank, n = dist.get_rank(), dist.get_world_size()
    block = cp.block_attention(q, k, v)
    partial = block if partial is None else cp.merge_partials(*partial, *block)
    k_next, v_next = torch.empty_like(k), torch.empty_like(v)
    reqs = [dist.isend(k.contiguous(), (rank + 1) % n), dist.isend(v.contiguous(), (rank + 1) % n)]
    reqs += [dist.irecv(k_next, (rank - 1) % n), dist.irecv(v_next, (rank - 1) % n)]
    for r in reqs:
        r.wait()
    return partial, k_next, v_next


def _ring_step_library(q, k, v, partial):
    return cp.ring_attention(q, k, v, causal=False), k, v


def _seq_to_heads_wrong_group(x):
    n = dist.get_world_size()
    b, a, length, d = x.shape
    send = x.reshape(b, n, a // n, length, d).transpose(0, 1).flip(0).contiguous()  # group n−1−j to rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, a // n, n * length, d)


def _merge_reference(out_a, lse_a, out_b, lse_b):
    m = torch.maximum(lse_a, lse_b)
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    out = (w_a.unsqueeze(-1) * out_a + w_b.unsqueeze(-1) * out_b) / (w_a + w_b).unsqueeze(-1)
    return out, m + torch.log(w_a + w_b)


def _positions(r, n, s):
    size = s // (2 * n)
    return [p for c in (r, 2 * n - 1 - r) for p in range(c * size, (c + 1) * size)]


def test_checks_pass_right_answers_and_read_stubs_as_not_attempted():
    assert check.merge_partials(_merge_reference).status == PASSED
    assert (
        check.causal_block(lambda q, k, v, i, j: _block(q, k, v, i, j, lambda a, b: a == b)).status == PASSED
    )
    assert check.zigzag_positions(_positions).status == PASSED
    for name in ("merge_partials", "causal_block", "zigzag_positions", "ring_step", "seq_to_heads"):
        assert getattr(check, name)(_stub).status == NOT_ATTEMPTED


@pytest.mark.parametrize(
    "name, answer, words",
    [
        pytest.param(
            "merge_partials", _merge_averaged, "averaged the two outputs", marks=pytest.mark.mistake("5b.1")
        ),
        pytest.param(
            "merge_partials", _merge_naive, "subtract the running max", marks=pytest.mark.mistake("5b.1")
        ),
        pytest.param(
            "merge_partials", _merge_max_lse, "running max alone", marks=pytest.mark.mistake("5b.1")
        ),
        ("merge_partials", cp.merge_partials, "build this yourself"),
        pytest.param(
            "causal_block",
            lambda q, k, v, i, j: _block(q, k, v, i, j, lambda a, b: False),
            "needs the causal mask",
            marks=pytest.mark.mistake("5b.2"),
        ),
        pytest.param(
            "causal_block",
            lambda q, k, v, i, j: _block(q, k, v, i, j, lambda a, b: True),
            "entirely visible",
            marks=pytest.mark.mistake("5b.2"),
        ),
        pytest.param(
            "causal_block",
            lambda q, k, v, i, j: (
                _block(q, k, v, min(i, j), min(i, j), lambda a, b: a == b)
                if j > i
                else _block(q, k, v, i, j, lambda a, b: a == b)
            ),
            "return None",
            marks=pytest.mark.mistake("5b.2"),
        ),
        pytest.param(
            "zigzag_positions", _zigzag_swapped, "the pair is swapped", marks=pytest.mark.mistake("5b.3")
        ),
        pytest.param(
            "zigzag_positions",
            lambda r, n, s: list(range(r * s // n, (r + 1) * s // n)),
            "contiguous layout",
            marks=pytest.mark.mistake("5b.3"),
        ),
        pytest.param(
            "ring_step",
            _ring_step_late,
            "posted after the block was computed",
            marks=pytest.mark.mistake("5b.4"),
        ),
        ("ring_step", _ring_step_library, "build this yourself"),
        pytest.param(
            "seq_to_heads",
            _seq_to_heads_wrong_group,
            "you hold head group",
            marks=pytest.mark.mistake("5b.5"),
        ),
    ],
    ids=lambda x: x if isinstance(x, str) and " " not in x else "",
)
def test_checks_name_the_typical_mistakes(name, answer, words):
    result = getattr(check, name)(answer)
    assert result.status == FAILED and words in result.message, result.message
