"""Chapter 07: ZeRO — data parallelism without N copies of the model states.

    opt = ZeroAdam(model, stage=2, lr=1e-3)      # inside each of N ranks, same model on each
    loss = F.mse_loss(model(x_shard), y_shard)   # each rank its own shard of the batch
    loss.backward(); opt.step(); opt.zero_grad()

Plain data parallelism (``stage=0`` here) keeps on every rank the parameters,
the gradients and both Adam moments: 4 + 4 + 8 = 16 bytes per parameter in
fp32. Adam is element-wise, so the update of element i needs only element i of
those. ZeRO cuts every rank's copy into N shards and keeps only its own:

* stage 1: rank r keeps Adam's moments for its shard only; after the update
  the new parameters are all-gathered. Gradients: reduce-scatter, not all-reduce,
  started by a hook during backward (overlapping it) and finished in step().
* stage 2: also the gradients. A hook reduce-scatters them during backward, as
  soon as a layer's gradients exist, and frees the full ones.
* stage 3: also the parameters. A layer's are all-gathered just before its
  forward and again before its backward, and freed after each.

Layout: the parameters a module owns directly (a Linear's weight and bias) form
one *unit*, laid out in one flat buffer zero-padded to a multiple of N; rank r
owns elements [r·S, (r+1)·S) of it, S = padded / N. Per layer, so that stage 3
can gather one layer at a time. Notation: N ranks, Ψ parameters.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten

STAGES = (0, 1, 2, 3)
#: Bytes per parameter of (params, grads, optimizer states) on every rank of plain DP.
PRECISIONS = {
    "fp32": (4, 4, 8),  # this course on CPU: fp32 params, grads, Adam's m and v
    "mixed": (2, 2, 12),
}  # fp16 params and grads; fp32 master copy, m and v


def padded_size(numel: int, world_size: int) -> int:
    """``numel`` rounded up to a multiple of ``world_size``: N equal shards."""
    return -(-numel // world_size) * world_size


def formula_bytes(stage: int, psi: float, world_size: int, precision: str = "fp32") -> dict:
    """Bytes of model states per rank by the ZeRO paper's accounting (no padding)."""
    p, g, o = PRECISIONS[precision]
    n = world_size
    return {
        "params": p * psi / (n if stage >= 3 else 1),
        "grads": g * psi / (n if stage >= 2 else 1),
        "optimizer": o * psi / (n if stage >= 1 else 1),
    }


def formula_traffic(
    stage: int,
    psi: float,
    world_size: int,
    bytes_per_element: int = 4,
    micro_batches: int = 1,
    accumulate_unsharded: bool = False,
) -> float:
    """Bytes each rank receives per step: 2Ψ (DP, stages 1, 2) or 3Ψ (stage 3), times (N−1)/N.

    With M = ``micro_batches`` backwards before each step (gradient accumulation), counted in
    halves of an all-reduce, Ψ·(N−1)/N each: stage 0 (ZeroAdam all-reduces in ``step()``) 2;
    stages 1 and 2 reduce-scatter every micro-batch and all-gather once, M + 1; stage 3 also
    gathers the parameters twice per micro-batch, 3M. With ``accumulate_unsharded`` (the first
    M − 1 backwards under :meth:`ZeroAdam.no_sync`: full gradients kept locally and reduced once)
    stages 1 and 2 come back to 2 and stage 3 to 2M + 1.
    """
    m = micro_batches
    if m < 1:
        raise ValueError(f"micro_batches must be at least 1, got {m}")
    if stage == 0:
        halves = 2
    elif stage in (1, 2):
        halves = 2 if accumulate_unsharded else m + 1
    else:
        halves = 2 * m + 1 if accumulate_unsharded else 3 * m
    return halves * psi * bytes_per_element * (world_size - 1) / world_size


def adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One ``torch.optim.AdamW`` update of ``param``, in place; ``step`` counts from 1."""
    beta1, beta2 = betas
    param.mul_(1 - lr * weight_decay)  # decoupled weight decay: AdamW, not Adam + L2
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))


def reduce_scatter(flat: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Chunk r of the sum over ranks of ``flat``, on rank r (a new tensor of len(flat)/N).

    Every rank sends its chunk j straight to rank j (an all-to-all) and adds up the N
    chunks it receives: (N−1)/N of ``flat`` sent and received per rank, as in a ring,
    but in one round instead of N−1. Written out because gloo's own reduce_scatter
    runs an all-reduce underneath and moves twice that (measured in the lesson).
    """
    n = dist.get_world_size(group)
    received = torch.empty_like(flat).view(n, -1)  # equal chunks: flat is padded to a multiple of N
    dist.all_to_all_single(received, flat.view(n, -1), group=group)
    return received.sum(dim=0)


class _Unit:
    """The parameters one module owns directly, in one flat buffer; this rank's shard of it."""

    def __init__(self, module, names, params, parts: int, rank: int):
        self.module, self.names, self.params = module, names, params
        self.numel = sum(p.numel() for p in params)
        self.padded = padded_size(self.numel, parts)
        self.shard_size = self.padded // parts
        self.start = rank * self.shard_size
        self.grad_shard = None
        self.exp_avg = torch.zeros(self.shard_size, dtype=params[0].dtype, device=params[0].device)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.step = 0
        self.unsynced = False  # p.grad holds gradients of a backward under no_sync(), not yet reduced
        self.waiting = len(params)  # gradients still to arrive in this backward (stages 1–3)
        # The full parameters live in `full`; every parameter is a view into it.
        # Stage 3 keeps `full`'s storage at size 0 except while a layer runs.
        self.full = self.flat([p.detach() for p in params])
        for p, view in zip(params, self.views(self.full)):
            p.data = view
        self.param_shard = self.full[self.start : self.start + self.shard_size]

    def flat(self, tensors) -> torch.Tensor:
        """A new flat buffer holding ``tensors`` one after another, then zeros up to ``padded``."""
        out = torch.zeros(self.padded, dtype=self.exp_avg.dtype, device=self.exp_avg.device)
        torch.cat([t.reshape(-1) for t in tensors], out=out[: self.numel])
        return out

    def views(self, flat):
        """One view of ``flat`` per parameter, in its shape."""
        pieces = flat[: self.numel].split([p.numel() for p in self.params])
        return [piece.view(p.shape) for piece, p in zip(pieces, self.params)]

    def flat_grad(self) -> torch.Tensor:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        return self.flat(grads)


class ZeroAdam:
    """AdamW (``torch.optim.AdamW`` semantics) over N data-parallel ranks, ZeRO stage 0–3.

    Every rank must call it with the same model (checked). Each rank runs the
    forward and backward on its own shard of the batch with the mean loss; the
    gradient used is the mean over ranks, so N ranks train exactly like one
    process on the whole batch. Stage 0 is plain data parallelism (all-reduce).
    It hooks into the model, so one ZeroAdam per model. Stage 3 swaps each
    layer's parameters out between uses: read them with :meth:`full_parameters`,
    not from the model.
    """

    def __init__(
        self,
        model,
        stage: int,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        group=None,
    ):
        if stage not in STAGES:
            raise ValueError(f"ZeRO stage must be one of {STAGES} (0 = plain data parallel), got {stage!r}")
        if not (lr >= 0 and eps >= 0 and weight_decay >= 0 and all(0 <= b < 1 for b in betas)):
            raise ValueError(
                f"need lr, eps, weight_decay >= 0 and 0 <= betas < 1; got lr={lr}, "
                f"betas={betas}, eps={eps}, weight_decay={weight_decay}"
            )
        self.model, self.stage, self.group = model, stage, group
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        named = list(model.named_parameters())
        if not named or any(not p.is_floating_point() for _, p in named):
            raise ValueError("ZeroAdam needs a model with floating-point parameters")
        _check_same_on_all_ranks(named, group)
        self.names = {p: name for name, p in named}
        # Plain DP is "one shard holding everything": the same code, nothing sharded.
        self.parts, rank = (1, 0) if stage == 0 else (self.world_size, self.rank)
        self.units = [
            _Unit(m, [self.names[p] for p in ps], ps, self.parts, rank)
            for m, ps in self._owned_parameters(model)
        ]
        self.in_flight = {}  # stage 1: unit -> its reduce-scatter started during the backward
        self.sync = True  # False inside no_sync(): backwards keep their gradients, unsharded
        if stage >= 1:
            for unit in self.units:
                for p in unit.params:
                    p.register_post_accumulate_grad_hook(lambda p, unit=unit: self._grad_ready(unit))
        if stage == 3:
            for unit in self.units:
                unit.param_shard = unit.param_shard.clone()  # its own storage: `full` gets freed
                self._free(unit)
                unit.module.register_forward_pre_hook(lambda *_, unit=unit: self._gather(unit))
                unit.module.register_forward_hook(lambda m, a, out, unit=unit: self._after_forward(unit, out))

    def _owned_parameters(self, model):
        """(module, the parameters it owns directly) in model order; a shared one counts once."""
        seen, units = set(), []
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            if self.stage == 3 and any(p in seen for p in own):
                raise ValueError(
                    "stage 3 gathers each module's own parameters around its forward; "
                    "a parameter shared by two modules is not supported"
                )
            own = [p for p in own if p not in seen]
            seen.update(own)
            if own:
                units.append((module, own))
        return units

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backwards inside accumulate full gradients locally and send nothing (DDP's ``no_sync``).

        For gradient accumulation over M micro-batches: run the first M − 1 backwards inside,
        the last outside; that one reduces the sum once (``step()`` does, if every backward was
        inside). Stages 0 and 1 keep full gradients anyway, so this is free; stages 2 and 3 then
        hold full, unsharded gradients between micro-batches — the memory sharding them saves.
        """
        previous, self.sync = self.sync, False
        try:
            yield
        finally:
            self.sync = previous

    # -- communication -------------------------------------------------------

    @torch.no_grad()
    def _reduce_gradients(self, units) -> None:
        """Add this rank's shard of the mean gradient to each unit's ``grad_shard``.

        Plain DP: every layer in one all-reduce. Stages 2, 3: one layer, reduce-scattered.
        """
        if self.stage == 0:
            bucket = torch.cat([u.flat_grad() for u in units])  # one message, not one per layer
            dist.all_reduce(bucket, group=self.group)
            shards = bucket.split([u.shard_size for u in units])
        else:
            shards = [reduce_scatter(u.flat_grad(), self.group) for u in units]
        for unit, shard in zip(units, shards):
            shard.div_(self.world_size)
            unit.grad_shard = shard if unit.grad_shard is None else unit.grad_shard.add_(shard)

    def _grad_ready(self, unit) -> None:
        """A parameter's gradient is complete; once all of a layer's are, reduce-scatter them."""
        unit.waiting -= 1
        if unit.waiting > 0:
            return
        unit.waiting = len(unit.params)
        if not self.sync:  # no_sync(): p.grad keeps adding up; reduced once, later
            if unit in self.in_flight:  # an earlier backward's send: it no longer holds the sum
                self.in_flight.pop(unit)[0].wait()
            unit.unsynced = True
            if self.stage == 3:
                self._free(unit)
            return
        unit.unsynced = False
        if self.stage == 1:
            # Start sending now and finish in step(): the transfer overlaps the rest of the
            # backward. (Stage 2 cannot wait: the receive buffer is as large as the gradient.)
            if unit in self.in_flight:  # an earlier backward's: p.grad has added it up since
                self.in_flight.pop(unit)[0].wait()
            sent = unit.flat_grad().view(self.parts, -1)
            received = torch.empty_like(sent)
            request = dist.all_to_all_single(received, sent, group=self.group, async_op=True)
            self.in_flight[unit] = (request, received, sent)  # `sent` must live until it is sent
            return
        self._reduce_gradients([unit])
        for p in unit.params:
            p.grad = None  # the point of stage 2: the full gradient goes now
        if self.stage == 3:
            self._free(unit)

    @torch.no_grad()
    def _gather(self, unit) -> None:
        """Stage 3: bring back a layer's full parameters (all-gather into `full`'s storage)."""
        storage = unit.full.untyped_storage()
        if storage.nbytes() == 0:
            storage.resize_(unit.padded * unit.full.element_size())
            dist.all_gather_single(unit.full, unit.param_shard, group=self.group)

    @staticmethod
    def _free(unit) -> None:
        # Resizing the storage, not replacing tensors: tensors autograd saved for
        # the backward are views of `full` too, and see the data once re-gathered.
        unit.full.untyped_storage().resize_(0)

    def _after_forward(self, unit, output) -> None:
        if torch.is_grad_enabled():
            for t in tree_flatten(output)[0]:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    # Fires when the gradient reaches this layer's output: before its backward.
                    t.register_hook(lambda grad, unit=unit: self._gather(unit))
        self._free(unit)

    # -- the optimizer -------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        if self.stage == 0:
            with_grads = [u for u in self.units if any(p.grad is not None for p in u.params)]
            if with_grads:
                self._reduce_gradients(with_grads)
        for unit in self.units:  # a layer some of whose parameters got no gradient
            while 0 < unit.waiting < len(unit.params):
                self._grad_ready(unit)
        previous, self.sync = self.sync, True
        for unit in self.units:  # the last backward ran under no_sync(): reduce its sum now
            if unit.unsynced:
                unit.waiting = 1
                self._grad_ready(unit)
        self.sync = previous
        for unit, (request, received, _) in self.in_flight.items():  # reduce_scatter, in two halves
            request.wait()
            unit.grad_shard = received.sum(dim=0).div_(self.world_size)
        self.in_flight = {}
        gathers = []
        for unit in self.units:
            if unit.grad_shard is None:
                continue  # like torch: no gradient, no update
            unit.step += 1
            adamw_(
                unit.param_shard,
                unit.grad_shard,
                unit.exp_avg,
                unit.exp_avg_sq,
                unit.step,
                self.lr,
                self.betas,
                self.eps,
                self.weight_decay,
            )
            if self.stage < 2:
                unit.grad_shard = None  # stages 0, 1 keep the full local gradients instead
            if self.stage in (1, 2):  # send this layer's new shard while the next one is updated
                mine = unit.param_shard.clone()  # input and output of a gather must not overlap
                gathers.append(
                    (dist.all_gather_single(unit.full, mine, group=self.group, async_op=True), mine)
                )
        for request, _ in gathers:
            request.wait()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for request, *_ in self.in_flight.values():  # gradients thrown away before a step
            request.wait()
        self.in_flight = {}
        for unit in self.units:
            unit.grad_shard = None
            unit.unsynced = False
            for p in unit.params:
                p.grad = None

    # -- looking inside ------------------------------------------------------

    @torch.no_grad()
    def full_parameters(self) -> dict:
        """{name: full current tensor} for every parameter, on every rank (a collective in stage 3)."""
        result = {}
        for unit in self.units:
            gathered = self.stage == 3 and unit.full.untyped_storage().nbytes() == 0
            if gathered:
                self._gather(unit)
            for name, view in zip(unit.names, unit.views(unit.full)):
                result[name] = view.clone()
            if gathered:
                self._free(unit)
        return result

    def memory_report(self) -> dict:
        """Bytes of model states this rank holds now, from the tensors' storages (each counted once)."""
        seen, units = set(), self.units
        return {
            "params": storage_bytes([u.full for u in units] + [u.param_shard for u in units], seen),
            "grads": storage_bytes(
                [p.grad for u in units for p in u.params] + [u.grad_shard for u in units], seen
            ),
            "optimizer": storage_bytes([u.exp_avg for u in units] + [u.exp_avg_sq for u in units], seen),
        }


def storage_bytes(tensors: Iterable[torch.Tensor | None], seen: set | None = None) -> int:
    """Bytes of the storages behind ``tensors`` (None skipped), each storage once: views share one."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        storage = None if t is None else t.untyped_storage()
        if storage is None or storage.nbytes() == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _check_same_on_all_ranks(named, group) -> None:
    """Raise on every rank if the ranks' models differ (in shapes or in values)."""
    n = dist.get_world_size(group)
    sizes = torch.tensor([len(named), sum(p.numel() for _, p in named)])
    everyone = torch.empty(n * 2, dtype=torch.int64)
    dist.all_gather_single(everyone, sizes, group=group)  # sizes first: gloo mixes unequal tensors silently
    if not (everyone.view(n, 2) == sizes).all():
        raise ValueError(
            f"ZeroAdam: the ranks' models differ: (parameter tensors, elements) per rank are "
            f"{[tuple(row) for row in everyone.view(n, 2).tolist()]}; every rank needs the same model"
        )
    mine = torch.stack([_checksum(p.detach()) for _, p in named])
    everyone = torch.empty(n * len(named), 2, dtype=torch.float64)
    dist.all_gather_single(everyone, mine, group=group)
    everyone = everyone.view(n, len(named), 2)
    differs = (everyone != everyone[0]).any(dim=2)  # [rank, parameter]
    if differs.any():
        rank, i = (int(v) for v in differs.nonzero()[0])
        raise ValueError(
            f"ZeroAdam: parameter {named[i][0]!r} differs across ranks (checksum on rank 0: "
            f"{everyone[0, i, 0].item():.6g}, on rank {rank}: {everyone[rank, i, 0].item():.6g}); "
            "every rank must start from the same weights: build the model with the same seed "
            "or broadcast rank 0's"
        )


def _checksum(t: torch.Tensor) -> torch.Tensor:
    """A sum and a position-weighted sum (which notices reordering), in float64."""
    x = t.reshape(-1).double()
    return torch.stack([x.sum(), (x * (torch.arange(x.numel()) % 13 + 1)).sum()])
