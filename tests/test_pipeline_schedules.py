"""Chapter 06b: course_lib.pipeline_schedules (schedules, validator, simulator, split backward,
runtime) against the sources' formulas, one process and torch.distributed.pipelining."""

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from course_lib import launch, pp
from course_lib import pipeline_schedules as ps
from course_lib.models import make_stack, regression_data

DEPTH, D_MODEL, D_HIDDEN, BATCH = 8, 8, 16, 72
TIMES = [(1.0, 2.0, 1.0), (1.0, 2.0, 0.5), (1.0, 3.0, 1.0), (2.0, 3.0, 1.0)]


def virtual(name, v=2):
    return v if name == "interleaved-1f1b" else 2 if name == "dualpipe-v" else 1


# ----------------------------------------------------------------------------
# schedules, simulator, formulas


@pytest.mark.parametrize("name", ps.NAMES)
def test_simulated_bubble_equals_the_sources_formula(name):
    for p in range(2, 7):
        for m in (2 * p, 3 * p, 4 * p):
            for v in (2, 3) if name == "interleaved-1f1b" else (virtual(name),):
                actions = ps.schedule(name, p, m, v)
                for t_f, t_b, t_w in TIMES:
                    sim = ps.simulate(actions, t_f, t_b, t_w, fb_pairs_together=name == "dualpipe-v")
                    formula = ps.bubble_formula(name, p, t_f, t_b, t_w)
                    if name == "zb-h1":  # (p-1)(F+B-2W) holds while W <= F and W <= I = B - W
                        t_i = t_b - t_w
                        formula = (p - 1) * max(t_f + t_i - t_w, t_f, t_i)
                        if t_w <= min(t_f, t_i):
                            assert formula == pytest.approx(ps.bubble_formula(name, p, t_f, t_b, t_w))
                    assert sim.bubble_time == pytest.approx(formula), (name, p, m, v, t_f, t_b, t_w)
                    busy = m * len(sim.stage_rank) / p * (t_f + t_b)
                    assert sim.total_time == pytest.approx(busy + sim.bubble_time)


def test_peaks_and_messages():
    p, m = 4, 8
    sims = {name: ps.simulate(ps.schedule(name, p, m, virtual(name))) for name in ps.NAMES}
    assert sims["1f1b"].peak_activations == [4, 3, 2, 1]
    assert sims["zb-h1"].peak_activations == [p] * p  # 1F1B's peak (rank 0's), on every rank
    assert sims["dualpipe-v"].peak_activations == [2 * p + 1] * p  # DeepSeek's PP + 1, PP = 2p
    warmups = [(p - r - 1) * 2 + p for r in range(p)]  # Megatron's warm-up, v = 2
    assert sims["interleaved-1f1b"].peak_activations == [w + 1 for w in warmups]
    assert sims["1f1b"].messages == [m, 2 * m, 2 * m, m]
    for v in (2, 3, 4):  # every boundary between stages crosses ranks: 2m(pv - 1) messages in all
        assert sum(ps.simulate(ps.schedule("interleaved-1f1b", p, m, v)).messages) == 2 * m * (p * v - 1)
    assert sum(sims["dualpipe-v"].messages) == 2 * m * (2 * p - 2)  # stages p-1 and p share a rank
    assert ps.stage_ranks("dualpipe-v", 3) == [0, 1, 2, 2, 1, 0]
    assert ps.stages_of_rank("interleaved-1f1b", 1, 3, 2) == [1, 4]


def test_schedules_keep_chapter_06_and_legacy_forms():
    assert pp.schedule("1f1b", 3, 4)[0][:4] == [("F", 0, 0), ("F", 1, 0), ("F", 2, 0), ("B", 0, 0)]
    assert pp.schedule("interleaved-1f1b", 2, 2, 1) == pp.schedule("1f1b", 2, 2)
    legacy = pp.simulate(pp.one_f_one_b_schedule(3, 4))
    assert legacy.timeline[0][0][0] == ("F", 0) and legacy.total_time == 6 * 3
    zb = pp.zb_h1_schedule(3, 3)
    assert zb[2] == [("F", 0, 2), ("I", 0, 2), ("F", 1, 2), ("I", 1, 2), ("F", 2, 2), ("I", 2, 2)] + [
        ("W", i, 2) for i in range(3)
    ]
    assert zb[0][:5] == [("F", 0, 0), ("F", 1, 0), ("F", 2, 0), ("I", 0, 0), ("W", 0, 0)]


def test_bad_inputs_and_broken_dependencies_are_named():
    with pytest.raises(ValueError, match="m = 6 is not a multiple of p"):
        ps.schedule("interleaved-1f1b", 4, 6, 2)
    with pytest.raises(ValueError, match="m >= 2p = 8"):
        ps.schedule("dualpipe-v", 4, 6)
    with pytest.raises(ValueError, match="unknown schedule 'zigzag'"):
        ps.schedule("zigzag", 2, 2)
    with pytest.raises(ValueError, match="num_virtual > 1 needs 'interleaved-1f1b'"):
        ps.schedule("zb-h1", 2, 2, 2)
    with pytest.raises(ValueError, match="exactly two stages"):
        ps.schedule("dualpipe-v", 2, 4, 3)
    with pytest.raises(ValueError, match="positive integer"):
        ps.schedule("1f1b", 0, 2)
    good = ps.schedule("zb-h1", 2, 2)
    w_first = [list(good[0]), good[1]]
    k = w_first[0].index(("W", 0, 0))
    w_first[0].insert(0, w_first[0].pop(k))
    with pytest.raises(
        ValueError, match=r"rank 0 runs \('W', 0, 0\) before the input gradient .B or I. of micro-batch 0"
    ):
        ps.validate(w_first)
    no_w = [[a for a in good[0] if a != ("W", 1, 0)], good[1]]
    with pytest.raises(ValueError, match="micro-batch 1 on stage 0 has 0 B, 1 I and 0 W"):
        ps.validate(no_w)
    with pytest.raises(ValueError, match="stage 0 appears on rank 0 and on rank 1"):
        ps.validate([[("F", 0, 0), ("B", 0, 0)], [("F", 0, 0), ("B", 0, 0)]])
    backwards_first = [good[0], [("I", 0, 1), ("F", 0, 1)] + good[1][2:]]
    with pytest.raises(
        ValueError, match=r"rank 1 runs \('I', 0, 1\) before the forward of micro-batch 0 on stage 1"
    ):
        ps.validate(backwards_first)
    crossed = [
        [("F", 0, 0), ("B", 0, 0), ("F", 1, 0), ("B", 1, 0)],
        [("F", 1, 1), ("B", 1, 1), ("F", 0, 1), ("B", 0, 1)],
    ]
    with pytest.raises(ValueError, match=r"deadlocks: rank 0 waits at \('B', 0, 0\) for the input gradient"):
        ps.validate(crossed)
    with pytest.raises(ValueError, match="cannot exceed t_b"):
        ps.simulate(good, 1.0, 1.0, 2.0)
    with pytest.raises(ValueError, match=r"cannot split 6 layer\(s\) into p·v = 4·2 = 8 stages"):
        pp.partition(make_stack(6, 4, 8), 0, 4, 2, "interleaved-1f1b")


@pytest.mark.parametrize("name", ps.NAMES)
def test_the_model_of_a_real_machine_latency_and_measured_durations(name):
    actions = ps.schedule(name, 4, 8, virtual(name))
    ideal = pp.simulate(actions, 1.0, 2.0, 1.0)
    assert pp.simulate(actions, 1.0, 2.0, 1.0, latency=0.0, durations={}).timeline == ideal.timeline
    # durations replace the per-kind times action by action: all of them given = the same play
    measured = ps.measured_durations(ideal.timeline)
    assert pp.simulate(actions, 9.0, 9.0, 9.0, durations=measured).bubble_time == pytest.approx(
        ideal.bubble_time
    )
    slow = {**measured, actions[0][0]: measured[actions[0][0]] + 0.5}
    assert pp.simulate(actions, 1.0, 2.0, 1.0, durations=slow).total_time > ideal.total_time
    # a message latency only delays; the latency and the delays are read back from a timeline
    late = pp.simulate(actions, 1.0, 2.0, 1.0, latency=0.1)
    assert late.total_time > ideal.total_time
    assert ps.message_latency(late.timeline) == pytest.approx(0.1)
    assert max(map(max, ps.delays(late.timeline, 0.1))) == pytest.approx(0.0, abs=1e-9)
    assert max(map(max, ps.delays(late.timeline, 0.0))) == pytest.approx(0.1)
    # a rank that starts an action 0.5 late (another program had its core) shows it
    shifted = [list(row) for row in late.timeline]
    shifted[1] = [(a, s + 0.5 * (k >= 3), e + 0.5 * (k >= 3)) for k, (a, s, e) in enumerate(shifted[1])]
    assert max(ps.delays(shifted, 0.1)[1]) == pytest.approx(0.5)
    assert [len(row) for row in ps.delays(shifted, 0.1)] == [len(row) for row in shifted]
    with pytest.raises(ValueError, match="latency must be a time >= 0"):
        pp.simulate(actions, latency=-1.0)
    with pytest.raises(ValueError, match="latency and durations need actions with a stage"):
        pp.simulate(pp.one_f_one_b_schedule(2, 2), latency=0.1)


def test_partition_interleaves_and_folds():
    model = make_stack(8, 4, 8)
    chunks = pp.partition(model, 1, 2, 2, "interleaved-1f1b")
    assert [list(c) for c in chunks] == [list(model[2:4]), list(model[6:8])]
    folded = pp.partition(model, 0, 4, schedule="dualpipe-v")
    assert [list(c) for c in folded] == [[model[0]], [model[7]]]
    assert isinstance(pp.partition(model, 0, 2), torch.nn.Sequential)


# ----------------------------------------------------------------------------
# the split backward, in one process


def test_split_backward_defers_weight_gradients_and_equals_a_full_backward():
    x, g = torch.randn(6, D_MODEL), torch.randn(6, D_MODEL)
    reference, split = make_stack(3, D_MODEL, D_HIDDEN, seed=3), make_stack(3, D_MODEL, D_HIDDEN, seed=3)
    x_ref = x.clone().requires_grad_()
    reference(x_ref).backward(g)
    store, x_split = ps.WeightGradients(), x.clone().requires_grad_()
    with ps.SplitBackward():
        out = split(x_split)
    with store.deferring("mb0"):
        out.backward(g)
    assert all(q.grad is None for q in split.parameters())  # the I computed input gradients only
    torch.testing.assert_close(x_split.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert store.run("mb0") == 6  # one piece of W per linear layer
    for a, b in zip(split.parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="no input-gradient pass"):
        store.run("mb0")


# ----------------------------------------------------------------------------
# on real ranks: every schedule equals one process, and torch's pipelining


def cases_for(p):
    cases = [("1f1b", 2 * p, 1), ("zb-h1", 2 * p, 1), ("zb-h1", p, 1), ("interleaved-1f1b", p, 2)]
    cases += [("interleaved-1f1b", 2 * p, 2), ("dualpipe-v", 2 * p, 2), ("dualpipe-v", 3 * p, 2)]
    return cases + ([("interleaved-1f1b", 4, 4)] if p == 2 else [])


def steps(group_size):
    rank, n = dist.get_rank(), dist.get_world_size()
    groups = [dist.new_group(list(range(g, g + group_size))) for g in range(0, n, group_size)]
    group = None if group_size == n else groups[rank // group_size]
    me, x, y = rank % group_size, *regression_data(BATCH, D_MODEL)
    out = []
    for name, m, v in cases_for(group_size):
        for pairs in (False, True) if name == "dualpipe-v" else (False,):
            stages = pp.partition(make_stack(DEPTH, D_MODEL, D_HIDDEN, seed=0), me, group_size, v, name)
            modules = stages if isinstance(stages, list) else [stages]
            loss = ps.train_step(
                stages, x, y, F.mse_loss, m, name, group, num_virtual=v, fb_pairs_together=pairs
            )
            out.append((loss, {k: q.grad for mod in modules for k, q in mod.named_parameters()}))
    return out


def torch_steps(_):
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining import schedules as torch_schedules

    rank, p = dist.get_rank(), dist.get_world_size()
    x, y = regression_data(BATCH, D_MODEL)
    out = []
    for kind, name, v in (
        ("ScheduleInterleaved1F1B", "interleaved-1f1b", 2),
        ("ScheduleInterleavedZeroBubble", "interleaved-1f1b", 2),
        ("ScheduleInterleavedZeroBubble", "zb-h1", 1),
        ("ScheduleDualPipeV", "dualpipe-v", 2),
    ):
        modules = pp.partition(make_stack(DEPTH, D_MODEL, D_HIDDEN, seed=0), rank, p, v, name)
        modules = modules if isinstance(modules, list) else [modules]
        ids, count = ps.stages_of_rank(name, rank, p, v), len(ps.stage_ranks(name, p, v))
        stages = [PipelineStage(mod, s, count, torch.device("cpu")) for mod, s in zip(modules, ids)]
        runner = getattr(torch_schedules, kind)(stages, 2 * p, loss_fn=F.mse_loss)
        runner.step(*([x] if 0 in ids else []), **({"target": y} if count - 1 in ids else {}))
        out.append({k: q.grad for mod in modules for k, q in mod.named_parameters()})
    return out


def full_batch():
    model = make_stack(DEPTH, D_MODEL, D_HIDDEN, seed=0)
    x, y = regression_data(BATCH, D_MODEL)
    loss = F.mse_loss(model(x), y)
    loss.backward()
    return loss.detach(), {k: q.grad for k, q in model.named_parameters()}


@pytest.mark.parametrize("world, group_size", [(4, 4), (4, 2), (3, 3)])
def test_every_schedule_equals_one_process(world, group_size):
    loss, grads = full_batch()
    per_rank = launch.run(steps, world, group_size, backend="gloo")
    for results in per_rank:
        for got_loss, got in results:
            assert sorted(got) == sorted(k for k in grads if k in got) and got
            for k, g in got.items():
                torch.testing.assert_close(g, grads[k], rtol=1e-5, atol=1e-5, msg=k)
            if got_loss is not None:
                torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-5)
    for c in range(len(per_rank[0])):  # every layer's gradient on some rank of each pipeline
        names = {k for rank in per_rank[:group_size] for k in rank[c][1]}
        assert names == set(grads)


def test_torch_pipelining_gives_the_same_gradients():
    _, grads = full_batch()
    for results in launch.run(torch_steps, 2, None, backend="gloo"):
        for got in results:
            for k, g in got.items():
                torch.testing.assert_close(g, grads[k], rtol=1e-5, atol=1e-5, msg=k)


def test_timed_chunks_record_every_action():
    configs = [("zb-h1", 2, 1, 0.002, 0.004, 0.002, False), ("dualpipe-v", 4, 2, 0.001, 0.002, 0.001, True)]
    runs = ps.idle_against_model(
        launch.run(ps.timed_schedules, 2, configs, repeats=1, backend="gloo"), configs, 2
    )
    for (name, m, v, *_), timelines in zip(configs, (run.timelines for run in runs)):
        assert [[a for a, _, _ in row] for row in timelines] == ps.schedule(name, 2, m, v)
        idle, wall = ps.idle_time(timelines)
        assert 0 <= idle < wall
        pairs = name == "dualpipe-v"
        alpha = ps.message_latency(timelines, pairs)
        delays = ps.delays(timelines, alpha, pairs)
        assert alpha >= 0 and [len(row) for row in delays] == [len(row) for row in timelines]
        assert min(map(min, delays)) >= 0
        model = pp.simulate(
            ps.schedule(name, 2, m, v),
            fb_pairs_together=pairs,
            latency=alpha,
            durations=ps.measured_durations(timelines),
        )
        assert model.bubble_time >= 0


# ----------------------------------------------------------------------------
# the exercise checks: solutions pass, stubs read "not attempted", typical mistakes are named


@pytest.fixture(scope="module")
def solution():
    import reference_answers

    return reference_answers.load("06b_pipeline_schedules")


def test_solutions_pass_and_stubs_are_not_attempted(solution):
    from course_lib.checks import NOT_ATTEMPTED, PASSED
    from course_lib.checks import pipeline_schedules as check

    def stub(*args):
        raise NotImplementedError("exercise: replace this line with your code")

    assert check.interleaved_order(solution.interleaved_order).status == PASSED
    assert check.split_backward(solution.input_gradient, solution.weight_gradient).status == PASSED
    assert check.zb_h1_order(solution.zb_h1_order).status == PASSED
    assert check.interleaved_order(stub).status == NOT_ATTEMPTED
    assert check.split_backward(stub, stub).status == NOT_ATTEMPTED
    assert check.zb_h1_order(stub).status == NOT_ATTEMPTED


@pytest.mark.mistake("6b.1", "6b.2", "6b.3")
def test_checks_name_typical_mistakes(solution):
    from course_lib.checks import FAILED
    from course_lib.checks import pipeline_schedules as check

    def failed(result, text):
        assert result.status == FAILED and text in result.message, result.message

    def one_f_one_b_warmup(rank, p, m, v):  # 1F1B's warm-up count in an interleaved order
        actions = solution.interleaved_order(rank, p, m, v)
        f, b = [a for a in actions if a[0] == "F"], [a for a in actions if a[0] == "B"]
        w = min(p - rank - 1, m * v)
        return f[:w] + [x for k in range(len(f) - w) for x in (f[w + k], b[k])] + b[len(f) - w :]

    failed(check.interleaved_order(one_f_one_b_warmup), "interleaved 1F1B warms up with (p−r−1)·2 + (v−1)·p")

    def no_check_of_m(rank, p, m, v):
        return (
            solution.interleaved_order(rank, p, p * max(1, m // p), v)
            if m % p
            else solution.interleaved_order(rank, p, m, v)
        )

    failed(check.interleaved_order(no_check_of_m), "expected a ValueError")
    failed(
        check.interleaved_order(lambda r, p, m, v: pp.interleaved_1f1b_schedule(p, m, v)[r]),
        "not to call the course's own",
    )

    failed(check.split_backward(lambda g, w: g @ w.t(), solution.weight_gradient), "∂L/∂x = ∂L/∂y · W")

    def transposed(g, x):
        grad_w, grad_b = solution.weight_gradient(g, x)
        return grad_w.t(), grad_b

    failed(check.split_backward(solution.input_gradient, transposed), "transposed")

    def no_flatten(g, x):
        return g.transpose(-1, -2) @ x, g.sum(0)

    failed(check.split_backward(solution.input_gradient, no_flatten), "flatten the leading dimensions")
    failed(check.split_backward(ps.input_gradient, solution.weight_gradient), "not to call the course's own")

    def w_right_after_i(rank, p, m):
        return [
            a
            for kind, i, s in [(k, i, rank) for k, i in pp.one_f_one_b_schedule(p, m)[rank]]
            for a in ([(kind, i, s)] if kind == "F" else [("I", i, s), ("W", i, s)])
        ]

    failed(check.zb_h1_order(w_right_after_i), "every W runs right after its I")

    def all_w_at_the_end(rank, p, m):
        actions = [
            ("I", i, s) if kind == "B" else (kind, i, s)
            for kind, i, s in [(k, i, rank) for k, i in pp.one_f_one_b_schedule(p, m)[rank]]
        ]
        return actions + [("W", i, rank) for i in range(m)]

    failed(check.zb_h1_order(all_w_at_the_end), "ZB-H1 keeps 1F1B's peak")

    def w_before_i(rank, p, m):
        actions = solution.zb_h1_order(rank, p, m)
        k = actions.index(("W", 0, rank))
        return [actions[k]] + actions[:k] + actions[k + 1 :]

    failed(check.zb_h1_order(w_before_i), "a W needs its I")
    failed(
        check.zb_h1_order(lambda r, p, m: [(k, i, r) for k, i in pp.one_f_one_b_schedule(p, m)[r]]),
        "use I and W for every backward",
    )


class _SimulatedTime:
    """A clock whose sleeps overshoot by a fixed 0.3 ms, and whose work takes what it is told."""

    def __init__(self):
        self.t = 100.0

    def now(self):
        return self.t

    def sleep(self, seconds):
        self.t += seconds + 0.0003

    def work(self, seconds):
        self.t += seconds


def test_action_clock_makes_an_action_take_its_booked_time():
    sim = _SimulatedTime()
    clock = ps.ActionClock(keep=4, now=sim.now, sleep=sim.sleep)
    took = []
    for send in [0.002] * 3 + [0.050] + [0.002] * 3:  # one send is slow, once
        start = clock.begin("F")
        sim.work(0.001)  # the runtime's own work inside the action
        clock.spend(0.010)
        clock.spend(0.005)  # two stages in one action: their times add up
        clock.wait(sending=True)
        sim.work(send)
        took.append(clock.end() - start)
    # the first action knows nothing of what follows its wake-up; from the second on it
    # subtracts the median of the recent tails (send + the sleep's overshoot), so one slow
    # send makes only its own action late
    assert took[0] == pytest.approx(0.015 + 0.0003 + 0.002)
    assert took[1:3] == pytest.approx([0.015, 0.015])
    assert took[3] == pytest.approx(0.015 + 0.048)
    assert took[4:] == pytest.approx([0.015] * 3)
    start = clock.begin("F")  # an action of another key (no send) learns on its own
    clock.spend(0.004)
    clock.wait()
    assert clock.end() - start == pytest.approx(0.004 + 0.0003)
    start = clock.begin("W")
    sim.work(0.001)
    clock.wait()  # nothing booked: no wait
    assert clock.end() - start == pytest.approx(0.001)
    start = clock.begin("B")
    clock.spend(0.002)
    sim.work(0.003)  # it already took longer than booked: no sleep, nothing learnt
    clock.wait()
    assert clock.end() - start == pytest.approx(0.003) and ("B", False) not in clock.tail
    before = sim.now()
    clock.spend(0.003)  # outside an action it just sleeps
    assert sim.now() - before == pytest.approx(0.0033)
    real = ps.ActionClock()  # and by default it is the real clock
    before = time.perf_counter()
    real.spend(0.003)
    assert time.perf_counter() - before >= 0.003


def test_measured_times_and_cores_awake():
    durations = {("F", 0, 0): 1.0, ("F", 1, 0): 1.2, ("I", 0, 0): 2.0, ("W", 0, 0): 1.0, ("W", 1, 0): 1.4}
    assert ps.measured_times(durations) == pytest.approx((1.1, 3.2, 1.2))
    assert ps.measured_times({("F", 0, 0): 1.0, ("B", 0, 0): 3.0}) == (1.0, 3.0, 1.5)
    with ps.cores_awake() as loops:
        assert loops == (os.cpu_count() if hasattr(os, "SCHED_IDLE") else 0)


def test_split_backward_names_exactly_the_schedules_with_w_actions():
    with_w = {
        name
        for name in ps.NAMES
        if any(
            a[0] == "W"
            for row in ps.schedule(name, 4, 8, 2 if name in ("interleaved-1f1b", "dualpipe-v") else 1)
            for a in row
        )
    }
    assert set(ps.SPLIT_BACKWARD) == with_w == {"zb-h1", "dualpipe-v"}
