"""Chapter 06b: pipeline schedules past 1F1B, as per-rank action lists that a simulator plays
out and a runtime runs on real ranks: interleaved 1F1B, ZB-H1 (backward split into an
input-gradient pass I and a weight-gradient pass W) and DualPipe-V.

    actions = pp.schedule("zb-h1", p, m)              # per rank: [("F", 0, 0), ("I", 0, 0), ...]
    sim = pp.simulate(actions, t_f=1, t_b=2, t_w=1)   # .bubble_time, .peak_activations, ...
    stages = pp.partition(model, rank, p, num_virtual=2, schedule="interleaved-1f1b")
    loss = pp.train_step(stages, x, y, F.mse_loss, m, schedule="interleaved-1f1b")

An action is ``(kind, microbatch, stage)``: kind "F" (forward), "B" (full backward), "I"
(backward for the input only) or "W" (backward for the weights only); ``stage`` is the global
index of a (virtual) stage, 0 … S−1, in the order a micro-batch passes them. Notation: p ranks,
m micro-batches, v (virtual) stages per rank, S = p·v stages; t_f, t_b, t_w the time of one
micro-batch's forward, full backward and weight-gradient pass on one stage (the input part
of a split backward takes t_b − t_w).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from course_lib import pipeline_parallel as _pp
from course_lib.p2p import global_rank, recv_header, send_header

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence

NAMES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "dualpipe-v")
#: The schedules that split a backward into I and W (the others have no W to measure).
SPLIT_BACKWARD = ("zb-h1", "dualpipe-v")
KINDS = ("F", "B", "I", "W")

# ----------------------------------------------------------------------------
# where the stages live


def _check_name(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"unknown schedule {name!r}: choose one of {NAMES}")
    return name


def virtual_stages(name: str, num_virtual: int = 1) -> int:
    """How many stages each rank holds under schedule ``name`` (v)."""
    _check_name(name)
    if isinstance(num_virtual, bool) or not isinstance(num_virtual, int) or num_virtual < 1:
        raise ValueError(f"num_virtual must be a positive integer, got {num_virtual!r}")
    if name == "dualpipe-v":
        if num_virtual not in (1, 2):
            raise ValueError(f"DualPipe-V holds exactly two stages per rank, got num_virtual={num_virtual}")
        return 2
    if name != "interleaved-1f1b" and num_virtual != 1:
        raise ValueError(f"{name} holds one stage per rank; num_virtual > 1 needs 'interleaved-1f1b'")
    return num_virtual


def stage_ranks(name: str, num_stages: int, num_virtual: int = 1) -> list[int]:
    """The rank holding each of the S = p·v stages: interleaved stage s on rank s mod p
    (a loop), DualPipe-V stages s and 2p−1−s on rank s (a V), otherwise stage s on rank s."""
    v, p = virtual_stages(name, num_virtual), num_stages
    if name == "dualpipe-v":
        return [s if s < p else 2 * p - 1 - s for s in range(2 * p)]
    return [s % p for s in range(p * v)]


def stages_of_rank(name: str, rank: int, num_stages: int, num_virtual: int = 1) -> list[int]:
    """The stages rank ``rank`` holds, in increasing order (its virtual-stage order)."""
    return [s for s, r in enumerate(stage_ranks(name, num_stages, num_virtual)) if r == rank]


# ----------------------------------------------------------------------------
# the schedules: one ordered list of actions per rank


def interleaved_1f1b_schedule(num_stages: int, num_microbatches: int, num_virtual: int = 2) -> list:
    """Megatron's interleaved 1F1B: rank r holds stages r, r+p, …, r+(v−1)p.

    Forwards go in rounds of p micro-batches: the round's p micro-batches through the
    rank's first stage, then the same p through its second, …; backwards take the stages
    in reverse. Rank r warms up with (p−r−1)·2 + (v−1)·p forwards (at most m·v), then
    alternates one forward, one backward, then drains the backwards. m must be a multiple
    of p (as in Megatron-LM); with v = 1 this is 1F1B.
    """
    p, m = _pp._check_sizes(num_stages, num_microbatches)
    v = virtual_stages("interleaved-1f1b", num_virtual)
    if v == 1:
        return [[(kind, i, s) for kind, i in row] for s, row in enumerate(_pp.one_f_one_b_schedule(p, m))]
    if m % p:
        raise ValueError(
            f"interleaved 1F1B runs micro-batches in rounds of p = {p}: m = {m} is not a multiple "
            f"of p (Megatron-LM requires it too); use m = {m + p - m % p} or {m - m % p or p}"
        )
    schedule = []
    for r in range(p):

        def forward(k, r=r):  # the k-th forward of rank r
            round_, within = divmod(k, p * v)
            return ("F", round_ * p + within % p, (within // p) * p + r)

        def backward(k, r=r):  # the k-th backward: the same rounds, stages in reverse
            round_, within = divmod(k, p * v)
            return ("B", round_ * p + within % p, (v - 1 - within // p) * p + r)

        total = m * v
        warmup = min((p - r - 1) * 2 + (v - 1) * p, total)
        actions = [forward(k) for k in range(warmup)]
        for k in range(total - warmup):
            actions += [forward(warmup + k), backward(k)]
        actions += [backward(k) for k in range(total - warmup, total)]
        schedule.append(actions)
    return schedule


def zb_h1_schedule(num_stages: int, num_microbatches: int) -> list:
    """ZB-H1 (Qi et al., 2024): 1F1B with each backward split into I (input gradient, on the
    critical path) and W (weight gradient, which nothing waits for).

    Rank r warms up with min(p−r−1, m) forwards like 1F1B, then alternates F and I; its
    k-th I is followed by a W only from k ≥ r on, so rank r carries r weight-gradient passes
    into the cool-down, where they fill the gaps between backwards. At most p micro-batches
    are alive on any rank, as on 1F1B's first stage.
    """
    p, m = _pp._check_sizes(num_stages, num_microbatches)
    schedule = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        actions = [("F", i, r) for i in range(warmup)]
        waiting = deque()  # micro-batches whose W is still to run
        for k in range(m):
            if warmup + k < m:
                actions.append(("F", warmup + k, r))
            actions.append(("I", k, r))
            waiting.append(k)
            if k >= r:
                actions.append(("W", waiting.popleft(), r))
        actions += [("W", i, r) for i in waiting]
        schedule.append(actions)
    return schedule


def dualpipe_v_schedule(num_stages: int, num_microbatches: int) -> list:
    """DualPipe-V (DeepSeek's DualPipe cut in half): p ranks, 2p stages in a V, rank r holds
    stage r (on the way down) and stage 2p−1−r (on the way back); the loss is on rank 0.

    The order follows DeepSeek's DualPipeV in eight phases; each "F&B" pair, which DeepSeek
    overlaps on a GPU, runs here as a forward then a backward. m ≥ 2p.
    """
    p, m = _pp._check_sizes(num_stages, num_microbatches)
    if m < 2 * p:
        raise ValueError(f"DualPipe-V needs m >= 2p = {2 * p} micro-batches (one per stage), got m = {m}")
    schedule = []
    for r in range(p):
        down, up = r, 2 * p - 1 - r
        actions, counts, waiting = [], {}, deque()

        def act(kind, stage, actions=actions, counts=counts, waiting=waiting):
            key = ("F" if kind == "F" else "backward", stage)
            i = counts[key] = counts.get(key, -1) + 1
            actions.append((kind, i, stage))
            if kind == "I":
                waiting.append((i, stage))

        def weight(actions=actions, waiting=waiting):
            if waiting:
                i, stage = waiting.popleft()
                actions.append(("W", i, stage))

        for _ in range(2 * (p - r - 1)):  # 1: forwards down the V
            act("F", down)
        for _ in range(r + 1):  # 2: both stages
            act("F", down)
            act("F", up)
        for _ in range(p - r - 1):  # 3: zero-bubble steps on the way up
            act("I", up)
            weight()
            act("F", up)
        for _ in range(m - 2 * p + r + 1):  # 4: the steady state, two F&B pairs
            act("F", down)
            act("B", up)
            act("F", up)
            act("B", down)
        for _ in range(p - r - 1):  # 5
            act("B", up)
            act("F", up)
            act("B", down)
        split, half = False, (r + 1) // 2
        for j in range(r + 1):  # 6: backwards, split from half-way on
            split = split or (j == half and r % 2 == 1)
            act("I" if split else "B", up)
            split = split or (j == half and r % 2 == 0)
            act("I" if split else "B", down)
        for _ in range(p - r - 1):  # 7
            weight()
            act("I", down)
        while waiting:  # 8: the weight gradients left over
            weight()
        schedule.append(actions)
    return schedule


def schedule(name: str, num_stages: int, num_microbatches: int, num_virtual: int = 1) -> list:
    """Each rank's ordered actions ``(kind, microbatch, stage)`` under schedule ``name``.

    ``num_stages`` is p, the number of ranks in the pipeline; ``num_virtual`` the stages per
    rank of interleaved 1F1B (DualPipe-V always has two).
    """
    v = virtual_stages(name, num_virtual)
    p, m = _pp._check_sizes(num_stages, num_microbatches)
    if name in ("gpipe", "1f1b"):
        return [[(kind, i, r) for kind, i in row] for r, row in enumerate(_pp.SCHEDULES[name](p, m))]
    if name == "interleaved-1f1b":
        return interleaved_1f1b_schedule(p, m, v)
    if name == "zb-h1":
        return zb_h1_schedule(p, m)
    return dualpipe_v_schedule(p, m)


# ----------------------------------------------------------------------------
# the validator and the simulator


def _needs(action, last_stage: int) -> list:
    """The events ``action`` waits for: ("F", i, s) a forward done, ("G", i, s) the gradient of
    stage s's input computed (by its B or its I), ("W", i, s) a weight gradient done."""
    kind, i, s = action
    if kind == "F":
        return [("F", i, s - 1)] if s > 0 else []
    if kind == "W":
        return [("G", i, s)]
    return [("F", i, s)] + ([("G", i, s + 1)] if s < last_stage else [])


def _event(action):
    kind, i, s = action
    return ("G" if kind in "BI" else kind, i, s)


def _show_event(event, ranks) -> str:
    kind, i, s = event
    what = {"F": "the forward", "G": "the input gradient (B or I)", "W": "the weight gradient"}[kind]
    return f"{what} of micro-batch {i} on stage {s} (rank {ranks[s]})"


def validate(schedule: Sequence[Sequence[tuple[str, int, int]]]) -> tuple[int, list[int]]:
    """(m, the rank of each stage), or ValueError naming the first action that breaks a rule.

    Every stage lives on one rank; each (micro-batch, stage) runs one F and either one B or
    one I and one W; on its rank an action comes after what it needs there (a W after its
    I, a backward after its forward); and the ranks together cannot deadlock.
    """
    if not isinstance(schedule, (list, tuple)) or not schedule:
        raise ValueError("a schedule is a non-empty list with one list of actions per rank")
    ranks = {}
    for r, actions in enumerate(schedule):
        if not isinstance(actions, (list, tuple)):
            raise ValueError(f"rank {r}: expected a list of actions, got {type(actions).__name__}")
        for a in actions:
            if not (
                isinstance(a, (list, tuple))
                and len(a) == 3
                and a[0] in KINDS
                and all(type(x) is int and x >= 0 for x in a[1:])
            ):
                raise ValueError(
                    f"rank {r}: {a!r} is not an action like ('F', 0, 0): (kind in FBIW, i, stage)"
                )
            if ranks.setdefault(a[2], r) != r:
                raise ValueError(
                    f"stage {a[2]} appears on rank {ranks[a[2]]} and on rank {r}: a stage lives on one rank"
                )
    num_stages = max(ranks) + 1
    missing = sorted(set(range(num_stages)) - set(ranks))
    if missing:
        raise ValueError(f"no rank runs stage {missing[0]}: the stages must be 0 … {num_stages - 1}")
    stage_rank = [ranks[s] for s in range(num_stages)]
    seen = {}
    for r, actions in enumerate(schedule):
        for a in actions:
            seen.setdefault(tuple(a), []).append(r)
    m = 1 + max(i for _, i, _ in seen)
    for i in range(m):
        for s in range(num_stages):
            r = stage_rank[s]
            has = {k: len(seen.get((k, i, s), [])) for k in KINDS}
            if has["F"] != 1:
                raise ValueError(f"rank {r} runs ('F', {i}, {s}) {has['F']} times: every forward runs once")
            full, split = has["B"], (has["I"], has["W"])
            if not ((full == 1 and split == (0, 0)) or (full == 0 and split == (1, 1))):
                raise ValueError(
                    f"rank {r}: micro-batch {i} on stage {s} has {full} B, {split[0]} I and {split[1]} W: "
                    f"its backward is one B, or one I and one W (an I needs its W, a W its I)"
                )
    for r, actions in enumerate(schedule):
        done = set()
        for a in actions:
            for need in _needs(tuple(a), num_stages - 1):
                if stage_rank[need[2]] == r and need not in done:
                    raise ValueError(
                        f"rank {r} runs {tuple(a)} before {_show_event(need, stage_rank)}, which it "
                        f"needs: move it after that"
                    )
            done.add(_event(tuple(a)))
    _play(schedule, stage_rank, lambda a: 1.0)  # raises if the ranks wait on each other in a circle
    return m, stage_rank


def fb_pairs(actions: Sequence[tuple[str, int, int]]) -> set[int]:
    """Positions k in one rank's actions where a forward is followed by the backward (B or I) of
    another of the rank's stages: the "F&B" blocks DualPipe overlaps on a GPU."""
    return {
        k
        for k, (a, b) in enumerate(zip(actions, actions[1:]))
        if a[0] == "F" and b[0] in "BI" and a[2] != b[2]
    }


def _play(schedule, stage_rank, duration, describe=None, pairs=None, latency=0.0):
    """Every rank runs its actions in order, each as soon as what it needs has finished.

    Returns (per rank: [(action, start, end)], total time); a deadlock raises ValueError with
    ``describe(rank, action, missing events)`` for each waiting rank. ``latency``: what comes
    from another rank arrives that many seconds after the action that made it ends."""
    describe = describe or (
        lambda r, action, missing: (
            f"rank {r} waits at {action} for " + " and ".join(_show_event(n, stage_rank) for n in missing)
        )
    )
    p, last = len(schedule), len(stage_rank) - 1
    orders = [[tuple(a) for a in actions] for actions in schedule]
    finished, clock, position = {}, [0.0] * p, [0] * p
    timeline = [[] for _ in range(p)]
    pairs = pairs or [set()] * p
    while any(position[r] < len(orders[r]) for r in range(p)):
        progressed = False
        for r in range(p):
            while position[r] < len(orders[r]):
                k = position[r]
                block = orders[r][k : k + 2] if k in pairs[r] else orders[r][k : k + 1]
                needs = [n for a in block for n in _needs(a, last) if n != _event(block[0])]
                if any(n not in finished for n in needs):
                    break
                start = max(
                    [clock[r]] + [finished[n] + (latency if stage_rank[n[2]] != r else 0.0) for n in needs]
                )
                for action in block:  # a pair starts when both its inputs are here
                    clock[r] = finished[_event(action)] = start + duration(action)
                    timeline[r].append((action, start, clock[r]))
                    start = clock[r]
                position[r] += len(block)
                progressed = True
        if not progressed:
            waits = [
                describe(r, action, [n for n in _needs(action, last) if n not in finished])
                for r in range(p)
                if position[r] < len(orders[r])
                for action in [orders[r][position[r]]]
            ]
            raise ValueError("the schedule deadlocks: " + "; ".join(waits))
    return timeline, max(clock)


@dataclass
class ScheduleSimulation(_pp.Simulation):
    #: Mean idle time per rank: total_time − (each rank's busy time, averaged).
    bubble_time: float = 0.0
    #: Per rank: point-to-point messages it sends in one step (activations and gradients).
    messages: list | None = None
    #: The rank of each stage.
    stage_rank: list | None = None


def _per_stage(value, count: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count or any(not isinstance(x, (int, float)) or x < 0 for x in values):
        raise ValueError(
            f"{name} must be a time >= 0 or a list of {count} of them (one per stage), got {value!r}"
        )
    return [float(x) for x in values]


def simulate(
    schedule: Sequence[Sequence[tuple[str, int, int]]],
    t_f: float | Sequence[float] = 1.0,
    t_b: float | Sequence[float] = 2.0,
    t_w: float | Sequence[float] | None = None,
    *,
    fb_pairs_together: bool = False,
    latency: float = 0.0,
    durations: Mapping[tuple[str, int, int], float] | None = None,
) -> ScheduleSimulation:
    """Play ``schedule`` out on an idealised machine (by default no communication cost; each
    rank does one action at a time, in its order, as soon as the action's inputs exist).

    ``t_f``, ``t_b`` (full backward) and ``t_w`` (weight gradient) are one micro-batch's times
    on one stage: a number, or a list with one per stage. An I takes t_b − t_w; ``t_w=None``
    means t_b / 2. Raises ValueError when the schedule is not valid (see :func:`validate`).
    ``fb_pairs_together=True`` starts each :func:`fb_pairs` pair only when both of its inputs
    are here, as DualPipe's overlapped F&B blocks do (run one after the other, t_f + t_b).
    ``latency`` (seconds): a message between two ranks arrives that long after the action that
    sends it ends. ``durations`` maps actions to the seconds they take, overriding t_f, t_b,
    t_w for those (e.g. the times a run on real ranks measured: :func:`measured_durations`).
    """
    if not (isinstance(latency, (int, float)) and latency >= 0):
        raise ValueError(f"latency must be a time >= 0 in seconds, got {latency!r}")
    m, stage_rank = validate(schedule)
    num_stages = len(stage_rank)
    t_f, t_b = _per_stage(t_f, num_stages, "t_f"), _per_stage(t_b, num_stages, "t_b")
    t_w = [b / 2 for b in t_b] if t_w is None else _per_stage(t_w, num_stages, "t_w")
    if any(w > b for w, b in zip(t_w, t_b)):
        raise ValueError(f"t_w (the weight part of the backward) cannot exceed t_b: {t_w} > {t_b}")
    times = {"F": t_f, "B": t_b, "I": [b - w for b, w in zip(t_b, t_w)], "W": t_w}
    pairs = [fb_pairs(actions) for actions in schedule] if fb_pairs_together else None
    durations = durations or {}

    def duration(a):
        return durations[a] if a in durations else times[a[0]][a[2]]

    timeline, total = _play(schedule, stage_rank, duration, pairs=pairs, latency=float(latency))
    busy = [sum(end - start for _, start, end in row) for row in timeline]
    p = len(schedule)
    return ScheduleSimulation(
        timeline=timeline,
        total_time=total,
        bubble_fraction=1 - sum(busy) / (p * total) if total > 0 else 0.0,
        peak_activations=[peak_alive(actions) for actions in schedule],
        bubble_time=total - sum(busy) / p,
        messages=messages_per_rank(schedule, stage_rank),
        stage_rank=stage_rank,
    )


def peak_alive(actions: Iterable[tuple]) -> int:
    """Most (micro-batch, stage) activations alive at once on a rank: a forward adds one, a
    full backward or a weight-gradient pass frees one (an I keeps what its W will need)."""
    alive = peak = 0
    for kind, *_ in actions:
        alive += {"F": 1, "B": -1, "W": -1}.get(kind, 0)
        peak = max(peak, alive)
    return peak


def messages_per_rank(
    schedule: Sequence[Sequence[tuple[str, int, int]]], stage_rank: Sequence[int]
) -> list[int]:
    """Point-to-point messages each rank sends per step: a forward's output when the next
    stage lives on another rank, an input gradient when the previous stage does."""
    last = len(stage_rank) - 1
    counts = []
    for r, actions in enumerate(schedule):
        n = 0
        for kind, _, s in actions:
            if kind == "F" and s < last and stage_rank[s + 1] != r:
                n += 1
            if kind in "BI" and s > 0 and stage_rank[s - 1] != r:
                n += 1
        counts.append(n)
    return counts


def bubble_formula(name: str, p: int, t_f: float = 1.0, t_b: float = 2.0, t_w: float | None = None) -> float:
    """The idle time per rank the sources state, in one stage's times t_f, t_b, t_w
    (for interleaving and DualPipe-V, one virtual stage's):

    1F1B and GPipe (p−1)(F+B); interleaved (p−1)(F+B)/v, which is (p−1)(t_f+t_b) in one
    virtual stage's times; ZB-H1 (p−1)(F+B−2W); DualPipe-V (PP/2−1)(F&B+B−3W) with PP = 2p
    stages and F&B = t_f + t_b here, since this machine runs the pair one after the other.
    """
    _check_name(name)
    t_w = t_b / 2 if t_w is None else t_w
    if name == "zb-h1":
        return (p - 1) * (t_f + t_b - 2 * t_w)
    if name == "dualpipe-v":
        return (2 * p / 2 - 1) * ((t_f + t_b) + t_b - 3 * t_w)
    return (p - 1) * (t_f + t_b)


# ----------------------------------------------------------------------------
# splitting a model into (virtual) stages


def partition(
    model: nn.Sequential, rank: int, world_size: int, num_virtual: int = 1, schedule: str = "1f1b"
) -> nn.Sequential | list[nn.Sequential]:
    """Rank ``rank``'s stages of ``model``: one ``nn.Sequential`` for one stage per rank (as
    chapter 06), else a list of them in stage order. The model is cut into S = p·v contiguous
    stages of nearly equal parameter count; rank r holds the stages :func:`stages_of_rank` names.
    """
    v = virtual_stages(schedule, num_virtual)
    if v == 1:
        return _pp._partition_one(model, rank, world_size)
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"partition() splits an nn.Sequential, got {type(model).__name__}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    count = world_size * v
    if len(model) < count:
        raise ValueError(
            f"cannot split {len(model)} layer(s) into p·v = {world_size}·{v} = {count} stages: every "
            f"stage needs at least one layer (use fewer ranks, fewer virtual stages or a deeper model)"
        )
    costs = [sum(q.numel() for q in layer.parameters()) for layer in model]
    bounds = _pp.partition_bounds(costs, count)
    return [model[slice(*bounds[s])] for s in stages_of_rank(schedule, rank, world_size, v)]


# ----------------------------------------------------------------------------
# the split backward: a linear layer's input gradient now, its weight gradient later


def input_gradient(grad_output: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x·Wᵀ + b, so ∂L/∂x = ∂L/∂y · W."""
    return grad_output @ weight


def weight_gradient(grad_output: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂W, ∂L/∂b) = (∂L/∂yᵀ · x, Σ over rows of ∂L/∂y), rows being every leading dim."""
    g, x = grad_output.reshape(-1, grad_output.shape[-1]), x.reshape(-1, x.shape[-1])
    return g.t() @ x, g.sum(0)


class WeightGradients:
    """Weight-gradient work waiting for its W, per (micro-batch, stage).

    ``with store.deferring(key): out.backward(g)`` runs a backward whose split layers hand
    their weight gradients to ``key`` instead of computing them; ``store.run(key)`` does them.
    """

    _active: list = []  # the store and key the running backward defers to (innermost last)

    def __init__(self):
        self.pending = {}

    @contextlib.contextmanager
    def deferring(self, key: Hashable) -> Iterator[WeightGradients]:
        self.pending.setdefault(key, [])
        WeightGradients._active.append((self, key))
        try:
            yield self
        finally:
            WeightGradients._active.pop()

    @staticmethod
    def defer(work: Callable[[], Any]) -> bool:
        """Queue ``work`` (no arguments) for the active key; False when nothing is deferring."""
        if not WeightGradients._active:
            return False
        store, key = WeightGradients._active[-1]
        store.pending[key].append(work)
        return True

    def run(self, key: Hashable) -> int:
        """Do the weight-gradient work queued for ``key``; returns how many pieces ran."""
        if key not in self.pending:
            raise KeyError(f"no input-gradient pass (I) ran for {key}: its W has nothing to do")
        work = self.pending.pop(key)
        for piece in work:
            piece()
        return len(work)


def _accumulate(param, grad):
    if param is not None and param.requires_grad:
        if param.grad is None:
            param.grad = grad.detach().clone()
        else:
            param.grad.add_(grad)


class _SplitLinear(torch.autograd.Function):
    """``F.linear`` whose backward returns the input gradient now and leaves the weights'
    gradient as work for the active :class:`WeightGradients` (or does it at once if none)."""

    @staticmethod
    def forward(ctx, x, weight, bias, fns):
        ctx.save_for_backward(x)
        ctx.weight, ctx.bias, ctx.fns = weight, bias, fns
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        weight, bias, (in_fn, w_fn) = ctx.weight, ctx.bias, ctx.fns
        grad_x = in_fn(grad_output, weight.detach()) if ctx.needs_input_grad[0] else None

        g, x = grad_output.detach(), x.detach()

        def weights():
            grad_w, grad_b = w_fn(g, x)
            _accumulate(weight, grad_w)
            if bias is not None:
                _accumulate(bias, grad_b)

        if not WeightGradients.defer(weights):
            weights()
        return grad_x, None, None, None


class SplitBackward(torch.overrides.TorchFunctionMode):
    """Inside this block every ``F.linear`` (so every ``nn.Linear``) records a split backward:
    a backward run under :meth:`WeightGradients.deferring` computes only input gradients.
    ``fns`` = (input_gradient, weight_gradient) to use (the exercise plugs in its own)."""

    def __init__(self, fns=None):
        super().__init__()
        self.fns = fns or (input_gradient, weight_gradient)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and torch.is_grad_enabled():
            x, weight, *rest = args
            bias = rest[0] if rest else kwargs.get("bias")
            return _SplitLinear.apply(x, weight, bias, self.fns)
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------
# the runtime: one rank runs its actions of any valid schedule


def _tag(kind: str, i: int, s: int, num_stages: int) -> int:
    """A message's tag: gloo matches each receive with the send of the same tag."""
    return 2 + 2 * (i * num_stages + s) + (kind == "grad")


def train_step(
    stages: nn.Module | Sequence[nn.Module],
    inputs: torch.Tensor | None,
    targets: torch.Tensor | None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    num_microbatches: int,
    schedule: str = "1f1b",
    group: dist.ProcessGroup | None = None,
    *,
    num_virtual: int | None = None,
    timeline: list | None = None,
    split_fns: tuple[Callable[..., Any], Callable[..., Any]] | None = None,
    fb_pairs_together: bool = False,
    live: list | None = None,
) -> torch.Tensor | None:
    """One training step of schedule ``schedule``; call it on every rank of ``group`` with
    its stages (one module, or a list in stage order as :func:`partition` returns).

    ``inputs`` are used by the rank holding stage 0, ``targets`` by the rank holding the last
    stage (rank p−1, or rank 0 for DualPipe-V); others may pass None. Each micro-batch's loss
    is divided by m, so gradients equal one process on the whole batch with a mean loss; they
    accumulate into ``.grad``. Returns the batch's loss on the rank with the last stage, else
    None. Messages carry tags (gloo matches them by tag, whatever the order of sends).
    ``timeline`` (a list) receives ``(action, start, end)`` per action, ``time.perf_counter``.
    ``split_fns`` = (input_gradient, weight_gradient) for the split backward (default ours);
    ``fb_pairs_together=True`` receives a pair's gradient before its forward, so each
    :func:`fb_pairs` pair starts when both inputs are here (DualPipe's F&B blocks).
    ``live`` (a list) receives, after each action, how many (micro-batch, stage) activations
    this rank still holds: forwards whose backward has not run, and I's waiting for their W.
    """
    _check_name(schedule)
    modules = list(stages) if isinstance(stages, (list, tuple)) else [stages]
    v = num_virtual if num_virtual is not None else len(modules)
    v = virtual_stages(schedule, v)
    rank, p = dist.get_rank(group), dist.get_world_size(group)
    _, m = _pp._check_sizes(p, num_microbatches)
    actions = globals()["schedule"](schedule, p, m, v)[rank]
    stage_rank = stage_ranks(schedule, p, v)
    mine = stages_of_rank(schedule, rank, p, v)
    if len(modules) != len(mine):
        raise ValueError(
            f"rank {rank} holds {len(mine)} stage(s) {mine} under {schedule!r} with v = {v}, "
            f"but got {len(modules)} module(s): pass partition(model, rank, p, {v}, {schedule!r})"
        )
    module_of = dict(zip(mine, modules))
    last = len(stage_rank) - 1
    if 0 in mine and inputs is None or last in mine and targets is None:
        raise ValueError("the rank with stage 0 needs inputs and the rank with the last stage needs targets")
    micro_inputs = None if inputs is None else _pp._split(inputs, m, "inputs")
    micro_targets = None if targets is None else _pp._split(targets, m, "targets")
    split = {(i, s) for kind, i, s in actions if kind == "I"}
    device = next(modules[0].parameters(), torch.empty(0)).device
    peer = {s: global_rank(group, r) for s, r in enumerate(stage_rank)}
    store = WeightGradients()
    saved = {}  # (i, s) -> (stage input, stage output or loss)
    local = {}  # ("act" | "grad", i, s) -> a tensor handed between two stages of this rank
    shapes = {}  # boundary s -> (shape, dtype) of what stage s sends on
    headers_sent, in_flight = set(), []
    total_loss = torch.zeros((), device=device)
    pairs = fb_pairs(actions) if fb_pairs_together else set()

    # Every receive is posted ahead (irecv): a message that arrives before its action is needed
    # lands in its buffer at once, and the action finds it there. A receive posted only when
    # the action starts costs a round through gloo's own thread even for a message that arrived
    # long before (milliseconds on a busy machine; measured in the lesson).
    posted = {}  # ("act" | "grad", i, s) -> (request, buffer) of a receive posted ahead
    next_forward = {}  # (i, s) -> the micro-batch of this rank's next forward of stage s
    for s in mine:
        order = [i for kind, i, t in actions if kind == "F" and t == s]
        next_forward.update(zip(((i, s) for i in order), order[1:]))

    def post(kind, i, s, buffer, src):
        request = dist.irecv(buffer, src, group=group, tag=_tag(kind, i, s, last + 1))
        posted[kind, i, s] = request, buffer

    def post_input(i, s):
        if i is not None and ("act", i, s) not in posted:
            shape, dtype = shapes[s - 1]
            post("act", i, s, torch.empty(shape, dtype=dtype, device=device), peer[s - 1])

    def receive_input(i, s):  # forward (i, s)'s input, s > 0
        if stage_rank[s - 1] == rank:
            return local.pop(("act", i, s)).detach().requires_grad_()
        if s - 1 not in shapes:
            shapes[s - 1] = recv_header(peer[s - 1], group, device)
        post_input(i, s)
        request, x = posted.pop(("act", i, s))
        request.wait()
        return x.requires_grad_()

    def receive_gradient(i, s):  # the gradient of stage s's output for micro-batch i, s < last
        if stage_rank[s + 1] == rank:
            return local.pop(("grad", i, s))
        request, grad = posted.pop(("grad", i, s))
        request.wait()
        return grad

    early = {}  # (i, s) -> an output gradient received before a pair's forward
    for k, action in enumerate(actions):
        kind, i, s = action
        if k in pairs and actions[k + 1][2] < last:
            _, j, t = actions[k + 1]
            early[j, t] = receive_gradient(j, t)
        send = None  # (tensor, to stage, kind): what this action sends to another rank, last
        if kind == "F":
            x = micro_inputs[i] if s == 0 else receive_input(i, s)
            start = ACTION_CLOCK.begin(kind)  # the action starts when its inputs are here
            if s > 0 and stage_rank[s - 1] != rank:
                post_input(next_forward.get((i, s)), s)  # the next input's receive, ahead
            with SplitBackward(split_fns) if (i, s) in split else contextlib.nullcontext():
                y = module_of[s](x)
                if s == last:
                    y = loss_fn(y, micro_targets[i]) / m
            if s == last:
                total_loss += y.detach()
            elif stage_rank[s + 1] == rank:
                local["act", i, s + 1] = y
            else:
                if s not in headers_sent:
                    in_flight.append(send_header(y, peer[s + 1], group))
                    headers_sent.add(s)
                send = y.detach(), s + 1, "act"
                post("grad", i, s, torch.empty_like(send[0]), peer[s + 1])  # its gradient, ahead
            saved[i, s] = (x, y)
        elif kind in "BI":
            x, y = saved.pop((i, s))
            grad = None
            if s < last:
                grad = early.pop((i, s)) if (i, s) in early else receive_gradient(i, s)
            start = ACTION_CLOCK.begin(kind)
            with store.deferring((i, s)) if kind == "I" else contextlib.nullcontext():
                y.backward(grad)
            if s > 0 and stage_rank[s - 1] == rank:
                local["grad", i, s - 1] = x.grad
            elif s > 0:
                send = x.grad, s - 1, "grad"
        else:
            start = ACTION_CLOCK.begin(kind)
            store.run((i, s))
        ACTION_CLOCK.wait(sending=send is not None)  # a stage of known duration ends on time
        if send is not None:
            tensor, to, what = send
            request = dist.isend(tensor, peer[to], group=group, tag=_tag(what, i, to, last + 1))
            in_flight.append((request, tensor))
        end = ACTION_CLOCK.end()
        if timeline is not None:
            timeline.append((action, start, end))
        if live is not None:
            live.append(len(saved) + len(store.pending))
    for request, _ in in_flight:
        request.wait()
    return total_loss if last in mine else None


# ----------------------------------------------------------------------------
# measuring: stages of known duration, and each schedule's idle time on real ranks


class ActionClock:
    """The time of the action this process's runtime is running, so that a stage of known
    duration (:class:`TimedChunk`) makes the whole action — the runtime's work around the
    stage included — take that duration, from its start to its end as the timeline records.

    :func:`train_step` calls :meth:`begin` when an action's inputs are here, :meth:`wait`
    just before it posts the action's send (the last thing it does), and :meth:`end`. A stage
    only *books* its time with :meth:`spend`; :meth:`wait` sleeps until the action's start
    plus the booked time, less what still follows in the action: posting the send and the
    sleep's own overshoot, whose recent median the clock keeps per kind of action. The
    timeline records what each action really took; the clock only keeps that close to the
    booked time. Outside :func:`train_step`, :meth:`spend` just sleeps.

    ``now`` and ``sleep`` are the clock and the sleep it uses (a test passes simulated ones,
    so that the clock's arithmetic is checked without depending on how busy the machine is)."""

    def __init__(self, keep: int = 16, now=time.perf_counter, sleep=time.sleep):
        self.keep, self.tail = keep, {}  # (kind, sends?) -> recent seconds from wake-up to end
        self.now, self.sleep = now, sleep
        self.key = self.start = self.booked = self.woke = None

    def begin(self, kind: str) -> float:
        """An action of ``kind`` starts now; returns the time (``time.perf_counter``)."""
        self.key, self.booked, self.woke = kind, None, None
        self.start = self.now()
        return self.start

    def spend(self, seconds: float) -> None:
        """Book ``seconds`` more for the running action (or sleep them, outside an action)."""
        if self.start is None:
            self.sleep(seconds)
        else:
            self.booked = (self.booked or 0.0) + seconds

    def wait(self, sending: bool = False) -> None:
        """Sleep until the running action has taken its booked time, less the part of it that
        still follows (``sending``: the action's send is posted after this)."""
        if self.booked is None:
            return
        self.key = self.key, sending
        recent = self.tail.get(self.key)
        self.woke = self.start + self.booked - (statistics.median(recent) if recent else 0.0)
        rest = self.woke - self.now()
        if rest > 0:
            self.sleep(rest)
        else:  # the action took longer than its booked time already: nothing to learn
            self.woke = None

    def end(self) -> float:
        """The running action ends now; returns the time, and learns what followed the wake-up."""
        now = self.now()
        if self.woke is not None:
            self.tail.setdefault(self.key, deque(maxlen=self.keep)).append(now - self.woke)
        self.key = self.start = self.booked = self.woke = None
        return now


#: The clock of this process's runtime (one per rank: each rank is a process).
ACTION_CLOCK = ActionClock()


class _SleepInBackward(torch.autograd.Function):
    """Identity whose backward takes t_b, or t_b − t_w now and t_w in the W when split."""

    @staticmethod
    def forward(ctx, x, t_b, t_w):
        ctx.t_b, ctx.t_w = t_b, t_w
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        t_w = ctx.t_w
        if WeightGradients.defer(lambda: ACTION_CLOCK.spend(t_w)):
            ACTION_CLOCK.spend(ctx.t_b - t_w)
        else:
            ACTION_CLOCK.spend(ctx.t_b)
        return grad, None, None


class TimedChunk(nn.Module):
    """A stage whose forward takes t_f, full backward t_b, and split backward t_b − t_w in its
    I and t_w in its W (a tiny ``nn.Linear`` keeps real gradients flowing): on a laptop the
    only waiting left to see is the schedule's own, as with chapter 06's ``TimedStage``.

    Each action takes its time from its start to its end as the runtime records them, the
    Python, autograd and sends around the stage included: the stage sleeps until then
    (:class:`ActionClock`). So t_f, t_b, t_w are what the actions really take, up to how
    precisely a sleeping process wakes up (the lesson measures it)."""

    def __init__(self, t_f: float, t_b: float, t_w: float, width: int = 4):
        super().__init__()
        self.t_f, self.t_b, self.t_w = t_f, t_b, t_w
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ACTION_CLOCK.spend(self.t_f)
        return _SleepInBackward.apply(self.linear(x), self.t_b, self.t_w)


_SPIN = """
import os, select, sys
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
while not select.select([sys.stdin], [], [], 0)[0]:  # until the parent closes the pipe (or dies)
    pass
"""


@contextlib.contextmanager
def cores_awake() -> Iterator[int]:
    """Keep every core busy at the lowest priority Linux has (SCHED_IDLE) for the block.

    A core with nothing to run halts, and on a virtual machine (or a laptop saving power) it
    takes it a fraction of a millisecond to wake up for a rank whose message arrived or whose
    sleep ended — for every message, on the critical path. A SCHED_IDLE loop runs only when
    nothing else wants the core, and gives it up the moment a rank (or any other program)
    wakes, so it takes no core from anyone; it only keeps the cores from halting. Yields the
    number of loops (0 where the system has no SCHED_IDLE: nothing is started)."""
    loops = []
    if hasattr(os, "SCHED_IDLE"):
        for _ in range(os.cpu_count() or 1):
            loops.append(subprocess.Popen([sys.executable, "-c", _SPIN], stdin=subprocess.PIPE))
    try:
        yield len(loops)
    finally:
        for loop in loops:
            loop.stdin.close()
        for loop in loops:
            try:
                loop.wait(timeout=5)
            except subprocess.TimeoutExpired:
                loop.kill()
                loop.wait()


def machine_busy() -> tuple[bool, float]:
    """(busy, load): whether other programs kept every core busy over the last minute — the
    1-minute load average at least the number of cores. Call it before :func:`cores_awake`,
    whose loops add to the load themselves. On a machine that busy a rank often waits for a
    core, and a timed run that happened to dodge every late start is luck, not a measurement:
    count every run on it as disturbed."""
    load = os.getloadavg()[0]
    return load >= (os.cpu_count() or 1), load


def idle_time(timelines: Sequence[Sequence[tuple]]) -> tuple[float, float]:
    """(mean idle seconds per rank, wall seconds) of one step from every rank's timeline."""
    start = min(row[0][1] for row in timelines)
    end = max(row[-1][2] for row in timelines)
    busy = [sum(b - a for _, a, b in row) for row in timelines]
    return (end - start) - sum(busy) / len(busy), end - start


def timed_schedules(configs: Iterable[tuple], repeats: int = 2) -> list[list[list[tuple]]]:
    """Run on every rank: per (name, m, v, t_f, t_b, t_w, pairs) in ``configs``, ``repeats``
    steps of :class:`TimedChunk` stages; returns this rank's timeline of each repeat."""
    rank, p = dist.get_rank(), dist.get_world_size()
    ones = torch.ones(2 * p, 4)
    # Open the links, and let the clock learn how long each kind of action runs past its stage
    # (a short DualPipe-V step has all four kinds: F, B, I and W).
    warm = partition(
        nn.Sequential(*[TimedChunk(1e-3, 2e-3, 1e-3) for _ in range(2 * p)]), rank, p, 2, "dualpipe-v"
    )
    train_step(warm, ones, ones, F.mse_loss, 2 * p, "dualpipe-v")
    results = []
    for name, m, v, t_f, t_b, t_w, pairs in configs:
        count = len(stage_ranks(name, p, v))
        torch.manual_seed(0)
        model = nn.Sequential(*[TimedChunk(t_f, t_b, t_w) for _ in range(count)])
        stages = partition(model, rank, p, v, name)
        x, y = torch.randn(m, 4), torch.randn(m, 4)
        runs = []
        for _ in range(repeats):
            dist.barrier()
            timeline = []
            train_step(
                stages, x, y, F.mse_loss, m, name, num_virtual=v, timeline=timeline, fb_pairs_together=pairs
            )
            runs.append(timeline)
        results.append(runs)
    return results


def measured_durations(timelines: Sequence[Sequence[tuple]]) -> dict:
    """Every action's measured seconds (end − start), from every rank's timeline of one step:
    feed them to :func:`simulate` (``durations=``) to play the schedule out with real times."""
    return {action: end - start for row in timelines for action, start, end in row}


def _readiness(timelines, fb_pairs_together):
    """Per action of every rank: (rank, start, when the rank was free, when its latest input from
    another rank was sent, when its latest input from this rank was made); None when unknown."""
    actions = [[tuple(a) for a, _, _ in row] for row in timelines]
    _, stage_rank = validate(actions)
    last = len(stage_rank) - 1
    end = {_event(a): e for row in timelines for a, _, e in row}
    for r, row in enumerate(timelines):
        pairs = fb_pairs(actions[r]) if fb_pairs_together else set()
        free = None
        for k, (_, start, stop) in enumerate(row):
            block = actions[r][k : k + 2] if k in pairs else actions[r][k : k + 1]
            needs = [n for a in block for n in _needs(a, last) if n != _event(block[0])]
            remote = max((end[n] for n in needs if stage_rank[n[2]] != r), default=None)
            local = max((end[n] for n in needs if stage_rank[n[2]] == r), default=None)
            yield r, start, free, remote, local
            free = stop


def message_latency(timelines: Sequence[Sequence[tuple]], fb_pairs_together: bool = False) -> float:
    """α: the median time from the end of the action that sent a message to the start of the
    action waiting for it, over every message its receiver was already waiting for (from every
    rank's timeline of one step)."""
    waits = [
        start - remote
        for _, start, free, remote, local in _readiness(timelines, fb_pairs_together)
        if remote is not None and free is not None and remote > max(free, local or free)
    ]
    return max(0.0, statistics.median(waits)) if waits else 0.0


def delays(
    timelines: Sequence[Sequence[tuple]], latency: float = 0.0, fb_pairs_together: bool = False
) -> list[list[float]]:
    """Per rank, how late each of its actions started (seconds, 0 when on time): after the
    rank's previous action ended and its inputs had arrived (``latency`` after the action that
    made them, when that ran on another rank). Fractions of a millisecond when the ranks had a
    core whenever they were ready; milliseconds when another program held the cores."""
    late = [[] for _ in timelines]
    for r, start, free, remote, local in _readiness(timelines, fb_pairs_together):
        ready = [t for t in (free, local, None if remote is None else remote + latency) if t is not None]
        late[r].append(max(0.0, start - max(ready)) if ready else 0.0)
    return late


#: A timed run is undisturbed when no action started more than QUIET_LATE seconds late and no
#: rank lost more than QUIET_LOST of the model's idle time to late starts; otherwise another
#: program had the cores and no schedule explains the difference.
QUIET_LATE, QUIET_LOST = 2e-3, 0.08


@dataclass
class IdleAgainstModel:
    """One configuration of :func:`timed_schedules`: measured idle time beside its models."""

    name: str
    pairs: bool
    idle: float  # measured mean idle seconds per rank
    wall: float
    simulated: ScheduleSimulation  # the schedule played with the stated t_f, t_b, t_w
    model: ScheduleSimulation  # played with every action's measured time and α per message
    alpha: float
    late: float  # the latest start of one action, seconds
    lost: float  # the most one rank lost to late starts, seconds
    timelines: list
    durations: dict
    formula: float  # the bubble formula at the stated t_f, t_b, t_w
    times: tuple  # (F, B, W): the median measured forward, full backward (or I + W), W
    formula_measured: float  # the bubble formula at the measured F, B, W
    busy: bool = False  # the machine was busy before the runs (:func:`machine_busy`)

    @property
    def quiet(self) -> bool:
        """Undisturbed: a machine not busy before the runs, and no late start past the bounds."""
        return not self.busy and self.late < QUIET_LATE and self.lost < QUIET_LOST * self.model.bubble_time


def measured_times(durations: Mapping[tuple, float]) -> tuple[float, float, float]:
    """(F, B, W): the median measured seconds of a forward, a full backward and a weight-gradient
    pass; where backwards are split, B = median I + median W (and W = B/2 where none is)."""
    by_kind = {}
    for (kind, *_), seconds in durations.items():
        by_kind.setdefault(kind, []).append(seconds)
    median = {kind: statistics.median(values) for kind, values in by_kind.items()}
    b = median["B"] if "B" in median else median["I"] + median["W"]
    return median["F"], b, median.get("W", b / 2)


def idle_against_model(
    per_rank: Sequence[Sequence[Sequence[list[tuple]]]], configs: Sequence[tuple], p: int, busy: bool = False
) -> list[IdleAgainstModel]:
    """Per configuration of :func:`timed_schedules` (``per_rank``: every rank's result), the
    repeat whose ranks lost least to late starts, against its bubble formula (at the stated
    times and at the measured F, B, W) and the simulation of its schedule. ``busy``: what
    :func:`machine_busy` said before the runs (every run then counts as disturbed)."""
    out = []
    for c, (name, m, v, t_f, t_b, t_w, pairs) in enumerate(configs):
        repeats = [[rank_result[c][k] for rank_result in per_rank] for k in range(len(per_rank[0][c]))]

        def lost_in(timelines, pairs=pairs):
            return max(map(sum, delays(timelines, message_latency(timelines, pairs), pairs)))

        timelines = min(repeats, key=lost_in)
        alpha = message_latency(timelines, pairs)
        late = delays(timelines, alpha, pairs)
        idle, wall = idle_time(timelines)
        actions = schedule(name, p, m, v)
        durations = measured_durations(timelines)
        times = measured_times(durations)
        out.append(
            IdleAgainstModel(
                name,
                pairs,
                idle,
                wall,
                simulate(actions, t_f, t_b, t_w, fb_pairs_together=pairs),
                simulate(actions, fb_pairs_together=pairs, latency=alpha, durations=durations),
                alpha,
                max(map(max, late)),
                max(map(sum, late)),
                timelines,
                durations,
                bubble_formula(name, p, t_f, t_b, t_w),
                times,
                bubble_formula(name, p, *times),
                busy,
            )
        )
    return out
