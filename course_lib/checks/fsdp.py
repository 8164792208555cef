"""Checks for chapter 07b: FSDP's pieces.

7b.1 and 7b.4 are plain functions, checked in the notebook's process on many cases. 7b.2 and 7b.3
run on N = 1 … 4 ranks: 7b.2 installs the learner's gather as every unit's pre-forward hook of a
small three-unit model (units of 42, 138 and 24 elements, padded for N = 4) and compares its
forward and backward with one process; 7b.3 feeds seeded bf16 gradients and compares the fp32
master shard after three steps with one process making the same casts. While a learner's code runs,
``course_lib.fsdp``'s functions raise: the exercises rebuild them.
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from course_lib import fsdp, zero
from course_lib.checks import (
    BuiltinUsed,
    Mismatch,
    builtins_switched_off,
    compare,
    exercise,
    learner_in_rank,
    run_learner,
)
from course_lib.models import make_mlp, regression_data, shard

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

WORLD_SIZES = (1, 2, 4)  # N = 4 pads two of the three units
TIMEOUT = 20.0
HYPER = dict(lr=0.01, betas=(0.8, 0.9), eps=0.01, weight_decay=0.1)
STEPS = 3
LIBRARY = ("fully_shard", "full_state_dict", "no_sync", "hsdp_groups")


@contextlib.contextmanager
def _library_off(ex_id: str, learner_fn, collectives=(), reason=""):
    """course_lib.fsdp's functions (and ``collectives``, for ``reason``) raise while the learner's code runs."""
    why = f"exercise {ex_id} asks you to write this yourself"
    with builtins_switched_off(learner_fn, LIBRARY, why, namespaces=(fsdp,), shown_as="fsdp"):
        with builtins_switched_off(learner_fn, collectives, f"exercise {ex_id} {reason}"):
            yield


def _call(ex_id, learner_fn, *args):
    try:
        with _library_off(ex_id, learner_fn):
            return learner_fn(*args)
    except BuiltinUsed as exc:
        raise Mismatch(str(exc)) from None


# ----------------------------------------------------------------------------
# 7b.1 shard ranges


def reference_shard_ranges(numels: Sequence[int], rank: int, world_size: int) -> list[tuple[int, int, int]]:
    """(parameter index, first, end) of each parameter's elements inside shard ``rank``."""
    size = zero.padded_size(sum(numels), world_size) // world_size
    start, end, offset, out = rank * size, (rank + 1) * size, 0, []
    for i, k in enumerate(numels):
        lo, hi = max(start, offset), min(end, offset + k)
        if lo < hi:
            out.append((i, lo - offset, hi - offset))
        offset += k
    return out


def _floor_ranges(numels, rank, n):
    size = sum(numels) // n
    start, end, offset, out = rank * size, (rank + 1) * size, 0, []
    for i, k in enumerate(numels):
        lo, hi = max(start, offset), min(end, offset + k)
        if lo < hi:
            out.append((i, lo - offset, hi - offset))
        offset += k
    return out


def _flat_ranges(numels, rank, n):
    offsets = [sum(numels[:i]) for i in range(len(numels))]
    return [(i, lo + offsets[i], hi + offsets[i]) for i, lo, hi in reference_shard_ranges(numels, rank, n)]


SHARD_CASES = ([42, 138, 24], [35, 7], [1], [5, 5, 5], [3, 1, 4, 1, 5], [10, 70])


@exercise("7b.1", "a rank's pieces of a unit's flat, padded buffer")
def shard_ranges(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(numels, rank, world_size) -> [(parameter index, first, end), ...]``."""
    for numels in SHARD_CASES:
        for n in (1, 2, 3, 4, 5):
            for rank in range(n):
                got = _call("7b.1", learner_fn, list(numels), rank, n)
                want = reference_shard_ranges(numels, rank, n)
                got = [tuple(int(v) for v in item) for item in got] if isinstance(got, (list, tuple)) else got
                if got == want:
                    continue
                where = f"numels={numels}, N={n}, rank {rank}"
                hint = ""
                if got == _floor_ranges(numels, rank, n):
                    hint = (
                        f"shards of {sum(numels)} // {n} elements lose the last ones: pad the unit to a "
                        f"multiple of N first (shards of ⌈{sum(numels)}/{n}⌉)"
                    )
                elif got == _flat_ranges(numels, rank, n):
                    hint = "your ranges are positions in the flat buffer: give them within each parameter"
                elif isinstance(got, list) and [g for g in got if g[1] < g[2]] == want:
                    hint = "leave out parameters with no element in this shard (first == end)"
                raise Mismatch(f"{where}: {hint + ' — ' if hint else ''}expected {want}, got {got}")


# ----------------------------------------------------------------------------
# 7b.2 the pre-forward gather, inside ranks


class Unit:
    """What the gather hook of 7b.2 gets: ``shard`` (this rank's 1/N, fp32), ``full`` (the flat,
    padded buffer the layer's parameters are views of; its storage is 0 bytes while freed),
    ``padded`` (elements of ``full``)."""

    def __init__(self, module, n, rank):
        params = list(module.parameters())
        self.numel = sum(p.numel() for p in params)
        self.padded = zero.padded_size(self.numel, n)
        size = self.padded // n
        flat = torch.zeros(self.padded)
        torch.cat([p.detach().reshape(-1) for p in params], out=flat[: self.numel])
        self.shard = flat[rank * size : (rank + 1) * size].clone()
        self.full = torch.zeros(self.padded)
        self.leaves = []
        offset = 0
        for sub in list(module.modules()):
            for name, p in list(sub.named_parameters(recurse=False)):
                leaf = torch.empty(0).requires_grad_()
                leaf.data = self.full[offset : offset + p.numel()].view(p.shape)
                offset += p.numel()
                del sub._parameters[name]
                setattr(sub, name, leaf)
                self.leaves.append(leaf)
        self.full.untyped_storage().resize_(0)


def _three_units():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.GELU(), make_mlp(7, 9, 1), nn.Linear(7, 3))


def _gather_rank(payload):
    learner = learner_in_rank(payload)
    rank, n = dist.get_rank(), dist.get_world_size()
    model = _three_units()
    modules = [m for m in model if any(True for _ in m.parameters())]
    units = [Unit(m, n, rank) for m in modules]  # takes the parameters out of the modules
    problems = []
    gathered_during = []

    def gather(unit, when):
        before = unit.full
        freed = unit.full.untyped_storage().nbytes() == 0
        try:
            with _library_off(
                "7b.2", learner, ("all_reduce", "broadcast"), "gathers the shards: no reduction, no broadcast"
            ):
                learner(unit)
        except (BuiltinUsed, NotImplementedError):
            raise
        except Exception as exc:
            if freed and unit.full.untyped_storage().nbytes() == 0:
                problems.append(
                    f"{when}: your gather raised {type(exc).__name__} with unit.full's storage still 0 bytes: "
                    "resize it back (unit.full.untyped_storage().resize_) before gathering into it"
                )
            raise
        if unit.full is not before:
            problems.append(
                f"{when}: you replaced unit.full; gather INTO its storage (the parameters are views of it)"
            )
        elif unit.full.untyped_storage().nbytes() != unit.padded * 4:
            problems.append(
                f"{when}: unit.full's storage holds {unit.full.untyped_storage().nbytes()} bytes after your gather, "
                f"expected {unit.padded * 4}: resize it back (untyped_storage().resize_) before gathering"
            )
        if when.startswith("forward"):
            gathered_during.append(sum(u.full.untyped_storage().nbytes() > 0 for u in units))

    def free(unit):
        unit.full.untyped_storage().resize_(0)

    for i, (module, unit) in enumerate(zip(modules, units)):
        module.register_forward_pre_hook(lambda m, a, unit=unit, i=i: gather(unit, f"forward of unit {i}"))

        def after(m, a, out, unit=unit, i=i):
            out.register_hook(lambda g: gather(unit, f"backward of unit {i}"))
            free(unit)

        module.register_forward_hook(after)
    x, y = regression_data(24, 5)
    try:
        out = model(shard(x, rank, n))
        F.mse_loss(out, shard(y[:, :3], rank, n)).backward()
    except (BuiltinUsed, NotImplementedError):
        raise
    except Exception as exc:
        if problems:
            return dict(problems=problems)
        raise Mismatch(f"rank {rank}: your gather raised {type(exc).__name__}: {exc}") from None
    grads = [leaf.grad.clone() if leaf.grad is not None else None for u in units for leaf in u.leaves]
    return dict(problems=problems, out=out.detach(), grads=grads, gathered=gathered_during)


@functools.cache
def _gather_reference(n):
    model = _three_units()
    x, y = regression_data(24, 5)
    outs, grads = [], None
    for r in range(n):
        model.zero_grad()
        out = model(shard(x, r, n))
        F.mse_loss(out, shard(y[:, :3], r, n)).backward()
        outs.append(out.detach())
        g = [p.grad.clone() for p in model.parameters()]
        grads = grads or []
        grads.append(g)
    return outs, grads


@exercise("7b.2", "the pre-forward gather of a unit")
def gather_unit(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(unit)`` as every unit's pre-forward (and pre-backward) gather."""
    for n in WORLD_SIZES:
        got = run_learner(n, _gather_rank, learner_fn, timeout=TIMEOUT, refusals=(Mismatch,))
        outs, grads = _gather_reference(n)
        for rank, result in enumerate(got):
            if result["problems"]:
                raise Mismatch(f"N={n}, rank {rank}, {result['problems'][0]}")
            try:
                compare(result["out"], outs[rank], "the model's output", rank)
                compare(result["grads"], grads[rank], "gradients", rank)
            except Mismatch as exc:
                hint = ""
                if torch.count_nonzero(result["out"]) == 0 or not torch.isfinite(result["out"]).all():
                    hint = "the layers computed with parameters that were never gathered — "
                raise Mismatch(f"N={n}: {hint}{exc}") from None
            if max(result["gathered"]) > 1:
                raise Mismatch(f"N={n}, rank {rank}: more than one unit gathered at once: gather only `unit`")


# ----------------------------------------------------------------------------
# 7b.3 reduce-scatter in fp32, update the fp32 master, hand back bf16


def _grads(n, step):
    """This step's unsharded bf16 gradient of every rank: 202 elements padded for N."""
    g = torch.Generator().manual_seed(100 + step)
    numel = 202
    padded = zero.padded_size(numel, n)
    out = []
    for _ in range(n):
        t = torch.zeros(padded)
        t[:numel] = torch.randn(numel, generator=g) * 0.03
        out.append(t.bfloat16())
    return out


def _master0(n):
    g = torch.Generator().manual_seed(5)
    padded = zero.padded_size(202, n)
    t = torch.zeros(padded)
    t[:202] = torch.randn(202, generator=g) * 0.5
    return t


def _reduce_rank(payload):
    learner = learner_in_rank(payload)
    rank, n = dist.get_rank(), dist.get_world_size()
    size = zero.padded_size(202, n) // n
    master = _master0(n)[rank * size : (rank + 1) * size].clone()
    m, v = torch.zeros(size), torch.zeros(size)
    returned = []
    with _library_off("7b.3", learner, ("all_reduce",), "reduce-scatters: no rank needs the whole sum"):
        for step in range(STEPS):
            out = learner(_grads(n, step)[rank].clone(), master, m, v, step + 1, **HYPER)
            returned.append(out.clone() if isinstance(out, torch.Tensor) else out)
    return master, returned


@functools.cache
def _reduce_reference(n, mode="right"):
    size = zero.padded_size(202, n) // n
    masters = [_master0(n)[r * size : (r + 1) * size].clone() for r in range(n)]
    states = [(torch.zeros(size), torch.zeros(size)) for _ in range(n)]
    for step in range(STEPS):
        grads = _grads(n, step)
        if mode == "bf16 reduce":
            total = grads[0]
            for g in grads[1:]:
                total = total + g
            mean = total.float() / n
        else:
            mean = torch.stack([g.float() for g in grads]).sum(0) / (1 if mode == "no mean" else n)
        for r in range(n):
            zero.adamw_(masters[r], mean[r * size : (r + 1) * size], *states[r], step + 1, **HYPER)
            if mode == "bf16 master":
                masters[r].copy_(masters[r].bfloat16())
    return masters


@exercise("7b.3", "reduce-scatter in fp32, update the fp32 master")
def reduce_and_update(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(grad, master, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay)``."""
    for n in WORLD_SIZES:
        got = run_learner(n, _reduce_rank, learner_fn, timeout=TIMEOUT)
        want = _reduce_reference(n)
        for rank, (master, returned) in enumerate(got):
            last = returned[-1]
            if not isinstance(last, torch.Tensor) or last.dtype != torch.bfloat16:
                what = last.dtype if isinstance(last, torch.Tensor) else type(last).__name__
                raise Mismatch(
                    f"N={n}, rank {rank}: return the updated shard in bf16 (what the next all-gather "
                    f"sends), got {what}"
                )
            try:
                compare(master, want[rank], "master shard", rank, rtol=1e-5, atol=1e-6)
                compare(last, want[rank].bfloat16(), "returned bf16 shard", rank, exact=True)
            except Mismatch as exc:
                raise Mismatch(f"N={n}: {_reduce_hint(n, rank, master)}{exc}") from None


def _reduce_hint(n, rank, master) -> str:
    right = (master - _reduce_reference(n)[rank]).abs().max().item()
    names = {
        "no mean": "the SUM over ranks: divide by N for the mean — ",
        "bf16 reduce": "a reduction in bf16: cast the gradient to fp32 BEFORE reducing — ",
        "bf16 master": "a master rounded to bf16: keep `master` fp32 and return a bf16 copy — ",
    }
    for mode, hint in names.items():
        if n == 1 and mode != "bf16 master":
            continue
        other = (master - _reduce_reference(n, mode)[rank]).abs().max().item()
        if other < 0.1 * right:
            return f"looks like {hint}"
    return ""


# ----------------------------------------------------------------------------
# 7b.4 the order of one step's collectives


def reference_collective_order(
    units: Sequence[str], prefetch: bool, reshard_after_forward: bool
) -> list[tuple[str, str, str]]:
    """[(op, unit, phase)] in the order one forward + backward of fsdp.fully_shard issues them."""
    out, gathered = [], set()

    def gather(u, phase):
        if u not in gathered:
            out.append(("all-gather", u, phase))
            gathered.add(u)

    for i, u in enumerate(units):
        gather(u, "forward")
        if prefetch and i + 1 < len(units):
            gather(units[i + 1], "forward")
        if reshard_after_forward:
            gathered.discard(u)
    for i in reversed(range(len(units))):
        gather(units[i], "backward")
        if prefetch and i > 0:
            gather(units[i - 1], "backward")
        out.append(("reduce-scatter", units[i], "backward"))
        gathered.discard(units[i])
    return out


def _forward_order_backward(units, prefetch, reshard):
    """A typical mistake: the backward's prefetch in forward order (the next unit, not the previous)."""
    out, gathered = [], set()
    for i, u in enumerate(units):
        if u not in gathered:
            out.append(("all-gather", u, "forward"))
            gathered.add(u)
        if prefetch and i + 1 < len(units) and units[i + 1] not in gathered:
            out.append(("all-gather", units[i + 1], "forward"))
            gathered.add(units[i + 1])
        if reshard:
            gathered.discard(u)
    for i in reversed(range(len(units))):
        if units[i] not in gathered:
            out.append(("all-gather", units[i], "backward"))
            gathered.add(units[i])
        if prefetch and i + 1 < len(units) and units[i + 1] not in gathered:
            out.append(("all-gather", units[i + 1], "backward"))
            gathered.add(units[i + 1])
        out.append(("reduce-scatter", units[i], "backward"))
        gathered.discard(units[i])
    return out


@exercise("7b.4", "the order of one step's collectives, with prefetch")
def collective_order(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(units, prefetch, reshard_after_forward) -> [(op, unit, phase), ...]``."""
    for units in (["a", "b", "c"], ["0", "1", "2", "3"], ["x"], ["emb", "block0", "block1", "head", "out"]):
        for prefetch in (False, True):
            for reshard in (True, False):
                got = _call("7b.4", learner_fn, list(units), prefetch, reshard)
                want = reference_collective_order(units, prefetch, reshard)
                got = [tuple(item) for item in got] if isinstance(got, (list, tuple)) else got
                if got == want:
                    continue
                where = f"units={units}, prefetch={prefetch}, reshard_after_forward={reshard}"
                if got == _forward_order_backward(units, prefetch, reshard):
                    raise Mismatch(
                        f"{where}: the backward runs the units in reverse: prefetch the unit BEFORE the "
                        "current one (i − 1), not after it"
                    )
                if not isinstance(got, list):
                    raise Mismatch(
                        f"{where}: return a list of (op, unit, phase) tuples, got {type(got).__name__}"
                    )
                i = next((k for k, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
                expected = want[i] if i < len(want) else "nothing more"
                found = got[i] if i < len(got) else "nothing more"
                hint = ""
                if (
                    not reshard
                    and isinstance(found, tuple)
                    and found[:1] == ("all-gather",)
                    and found[2:] == ("backward",)
                ):
                    hint = " (without resharding the units are still gathered from the forward)"
                raise Mismatch(f"{where}: collective {i}: expected {expected}, got {found}{hint}")
