"""Chapter 09b: the GPT, its data, and train_gpt's loss curves on several axes equal to one process."""

from __future__ import annotations

import math

import pytest
import reference_answers
import torch

from course_lib import gpt, launch, mesh, train
from course_lib.checks import train as check
from course_lib.checks.registry import FAILED, NOT_ATTEMPTED, PASSED

TINY = dict(n_layers=2, d_model=16, n_heads=2, seq_len=8, progress=False)
STEPS = 4


# ----------------------------------------------------------------------------
# data and model, no ranks


def test_tokenizer_round_trip_and_fixed_split():
    tok = gpt.CharTokenizer()
    ids = tok.encode(gpt.TEXT)
    assert tok.decode(ids) == gpt.TEXT and tok.vocab_size == len(set(gpt.TEXT))
    train_ids, val_ids = gpt.split(ids)
    assert len(train_ids) == int(0.9 * len(ids)) and torch.equal(torch.cat([train_ids, val_ids]), ids)
    with pytest.raises(ValueError, match="not in the tokenizer"):
        tok.encode("€")


def test_global_batch_is_deterministic_and_shards_cover_it():
    ids = gpt.CharTokenizer().encode(gpt.TEXT)
    x, y = gpt.global_batch(ids, 3, 8, 16, seed=0)
    x2, y2 = gpt.global_batch(ids, 3, 8, 16, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(x[:, 1:], y[:, :-1])
    assert not torch.equal(x, gpt.global_batch(ids, 4, 8, 16, seed=0)[0])
    shards = [gpt.data_shard(x, r, 4) for r in range(4)]
    assert torch.equal(torch.cat(shards), x) and all(s.shape == (2, 16) for s in shards)


def test_grid_with_an_expert_axis_keeps_every_older_grid():
    old = mesh.GridLayout(dp=2, tp=2, pp=2)
    assert old.coordinates(5) == mesh.Coord(dp=0, tp=1, pp=1) and old.groups("tp")[1] == [2, 3]
    layout = mesh.GridLayout(dp=2, tp=2, ep=2)
    assert layout.coordinates(6) == mesh.Coord(dp=1, tp=0, pp=0, cp=0, ep=1)
    assert layout.groups("ep") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.groups(("dp", "ep")) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert layout.rank_at(dp=1, ep=1, tp=1) == 7


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sharding="zero4"), "sharding must be one of"),
        (dict(ep=2, moe=True, sharding="fsdp"), "fsdp' with ep > 1 is not supported"),
        (dict(tp=2, moe=True), "moe with tp > 1 is not supported"),
        (dict(dp=3), "must split into dp·ep = 3"),
        (dict(cp=3, seq_len=8), "2·cp = 6 zig-zag chunks"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(precision="fp16"), "precision must be one of"),
        (dict(ep=2, precision="bf16"), "precision='bf16' with ep > 1 is not supported"),
    ],
)
def test_bad_configurations_are_refused_before_any_rank_talks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train.train_gpt(**{**TINY, **kwargs})


# ----------------------------------------------------------------------------
# loss curves


def _causal_tp_attention(seed):
    from course_lib.models import SelfAttention
    from course_lib.tensor_parallel import TensorParallelAttention

    torch.manual_seed(seed)
    attn = SelfAttention(8, 2, causal=True)
    x = torch.randn(2, 6, 8)
    return (TensorParallelAttention.from_dense(attn)(x) - attn(x)).abs().max().item()


def test_tensor_parallel_attention_keeps_the_causal_mask():
    assert max(launch.run(_causal_tp_attention, 2, 0, backend="gloo")) < 1e-6


CONFIGS = {
    "1": {},
    "dp2·tp2 zero3": dict(dp=2, tp=2, sharding="zero3"),
    "pp2·cp2": dict(pp=2, cp=2),
    "fsdp2·pp2": dict(dp=2, pp=2, sharding="fsdp"),
    "tp2·cp2 zero1": dict(tp=2, cp=2, sharding="zero1"),
}
MOE_CONFIGS = {"1 (moe)": dict(moe=True), "dp2·ep2 zero2": dict(dp=2, ep=2, sharding="zero2")}


def test_loss_curves_of_many_axes_equal_one_process():
    curves = {name: r["loss"] for name, r in train.run_configs(CONFIGS, steps=STEPS, **TINY).items()}
    worst = train.compare_curves(curves["1"], curves, CONFIGS, rtol=1e-5)
    assert worst < 1e-5 and curves["1"][-1] < curves["1"][0]  # it learns, and every axis agrees
    moe = {name: r for name, r in train.run_configs(MOE_CONFIGS, steps=STEPS, **TINY).items()}
    assert train.compare_curves(moe["1 (moe)"]["loss"], {n: r["loss"] for n, r in moe.items()}) < 1e-5
    assert moe["dp2·ep2 zero2"]["peak_bytes"] < moe["1 (moe)"]["peak_bytes"]


def test_bf16_follows_fp32_within_one_bf16_rounding():
    configs = {"fp32": {}, "bf16": dict(precision="bf16"), "tp2 bf16": dict(tp=2, precision="bf16")}
    curves = {name: r["loss"] for name, r in train.run_configs(configs, steps=STEPS, **TINY).items()}
    bf16_vs_fp32 = max(train.relative_deviation(curves["bf16"], curves["fp32"]))
    assert 0 < bf16_vs_fp32 <= 2**-8  # bf16 rounding shows, but stays within one rounding
    assert max(train.relative_deviation(curves["tp2 bf16"], curves["bf16"])) <= 2**-8


def _planted(bug, kwargs):
    """train_gpt with one gradient reduction taken out, inside the rank."""
    from course_lib import train as t

    if bug == "tp":  # SP's replicated LayerNorms, biases and head: no sum over the tp group
        summed = t.gradient_sums
        t.gradient_sums = lambda stage, grid: {
            n: [s for s in v if s[0] != "tp"] for n, v in summed(stage, grid).items()
        }
    else:  # the data-parallel average over a group of one rank: no dp all-reduce at all
        adam = t.ZeroAdam

        def alone(model, stage, lr, group):
            import torch.distributed as dist

            mine, _ = dist.new_subgroups_by_enumeration([[r] for r in range(dist.get_world_size())])
            return adam(model, stage, lr=lr, group=mine)

        t.ZeroAdam = alone
    return t._train_in_rank(kwargs)


@pytest.mark.parametrize("bug", ["dp", "tp"])
def test_a_missing_gradient_reduction_is_named_by_its_axis(bug):
    configs = {"dp2": dict(dp=2), "tp2": dict(tp=2)}
    reference = train.run_configs({"1": {}}, steps=STEPS, **TINY)["1"]["loss"]
    curves = {
        name: launch.run(_planted, 2, bug, {**TINY, **c, "steps": STEPS, "seed": 0}, backend="gloo")[0][
            "loss"
        ]
        for name, c in configs.items()
    }
    with pytest.raises(train.CurveMismatch, match=rf"'{bug}2' \(axes {bug}2\) diverged first"):
        train.compare_curves(reference, curves, configs)


# The same train_gpt as a script under torchrun (python -m course_lib.train) runs in lesson 09c:
# a run with a killed rank, restarted by torchrun, ends on the one-process curve (asserted there).


# ----------------------------------------------------------------------------
# the checks of exercises 9b.1–9b.3


@pytest.fixture(scope="module")
def solution():
    return reference_answers.load("09b_train")


def _not_attempted(*args):
    raise NotImplementedError


def test_checks_pass_the_solutions_and_read_stubs_as_not_attempted(solution):
    for name in ("group_of", "micro_batch_rows", "block_state_bytes"):
        assert getattr(check, name)(getattr(solution, name)).status == PASSED
        assert getattr(check, name)(_not_attempted).status == NOT_ATTEMPTED


def test_checks_refuse_the_course_s_own_answers():
    result = check.group_of(lambda r, axis, s: next(g for g in mesh.GridLayout(**s).groups(axis) if r in g))
    assert result.status == FAILED and "you called mesh.GridLayout.groups" in result.message
    assert "train.micro_batch_rows" in check.micro_batch_rows(train.micro_batch_rows).message
    assert "train.block_state_bytes" in check.block_state_bytes(train.block_state_bytes).message


def _order_group(order):
    def group_of(rank, axis, sizes):
        def coords(r):
            out = {}
            for a in order:
                r, out[a] = divmod(r, sizes[a])
            return out

        mine, world = coords(rank), math.prod(sizes.values())
        return [r for r in range(world) if all(c == mine[a] for a, c in coords(r).items() if a != axis)]

    return group_of


def _rows(data_rank_of, data_ranks_of, parts_of=lambda m: m):
    def rows(rank, sizes, batch, m):
        data_ranks, parts = data_ranks_of(sizes), parts_of(m)
        micro = batch // (data_ranks * parts)
        start = data_rank_of(rank, sizes) * micro * parts
        return [(start + i * micro, start + (i + 1) * micro) for i in range(parts)]

    return rows


def _coord(rank, sizes, axis):
    for a in ("tp", "cp", "ep", "dp", "pp"):
        rank, index = divmod(rank, sizes[a])
        if a == axis:
            return index


def _bytes(psi_of, shard_of=lambda dp, tp: dp, moment_bytes=8):
    def block_state_bytes(d, h, tp, dp, sharding):
        psi = psi_of(d, h, tp)
        stage = {"none": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3}[sharding]
        n = shard_of(dp, tp)
        return sum(b * psi / (n if stage >= s else 1) for b, s in ((4, 3), (4, 2), (moment_bytes, 1)))

    return block_state_bytes


RIGHT_PSI = lambda d, h, tp: (4 * d * d + 3 * d + 2 * h * d + h) / tp + 6 * d  # noqa: E731

WRONG_ANSWERS = [
    (check.group_of, _order_group(("tp", "cp", "dp", "ep", "pp")), "ep varies slower than dp"),
    (check.group_of, _order_group(("dp", "tp", "cp", "ep", "pp")), "dp varies fastest"),
    (check.group_of, lambda rank, axis, sizes: [rank], "only the rank itself"),
    (
        check.micro_batch_rows,
        _rows(lambda r, s: r, lambda s: math.prod(s.values())),
        "only the dp·ep data ranks split the batch",
    ),
    (
        check.micro_batch_rows,
        _rows(lambda r, s: _coord(r, s, "dp"), lambda s: s["dp"]),
        "the ep ranks are data ranks too",
    ),
    (
        check.micro_batch_rows,
        _rows(lambda r, s: _coord(r, s, "ep") * s["dp"] + _coord(r, s, "dp"), lambda s: s["dp"] * s["ep"]),
        "ep varies faster",
    ),
    (
        check.micro_batch_rows,
        _rows(
            lambda r, s: _coord(r, s, "dp") * s["ep"] + _coord(r, s, "ep"),
            lambda s: s["dp"] * s["ep"],
            lambda m: 1,
        ),
        "cut your share into m",
    ),
    (
        check.block_state_bytes,
        _bytes(lambda d, h, tp: (4 * d * d + 3 * d + 2 * h * d + h + 6 * d) / tp),
        "not split over tp",
    ),
    (check.block_state_bytes, _bytes(RIGHT_PSI, shard_of=lambda dp, tp: dp * tp), "dp ranks only"),
    (check.block_state_bytes, _bytes(RIGHT_PSI, moment_bytes=4), "two moments"),
]


@pytest.mark.mistake("9b.1", "9b.2", "9b.3")
@pytest.mark.parametrize("check_fn, answer, hint", WRONG_ANSWERS, ids=[w[2] for w in WRONG_ANSWERS])
def test_checks_name_typical_mistakes(check_fn, answer, hint):
    result = check_fn(answer)
    assert result.status == FAILED and hint in result.message, result.message
