"""Chapter 08: routing with capacity, the all-to-all, the expert-parallel layer, and the checks."""

import pytest
import reference_answers
import torch
import torch.distributed as dist

from course_lib import launch, moe
from course_lib.checks import FAILED, NOT_ATTEMPTED
from course_lib.checks import moe as check
from course_lib.comm import count_traffic


def assert_close(got, want, rtol=1e-5, atol=1e-5):
    """torch.testing.assert_close, without it: it imports torch.distributed.tensor, and then every
    function sent to the ranks that says `torch.tensor` drags DTensor (~2 s per rank) along."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.allclose(got, want, rtol=rtol, atol=atol), (got - want).abs().max()


# ----------------------------------------------------------------------------
# route: hand-made cases


def test_k1_weight_is_the_probability_and_later_tokens_are_dropped_first():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.7, 0.1]])
    r = moe.route(probs.log(), k=1, capacity_factor=1.5)  # C = ceil(1·1.5·4/3) = 2
    assert r.capacity == 2
    assert r.expert_index[:, 0].tolist() == [0, 0, 0, 1]
    assert r.slot[:, 0].tolist() == [0, 1, -1, 0]  # token 2 comes third to expert 0
    assert_close(r.weight[:, 0], torch.tensor([0.7, 0.6, 0.0, 0.7]))
    assert r.tokens_per_expert.tolist() == [3, 1, 0] and r.num_dropped == 1


def test_k2_first_choices_before_second_and_weights_renormalised():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.15, 0.8, 0.05], [0.5, 0.1, 0.4]])  # no ties
    r = moe.route(probs.log(), k=2, capacity_factor=0.5)  # C = ceil(2·0.5·4/3) = 2
    assert r.capacity == 2
    assert r.expert_index.tolist() == [[0, 1], [0, 1], [1, 0], [0, 2]]
    # Token 3's first choice loses to tokens 0 and 1's first choices; token 1's second choice
    # loses to token 0's second choice (earlier token), token 2's to the full expert 0.
    assert r.slot.tolist() == [[0, 1], [1, -1], [0, -1], [-1, 0]]
    want = torch.tensor([[0.7 / 0.9, 0.2 / 0.9], [0.6 / 0.9, 0.0], [0.8 / 0.95, 0.0], [0.0, 0.4 / 0.9]])
    assert_close(r.weight, want)
    assert r.tokens_per_expert.tolist() == [4, 3, 1]  # before dropping
    assert r.num_dropped == 3


def test_lesson_worked_example():
    probs = torch.tensor(
        [
            [0.60, 0.25, 0.10, 0.05],
            [0.50, 0.10, 0.30, 0.10],
            [0.20, 0.55, 0.15, 0.10],
            [0.45, 0.35, 0.10, 0.10],
            [0.20, 0.10, 0.60, 0.10],
            [0.55, 0.05, 0.10, 0.30],
            [0.40, 0.30, 0.20, 0.10],
            [0.10, 0.20, 0.10, 0.60],
        ]
    )
    r = moe.route(probs.log(), k=2, capacity_factor=1.0)
    assert r.capacity == 4
    assert r.slot.tolist() == [[0, 1], [1, 1], [0, -1], [2, 2], [0, -1], [3, 1], [-1, 3], [0, -1]]
    assert r.tokens_per_expert.tolist() == [7, 5, 2, 2] and r.num_dropped == 4
    assert r.weight[6, 0] == 0 and r.weight[6, 1] == pytest.approx(0.3 / 0.7)


def test_routing_table_names_every_choice():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.15, 0.8, 0.05], [0.5, 0.1, 0.4]])
    table = moe.routing_table(moe.route(probs.log(), k=2, capacity_factor=0.5), probs).splitlines()
    assert len(table) == 5 and "choice 2" in table[0]
    assert "e0 (p=0.50), DROPPED, w=0.00" in table[4] and "e2 (p=0.40),  slot 0" in table[4]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_drops_never_beat_the_floor_and_an_even_router_sits_on_it(k):
    num_tokens, num_experts = 96, 8
    even = moe.round_robin_logits(num_tokens, num_experts, k)
    assert (
        moe.route(even, k, 100.0).tokens_per_expert.tolist() == [k * num_tokens // num_experts] * num_experts
    )
    random_logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(k))
    for cf in (0.25, 0.5, 0.75, 1.0, 1.5):
        floor = max(0.0, 1 - cf)  # k·cf·T/E is a whole number for these
        assert moe.route(even, k, cf).num_dropped / (k * num_tokens) == pytest.approx(floor, abs=1e-12)
        assert moe.route(random_logits, k, cf).num_dropped / (k * num_tokens) >= floor - 1e-12


def test_routing_explorer_redraws_on_every_move(monkeypatch):
    import IPython.display

    from course_lib import viz

    titles = []
    monkeypatch.setattr(IPython.display, "display", lambda fig: titles.append(fig.axes[0].get_title()))
    explorer = viz.routing_explorer()
    sliders = explorer.children[0].children
    assert all(s.layout.width == "420px" and s.style.description_width == "initial" for s in sliders)
    for slider, value in zip(sliders, (0.5, 1, 4, 0.0)):
        slider.value = value  # the callback runs here; an exception would propagate
    assert len(titles) == 5 and len(set(titles)) == 5  # the first draw, then one per move
    assert titles[-1].startswith("k = 1, E = 4, cf = 0.5, skew = 0")


def test_chapter_08_pictures_draw():
    from course_lib import viz

    routing = moe.route(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), 2, 1.0)
    viz.plot_expert_buffers(routing, "example").savefig(__import__("io").BytesIO())
    assigned, kept = torch.tensor([10, 6, 4, 4]), torch.tensor([8, 6, 4, 4])
    assert "2 of 24" in viz.plot_expert_load(assigned, kept, 4, 2).axes[0].get_title()
    fig = viz.plot_drop_curves([0.5, 1.0], {("even", 1): [0.5, 0.0], ("even", 2): [0.5, 0.0]}, 4, 8)
    assert len(fig.axes) == 2
    history = {"imbalance": [2.0, 1.5], "dropped": [10, 5], "task loss": [1.0, 0.5]}
    assert len(viz.plot_balance_training({"a": history, "b": history}).axes) == 3


def test_weights_are_differentiable_and_sum_to_one_for_k_at_least_2():
    logits = torch.randn(20, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    r = moe.route(logits, k=3, capacity_factor=100.0)
    assert r.num_dropped == 0
    assert_close(r.weight.sum(dim=1), torch.ones(20))
    r.weight[:, 0].sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "tokens, experts, k, cf, want",
    [(8, 4, 2, 1.0, 4), (4, 3, 1, 1.5, 2), (256, 8, 1, 1.25, 40), (10, 1, 1, 1.1, 11), (5, 4, 1, 1.0, 2)],
)
def test_capacity_is_ceil_k_cf_t_over_e(tokens, experts, k, cf, want):
    assert moe.expert_capacity(tokens, experts, k, cf) == want


def test_k_must_be_between_1_and_e():
    with pytest.raises(ValueError, match="k=5"):
        moe.route(torch.zeros(3, 4), k=5, capacity_factor=1.0)


def test_aux_loss_value_and_gradient():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 4, generator=g, requires_grad=True)
    r = moe.route(logits, k=2, capacity_factor=1.0)
    p = logits.detach().softmax(-1)
    f = torch.bincount(p.argmax(-1), minlength=4).float() / 16
    assert float(r.aux_loss.detach()) == pytest.approx(float(4 * (f * p.mean(0)).sum()), rel=1e-6)
    r.aux_loss.backward()
    # d/dlogits of E·Σᵢ fᵢ·mean_t pₜᵢ, with f held constant: softmax's Jacobian applied to E·f/T.
    want = 4 / 16 * (p * f - p * (p @ f).unsqueeze(1))
    assert_close(logits.grad, want)
    assert float(moe.load_balancing_loss(torch.full((8, 4), 0.25), (torch.arange(8) % 4).view(8, 1))) == 1.0
    collapsed = torch.tensor([[1.0, 0, 0, 0]]).repeat(8, 1)
    assert float(moe.load_balancing_loss(collapsed, torch.zeros(8, 1, dtype=torch.long))) == 4.0


# ----------------------------------------------------------------------------
# all-to-all from send/recv against dist.all_to_all_single


def _both_all_to_alls():
    rank, n = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(7 * n + rank)
    counts = [1 + (rank + 2 * j) % 3 for j in range(n)]  # uneven
    if n > 1:
        counts[rank] = 0  # an empty piece for oneself
    if n > 2:
        counts[(rank + 1) % n] = 0  # and one for a neighbour
    rows = torch.randn(sum(counts), 2, 3, generator=g)  # trailing dims kept
    mine, mine_counts = moe.all_to_all(rows, counts)
    ref, ref_counts = moe.builtin_all_to_all(rows, counts)
    ids = torch.arange(sum(counts)) + 100 * rank  # 1-D integers too
    mine_ids, _ = moe.all_to_all(ids, counts)
    ref_ids, _ = moe.builtin_all_to_all(ids, counts)
    return torch.equal(mine, ref), mine_counts == ref_counts, torch.equal(mine_ids, ref_ids), sum(mine_counts)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_all_to_all_from_send_recv_equals_all_to_all_single(n):
    results = launch.run(_both_all_to_alls, n, timeout=30)
    assert all(r[:3] == (True, True, True) for r in results), results
    assert sum(r[3] for r in results) > 0


def test_all_to_all_rejects_counts_that_do_not_add_up():
    with pytest.raises(ValueError, match="summing to the 3 rows"):
        moe.all_to_all(torch.zeros(3, 2), [2])


# ----------------------------------------------------------------------------
# the expert-parallel layer against the one-process loop

D, E = 6, 4


def _tokens(rank):
    return torch.randn(8 + 3 * rank, D, generator=torch.Generator().manual_seed(20 + rank))


def _layer_rank(cases):
    rank = dist.get_rank()
    out = []
    for k, cf in cases:
        gate, experts = moe.make_moe(D, E, 10, seed=1)
        layer = moe.MoELayer.from_dense(gate, experts, k, cf)
        x = _tokens(rank).requires_grad_()
        y = layer(x)
        (y.square().sum() + layer.last_routing.aux_loss).backward()
        out.append(
            (
                y,
                x.grad,
                gate.weight.grad,
                {n: p.grad for n, p in layer.experts.named_parameters()},
                layer.last_routing.num_dropped,
            )
        )
    return out


CASES = ((2, 1.0), (1, 1.25))


@pytest.mark.parametrize("n", [1, 2, 4])
def test_layer_output_and_every_gradient_equal_the_dense_loop(n):
    results = launch.run(_layer_rank, n, CASES, timeout=30)
    for case, (k, cf) in enumerate(CASES):
        gate, experts = moe.make_moe(D, E, 10, seed=1)
        for rank in range(n):
            x = _tokens(rank).requires_grad_()
            y = moe.dense_moe(x, gate, experts, k, cf)
            (y.square().sum() + moe.route(gate(x), k, cf).aux_loss).backward()
            got_y, got_x_grad = results[rank][case][:2]
            assert_close(got_y, y.detach())
            assert_close(got_x_grad, x.grad)
        assert_close(sum(r[case][2] for r in results), gate.weight.grad)
        per_rank = E // n
        for rank in range(n):
            for name, grad in results[rank][case][3].items():
                index, param = name.split(".", 1)
                want = dict(experts[rank * per_rank + int(index)].named_parameters())[param].grad
                want = torch.zeros_like(grad) if want is None else want  # an expert no token reached
                assert_close(grad, want)
        assert sum(r[case][4] for r in results) > 0, "the case should drop something"


def test_layer_without_a_process_group_is_the_dense_loop():
    gate, experts = moe.make_moe(D, E, 10, seed=1)
    layer = moe.MoELayer.from_dense(gate, experts, 2, 1.0)
    x = _tokens(0)
    assert_close(layer(x), moe.dense_moe(x, gate, experts, 2, 1.0))
    assert layer.last_routing.expert_index.shape == (x.shape[0], 2)


def test_experts_that_do_not_split_evenly_raise_value_error():
    with pytest.raises(launch.RankError) as error:
        launch.run(lambda: moe.MoELayer.from_dense(*moe.make_moe(D, 3), 1, 1.0), 2, timeout=30)
    assert error.value.exc_type == "ValueError" and "E=3 experts do not split evenly over N=2" in str(
        error.value
    )


# ----------------------------------------------------------------------------
# traffic: exactly the formula when routing is perfectly balanced


def _balanced_traffic(num_tokens, k):
    """Token t goes to experts t mod E, then t+1 mod E: every expert gets exactly k·T/E rows."""
    rank = dist.get_rank()
    gate, experts = moe.make_moe(E, E, 4, seed=0)
    with torch.no_grad():
        gate.weight.copy_(10 * torch.eye(E) + 5 * torch.eye(E).roll(1, dims=0))
    layer = moe.MoELayer.from_dense(gate, experts, k, capacity_factor=1.0)
    x = torch.eye(E).repeat(num_tokens // E, 1).roll(rank, dims=0)
    with count_traffic() as traffic:
        layer(x)
    return traffic.payload_sent, layer.last_routing.num_dropped, layer.last_routing.tokens_per_expert


@pytest.mark.parametrize("n, k", [(2, 1), (4, 2)])
def test_all_to_all_bytes_follow_the_formula(n, k):
    num_tokens = 16
    for sent, dropped, load in launch.run(_balanced_traffic, n, num_tokens, k, timeout=30):
        assert dropped == 0 and load.tolist() == [k * num_tokens // E] * E
        counts = (n - 1) * (E // n) * 8
        assert sent == 2 * moe.traffic_formula(num_tokens, k, E, n) + counts
    assert moe.traffic_formula(256, 2, 64, 4) == 98304


# ----------------------------------------------------------------------------
# the checks: the solutions pass, mistakes get a specific line, stubs read "not attempted"


@pytest.fixture(scope="module")
def solution():
    return reference_answers.load("08_moe")


# That every reference answer passes its check is tested once, through the grader: tests/test_course.py.


def stub(*args):
    raise NotImplementedError("exercise: replace this line with your code")


@pytest.mark.parametrize("name", ["top_k_gate", "assign_slots", "all_to_all", "moe_forward"])
def test_stubs_read_not_attempted(name):
    assert getattr(check, name)(stub).status == NOT_ATTEMPTED


@pytest.mark.mistake("8.1")
def test_gate_without_renormalisation_is_told_so():
    def raw_probabilities(logits, k):
        p, i = logits.softmax(-1).topk(k)
        return i, p

    result = check.top_k_gate(raw_probabilities)
    assert result.status == FAILED
    assert result.message.startswith("T=12, E=6, k=2: token 0, choice 0 (expert 4): weight expected ")
    assert "divide the chosen probabilities by their sum" in result.message


@pytest.mark.mistake("8.2")
def test_token_major_slots_are_named():
    def token_major(expert_index, num_experts, capacity):
        slot, filled = torch.full_like(expert_index, -1), [0] * num_experts
        for t, row in enumerate(expert_index.tolist()):
            for j, e in enumerate(row):
                if filled[e] < capacity:
                    slot[t, j] = filled[e]
                filled[e] += 1
        return slot

    result = check.assign_slots(token_major)
    assert result.status == FAILED
    assert result.message.startswith("E=3, C=2, k=2: token 0, choice 1 (expert 1): slot expected 1, got 0")
    assert "first choice a slot before any token's second choice" in result.message


def test_library_route_is_switched_off_in_the_check():
    result = check.assign_slots(lambda ei, num_experts, c: moe.assign_slots(ei, num_experts, c))
    assert result.status == FAILED and "you called moe.assign_slots" in result.message


@pytest.mark.mistake("8.3")
def test_all_to_all_diagnostics(solution):
    all_to_all = solution.all_to_all  # closures carry the function, not the module

    def reversed_rows(rows, send_counts):
        received, counts = all_to_all(rows, send_counts)
        return received.flip(0), counts

    result = check.all_to_all(reversed_rows)
    assert result.status == FAILED and result.message.startswith(
        "N=2, rank 0: received row 0 expected [0, 0, 0]"
    )
    assert "row 2 that rank 0 sent to rank 0); keep each sender's rows in the order it sent them" in (
        result.message
    )

    def built_in(rows, send_counts):
        out = torch.empty_like(rows)
        dist.all_to_all_single(out, rows)
        return out, send_counts

    result = check.all_to_all(built_in)
    assert result.status == FAILED and "you called dist.all_to_all_single" in result.message

    result = check.all_to_all(lambda rows, send_counts: moe.all_to_all(rows, send_counts))
    assert result.status == FAILED and "you called moe.all_to_all" in result.message


@pytest.mark.mistake("8.4")
def test_forward_without_weights_and_with_global_capacity_are_located(solution):
    source = reference_answers.sources("08_moe")["moe_forward"]

    def variant(old, new):
        namespace = dict(vars(solution))  # a copy: the variant must not replace the shared answer
        exec(source.replace(old, new), namespace)
        return namespace["moe_forward"]

    result = check.moe_forward(variant("weight * back", "back"))
    assert result.status == FAILED and result.message.startswith("N=1, k=2, cf=1.0: rank 0: token 0 ")
    assert "multiply each expert's output by its combine weight" in result.message
    result = check.moe_forward(variant("capacity_factor)\n", "capacity_factor * n)\n"))
    assert result.status == FAILED and result.message.startswith("N=2, k=2, cf=1.0: rank 0: token 3 ")
    assert "C = ceil(k·cf·T/E) = 3" in result.message
