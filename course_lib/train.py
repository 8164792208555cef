"""Chapter 09b: train one small GPT with every axis at once, and check its loss curve equals one process's.

    result = train_gpt(dp=2, tp=2, pp=2, steps=50)       # inside each of 8 ranks (launch.run)
    result["loss"]                                       # the global mean loss of every step, on every rank
    curves = run_configs({"1": {}, "dp2·tp2·pp2": dict(dp=2, tp=2, pp=2)}, steps=50)
    compare_curves(curves["1"], curves)                  # largest relative deviation, or CurveMismatch

    python -m torch.distributed.run --standalone --nproc-per-node=4 -m course_lib.train --dp 2 --tp 2

Every rank takes its place on a :class:`course_lib.mesh.RankGrid` (tp fastest, then cp, ep, dp,
pp) and builds its part of :func:`course_lib.gpt.make_gpt`'s model from the chapters' own modules:

* pp (chapter 06): :func:`course_lib.pipeline_parallel.partition` gives the stage its layers,
  :func:`course_lib.pipeline_parallel.train_step` runs the schedule (any of chapter 06b's names).
* tp with sequence parallelism (chapters 04, 05): each block is a
  :class:`course_lib.tensor_parallel.SequenceParallelBlock`; the embedding's output is scattered
  along the sequence, the head works on this rank's positions.
* cp (chapter 05b): each block is a :class:`course_lib.context_parallel.ContextParallelBlock`
  (ring attention, zig-zag layout; with tp > 1 its heads and MLP are split too, without SP).
* ep (chapter 08): with ``moe=True`` each block's feed-forward is a mixture of experts, and with
  ep > 1 a :class:`course_lib.moe.MoELayer` over the ep group holds this rank's experts.
* dp with ``sharding`` (chapters 02, 07, 07b): :class:`course_lib.zero.ZeroAdam` stage 0–3 over
  the data-parallel group, or :func:`course_lib.fsdp.fully_shard` with AdamW.

Which gradients are summed where: a parameter that several ranks hold whole but each trains on
its own tokens gets the sum of their gradients — over tp for the sequence-parallel replicas
(LayerNorms, row-parallel biases, the head), over cp for every parameter — by a hook that fires
as soon as that gradient is computed; the optimizer then averages over the data ranks (dp·ep for
every parameter but the experts, dp for the experts, whose gradient already holds all ep ranks'
tokens and is divided by ep). Not supported, with a ValueError: moe with tp > 1, and
``sharding="fsdp"`` with ep > 1.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn

from course_lib import checkpoint as checkpoint_lib
from course_lib import context_parallel as cp_lib
from course_lib import fsdp as fsdp_lib
from course_lib import gpt
from course_lib import pipeline_parallel as pipeline
from course_lib import tensor_parallel as tp_lib
from course_lib.mesh import GridLayout, RankGrid
from course_lib.models import TransformerBlock
from course_lib.moe import MoELayer
from course_lib.zero import ZeroAdam, storage_bytes

if TYPE_CHECKING:
    from collections.abc import Sequence

SHARDINGS = ("none", "zero1", "zero2", "zero3", "fsdp")
#: ZeroAdam's stage for each sharding ("none" is plain data parallelism: stage 0, all-reduce).
ZERO_STAGE = {"none": 0, "zero1": 1, "zero2": 2, "zero3": 3}
#: ``precision``: "fp32" throughout, or "bf16" mixed precision — the parameters stay fp32 (the master
#: copy Adam updates), every matmul computes in bf16 (``torch.autocast``), and each gradient comes
#: back to fp32 before any gradient sum: chapter 07b's ``MixedPrecision(bf16, fp32)`` policy.
PRECISIONS = ("fp32", "bf16")
#: The default model: small enough for a laptop's CPU, large enough to learn the text's words.
MODEL_DEFAULTS = dict(seq_len=32, d_model=64, n_heads=4, n_layers=4)


# ----------------------------------------------------------------------------
# the pieces of one rank's stage


class ScatterEmbedding(nn.Module):
    """The embedding on the whole sequence, then this tp rank's block of positions (SP's entry)."""

    def __init__(self, embedding: gpt.Embedding, group):
        super().__init__()
        self.embedding, self.group = embedding, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return tp_lib.scatter_to_sequence_region(self.embedding(ids), self.group)


class ExpertParallelFFN(nn.Module):
    """Chapter 08's :class:`~course_lib.moe.MoELayer` on (batch, seq, d) activations: this rank's
    experts, tokens sent to their experts' ranks and back by all-to-all."""

    def __init__(self, ffn: gpt.MoEFeedForward, group):
        super().__init__()
        self.layer = MoELayer.from_dense(ffn.gate, ffn.experts, ffn.k, ffn.capacity_factor, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.flatten(0, -2)).view_as(x)


def _parallel_layer(layer: nn.Module, grid: RankGrid, seq_len: int) -> nn.Module:
    """``layer`` of the dense model, made into this rank's part of it."""
    sp = grid.tp > 1 and grid.cp == 1
    tp_group = grid.tp_group if grid.tp > 1 else None
    if isinstance(layer, gpt.Embedding):
        if grid.cp > 1:
            layer.positions = cp_lib.positions(grid.cp_rank, grid.cp, seq_len)
            return layer
        return ScatterEmbedding(layer, grid.tp_group) if sp else layer
    if isinstance(layer, gpt.Head):
        return layer  # on this rank's positions (SP, cp) or the whole sequence
    is_moe = isinstance(layer.mlp, gpt.MoEFeedForward)
    if is_moe and grid.tp > 1:
        raise ValueError(
            "moe with tp > 1 is not supported: chapter 04's tensor-parallel block splits a dense MLP, "
            "not a mixture of experts; use tp=1 with ep"
        )
    if grid.cp > 1:
        block = cp_lib.ContextParallelBlock(layer, grid.cp_group, tp_group, layout="zigzag", causal=True)
    elif sp:
        block = tp_lib.SequenceParallelBlock.from_dense(layer, grid.tp_group)
    else:
        block = layer
    if is_moe:
        block.mlp = ExpertParallelFFN(block.mlp, grid.ep_group)
    return block


def build_stage(grid: RankGrid, model: nn.Sequential) -> nn.Sequential:
    """This rank's pipeline stage of ``model`` (names keep their global layer index), each layer
    made tensor-, sequence-, context- or expert-parallel as the grid asks."""
    seq_len = model[0].pos.num_embeddings
    stage = pipeline.partition(model, grid.pp_rank, grid.pp)
    return nn.Sequential(
        OrderedDict((name, _parallel_layer(layer, grid, seq_len)) for name, layer in stage.named_children())
    )


def _sum_over(group):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=group)
        return grad

    return hook


def gradient_sums(stage: nn.Sequential, grid: RankGrid) -> dict:
    """{parameter name: [(axis, group)]}: the groups over which a parameter's gradient must be
    summed before the data-parallel average, because each rank of the group computed it on its
    own tokens only."""
    sums = {name: [] for name, _ in stage.named_parameters()}
    sp = grid.tp > 1 and grid.cp == 1
    if sp:
        for layer_name, layer in stage.named_children():
            if isinstance(layer, tp_lib.SequenceParallelBlock):
                ids = {id(p) for p in layer.replicated_parameters() if p is not None}
                for name, p in layer.named_parameters():
                    if id(p) in ids:
                        sums[f"{layer_name}.{name}"].append(("tp", grid.tp_group))
            elif isinstance(layer, gpt.Head):
                for name, _ in layer.named_parameters():
                    sums[f"{layer_name}.{name}"].append(("tp", grid.tp_group))
    if grid.cp > 1:
        for name in sums:
            sums[name].append(("cp", grid.cp_group))
    return sums


def expert_names(stage: nn.Module) -> set:
    """Names of the parameters that live in this rank's experts (split over ep, not replicated)."""
    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in stage.named_modules()
        if isinstance(module, ExpertParallelFFN)
        for name, _ in module.layer.experts.named_parameters(prefix="layer.experts")
    }


# ----------------------------------------------------------------------------
# the optimizer: ZeroAdam (stages 0-3) or FSDP + AdamW, over the data-parallel ranks


class _Optimizer:
    """One object for "step, zero_grad, bytes held" whichever sharding was asked for."""

    def __init__(self, stage, grid: RankGrid, sharding: str, lr: float, sums: dict, data_group):
        self.stage, self.sharding = stage, sharding
        experts = expert_names(stage)
        leaves = dict(stage.named_parameters())
        if sharding == "fsdp":
            fsdp_lib.fully_shard(stage, group=grid.dp_group)
            leaves = {name: p for u in fsdp_lib._state(stage).units for name, p in zip(u.names, u.params)}
            self.torch_adam = torch.optim.AdamW(stage.parameters(), lr=lr, weight_decay=0.0)
            self.zero = []
        else:
            stage_number = ZERO_STAGE[sharding]
            owners = [m for m in stage.modules() if any(True for _ in m.parameters(recurse=False))]
            in_experts = {
                m
                for f in stage.modules()
                if isinstance(f, ExpertParallelFFN)
                for m in f.layer.experts.modules()
            }
            dense = nn.ModuleList(m for m in owners if m not in in_experts)
            self.zero = [ZeroAdam(dense, stage_number, lr=lr, group=data_group)]
            if in_experts:  # experts: averaged over dp only (each ep rank holds others)
                owned = nn.ModuleList(m for m in owners if m in in_experts)
                self.zero.append(ZeroAdam(owned, stage_number, lr=lr, group=grid.dp_group))
        for name, p in leaves.items():
            for _, group in sums.get(name, []):
                p.register_hook(_sum_over(group))
            if name in experts and grid.ep > 1:
                p.register_hook(lambda g, ep=grid.ep: g / ep)
        self.params = list(leaves.values())

    def step(self) -> None:
        for z in self.zero:
            z.step()
        if self.sharding == "fsdp":
            self.torch_adam.step()

    def zero_grad(self) -> None:
        for z in self.zero:
            z.zero_grad()
        if self.sharding == "fsdp":
            self.torch_adam.zero_grad(set_to_none=True)

    def state_bytes(self) -> int:
        """Bytes of parameters, gradients and Adam's moments this rank holds now."""
        if self.sharding == "fsdp":
            seen = set()
            shards = list(self.stage.parameters())
            moments = [t for s in self.torch_adam.state.values() for t in s.values() if t.dim() > 0]
            return storage_bytes(shards + [p.grad for p in shards] + moments, seen)
        return sum(sum(z.memory_report().values()) for z in self.zero)


class _ActivationMeter(pipeline.ActivationMeter):
    """Chapter 06's meter, re-reading where the parameters live at every saved tensor (ZeRO-3 and
    FSDP gather them into new storage), so a saved parameter never counts as an activation."""

    def __init__(self, module, params):
        self._params = params
        super().__init__(module)

    def _pack(self, tensor):
        self._param_storages = {p.untyped_storage().data_ptr() for p in self._params}
        return super()._pack(tensor)


# ----------------------------------------------------------------------------
# the arithmetic of a configuration: a rank's rows, a block's bytes


def micro_batch_rows(rank: int, sizes: dict, global_batch: int, microbatches: int) -> list:
    """The rows of a global batch that ``rank`` computes, one ``(start, stop)`` per micro-batch.

    Only the dp·ep data ranks split the batch (data rank dp_index·ep + ep_index takes the r-th
    contiguous share); the tp, cp and pp ranks of one replica see the same rows. So
    global batch = micro-batch × micro-batches × dp·ep.
    """
    layout = GridLayout(**sizes)
    c = layout.coordinates(rank)
    data_ranks, data_rank = layout.dp * layout.ep, c.dp * layout.ep + c.ep
    if global_batch % (data_ranks * microbatches):
        raise ValueError(
            f"a global batch of {global_batch} does not split into dp·ep·m = "
            f"{data_ranks}·{microbatches} equal micro-batches"
        )
    micro = global_batch // (data_ranks * microbatches)
    start = data_rank * micro * microbatches
    return [(start + i * micro, start + (i + 1) * micro) for i in range(microbatches)]


def block_state_bytes(
    d_model: int, d_hidden: int, tp: int = 1, dp: int = 1, sharding: str = "none", element_bytes: int = 4
) -> int:
    """Bytes of parameters, gradients and Adam's two moments that one rank holds for one
    sequence-parallel transformer block (chapter 05's), trained with ``sharding`` over dp ranks.

    Split over tp: qkv (3d² + 3d), proj's weight (d²), fc1 (h·d + h), fc2's weight (d·h);
    whole on every rank: both LayerNorms (2·2d) and the row-parallel biases (d + d). ZeRO then
    shards the optimizer states (zero1), also the gradients (zero2), also the parameters
    (zero3, fsdp) over the dp ranks. Assumes every unit splits evenly (no padding)."""
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    d, h = d_model, d_hidden
    psi = (3 * d * d + 3 * d + d * d + h * d + h + d * h) / tp + 2 * 2 * d + 2 * d
    stage = ZERO_STAGE.get(sharding, 3)
    params = element_bytes * psi / (dp if stage >= 3 else 1)
    grads = element_bytes * psi / (dp if stage >= 2 else 1)
    moments = 2 * element_bytes * psi / (dp if stage >= 1 else 1)
    return round(params + grads + moments)


def measure_block_state_bytes(d_model: int, d_hidden: int, tp: int, dp: int, sharding: str) -> int:
    """Inside each of tp·dp ranks: one training step of one sequence-parallel block with this
    sharding; the bytes of model states this rank holds after the update, from the tensors."""
    grid = RankGrid(dp=dp, tp=tp)
    torch.manual_seed(0)
    dense = TransformerBlock(d_model, 4, d_hidden, causal=True)
    stage = nn.Sequential(OrderedDict([("0", tp_lib.SequenceParallelBlock.from_dense(dense, grid.tp_group))]))
    optimizer = _Optimizer(stage, grid, sharding, 1e-3, gradient_sums(stage, grid), grid.dp_group)
    x = torch.randn(2, 4 * tp, d_model)[:, tp_lib.block_of(4 * tp, tp, grid.tp_rank)]
    stage(x).square().mean().backward()
    optimizer.step()
    return optimizer.state_bytes()


# ----------------------------------------------------------------------------
# the training loop


def _model_description(vocab_size: int, kw: dict) -> dict:
    """make_gpt's arguments with every default filled in: what a checkpoint must match."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(gpt.make_gpt).parameters.items()
        if name not in ("vocab_size", "seed")
    }
    out = {"vocab_size": vocab_size, **defaults, **{k: v for k, v in kw.items() if k in defaults}}
    out["d_hidden"] = out["d_hidden"] or 4 * out["d_model"]
    return out


def _check_config(
    dp, tp, pp, cp, ep, sharding, steps, batch_size, microbatches, seq_len, moe, precision="fp32"
):
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and ep > 1:
        raise ValueError(
            "precision='bf16' with ep > 1 is not supported: chapter 08's MoELayer adds the experts' "
            "bf16 outputs into an fp32 buffer (index_add), which needs one dtype; use fp32 with ep"
        )
    if moe and tp > 1:
        raise ValueError(
            "moe with tp > 1 is not supported: chapter 04's tensor-parallel block splits a dense MLP, "
            "not a mixture of experts; use tp=1 with ep"
        )
    if ep > 1 and sharding == "fsdp":
        raise ValueError(
            "sharding='fsdp' with ep > 1 is not supported (the experts would need their own FSDP group); "
            "use sharding='zero3', which shards experts over dp and the rest over dp·ep"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    data = dp * ep
    if batch_size % (data * microbatches):
        raise ValueError(
            f"global batch {batch_size} must split into dp·ep = {data} data shards of "
            f"{microbatches} micro-batches each: use a multiple of {data * microbatches}"
        )
    if tp > 1 and cp == 1 and seq_len % tp:
        raise ValueError(f"seq_len={seq_len} must split over tp={tp} ranks (sequence parallel)")
    if cp > 1 and seq_len % (2 * cp):
        raise ValueError(f"seq_len={seq_len} must split into 2·cp = {2 * cp} zig-zag chunks")


def _progress(steps: int, show: bool):
    """tqdm's bar on rank 0 (a plain line every tenth of the run where tqdm is not installed)."""
    if not show:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=steps, desc="train_gpt", file=sys.stdout, mininterval=0.5, leave=True)


def train_gpt(
    dp: int = 1,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    ep: int = 1,
    sharding: str = "none",
    steps: int = 50,
    seed: int = 0,
    *,
    batch_size: int = 8,
    microbatches: int | None = None,
    schedule: str = "1f1b",
    lr: float = 3e-3,
    progress: bool = True,
    precision: str = "fp32",
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = True,
    **model_kw,
) -> dict:
    """Train :func:`course_lib.gpt.make_gpt` on the course's text; call it on every rank.

    dp·tp·pp·cp·ep must equal the world size; ``moe`` is on when ep > 1. Each step draws the same
    global batch of ``batch_size`` windows in every configuration (:func:`course_lib.gpt.global_batch`),
    data rank dp_index·ep + ep_index takes its rows, and the pipeline cuts them into ``microbatches``
    (default: pp) micro-batches. Optimizer: AdamW (lr, β = (0.9, 0.999), no weight decay).
    ``precision="bf16"``: bf16 compute on fp32 master weights (see :data:`PRECISIONS`).
    ``checkpoint_dir``: every ``checkpoint_every`` steps and at the last step each rank saves its
    slices there (:mod:`course_lib.checkpoint`); with ``resume`` the run first loads the latest checkpoint in
    it, whatever layout wrote it, and continues from its step (its "loss" then holds the whole
    curve, the steps before the checkpoint from the checkpoint; "resumed_from" is that step).
    Returns, on every rank, {"loss": the global mean loss of every step, "tokens_per_s": global
    tokens per second of wall time, "peak_bytes": the most bytes of model states plus saved
    activations this rank held, "step_s": this rank's wall seconds of every step, "coord", "sharding"}.
    """
    kw = {**MODEL_DEFAULTS, **model_kw}
    kw["moe"] = bool(kw.get("moe", False) or ep > 1)
    m = microbatches or pp
    _check_config(dp, tp, pp, cp, ep, sharding, steps, batch_size, m, kw["seq_len"], kw["moe"], precision)
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be a non-negative integer, got {checkpoint_every!r}")
    grid = RankGrid(dp=dp, tp=tp, pp=pp, cp=cp, ep=ep)
    data_group = grid.new_group(("dp", "ep"))
    tok = gpt.CharTokenizer()
    train_ids, _ = gpt.split(tok.encode(gpt.TEXT))
    model = gpt.make_gpt(tok.vocab_size, seed=seed, **kw)
    seq_len = kw["seq_len"]
    stage = build_stage(grid, model)
    sums = gradient_sums(stage, grid)
    optimizer = _Optimizer(stage, grid, sharding, lr, sums, data_group)
    ckpt, begin, losses = None, 0, []
    if checkpoint_dir is not None:
        index = checkpoint_lib.index_model(gpt.make_gpt(tok.vocab_size, seed=seed, **kw))
        layout = checkpoint_lib.global_layout(index)
        index_optimizer = _Optimizer(build_stage(grid, index), grid, sharding, lr, {}, data_group)
        ckpt = checkpoint_lib.Checkpointer(
            optimizer,
            index_optimizer,
            layout,
            _model_description(tok.vocab_size, kw),
            {"seed": seed, "batch_size": batch_size},
            {**dict(dp=dp, tp=tp, pp=pp, cp=cp, ep=ep), "sharding": sharding, "precision": precision},
        )
        found = checkpoint_lib.latest(checkpoint_dir) if resume else None
        if found is not None:
            meta = ckpt.load(found)
            begin, losses = meta["step"], list(meta["loss"])
            if grid.rank == 0 and progress:
                print(f"resumed at step {begin} from {found} (written by {meta['layout']})", flush=True)
    first, last = grid.pp_rank == 0, grid.pp_rank == pp - 1
    sp = tp > 1 and cp == 1
    data_rank, data_ranks = grid.coord.dp * ep + grid.coord.ep, dp * ep

    def my_columns(t):  # the positions this rank's activations hold
        if cp > 1:
            return cp_lib.shard_sequence(t, grid.cp_rank, cp, dim=1)
        if sp:
            return t[:, tp_lib.block_of(seq_len, tp, grid.tp_rank, "seq_len")]
        return t

    def loss_fn(logits, targets):  # this rank's share of its micro-batch's mean loss
        return gpt.token_loss_sum(logits, targets) / (targets.shape[0] * seq_len)

    # Copies of the same loss: the tp ranks of a context-parallel run all compute the whole head.
    copies = data_ranks * (tp if (tp > 1 and cp > 1) else 1)
    bar = _progress(steps, grid.rank == 0 and progress)
    if bar is not None and begin:
        bar.update(min(begin, steps))
    peak, step_s = 0, []
    start = time.perf_counter()
    for step in range(begin, steps):
        step_start = time.perf_counter()
        x, y = gpt.global_batch(train_ids, step, batch_size, seq_len, seed)
        x, y = gpt.data_shard(x, data_rank, data_ranks), gpt.data_shard(y, data_rank, data_ranks)
        inputs = (my_columns(x) if cp > 1 else x) if first else None  # SP scatters after embedding
        targets = my_columns(y) if last else None
        bf16 = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        with _ActivationMeter(stage, optimizer.params) as meter, bf16:
            loss = pipeline.train_step(stage, inputs, targets, loss_fn, m, schedule, group=grid.pp_group)
        optimizer.step()
        peak = max(peak, optimizer.state_bytes() + meter.peak_bytes)
        optimizer.zero_grad()
        total = loss.detach().clone() if last else torch.zeros(())
        dist.all_reduce(total)
        losses.append(total.item() / copies)
        step_s.append(time.perf_counter() - step_start)
        if (
            ckpt is not None
            and checkpoint_every
            and ((step + 1) % checkpoint_every == 0 or step + 1 == steps)
        ):
            ckpt.save(checkpoint_dir, step + 1, losses)
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update(1)
        elif grid.rank == 0 and progress and (step + 1) % max(1, steps // 10) == 0:
            speed = (step + 1 - begin) * batch_size * seq_len / (time.perf_counter() - start)
            print(f"step {step + 1}/{steps}  loss {losses[-1]:.4f}  tokens/s {speed:,.0f}", flush=True)
    if ckpt is not None and checkpoint_every and begin >= steps:  # nothing left to train: save in this layout
        ckpt.save(checkpoint_dir, begin, losses)
    wall = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return {
        "loss": losses,
        "tokens_per_s": max(steps - begin, 0) * batch_size * seq_len / wall,
        "peak_bytes": peak,
        "step_s": step_s,
        "resumed_from": begin,
        "coord": grid.coord,
        "sharding": sharding,
    }


# ----------------------------------------------------------------------------
# many configurations, and their curves compared


class CurveMismatch(AssertionError):
    """A configuration's loss curve left the one-process curve; the message names its axes."""


def axes_of(config: dict) -> list:
    """The parallel axes a configuration uses (size > 1), and its sharding if any."""
    used = [f"{a}{config[a]}" for a in ("dp", "tp", "pp", "cp", "ep") if config.get(a, 1) > 1]
    if config.get("sharding", "none") != "none":
        used.append(config["sharding"])
    return used


def relative_deviation(curve: Sequence[float], reference: Sequence[float]) -> list:
    """|loss − reference| / |reference| at every step."""
    if len(curve) != len(reference):
        raise ValueError(f"curves of {len(curve)} and {len(reference)} steps cannot be compared")
    return [abs(a - b) / abs(b) for a, b in zip(curve, reference)]


def compare_curves(
    reference: Sequence[float], curves: dict, configs: dict | None = None, rtol: float = 1e-4
) -> float:
    """The largest relative deviation of any curve from ``reference``; raises :class:`CurveMismatch`
    naming the configuration (and its axes, from ``configs``) whose curve left it first."""
    worst, first = 0.0, None
    for name, curve in curves.items():
        dev = relative_deviation(curve, reference)
        worst = max(worst, max(dev))
        bad = [i for i, d in enumerate(dev) if d > rtol]
        if bad and (first is None or bad[0] < first[1] or (bad[0] == first[1] and dev[bad[0]] > first[2])):
            first = (name, bad[0], dev[bad[0]])
    if first is not None:
        name, step, dev = first
        axes = axes_of((configs or {}).get(name, {})) or [name]
        raise CurveMismatch(
            f"the loss curve of {name!r} (axes {', '.join(axes)}) diverged first from one process's: "
            f"at step {step} its loss {curves[name][step]:.6f} is {dev:.2e} away from {reference[step]:.6f} "
            f"(relative; allowed {rtol:g}) — look at the gradient sums of axis {axes[0]}"
        )
    return worst


def _world(config: dict) -> int:
    return math.prod(config.get(a, 1) for a in ("dp", "tp", "pp", "cp", "ep"))


def run_configs(configs: dict, steps: int = 50, seed: int = 0, timeout: float = 300.0, **common) -> dict:
    """{name: rank 0's result} of :func:`train_gpt` for every configuration (``common`` keyword
    arguments go to every one; a configuration's own "steps" or "seed" wins). Configurations of
    the same world size dp·tp·pp·cp·ep share one launch: its ranks train them one after another
    (a launch's start-up is paid once per size)."""
    from course_lib.launch import run

    by_world: dict = {}
    for name, config in configs.items():
        by_world.setdefault(_world(config), []).append(name)
    results = {}
    for world, names in by_world.items():
        runs = [{**common, "steps": steps, "seed": seed, **configs[name]} for name in names]
        outs = run(_train_many_in_rank, world, runs, backend="gloo", timeout=timeout * len(runs))[0]
        results.update(zip(names, outs))
    return {name: results[name] for name in configs}


def _train_in_rank(kwargs):
    torch.set_num_threads(1)
    return train_gpt(**kwargs)


def _train_many_in_rank(runs):
    return [_train_in_rank(kwargs) for kwargs in runs]


# ----------------------------------------------------------------------------
# the same code under torchrun


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m course_lib.train", description=__doc__.split("\n")[0])
    for axis in ("dp", "tp", "pp", "cp", "ep"):
        p.add_argument(f"--{axis}", type=int, default=1)
    p.add_argument("--sharding", default="none", choices=SHARDINGS)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--schedule", default="1f1b")
    p.add_argument("--n-layers", type=int, default=MODEL_DEFAULTS["n_layers"])
    p.add_argument("--d-model", type=int, default=MODEL_DEFAULTS["d_model"])
    p.add_argument("--n-heads", type=int, default=MODEL_DEFAULTS["n_heads"])
    p.add_argument("--seq-len", type=int, default=MODEL_DEFAULTS["seq_len"])
    p.add_argument("--moe", action="store_true")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--json", help="write rank 0's result to this file")
    p.add_argument("--checkpoint-dir", help="save checkpoints here (and resume from the latest one)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="save every this many steps")
    p.add_argument("--no-resume", action="store_true", help="start from step 0 even if a checkpoint exists")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse(argv)
    if "RANK" in os.environ:  # torchrun set RANK, WORLD_SIZE, MASTER_ADDR/PORT (env://)
        store, rank, world = next(dist.rendezvous("env://"))
        # After a restart (--max-restarts) the restarted ranks sometimes waited forever inside
        # init_process_group (measured: about one restart in four, torch 2.13): the store can still
        # hold the killed attempt's keys (pytorch/pytorch#135712 describes the same for NCCL).
        # Each attempt's keys get their own prefix (none hung in the runs since).
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"course_lib.train/attempt{attempt}", store)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    else:  # plain `python -m course_lib.train`: a world of one
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        result = train_gpt(
            opts.dp,
            opts.tp,
            opts.pp,
            opts.cp,
            opts.ep,
            opts.sharding,
            opts.steps,
            opts.seed,
            batch_size=opts.batch_size,
            schedule=opts.schedule,
            n_layers=opts.n_layers,
            d_model=opts.d_model,
            n_heads=opts.n_heads,
            seq_len=opts.seq_len,
            moe=opts.moe,
            precision=opts.precision,
            checkpoint_dir=opts.checkpoint_dir,
            checkpoint_every=opts.checkpoint_every,
            resume=not opts.no_resume,
        )
        if dist.get_rank() == 0:
            print(
                f"final loss {result['loss'][-1]:.4f}  tokens/s {result['tokens_per_s']:,.0f}  "
                f"peak bytes (rank 0) {result['peak_bytes']:,}"
            )
            if opts.json:
                with open(opts.json, "w") as f:
                    json.dump(
                        {k: result[k] for k in ("loss", "tokens_per_s", "peak_bytes", "resumed_from")}, f
                    )
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
