"""Chapter 09d: the step-time model — FLOPs, α–β prices, the two bounds, tracing real ranks,
GPU plans — and the checks of 9d.1–9d.2 with a catalogue of wrong answers."""

from __future__ import annotations

import math

import pytest
import reference_answers
import torch
from torch.utils.flop_counter import FlopCounterMode

from course_lib import cost, gpt, step_time
from course_lib import pipeline_schedules as schedules
from course_lib.alpha_beta import AlphaBeta
from course_lib.checks import step_time as check
from course_lib.checks.registry import FAILED, NOT_ATTEMPTED, PASSED
from course_lib.step_time import Call, ConfigRun, Machine, StepTrace

TINY = dict(n_layers=2, d_model=16, n_heads=2, seq_len=8)
LINK = AlphaBeta(50e-6, 2e9)


# ----------------------------------------------------------------------------
# FLOPs


@pytest.mark.parametrize("moe", [False, True])
def test_model_flops_equal_torchs_counter(moe):
    vocab = gpt.CharTokenizer().vocab_size
    shape = dict(seq_len=16, d_model=32, n_layers=2)
    model = gpt.make_gpt(vocab, n_heads=4, moe=moe, **shape)
    x = torch.randint(0, vocab, (4, 16))
    if moe:  # the training code routes each token to its k experts only (chapter 08's MoELayer)
        from course_lib.train import ExpertParallelFFN

        for block in model[1:-1]:
            block.mlp = ExpertParallelFFN(block.mlp, None)
    with FlopCounterMode(display=False) as counter:
        gpt.token_loss_sum(model(x), x).backward()
    assert counter.get_total_flops() == step_time.model_flops(vocab, batch_size=4, moe=moe, **shape)["total"]


def test_model_flops_parts_and_bad_input():
    f = step_time.model_flops(100, 32, 64, 4, batch_size=2)
    psi = 4 * (4 * 64 * 64 + 2 * 64 * 256) + 64 * 100
    assert f["psi"] == psi and f["tokens"] == 64
    assert f["total"] == 6 * psi * 64 + 12 * 4 * 32 * 64 * 64
    assert step_time.model_flops(100, 32, 64, 4, 2, recompute=True)["total"] == pytest.approx(
        f["total"] * 4 / 3
    )
    for bad in (dict(seq_len=0), dict(d_model=2.5), dict(n_layers=True)):
        kw = dict(vocab_size=10, seq_len=8, d_model=8, n_layers=1, **{}) | bad
        with pytest.raises(ValueError, match="must be a positive integer"):
            step_time.model_flops(**kw)


def test_op_counter_counts_every_op_and_the_bytes_of_all_but_matmuls_and_views():
    x, w = torch.ones(64, 32), torch.ones(32, 16)
    with step_time.OpCounter() as counter:
        x.view(32, 64)  # a view: no bytes
        x @ w  # a matrix product: its FLOPs, not bytes
        x * 2.0  # reads 8 KiB, writes 8 KiB
    assert counter.ops == 3 and counter.bytes == 2 * 64 * 32 * 4
    assert counter.matmuls == {(1, 64, 32, 16): 1}  # (batch, m, k, n)
    one = step_time.matmul_seconds({(1, 64, 32, 16): 1})
    assert 0 < one and step_time.matmul_seconds({(1, 64, 32, 16): 3}) == pytest.approx(3 * one)


# ----------------------------------------------------------------------------
# α–β prices


def test_call_seconds_per_collective():
    s = 1 << 20
    assert step_time.call_seconds(Call("send", 2, s), LINK) == pytest.approx(50e-6 + s / 2e9)
    assert step_time.call_seconds(Call("irecv", 2, s), LINK) == pytest.approx(50e-6 + s / 2e9)
    assert step_time.call_seconds(Call("all_reduce", 4, s), LINK) == pytest.approx(6 * (50e-6 + s / 4 / 2e9))
    for op in ("all_gather_single", "all_to_all_single", "reduce_scatter_single"):
        assert step_time.call_seconds(Call(op, 4, s), LINK) == pytest.approx(3 * (50e-6 + s / 4 / 2e9))
    assert step_time.call_seconds(Call("broadcast", 8, s), LINK) == pytest.approx(3 * (50e-6 + s / 2e9))
    assert step_time.call_seconds(Call("all_reduce", 1, s), LINK) == 0.0


def _machine(cores=2, links=None):
    return Machine(cores, 1e9, 2e9, 1e-6, 1e9, links or {2: LINK, 8: AlphaBeta(1e-3, 1e9)})


def test_machine_picks_the_fit_for_its_rank_count():
    m = _machine()
    assert m.link(2) is LINK and m.link(4) is LINK and m.link(8).alpha == 1e-3 and m.link(1) is LINK
    assert "8 ranks exchanging at once" in m.describe()


# ----------------------------------------------------------------------------
# the two bounds, on made-up traces


def _run(config, flops, ops=0, calls=(), nbytes=0):
    world = math.prod(config.get(a, 1) for a in ("dp", "tp", "pp", "cp", "ep"))
    traces = [StepTrace(flops=flops, ops=ops, bytes=nbytes, calls=list(calls)) for _ in range(world)]
    return ConfigRun(config, world, traces, [[1.0, 0.5, 0.6]] * world, {})


def test_one_rank_is_its_own_work():
    p = step_time.predict(_run({}, 3e9, ops=1000, nbytes=5e8), _machine())
    assert p.compute == pytest.approx(3.0) and p.overhead == pytest.approx(1e-3) and p.comm == 0
    assert p.memory == pytest.approx(0.5) and p.total == pytest.approx(3.501)
    assert p.bubble == 0 and p.bound == "path"


def test_ranks_beyond_the_cores_share_them_but_messages_are_priced_at_their_fit():
    calls = [Call("all_reduce", 8, 1 << 20)]
    p = step_time.predict(_run(dict(dp=8), 1e9, calls=calls), _machine(cores=2))
    assert p.compute == pytest.approx(4.0)  # 8 ranks on 2 cores: a quarter of a core each
    assert p.comm == pytest.approx(AlphaBeta(1e-3, 1e9).ring_all_reduce(8, 1 << 20))


def test_pipeline_bubble_is_the_simulators_when_each_rank_has_a_core():
    run = _run(dict(pp=2, microbatches=4), 3e9)
    p = step_time.predict(run, _machine(cores=2))
    t_f = 3.0 / (3 * 4)  # a stage's 3 s of work: m forwards (⅓) and m backwards (⅔)
    sim = schedules.simulate(schedules.schedule("1f1b", 2, 4), t_f, 2 * t_f)
    assert p.total == pytest.approx(sim.total_time) and p.bound == "path"
    assert p.bubble == pytest.approx(schedules.bubble_formula("1f1b", 2, t_f, 2 * t_f))


def test_with_fewer_cores_than_ranks_the_bubble_lends_its_core():
    run = _run(dict(pp=2, dp=2, microbatches=2), 3e9)  # 4 ranks, 2 cores
    p = step_time.predict(run, _machine(cores=2))
    assert p.bound == "machine" and p.bubble == 0 and p.total == pytest.approx(4 * 3.0 / 2)


def test_measured_is_the_fastest_step_after_the_warm_up_of_the_slowest_rank():
    run = ConfigRun({"dp": 2}, 2, [StepTrace(), StepTrace()], [[9.0, 0.5, 0.4], [1.0, 0.6, 0.3]], {})
    assert run.measured == 0.4 and run.spread == pytest.approx(0.5 / 0.4)


def test_mfu_uses_the_cores_the_run_could_use():
    m = _machine(cores=2)  # peak 2 GFLOP/s over 2 cores
    assert step_time.mfu(1e9, 1.0, m, ranks=1) == pytest.approx(1.0)
    assert step_time.mfu(1e9, 1.0, m, ranks=8) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="step_seconds must be > 0"):
        step_time.mfu(1e9, 0.0, m, 1)


# ----------------------------------------------------------------------------
# real ranks: one launch traces and times, one measures the machine


@pytest.fixture(scope="module")
def runs():
    configs = {"1": {}, "dp2·tp2": dict(dp=2, tp=2, sharding="zero1"), "pp2": dict(pp=2)}
    return step_time.measure_configs(configs, steps=2, **TINY)


def test_traces_count_the_models_flops_and_every_message(runs):
    vocab = gpt.CharTokenizer().vocab_size
    flops = step_time.model_flops(vocab, batch_size=8, **TINY)["total"]
    for name, run in runs.items():
        assert sum(t.flops for t in run.traces) == pytest.approx(flops, rel=0.03), name
        assert all(t.ops > 100 for t in run.traces) and len(run.step_s[0]) == 2 and run.measured > 0
    one = runs["1"].traces[0]
    assert all(c.group == 1 for c in one.calls)  # one rank: nothing leaves it
    tp = runs["dp2·tp2"].traces[0]
    groups = {(c.op, c.group) for c in tp.calls}
    assert ("all_gather_single", 2) in groups and ("all_reduce", 4) in groups  # SP, and the loss
    stage0 = runs["pp2"].traces[0]
    sends = [c.nbytes for c in stage0.calls if c.op in ("send", "isend") and c.nbytes > 100]  # not headers
    assert sends == [4 * 4 * 8 * 16] * 2  # one (4, 8, 16) fp32 activation per micro-batch


def test_measure_machine_and_predict_on_real_runs(runs):
    machine = step_time.measure_machine(worlds=(2,), sizes=(4, 65536, 1 << 20), batches=2)
    assert machine.cores == step_time.available_cores()
    assert machine.core_flops > 1e8 and machine.peak_flops > 1e8 and 0 < machine.op_seconds < 1e-3
    assert set(machine.links) == {2} and machine.links[2].alpha > 0
    for run in runs.values():
        p = step_time.predict(run, machine)
        assert p.total > 0 and p.compute > 0 and p.overhead > 0
    with pytest.raises(ValueError, match="even numbers of ranks"):
        step_time.measure_machine(worlds=(3,))


def test_measure_configs_refuses_too_few_steps():
    with pytest.raises(ValueError, match="steps must be an integer >= 2"):
        step_time.measure_configs({"1": {}}, steps=1)


# ----------------------------------------------------------------------------
# GPUs


def test_cluster_step_prices_zero3_over_ethernet():
    plan = cost.Strategy(dp=8, zero=3, micro_batch_size=2, recompute=True, attention="flash")
    links = dict(
        dp=step_time.LINKS["10 GbE"], tp=step_time.LINKS["PCIe 4.0 x16"], pp=step_time.LINKS["10 GbE"]
    )
    r = step_time.cluster_step(cost.PRESETS["7B"], plan, step_time.GPUS["RTX 4090"], links)
    assert r["dp"] == pytest.approx(3 * 6.7e9 * 2 * 7 / 8 / 1.25e9)  # 3Ψ bf16 values, (N−1)/N, 10 GbE
    assert r["tokens"] == 8 * 2 * 4096 and r["fits"]
    assert r["serial"] == pytest.approx(r["compute"] + r["dp"]) and r["overlapped"] == r["dp"]
    three_d = cost.Strategy(tp=4, pp=2, sp=True, microbatches=16, recompute=True, attention="flash")
    r3 = step_time.cluster_step(cost.PRESETS["7B"], three_d, step_time.GPUS["RTX 4090"], links)
    assert r3["overlapped"] * 2 < r["overlapped"] and r3["bubble"] == pytest.approx(r3["compute"] / 16)


def test_cluster_step_refuses_bad_plans():
    links = {axis: step_time.LINKS["NVLink 4"] for axis in ("dp", "tp", "pp")}
    with pytest.raises(ValueError, match="cannot run this model.*does not divide"):
        step_time.cluster_step(cost.PRESETS["7B"], cost.Strategy(tp=3), step_time.GPUS["H100 SXM"], links)
    with pytest.raises(ValueError, match="efficiency must be in"):
        step_time.cluster_step(cost.PRESETS["7B"], cost.Strategy(), step_time.GPUS["H100 SXM"], links, 1.5)


# ----------------------------------------------------------------------------
# checks 9d.1–9d.2


@pytest.fixture(scope="module")
def solution():
    return reference_answers.load("09d_step_time")


def test_solutions_pass_and_stubs_are_not_attempted(solution):
    assert check.step_flops(solution.step_flops).status == PASSED
    assert check.collective_seconds(solution.collective_seconds).status == PASSED

    def stub(*args):
        raise NotImplementedError

    assert check.step_flops(stub).status == NOT_ATTEMPTED
    assert check.collective_seconds(stub).status == NOT_ATTEMPTED


def test_checks_refuse_the_library():
    result = check.step_flops(lambda v, s, d, L, b: step_time.model_flops(v, s, d, L, b)["total"])
    assert result.status == FAILED and "model_flops" in result.message
    result = check.collective_seconds(
        lambda op, n, s, a, b: step_time.call_seconds(Call(op, n, s), AlphaBeta(a, b))
    )
    assert result.status == FAILED and "call_seconds" in result.message
    result = check.collective_seconds(lambda op, n, s, a, b: AlphaBeta(a, b).ring_all_reduce(n, s))
    assert result.status == FAILED and "ring_all_reduce" in result.message


def _flops(v, s, d, L, b, attention=12, head=True, embeddings=False, passes=3):
    psi = L * (4 * d * d + 8 * d * d) + (d * v if head else 0) + (d * (v + s) if embeddings else 0)
    return passes * 2 * psi * b * s + attention * passes // 3 * L * s * d * b * s


def _seconds(op, n, s, a, b, rounds=None, per_round=None):
    if op == "send":
        return a + s / b
    if n == 1:
        return 0.0
    k = rounds(op, n) if rounds else (2 * (n - 1) if op == "all_reduce" else n - 1)
    return k * (a + (per_round(s, n) if per_round else s / n) / b)


@pytest.mark.parametrize(
    "wrong, words",
    [
        pytest.param(
            lambda *a: _flops(*a, attention=0),
            "attention's two products are missing",
            marks=pytest.mark.mistake("9d.1"),
        ),
        pytest.param(
            lambda *a: _flops(*a, passes=1), "counts the forward only", marks=pytest.mark.mistake("9d.1")
        ),
        pytest.param(lambda *a: _flops(*a, head=False), "the head", marks=pytest.mark.mistake("9d.1")),
        pytest.param(
            lambda *a: _flops(*a, embeddings=True),
            "embedding tables are in Ψ",
            marks=pytest.mark.mistake("9d.1"),
        ),
        pytest.param(
            lambda *a: _flops(*a, attention=6),
            "attention counted as 6·L·s·d",
            marks=pytest.mark.mistake("9d.1"),
        ),
    ],
)
def test_step_flops_names_the_mistake(wrong, words):
    result = check.step_flops(wrong)
    assert result.status == FAILED and words in result.message, result.message


@pytest.mark.parametrize(
    "wrong, words",
    [
        pytest.param(
            lambda op, n, s, a, b: a + s / b, "one message of S bytes", marks=pytest.mark.mistake("9d.2")
        ),
        pytest.param(
            lambda *x: _seconds(*x, rounds=lambda op, n: n - 1),
            "two passes round the ring",
            marks=pytest.mark.mistake("9d.2"),
        ),
        pytest.param(
            lambda *x: _seconds(*x, rounds=lambda op, n: 2 * (n - 1)),
            "that is an all-reduce's price",
            marks=pytest.mark.mistake("9d.2"),
        ),
        pytest.param(
            lambda *x: _seconds(*x, per_round=lambda s, n: s),
            "each round of a ring moves S/n",
            marks=pytest.mark.mistake("9d.2"),
        ),
    ],
)
def test_collective_seconds_names_the_mistake(wrong, words):
    result = check.collective_seconds(wrong)
    assert result.status == FAILED and words in result.message, result.message
