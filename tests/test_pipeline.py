"""Chapter 06: course_lib.pp (schedules, simulator, partition, runtime, checkpointing) and its checks."""

import pytest
import reference_answers
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from course_lib import launch, pp
from course_lib.checks import FAILED, NOT_ATTEMPTED
from course_lib.checks import pipeline_parallel as check
from course_lib.models import make_stack, regression_data

DEPTH, D_MODEL, D_HIDDEN, BATCH = 8, 8, 16, 16
GRID = [(p, m) for p in range(1, 7) for m in range(1, 11)]
EXERCISES = ["gpipe_schedule", "one_f_one_b_schedule", "run_stage", "recompute_backward"]


# ----------------------------------------------------------------------------
# schedules and the simulator


def assert_dependencies_hold(schedule, sim):
    p = len(schedule)
    ends = {}
    for s, row in enumerate(sim.timeline):
        assert [a for a, _, _ in row] == [tuple(a) for a in schedule[s]]  # the stage's own order
        for (_, _start, end), (_, next_start, _) in zip(row, row[1:]):
            assert end <= next_start  # one action at a time
        for (kind, i), start, end in row:
            ends[kind, i, s] = (start, end)
    for (kind, i, s), (start, _) in ends.items():
        needs = [("F", i, s - 1)] if kind == "F" and s > 0 else []
        if kind == "B":
            needs = [("F", i, s)] + ([("B", i, s + 1)] if s < p - 1 else [])
        assert all(ends[n][1] <= start for n in needs), (kind, i, s)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_bubble_equals_formula_and_peaks(name):
    for p, m in GRID:
        schedule = pp.SCHEDULES[name](p, m)
        for t_f, t_b in ((1.0, 2.0), (1.0, 1.0), (0.5, 3.0)):
            sim = pp.simulate(schedule, t_f, t_b)
            assert sim.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12), (p, m)
            assert sim.total_time == pytest.approx((m + p - 1) * (t_f + t_b))
        expected = [m] * p if name == "gpipe" else [min(p - s, m) for s in range(p)]
        assert sim.peak_activations == expected, (p, m)
        assert_dependencies_hold(schedule, sim)
    assert pp.bubble_formula(4, 16) < 0.2  # the seed notes: under 20 % once m >= 4p


def test_schedule_shapes():
    assert pp.gpipe_schedule(2, 2) == [[("F", 0), ("F", 1), ("B", 0), ("B", 1)]] * 2
    assert pp.one_f_one_b_schedule(3, 4)[0] == [
        ("F", 0),
        ("F", 1),
        ("F", 2),
        ("B", 0),
        ("F", 3),
        ("B", 1),
        ("B", 2),
        ("B", 3),
    ]
    assert pp.one_f_one_b_schedule(3, 4)[2] == [a for i in range(4) for a in (("F", i), ("B", i))]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            pp.gpipe_schedule(bad, 2)


def test_simulator_unbalanced_and_invalid():
    sim = pp.simulate(pp.gpipe_schedule(2, 2), t_f=[2, 1], t_b=[4, 2])
    assert sim.total_time == 2 * 2 + 1 + 2 + 2 * 4  # stage 0 (twice as slow) sets the pace
    with pytest.raises(ValueError, match="deadlocks: stage 0 waits at .'B', 0."):
        pp.simulate([[("B", 0), ("F", 0)], [("F", 0), ("B", 0)]])
    with pytest.raises(ValueError, match="misses .'B', 1."):
        pp.simulate([[("F", 0), ("F", 1), ("B", 0)]])
    with pytest.raises(ValueError, match="not an action"):
        pp.simulate([[("X", 0)]])
    with pytest.raises(ValueError, match="list of 2"):
        pp.simulate(pp.gpipe_schedule(2, 1), t_f=[1, 1, 1])


# ----------------------------------------------------------------------------
# partition


@pytest.mark.parametrize("depth, world", [(4, 1), (4, 2), (4, 3), (4, 4), (7, 3), (10, 4)])
def test_partition_is_contiguous_and_balanced(depth, world):
    model = make_stack(depth, 4, 8)
    stages = [pp.partition(model, r, world) for r in range(world)]
    assert [layer for stage in stages for layer in stage] == list(model)  # every layer once, in order
    sizes = [len(stage) for stage in stages]
    assert max(sizes) - min(sizes) <= 1
    assert stages[0][0] is model[0]  # shared, not copied


def test_partition_balances_parameters_and_refuses_too_few_layers():
    assert pp.partition_bounds([1, 1, 1, 6, 1, 1, 1], 3) == [(0, 3), (3, 4), (4, 7)]
    assert pp.partition_bounds([0, 0, 0], 2) == [(0, 1), (1, 3)]
    with pytest.raises(ValueError, match="cannot split 2 layer.s. over 3 ranks"):
        pp.partition(make_stack(2, 4, 8), 0, 3)
    with pytest.raises(TypeError, match="nn.Sequential"):
        pp.partition(nn.Linear(2, 2), 0, 1)


# ----------------------------------------------------------------------------
# the runtime on real ranks


def reference():
    model = make_stack(DEPTH, D_MODEL, D_HIDDEN, seed=0)
    x, y = regression_data(BATCH, D_MODEL)
    loss = F.mse_loss(model(x), y)
    loss.backward()
    return loss.detach(), {k: q.grad for k, q in model.named_parameters()}


def step_everything(group_size):
    """Both schedules, with and without checkpointing, in pipelines of ``group_size`` ranks."""
    rank, n = dist.get_rank(), dist.get_world_size()
    groups = [dist.new_group(list(range(g, g + group_size))) for g in range(0, n, group_size)]
    group = None if group_size == n else groups[rank // group_size]
    stage_index = rank % group_size
    x, y = regression_data(BATCH, D_MODEL)
    out = {}
    for schedule in ("gpipe", "1f1b"):
        for m in (1, 4):
            for checkpoint in (False, True):
                stage = pp.partition(make_stack(DEPTH, D_MODEL, D_HIDDEN, seed=0), stage_index, group_size)
                with pp.ActivationMeter(stage) as meter:
                    loss = pp.train_step(stage, x, y, F.mse_loss, m, schedule, group, checkpoint=checkpoint)
                grads = {k: q.grad for k, q in stage.named_parameters()}
                out[schedule, m, checkpoint] = loss, grads, meter.peak_bytes, meter.live_bytes
    return out


@pytest.mark.parametrize("world, group_size", [(2, 2), (4, 4), (4, 2)])
def test_train_step_equals_single_process(world, group_size):
    full_loss, full_grads = reference()
    per_rank = launch.run(step_everything, world, group_size)
    for key in per_rank[0]:
        for rank, result in enumerate(per_rank):
            loss, grads, _, live = result[key]
            assert live == 0  # every activation freed by the end of the step
            last = rank % group_size == group_size - 1
            assert (loss is None) != last, (key, rank)
            if last:
                torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-5)
            for name, grad in grads.items():
                torch.testing.assert_close(grad, full_grads[name], rtol=1e-5, atol=1e-5, msg=f"{key} {name}")
    if group_size == 4:  # live micro-batches: GPipe m, 1F1B min(p - s, m); checkpointing stores less
        for s in range(4):
            unit = per_rank[s]["gpipe", 1, False][2] // 4  # bytes of one micro-batch of BATCH/4 rows
            assert per_rank[s]["gpipe", 4, False][2] == 4 * unit
            assert per_rank[s]["1f1b", 4, False][2] == min(4 - s, 4) * unit
            assert per_rank[s]["gpipe", 4, True][2] < per_rank[s]["gpipe", 4, False][2] / 2


def torch_pipeline(schedule_name):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    rank, p = dist.get_rank(), dist.get_world_size()
    stage = pp.partition(make_stack(DEPTH, D_MODEL, D_HIDDEN, seed=0), rank, p)
    x, y = regression_data(BATCH, D_MODEL)
    kind = ScheduleGPipe if schedule_name == "gpipe" else Schedule1F1B
    runner = kind(PipelineStage(stage, rank, p, torch.device("cpu")), 4, loss_fn=F.mse_loss)
    runner.step(*([x] if rank == 0 else []), **({"target": y} if rank == p - 1 else {}))
    return {k: q.grad for k, q in stage.named_parameters()}


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_torch_pipelining_agrees(schedule):
    _, full_grads = reference()
    for grads in launch.run(torch_pipeline, 2, schedule):
        for name, grad in grads.items():
            torch.testing.assert_close(grad, full_grads[name], rtol=1e-5, atol=1e-5)


def errors():
    stage = pp.partition(make_stack(DEPTH, D_MODEL, D_HIDDEN), dist.get_rank(), dist.get_world_size())
    x, y = regression_data(BATCH, D_MODEL)
    found = []
    for kwargs in (
        dict(num_microbatches=3),
        dict(num_microbatches=4, schedule="zigzag"),
        dict(num_microbatches=0),
    ):
        try:
            pp.train_step(stage, x, y, F.mse_loss, **kwargs)
        except ValueError as exc:
            found.append(str(exc))
    return found


def test_train_step_value_errors():
    for messages in launch.run(errors, 2):
        assert "does not split into 3 equal micro-batches" in messages[0]
        assert "unknown schedule 'zigzag'" in messages[1]
        assert "positive integer" in messages[2]


# ----------------------------------------------------------------------------
# activation checkpointing


def test_checkpointed_equals_torch_checkpoint_and_stores_only_the_input():
    x, g = torch.randn(6, D_MODEL), torch.randn(6, D_MODEL)
    results = []
    for mode in ("ours", "torch", "none"):
        stage = make_stack(3, D_MODEL, D_HIDDEN, seed=2)
        forwards = []
        stage.register_forward_pre_hook(lambda *_: forwards.append(1))
        x_in = x.clone().requires_grad_()
        with pp.ActivationMeter(stage) as meter:
            if mode == "ours":
                out = pp.checkpointed(stage, x_in)
            elif mode == "torch":
                out = torch.utils.checkpoint.checkpoint(stage, x_in, use_reentrant=False)
            else:
                out = stage(x_in)
            kept = meter.live_bytes
            out.backward(g)
        results.append((out.detach(), x_in.grad, *(q.grad for q in stage.parameters())))
        if mode == "ours":
            assert kept == x.numel() * 4 and len(forwards) == 2
            assert meter.peak_bytes > kept and meter.live_bytes == 0
        if mode == "none":
            assert kept == 3 * 6 * (D_MODEL + 2 * D_HIDDEN) * 4 and len(forwards) == 1
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    torch.testing.assert_close(results[0], results[2], rtol=1e-5, atol=1e-5)
    stage = make_stack(2, D_MODEL, D_HIDDEN)  # an input that needs no gradient (stage 0)
    pp.checkpointed(stage, x).sum().backward()
    assert all(q.grad is not None for q in stage.parameters())


def test_flop_counter_backward_is_twice_forward_and_recompute_four_thirds():
    stage, x = make_stack(2, D_MODEL, D_HIDDEN), torch.randn(6, D_MODEL, requires_grad=True)
    with pp.FlopCounter() as forward:
        out = stage(x)
    with pp.FlopCounter() as backward:
        out.sum().backward()
    assert forward.total == 2 * 2 * 6 * D_MODEL * D_HIDDEN * 2  # 2 layers × 2 products × 2·b·in·out
    assert backward.total == 2 * forward.total
    with pp.FlopCounter() as checkpointed:
        pp.checkpointed(stage, x).sum().backward()
    assert checkpointed.total * 3 == (forward.total + backward.total) * 4


def test_measured_bubble_and_least_disturbed():
    sim = pp.simulate(pp.gpipe_schedule(3, 4), 1.0, 2.0)
    bubble, wall = pp.measured_bubble(sim.timeline)
    assert bubble == pytest.approx(pp.bubble_formula(3, 4)) and wall == pytest.approx(sim.total_time)
    late = 5.0 * (len(sim.timeline) - 1)  # stage 0's last backward starts late: more waiting
    slow = [
        [(a, s + late * (a == ("B", 3) and r == 0), e + late * (a == ("B", 3) and r == 0)) for a, s, e in row]
        for r, row in enumerate(sim.timeline)
    ]
    per_rank = [[[slow[r], sim.timeline[r]]] for r in range(3)]  # one config, two repeats
    assert pp.least_disturbed(per_rank) == [sim.timeline]
    times = pp.fastest({"a": lambda: None, "b": lambda: sum(range(1000))}, repeats=3)
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())


def test_time_forward_backward_returns_positive_times():
    t_f, t_b = pp.time_forward_backward(make_stack(2, D_MODEL, D_HIDDEN), torch.randn(4, D_MODEL), repeats=2)
    assert t_f > 0 and t_b > 0  # (their ratio is timing: not asserted in tests)


def test_timed_steps_on_ranks_record_every_action():
    configs = [("gpipe", 2, [1, 1]), ("1f1b", 2, [1, 0.5])]
    per_rank = launch.run(pp.timed_steps, 2, configs, 0.002, 0.004, repeats=1)
    best = pp.least_disturbed(per_rank)
    for (_, m, _), timelines in zip(configs, best):
        assert [sorted(a for a, _, _ in row) for row in timelines] == [
            sorted((k, i) for k in "FB" for i in range(m))
        ] * 2
        assert 0 <= pp.measured_bubble(timelines)[0] < 1


def test_pipeline_explorer_redraws_on_every_move():
    import ipywidgets as widgets

    from course_lib import viz

    explorer = viz.pipeline_explorer()
    controls, readout = explorer.children[0].children
    stages, micro, ratio, picker = controls.children
    assert all(isinstance(w, widgets.IntSlider | widgets.FloatSlider) for w in (stages, micro, ratio))
    assert all(
        w.layout.width == "420px" and w.style.description_width == "initial" for w in (stages, micro, ratio)
    )
    seen = [readout.value]
    for widget, value in ((stages, 6), (micro, 3), (ratio, 1.0), (picker, "1f1b")):
        widget.value = value  # the callback runs here; an exception would propagate
        assert readout.value != seen[-1], widget.description
        seen.append(readout.value)
    assert "5/8" in readout.value and "[3, 3, 3, 3, 2, 1]" in readout.value


# ----------------------------------------------------------------------------
# the exercise checks: the solutions pass, mistakes get a specific line, stubs read "not attempted"


@pytest.fixture(scope="module")
def solution():
    return reference_answers.load("06_pipeline_parallel")


# That every reference answer passes its check is tested once, through the grader: tests/test_course.py.


def not_yet(*args):
    raise NotImplementedError("exercise: replace this line with your code")


@pytest.mark.parametrize("name", EXERCISES)
def test_stubs_are_not_attempted(name):
    assert getattr(check, name)(not_yet).status == NOT_ATTEMPTED


@pytest.mark.mistake("6.1", "6.2")
def test_schedule_diagnostics():
    def reversed_backwards(p, m):
        return [[("F", i) for i in range(m)] + [("B", i) for i in reversed(range(m))] for _ in range(p)]

    def forward_then_backward(p, m):
        return [[a for i in range(m) for a in (("F", i), ("B", i))] for _ in range(p)]

    result = check.gpipe_schedule(reversed_backwards)
    assert result.status == FAILED
    assert result.message == (
        "p=1, m=2: stage 0, position 2: expected ('B', 0), got ('B', 1) — run the "
        "backwards in micro-batch order 0, 1, …, m−1"
    )
    gpipe = {(p, m): pp.gpipe_schedule(p, m) for p in check.STAGES for m in check.MICRO_BATCHES}
    result = check.one_f_one_b_schedule(lambda p, m: gpipe[p, m])  # GPipe's order, worked out earlier
    assert "keeps 2 micro-batches alive at once; 1F1B keeps at most min(p−s, m) = 1" in result.message
    result = check.one_f_one_b_schedule(forward_then_backward)
    assert result.message.startswith("p=2, m=2: stage 0, position 1: expected ('F', 1), got ('B', 0)")
    result = check.one_f_one_b_schedule(lambda p, m: [[("B", 0), ("F", 0)]] * p)
    assert result.message == "p=1, m=1: the schedule deadlocks: stage 0 waits at ('B', 0) for F 0 on stage 0"
    result = check.gpipe_schedule(lambda p, m: [[("F", i) for i in range(m)]] * p)
    assert "should have 2m = 2 actions" in result.message


@pytest.mark.mistake("6.3")
def test_run_stage_diagnostics(solution, monkeypatch):
    source = solution.run_stage  # closures carry the function, not the module

    def loss_not_divided(stage, actions, micro_inputs, micro_targets, loss_fn, shape):
        return source(
            stage,
            actions,
            micro_inputs,
            micro_targets,
            lambda out, y: loss_fn(out, y) * len(micro_inputs),
            shape,
        )

    result = check.run_stage(loss_not_divided)
    assert result.status == FAILED and "SUM of the 4 micro-batch losses: divide each by m" in result.message

    def gradients_never_sent(*args):
        if dist.get_world_size() > 1 and dist.get_rank() == dist.get_world_size() - 1:
            dist.isend = lambda *a, **k: Sent()  # the last stage "forgets" to send x.grad back
        return source(*args)

    monkeypatch.setattr(check, "TIMEOUT", 4.0)
    result = check.run_stage(gradients_never_sent)
    assert result.status == FAILED
    # p = 1 passes (nothing to send); on 2 ranks rank 0 waits for a gradient that never comes.
    expected = "p=2 (gpipe m=4, then 1f1b m=4, then 1f1b m=2): deadlock — "
    assert result.message.startswith(expected), result.message


class Sent:
    def wait(self):
        pass


@pytest.mark.mistake("6.4")
def test_recompute_diagnostics():
    def forgot_requires_grad(stage, x, grad_output):
        stage(x).backward(grad_output)
        return x.grad

    result = check.recompute_backward(forgot_requires_grad)
    assert result.status == FAILED and "returned None — return the gradient of x" in result.message

    def twice(stage, x, grad_output):
        x = x.detach().requires_grad_()
        stage(x).backward(grad_output)
        stage(x).backward(grad_output)
        return x.grad / 2

    assert "ran the stage's forward 2 times" in check.recompute_backward(twice).message
