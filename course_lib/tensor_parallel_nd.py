"""Chapter 04b: tensor parallelism on a grid of ranks: 2D (SUMMA), 2.5D (Solomonik–Demmel), 3D (Agarwal et al.).

    mlp = parallel_mlp(make_mlp(48, 192), "2d")   # inside each of N = q·q ranks
    out = mlp(x)                                  # x whole on every rank, out whole on every rank
    (out * upstream).sum().backward()
    grads = mlp.gathered_grads()                  # every gradient, in the dense MLP's shapes

Chapter 04 cut each weight along one dimension ("1D") and kept the activations whole on
every rank. Here the N ranks form a grid, and activations and weights are both cut into
blocks. A linear layer computes Y = X·B with X the (M, K) activations (M = b·s rows) and
B = weight.T (K, F):

    "1d"    any N          chapter 04's Megatron MLP (course_lib.tensor_parallel), for comparison
    "2d"    N = q·q        SUMMA: rank (i, j) holds X_ij and B_ij. In step k, X_ik is broadcast
                           along grid row i and B_kj along grid column j; (i, j) adds X_ik·B_kj.
    "2.5d"  N = q·q·d      d copies ("layers") of the q×q grid, each holding all the blocks; layer l
                           runs q/d of SUMMA's steps and one all-reduce along the depth adds them.
    "3d"    N = q·q·q      rank (a, b, c) all-gathers its X block along one axis of the cube and its
                           weight block along another, multiplies, and reduce-scatters the product
                           along the third; the next layer swaps the roles of the last two axes.

Every collective runs on a row, column, depth or axis process group built here
(:func:`make_grid`). The backward of each product is the same algorithm run on the
transposed problem: dX = dY·Bᵀ and dB = Xᵀ·dY. ``forward`` takes the whole input,
keeps this rank's block (:class:`_Scatter`) and returns the whole output
(:class:`_Gather`); ``forward_sharded`` is the layer itself, from block to block, as it
runs between the layers of a real network. :func:`predicted` states each method's
per-rank bytes and calls, measured beside it in the lesson and the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from course_lib.tensor_parallel import (
    TensorParallelMLP,
    _all_gather,
    _reduce_scatter,
    copy_to_tp_region,
    reduce_from_tp_region,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from course_lib.models import MLP
MODES = ("1d", "2d", "2.5d", "3d")


# ----------------------------------------------------------------------------
# grid shapes: which rank counts work


def _exact_root(n: int, power: int) -> int | None:
    root = round(n ** (1 / power))
    return next((r for r in (root - 1, root, root + 1) if r > 0 and r**power == n), None)


def _shape(n: int, mode: str, depth: int | None = None) -> tuple[int, int] | None:
    if mode == "1d":
        return n, 1
    if mode == "2d":
        q = _exact_root(n, 2)
        return (q, 1) if q else None
    if mode == "3d":
        q = _exact_root(n, 3)
        return (q, q) if q else None
    # 2.5D: q·q·d = n with d dividing q (each of the d layers runs q/d of SUMMA's q steps)
    options = [
        (q, n // (q * q)) for q in range(1, math.isqrt(n) + 1) if n % (q * q) == 0 and q % (n // (q * q)) == 0
    ]
    options = [(q, d) for q, d in options if depth is None or d == depth]
    return max(options, key=lambda qd: qd[1]) if options else None  # the deepest grid that fits


def shapes_that_work(mode: str, up_to: int = 64) -> list[str]:
    """The rank counts ``mode`` accepts up to ``up_to``, written as their grid ("8 = 2·2·2")."""
    found = []
    for n in range(1, up_to + 1):
        if (shape := _shape(n, mode)) is None:
            continue
        q, d = shape
        found.append(
            {"1d": f"{n}", "2d": f"{n} = {q}·{q}", "3d": f"{n} = {q}·{q}·{q}"}.get(mode, f"{n} = {q}·{q}·{d}")
        )
    return found


def grid_shape(n: int, mode: str, depth: int | None = None) -> tuple[int, int]:
    """(q, d) of the grid that ``mode`` builds on ``n`` ranks; ValueError naming the counts that work."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if depth is not None and mode != "2.5d":
        raise ValueError(f"depth is the 2.5D grid's d; mode {mode!r} takes no depth (got depth={depth})")
    if (shape := _shape(n, mode, depth)) is not None:
        return shape
    need = {
        "2d": "a square number of ranks, N = q·q",
        "3d": "a cube number of ranks, N = q·q·q",
        "2.5d": "N = q·q·d ranks with the depth d dividing q",
    }[mode]
    given = f"N={n}" + (f" with depth={depth}" if depth is not None else "")
    works = ", ".join(shapes_that_work(mode, 32))
    raise ValueError(
        f"{mode} tensor parallelism needs {need}; {given} is not one. Counts that work: {works}, …"
    )


def _split(size: int, parts: int, what: str, grid: str) -> int:
    if size % parts:
        raise ValueError(
            f"{what}={size} does not split into {parts} equal blocks on the {grid} grid "
            f"({size} % {parts} = {size % parts}); choose sizes divisible by {parts}"
        )
    return size // parts


def _blk(size: int, parts: int, index: int) -> slice:
    step = size // parts
    return slice(index * step, (index + 1) * step)


# ----------------------------------------------------------------------------
# which block each rank holds (pure arithmetic: the exercises and the pictures use it too)


def coords_2d(rank: int, q: int) -> tuple[int, int]:
    """Rank → (i, j) on the q×q grid, rows first: rank = i·q + j."""
    return rank // q, rank % q


def block(t: torch.Tensor, q: int, i: int, j: int) -> torch.Tensor:
    """Block (i, j) of a matrix cut into q×q equal blocks."""
    return t[_blk(t.shape[0], q, i), _blk(t.shape[1], q, j)]


def owned_2d(x: torch.Tensor, weight: torch.Tensor, q: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks rank (i, j) holds on the 2D grid: X_ij of the input, and B_ij of B = weight.T."""
    i, j = coords_2d(rank, q)
    return block(x, q, i, j), block(weight.T, q, i, j)


def coords_3d(rank: int, q: int) -> tuple[int, int, int]:
    """Rank → (a, b, c) on the q×q×q cube: rank = a·q² + b·q + c."""
    return rank // (q * q), rank // q % q, rank % q


def chunk_3d(t: torch.Tensor, q: int, row_block: int, sub: int, col_block: int) -> torch.Tensor:
    """Rows: piece ``sub`` (of q) of row block ``row_block`` (of q); columns: block ``col_block`` (of q)."""
    rows = _blk(t.shape[0], q * q, row_block * q + sub)
    return t[rows, _blk(t.shape[1], q, col_block)]


def owned_3d(x: torch.Tensor, weight: torch.Tensor, q: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What rank (a, b, c) holds of the first linear layer on the cube.

    X: row block a, its piece b, column block c — the block X_ac, split along the b axis.
    weight (out, in): output block b, its piece a, input block c — W_bc, split along the a axis.
    """
    a, b, c = coords_3d(rank, q)
    return chunk_3d(x, q, a, b, c), chunk_3d(weight, q, b, a, c)


def owner_maps(mode: str, q: int, m: int, k: int, f: int) -> dict:
    """Which rank holds each element of X (m, k) and of a weight (f, k), by :func:`owned_2d` /
    :func:`owned_3d` — the functions the layers cut their blocks with. "2d" also stands for each
    layer of the 2.5D grid (layer l's rank is l·q² plus the 2D rank)."""
    x = torch.arange(m * k, dtype=torch.float64).view(m, k)
    weight = torch.arange(f * k, dtype=torch.float64).view(f, k)
    owners = {"x": torch.full((m, k), -1), "weight": torch.full((f, k), -1)}
    for rank in range(q**3 if mode == "3d" else q * q):
        x_part, w_part = (owned_3d if mode == "3d" else owned_2d)(x, weight, q, rank)
        owners["x"].view(-1)[x_part.reshape(-1).long()] = rank
        owners["weight"].view(-1)[w_part.reshape(-1).long()] = rank
    return owners


# ----------------------------------------------------------------------------
# the grid: coordinates and one process group per axis


@dataclass
class Grid:
    """This rank's place on the grid and the process groups along each axis.

    ``axes`` maps an axis name to (group, global ranks along it, ordered by coordinate):
    "row" and "col" (2D, 2.5D: ranks with the same i, the same j, in this layer), "depth"
    (2.5D: the same (i, j) in every layer), and 0, 1, 2 (3D: the cube's axes).
    """

    mode: str
    q: int
    d: int
    rank: int  # in the parent group
    coords: tuple
    parent: object = None
    axes: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.q if self.mode == "1d" else self.q * self.q * self.d  # 3D: d = q

    def group(self, axis: str | int) -> dist.ProcessGroup:
        return self.axes[axis][0]

    def ranks(self, axis: str | int) -> list[int]:
        return self.axes[axis][1]

    def coords_of(self, rank: int) -> tuple:
        q = self.q
        if self.mode == "2d":
            return coords_2d(rank, q)
        if self.mode == "2.5d":  # (i, j, layer): rank = layer·q² + i·q + j
            return (*coords_2d(rank % (q * q), q), rank // (q * q))
        return coords_3d(rank, q)

    def activation_blocks(self, m: int, features: int) -> list[tuple[slice, slice]]:
        """Per rank of the group: (rows, columns) of the (m, features) activation it holds between layers."""
        q, out = self.q, []
        for r in range(dist.get_world_size(self.parent)):
            c = self.coords_of(r)
            if self.mode == "3d":  # row block a, piece b, column block c
                out.append((_blk(m, q * q, c[0] * q + c[1]), _blk(features, q, c[2])))
            else:
                out.append((_blk(m, q, c[0]), _blk(features, q, c[1])))
        return out


_GROUPS: dict = {}  # global ranks -> process group: each group is made once per process


def _group(global_ranks: list[int]):
    key = tuple(global_ranks)
    if key not in _GROUPS:
        # Only the members take part in making it, so grids on a subgroup work too.
        _GROUPS[key] = dist.new_group(list(key), use_local_synchronization=True)
    return _GROUPS[key]


def make_grid(mode: str, group: dist.ProcessGroup | None = None, depth: int | None = None) -> Grid:
    """This rank's :class:`Grid` for ``mode`` over the ranks of ``group`` (default: all)."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    q, d = grid_shape(n, mode, depth)
    grid = Grid(mode, q, d, rank, (), group)
    grid.coords = grid.coords_of(rank) if mode != "1d" else (rank,)
    if mode == "1d":
        return grid

    def global_rank(r):
        return dist.get_global_rank(group, r) if group is not None else r

    # An axis group: the ranks whose coordinates equal mine except the one at that position.
    # A grid *row* (same i) is where j varies, so "row" varies position 1 and "col" position 0.
    varying = {"2d": {"row": 1, "col": 0}, "2.5d": {"row": 1, "col": 0, "depth": 2}, "3d": {0: 0, 1: 1, 2: 2}}
    for name, position in varying[mode].items():
        along = [
            r
            for r in range(n)
            if all(a == b for k, (a, b) in enumerate(zip(grid.coords_of(r), grid.coords)) if k != position)
        ]
        along.sort(key=lambda r: grid.coords_of(r)[position])
        members = [global_rank(r) for r in along]
        grid.axes[name] = (_group(members), members)
    return grid


# ----------------------------------------------------------------------------
# 2D: SUMMA, forward and backward


def summa_step_blocks(
    x: torch.Tensor, b: torch.Tensor, grid: Grid, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two blocks SUMMA's step k brings to rank (i, j): X_ik along grid row i (from rank
    (i, k)) and B_kj along grid column j (from rank (k, j))."""
    i, j = grid.coords[:2]
    x_k = x.clone(memory_format=torch.contiguous_format) if j == k else x.new_empty(x.shape)
    b_k = b.clone(memory_format=torch.contiguous_format) if i == k else b.new_empty(b.shape)
    dist.broadcast(x_k, src=grid.ranks("row")[k], group=grid.group("row"))
    dist.broadcast(b_k, src=grid.ranks("col")[k], group=grid.group("col"))
    return x_k, b_k


def summa(x: torch.Tensor, b: torch.Tensor, grid: Grid, steps: Iterable[int] | None = None) -> torch.Tensor:
    """C_ij = Σ_k X_ik·B_kj on rank (i, j), holding X_ij and B_ij; ``steps`` (default all q) picks the k's."""
    out = x.new_zeros(x.shape[0], b.shape[1])
    for k in range(grid.q) if steps is None else steps:
        x_k, b_k = summa_step_blocks(x, b, grid, k)
        out += x_k @ b_k  # both blocks have arrived: broadcast returns when its data is here
    return out


def summa_backward(
    x: torch.Tensor, b: torch.Tensor, grad: torch.Tensor, grid: Grid, steps: Iterable[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """dX_ik = Σ_j dC_ij·B_kjᵀ and dB_kj = Σ_i X_ikᵀ·dC_ij, step by step like the forward.

    Step k broadcasts the same blocks as the forward did; rank (i, j) multiplies them with its
    own gradient block, and a reduce along row i sums the parts of dX_ik onto rank (i, k), one
    along column j those of dB_kj onto rank (k, j).
    """
    i, j = grid.coords[:2]
    grad_x, grad_b = torch.zeros_like(x), torch.zeros_like(b)
    for k in range(grid.q) if steps is None else steps:
        x_k, b_k = summa_step_blocks(x, b, grid, k)
        part_x = grad @ b_k.T
        dist.reduce(part_x, dst=grid.ranks("row")[k], group=grid.group("row"))
        part_b = x_k.T @ grad
        dist.reduce(part_b, dst=grid.ranks("col")[k], group=grid.group("col"))
        if j == k:
            grad_x = part_x
        if i == k:
            grad_b = part_b
    return grad_x, grad_b


class _Summa(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, grid, steps):
        ctx.save_for_backward(x, weight)  # only my own blocks: backward broadcasts them again
        ctx.grid, ctx.steps = grid, steps
        return summa(x, weight.T, grid, steps)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x, grad_b = summa_backward(x, weight.T, grad.contiguous(), ctx.grid, ctx.steps)
        return grad_x, grad_b.T.contiguous(), None, None  # collectives need contiguous tensors


class Linear2D(nn.Module):
    """A linear layer on the q×q grid, or on each layer of the q×q×d (2.5D) grid: X_ij in, Y_ij out.

    Rank (i, j) keeps B_ij (stored as nn.Linear does, (out, in): ``weight[j-block, i-block]``) and
    the bias block b_j, which every rank of column j holds and adds once, after the sum.
    """

    def __init__(self, weight, bias, grid: Grid):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.grid = grid
        layer = grid.coords[2] if grid.mode == "2.5d" else 0
        per_layer = grid.q // grid.d  # 2.5D: layer l runs steps l·q/d … (l+1)·q/d − 1
        self.steps = range(layer * per_layer, (layer + 1) * per_layer)

    @classmethod
    def from_dense(cls, linear: nn.Linear, grid: Grid) -> Linear2D:
        q, (i, j) = grid.q, grid.coords[:2]
        _split(linear.in_features, q, "in_features", grid_name(grid))
        _split(linear.out_features, q, "out_features", grid_name(grid))
        weight = block(linear.weight.detach().T, q, i, j).T.clone()
        bias = None if linear.bias is None else linear.bias.detach()[_blk(linear.out_features, q, j)].clone()
        return cls(weight, bias, grid)

    def index_of(self, rank: int, out_features: int, in_features: int) -> dict:
        """Where group rank ``rank``'s parameters sit in the dense layer's."""
        i, j = self.grid.coords_of(rank)[:2]
        q = self.grid.q
        return {
            "weight": (_blk(out_features, q, j), _blk(in_features, q, i)),
            "bias": (_blk(out_features, q, j),),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid, weight = self.grid, self.weight
        if grid.d > 1:  # every layer holds a copy of X_ij and B_ij: their gradients add up along the depth
            x, weight = (
                copy_to_tp_region(x, grid.group("depth")),
                copy_to_tp_region(weight, grid.group("depth")),
            )
        y = _Summa.apply(x, weight, grid, self.steps)
        if grid.d > 1:  # each layer holds the sum over its own steps: add the layers' sums
            y = reduce_from_tp_region(y, grid.group("depth"))
        if self.bias is None:
            return y
        return y + copy_to_tp_region(self.bias, grid.group("col"))  # b_j's gradient: summed over column j


# ----------------------------------------------------------------------------
# 3D: all-gather, multiply, reduce-scatter


class _Linear3D(torch.autograd.Function):
    """Y = X·Wᵀ on the cube. The contraction (K) runs along axis ``k_axis``, the output
    features (F) along ``n_axis``, and the rows of X's block are split along ``n_axis``."""

    @staticmethod
    def forward(ctx, x, weight, grid, k_axis, n_axis):
        x_block = _all_gather(x, 0, grid.group(n_axis))  # X_(a, k): row block a, input block k
        w_block = _all_gather(weight, 0, grid.group(0))  # W_(n, k): output block n, input block k
        ctx.save_for_backward(x_block, w_block)
        ctx.grid, ctx.k_axis, ctx.n_axis = grid, k_axis, n_axis
        partial = x_block @ w_block.T  # my term of Y_(a, n) = Σ_k X_(a, k)·W_(n, k)ᵀ
        return _reduce_scatter(partial, 0, grid.group(k_axis))  # the sum over k, its rows split along k

    @staticmethod
    def backward(ctx, grad):
        x_block, w_block = ctx.saved_tensors
        grid = ctx.grid
        grad_block = _all_gather(grad.contiguous(), 0, grid.group(ctx.k_axis))  # dY_(a, n)
        grad_x = _reduce_scatter(grad_block @ w_block, 0, grid.group(ctx.n_axis))  # Σ_n dY·W
        grad_w = _reduce_scatter(grad_block.T @ x_block, 0, grid.group(0))  # Σ_a dYᵀ·X
        return grad_x, grad_w, None, None, None


class Linear3D(nn.Module):
    """A linear layer on the q×q×q cube; rank (a, b, c) with ``k_axis``/``n_axis`` = 2/1 (the first
    layer; the next one swaps them) holds X's row block a, piece b, input block c and
    the weight's output block b, piece a, input block c (:func:`owned_3d`)."""

    def __init__(self, weight, bias, grid: Grid, k_axis: int, n_axis: int):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.grid, self.k_axis, self.n_axis = grid, k_axis, n_axis

    @classmethod
    def from_dense(cls, linear: nn.Linear, grid: Grid, k_axis: int, n_axis: int) -> Linear3D:
        q, c = grid.q, grid.coords
        _split(linear.in_features, q, "in_features", grid_name(grid))
        _split(linear.out_features, q * q, "out_features", grid_name(grid))
        weight = chunk_3d(linear.weight.detach(), q, c[n_axis], c[0], c[k_axis]).clone()
        bias = (
            None
            if linear.bias is None
            else linear.bias.detach()[_blk(linear.out_features, q, c[n_axis])].clone()
        )
        return cls(weight, bias, grid, k_axis, n_axis)

    def index_of(self, rank: int, out_features: int, in_features: int) -> dict:
        c, q = self.grid.coords_of(rank), self.grid.q
        rows = _blk(out_features, q * q, c[self.n_axis] * q + c[0])
        return {
            "weight": (rows, _blk(in_features, q, c[self.k_axis])),
            "bias": (_blk(out_features, q, c[self.n_axis]),),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Linear3D.apply(x, self.weight, self.grid, self.k_axis, self.n_axis)
        if self.bias is None:
            return y
        # b_n is on every rank with the same n coordinate: its gradient sums over the other two axes.
        bias = copy_to_tp_region(
            copy_to_tp_region(self.bias, self.grid.group(0)), self.grid.group(self.k_axis)
        )
        return y + bias


# ----------------------------------------------------------------------------
# whole input in, whole output out


def _assemble(part, grid: Grid, blocks, shape) -> torch.Tensor:
    """Every rank's ``part`` (all-gathered over the grid) put at its block of a ``shape`` tensor."""
    parts = [torch.empty_like(part, memory_format=torch.contiguous_format) for _ in blocks]
    dist.all_gather(parts, part.contiguous(), group=grid.parent)
    whole = part.new_zeros(shape)
    for index, p in zip(blocks, parts):
        whole[index] = p  # a block several ranks hold (2.5D's layers) is written more than once: same values
    return whole


class _Scatter(torch.autograd.Function):
    """Forward: keep my block of a tensor every rank holds whole. Backward: the whole gradient, assembled."""

    @staticmethod
    def forward(ctx, x, grid, blocks):
        ctx.grid, ctx.blocks, ctx.shape = grid, blocks, x.shape
        return x[blocks[grid.rank]].clone()

    @staticmethod
    def backward(ctx, grad):
        return _assemble(grad, ctx.grid, ctx.blocks, ctx.shape), None, None


class _Gather(torch.autograd.Function):
    """Forward: the whole tensor on every rank from every rank's block. Backward: my block of
    the gradient (the same on every rank, as for chapter 04's g)."""

    @staticmethod
    def forward(ctx, part, grid, blocks, shape):
        ctx.grid, ctx.blocks = grid, blocks
        return _assemble(part, grid, blocks, shape)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.blocks[ctx.grid.rank]].contiguous(), None, None, None


def grid_name(grid: Grid) -> str:
    q = grid.q
    return {"1d": f"{grid.size}-rank", "2d": f"{q}×{q}", "2.5d": f"{q}×{q}×{grid.d}", "3d": f"{q}×{q}×{q}"}[
        grid.mode
    ]


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


class ParallelMLP(nn.Module):
    """``fc2(gelu(fc1(x)))`` on a grid of ranks; see :func:`parallel_mlp`."""

    def __init__(self, fc1, fc2, grid: Grid, d_model: int, d_hidden: int):
        super().__init__()
        self.fc1, self.fc2, self.grid = fc1, fc2, grid
        self.d_model, self.d_hidden = d_model, d_hidden
        #: Bytes of the activations this rank held in the last forward: the layer's input block,
        #: the hidden block between fc1 and fc2, and the output block.
        self.held_activation_bytes: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The whole input (the same on every rank) in, the whole output on every rank out."""
        if self.grid.mode == "1d":  # chapter 04: the activations are whole on every rank already
            return self.forward_sharded(x)
        rows = x.reshape(-1, x.shape[-1])
        parts = self.grid.q * self.grid.q if self.grid.mode == "3d" else self.grid.q
        _split(rows.shape[0], parts, "the input's rows b·s", grid_name(self.grid))
        blocks = self.grid.activation_blocks(rows.shape[0], self.d_model)
        mine = _Scatter.apply(rows, self.grid, blocks)
        out = _Gather.apply(self.forward_sharded(mine), self.grid, blocks, rows.shape)
        return out.view(x.shape)

    def forward_sharded(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's block of the input in, its block of the output out: the layer itself."""
        hidden = F.gelu(self.fc1(x))  # element by element: no communication
        out = self.fc2(hidden)
        self.held_activation_bytes = {"input": _nbytes(x), "hidden": _nbytes(hidden), "output": _nbytes(out)}
        return out

    def _index(self, rank: int) -> dict:
        """Per parameter name: where group rank ``rank``'s block sits in the dense parameter."""
        h, hidden = self.d_model, self.d_hidden
        if self.grid.mode == "1d":
            mine = _blk(hidden, self.grid.size, rank)
            every = slice(None)
            return {
                "fc1.weight": (mine, every),
                "fc1.bias": (mine,),
                "fc2.weight": (every, mine),
                "fc2.bias": (every,),
            }
        index = {}
        for name, layer, (out_f, in_f) in (("fc1", self.fc1, (hidden, h)), ("fc2", self.fc2, (h, hidden))):
            for kind, where in layer.index_of(rank, out_f, in_f).items():
                index[f"{name}.{kind}"] = where
        return index

    def gathered_grads(self) -> dict:
        """Every parameter's gradient in the dense MLP's shape and names, on every rank."""
        n = dist.get_world_size(self.grid.parent)
        shapes = {
            "fc1.weight": (self.d_hidden, self.d_model),
            "fc1.bias": (self.d_hidden,),
            "fc2.weight": (self.d_model, self.d_hidden),
            "fc2.bias": (self.d_model,),
        }
        indices = [self._index(r) for r in range(n)]
        grads = {}
        for name, p in self.named_parameters():
            if p.grad is None:
                raise RuntimeError(f"{name} has no gradient yet: run a backward pass first")
            grads[name] = _assemble(p.grad, self.grid, [ix[name] for ix in indices], shapes[name])
        return grads


def check_sizes(mode: str, n: int, d_model: int, d_hidden: int, depth: int | None = None) -> None:
    """ValueError unless an MLP d_model → d_hidden → d_model splits over ``mode``'s grid on ``n`` ranks."""
    q, d = grid_shape(n, mode, depth)
    shape = {"1d": f"{n}-rank", "2d": f"{q}×{q}", "2.5d": f"{q}×{q}×{d}", "3d": f"{q}×{q}×{q}"}[mode]
    # 1D cuts H in N; 2D/2.5D cut h and H in q; 3D cuts them in q·q (the weight's output block in q pieces)
    parts = {"1d": n, "2d": q, "2.5d": q, "3d": q * q}[mode]
    if mode != "1d":
        _split(d_model, parts, "d_model h", shape)
    _split(d_hidden, parts, "the hidden size H", shape)


def parallel_mlp(
    dense_mlp: MLP, mode: str, group: dist.ProcessGroup | None = None, depth: int | None = None
) -> ParallelMLP:
    """The MLP ``dense_mlp`` (fc1, GELU, fc2) tensor-parallel over the ranks of ``group`` (default all).

    ``mode``: "1d" (chapter 04's Megatron split), "2d" (SUMMA, N = q·q), "2.5d" (N = q·q·d;
    ``depth`` = d, or the deepest grid that fits) or "3d" (N = q·q·q). Call it on every rank of
    the group with the same dense MLP. ValueError names the rank counts that work, or the size
    that does not split over the grid.
    """
    h, hidden = dense_mlp.fc1.in_features, dense_mlp.fc1.out_features
    check_sizes(mode, dist.get_world_size(group), h, hidden, depth)
    grid = make_grid(mode, group, depth)
    if mode == "1d":
        tp = TensorParallelMLP.from_dense(dense_mlp, group)
        return ParallelMLP(tp.fc1, tp.fc2, grid, h, hidden)
    if mode == "3d":
        fc1 = Linear3D.from_dense(dense_mlp.fc1, grid, k_axis=2, n_axis=1)
        fc2 = Linear3D.from_dense(dense_mlp.fc2, grid, k_axis=1, n_axis=2)  # the axes swap roles
    else:
        fc1, fc2 = Linear2D.from_dense(dense_mlp.fc1, grid), Linear2D.from_dense(dense_mlp.fc2, grid)
    return ParallelMLP(fc1, fc2, grid, h, hidden)


# ----------------------------------------------------------------------------
# the formulas: per-rank bytes and calls, measured beside them in the lesson


def predicted(mode: str, n: int, m: int, h: int, hidden: int, depth: int | None = None) -> dict:
    """Per-rank figures of one MLP (h → hidden → h, biases included, fp32) on ``n`` ranks, M = ``m`` rows.

    parameters, activations (input + hidden + output blocks held), and the bytes each rank
    receives in the forward and backward passes of ``forward_sharded`` (mean over ranks) with
    the number of collective calls. Received bytes per call, gloo's algorithms on a group of
    g ranks and a tensor of S bytes: all-reduce 2(g−1)/g·S (ring); all-gather and reduce-scatter
    (g−1)/g·S; broadcast (g−1)/g·S on average over the ranks; reduce (g²−1)/g²·S on average
    (a ring reduce-scatter, then the root gathers the pieces).
    """
    q, d = grid_shape(n, mode, depth)
    f = {"forward": 0.0, "backward": 0.0, "forward calls": 0, "backward calls": 0}
    if mode == "1d":
        all_reduce = 2 * (n - 1) / n * m * h
        f.update(forward=all_reduce, backward=all_reduce, **{"forward calls": n > 1, "backward calls": n > 1})
        f["parameters"] = 2 * h * hidden / n + hidden / n + h
        f["activations"] = m * h + m * hidden / n + m * h
    for rows, k, out in ((m, h, hidden), (m, hidden, h)):
        if mode in ("2d", "2.5d"):
            s_x, s_b, s_y = rows * k / q**2, k * out / q**2, rows * out / q**2
            steps = q // d  # SUMMA steps per layer of the grid
            broadcasts = steps * (q - 1) / q * (s_x + s_b)
            reduces = steps * (q * q - 1) / (q * q) * (s_x + s_b)
            f["forward"] += broadcasts + 2 * (d - 1) / d * s_y
            f["backward"] += broadcasts + reduces + 2 * (d - 1) / d * (s_x + s_b) + 2 * (q - 1) / q * out / q
            f["forward calls"] += 2 * steps + (d > 1)
            f["backward calls"] += 4 * steps + 2 * (d > 1) + (q > 1)
        elif mode == "3d":
            moved = (q - 1) / q**3 * (rows * k + k * out + rows * out)
            f["forward"] += moved
            f["backward"] += moved + 2 * 2 * (q - 1) / q * out / q  # + the bias's two all-reduces
            f["forward calls"] += 3 * (q > 1)
            f["backward calls"] += 5 * (q > 1)
    if mode in ("2d", "2.5d", "3d"):
        copies = d if mode == "2.5d" else 1  # 2.5D keeps d copies of everything
        f["parameters"] = copies * 2 * h * hidden / n + (hidden + h) / q
        f["activations"] = copies * (2 * m * h + m * hidden) / n
    for key in ("parameters", "activations", "forward", "backward"):
        f[key] *= 4  # fp32 bytes
    f["forward calls"], f["backward calls"] = int(f["forward calls"]), int(f["backward calls"])
    return f
