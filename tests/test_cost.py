"""Chapter 09: the cost model against known values and against measurements here."""

import math

import pytest
import torch.nn.functional as F

from course_lib import cost, dp, launch, mesh, pp
from course_lib.comm import count_traffic
from course_lib.models import make_stack, num_params, shard


def test_model_states_match_the_zero_paper():
    psi = 7.5e9  # ZeRO paper's example: 120 GB plain, 31.4 / 16.6 / 1.9 GB on 64 GPUs
    totals = [sum(cost.model_state_bytes(psi, z, dp=64).values()) / 1e9 for z in range(4)]
    assert totals[0] == pytest.approx(120)
    assert totals[1] == pytest.approx(31.4, abs=0.05)
    assert totals[2] == pytest.approx(16.6, abs=0.05)
    assert totals[3] == pytest.approx(1.875)
    # TP and PP divide what is left before ZeRO shards it
    assert sum(cost.model_state_bytes(psi, 1, dp=8, tp=4, pp=2).values()) == pytest.approx(
        (4 + 12 / 8) * psi / 8
    )


def test_activation_formulas():
    s, b, h, a = 2048, 1, 4096, 32
    full = cost.activation_bytes_per_layer(s, b, h, a)
    assert full == s * b * h * (34 + 5 * a * s / h)
    assert cost.activation_bytes_per_layer(s, b, h, a, tp=8, sp=True) == pytest.approx(full / 8)
    tp_only = cost.activation_bytes_per_layer(s, b, h, a, tp=8)
    assert tp_only == pytest.approx(s * b * h * (10 + 24 / 8 + 5 * a * s / (h * 8)))
    assert full / 8 < tp_only < full  # SP saves the 10·sbh that TP alone replicates


def test_bubble_matches_the_pipeline_simulator():
    for p, m in [(1, 4), (2, 2), (4, 8), (8, 32)]:
        assert cost.bubble_fraction(p, m) == pytest.approx(
            pp.simulate(pp.gpipe_schedule(p, m)).bubble_fraction
        )
    assert cost.microbatches_alive(4, 16, "1f1b") == 4 and cost.microbatches_alive(4, 16, "gpipe") == 16


def test_traffic_formulas():
    assert cost.dp_traffic_bytes(1e9, 0, 8, element_bytes=2) == pytest.approx(2 * 1e9 * 2 * 7 / 8)
    assert cost.dp_traffic_bytes(1e9, 3, 8) == pytest.approx(1.5 * cost.dp_traffic_bytes(1e9, 2, 8))
    assert cost.tp_traffic_bytes(100, 64, 2, 1) == 0
    assert cost.tp_traffic_bytes(100, 64, 2, 4, element_bytes=1) == 4 * 2 * 100 * 64 * 2 * 3 / 4
    assert cost.pp_traffic_bytes(100, 64, 4, 1) == 0


def test_estimate_and_its_problems():
    model = cost.PRESETS["7B"]
    est = cost.estimate(model, cost.Strategy(dp=8, tp=4, pp=2, zero=1, sp=True, microbatches=8), 64)
    assert not est.problems and set(est.memory) == {"params", "grads", "optimizer", "activations"}
    assert est.bubble == pytest.approx(1 / 9)
    assert est.memory_total < cost.estimate(model, cost.Strategy(dp=64), 64).memory_total
    bad = cost.estimate(model, cost.Strategy(dp=2, tp=3, sp=True), 8)
    assert any("world" in p or "GPUs" in p for p in bad.problems)
    assert any("heads" in p for p in bad.problems)
    assert cost.problems(model, cost.Strategy(sp=True)) == [
        "sequence parallelism splits the tensor-parallel group's work: it needs tp > 1"
    ]
    recompute = cost.estimate(model, cost.Strategy(dp=64, recompute=True))
    assert recompute.memory["activations"] == 2 * model.seq_len * model.hidden * model.layers


def test_draw_plans():
    fig = cost.draw_plans(cost.PRESETS["1.3B"], {"DP": cost.Strategy(dp=8), "TP": cost.Strategy(tp=8)})
    assert fig._repr_png_()[:4] == b"\x89PNG"


def _one_step_traffic(d, t, p, m):
    grid = mesh.RankGrid(d, t, p)
    stage = mesh.build_3d_stage(grid, make_stack(2, 64, 128, 0))
    x, y = dp.make_batches(1, 64, d_model=64)[0]
    x, y = shard(x, grid.dp_rank, d), shard(y, grid.dp_rank, d)
    with count_traffic() as pipe:
        pp.train_step(stage, x, y, F.mse_loss, m, group=grid.pp_group)
    with count_traffic() as sync:
        dp.average_gradients_allreduce(stage, group=grid.dp_group)
    return num_params(stage), pipe.sent, pipe.payload_sent, sync.sent


def test_predictions_near_measured_traffic():
    """DP × PP on 4 ranks: the dp sync and the pipeline sends, measured vs predicted."""
    psi, pipe_wire, pipe_payload, dp_wire = launch.run(_one_step_traffic, 4, 2, 1, 2, 2, backend="gloo")[0]
    tokens = 64 // 2 // 2
    assert pipe_payload == pytest.approx(cost.pp_traffic_bytes(tokens, 64, 2, 2, 4, neighbours=1), abs=100)
    if dp_wire is None:
        pytest.skip("wire bytes cannot be read on this system")
    assert dp_wire == pytest.approx(cost.dp_traffic_bytes(psi, 0, 2, element_bytes=4), rel=0.15)
    assert math.isclose(pipe_wire, pipe_payload, rel_tol=0.15)  # no tp: the pipe's traffic is the sends


def test_attention_switch_drops_the_score_term():
    s, b, h, a = 2048, 1, 4096, 32
    sbh = s * b * h
    for tp, sp, without in [(1, False, 34), (8, False, 10 + 24 / 8), (8, True, 34 / 8)]:
        materialised = cost.activation_bytes_per_layer(s, b, h, a, tp, sp)
        for attention in ("flash", "selective"):
            assert cost.activation_bytes_per_layer(s, b, h, a, tp, sp, attention=attention) == pytest.approx(
                sbh * without
            )
        assert materialised == pytest.approx(sbh * (without + 5 * a * s / (h * tp)))
    with pytest.raises(ValueError, match="attention"):
        cost.activation_bytes_per_layer(s, b, h, a, attention="sparse")
    model = cost.PRESETS["7B"]
    flash = cost.estimate(model, cost.Strategy(dp=8, attention="flash"))
    assert flash.memory["activations"] == pytest.approx(34 * model.seq_len * model.hidden * model.layers)
    assert flash.memory["activations"] < cost.estimate(model, cost.Strategy(dp=8)).memory["activations"]
    assert any("attention" in p for p in cost.problems(model, cost.Strategy(attention="sparse")))
    # full recomputation keeps only the inputs, whatever the attention
    assert (
        cost.estimate(model, cost.Strategy(dp=8, recompute=True, attention="flash")).memory
        == cost.estimate(model, cost.Strategy(dp=8, recompute=True)).memory
    )


def test_full_recomputation_repeats_the_forward_all_reduces():
    model = cost.PRESETS["7B"]
    plain = cost.estimate(model, cost.Strategy(dp=8, tp=8))
    again = cost.estimate(model, cost.Strategy(dp=8, tp=8, recompute=True))
    assert again.traffic["tp"] == pytest.approx(1.5 * plain.traffic["tp"])  # 6 all-reduces per layer, not 4


def test_dp_traffic_with_micro_batches():
    one = {z: cost.dp_traffic_bytes(1e9, z, 8) for z in range(4)}
    four = {z: cost.dp_traffic_bytes(1e9, z, 8, microbatches=4) for z in range(4)}
    assert four[0] == one[0] and four[1] == one[1]  # the full gradient is accumulated locally
    assert four[2] == pytest.approx(one[2] * 5 / 2)  # a reduce-scatter per micro-batch + one gather
    assert four[3] == pytest.approx(one[3] * 4)  # everything per micro-batch
    est = cost.estimate(cost.PRESETS["7B"], cost.Strategy(dp=8, zero=2, microbatches=4))
    assert est.traffic["dp"] == pytest.approx(cost.dp_traffic_bytes(6.7e9, 2, 8, microbatches=4))
    assert any("every micro-batch" in n for n in est.notes)


def test_plan_calculator_redraws_and_explains(capsys):
    from course_lib import viz

    widget = viz.plan_calculator()
    assert "memory per GPU" in capsys.readouterr().out
    dp_control = widget.children[1].children[0]
    assert dp_control.description == "dp"
    dp_control.value = 16  # 16 · 4 · 2 ≠ 64 GPUs
    assert "cannot run" in capsys.readouterr().out
    labels = [c.description for box in widget.children[:2] for c in box.children]
    assert all(len(label) <= 12 for label in labels)
    slider = widget.children[2]
    assert slider.description == "micro-batches m" and slider.style.description_width == "initial"


def test_draw_plans_is_readable():
    from test_mesh import readable

    fig = cost.draw_plans(
        cost.PRESETS["70B"], {"a": cost.Strategy(dp=8, attention="flash"), "b": cost.Strategy(tp=8)}, 141e9
    )
    readable(fig)
