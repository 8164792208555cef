"""Point-to-point helpers the strategies share: global ranks inside a group, a ring's
neighbours, and the small header a rank sends before a tensor so that a peer holding a
different shape or dtype fails with a clear error instead of a garbled message.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

#: Size of the header each rank sends its right neighbour before a ring, so that
#: ranks holding different shapes or dtypes fail with a clear error.
HEADER_BYTES = 80
_HEADER_DIMS = 8
_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.complex64,
    torch.complex128,
)


def global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    """Point-to-point calls name peers by their global rank, even inside a group."""
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


@dataclass(frozen=True)
class Ring:
    """This rank's place in a group: its group rank, the group size, its neighbours."""

    rank: int
    size: int
    group: object = None

    def global_rank(self, group_rank: int) -> int:
        return global_rank(self.group, group_rank)

    @property
    def left(self) -> int:
        return self.global_rank((self.rank - 1) % self.size)

    @property
    def right(self) -> int:
        return self.global_rank((self.rank + 1) % self.size)


def ring_of(group: dist.ProcessGroup | None = None) -> Ring:
    """This rank's :class:`Ring` in ``group`` (None: every rank)."""
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this rank is not a member of the group it was asked to communicate in")
    return Ring(rank, dist.get_world_size(group), group)


def _header(tensor: torch.Tensor) -> torch.Tensor:
    code = _DTYPES.index(tensor.dtype) if tensor.dtype in _DTYPES else -1
    shape = list(tensor.shape) if tensor.dim() <= _HEADER_DIMS else [tensor.numel()]
    dims = shape + [0] * (_HEADER_DIMS - len(shape))
    return torch.tensor([code, len(shape)] + dims, dtype=torch.int64, device=tensor.device)


def send_header(
    tensor: torch.Tensor, dst: int, group: dist.ProcessGroup | None = None
) -> tuple[dist.Work | None, torch.Tensor]:
    """Start sending ``tensor``'s shape and dtype to ``dst``, so it can allocate a buffer.

    Returns (request, header): the header must live until the request completes.
    """
    if tensor.dtype not in _DTYPES or tensor.dim() > _HEADER_DIMS:
        raise ValueError(
            f"a header describes up to {_HEADER_DIMS} dimensions of "
            f"{', '.join(str(d).replace('torch.', '') for d in _DTYPES)}; "
            f"got shape {tuple(tensor.shape)} {tensor.dtype}"
        )
    header = _header(tensor)
    return dist.isend(header, dst, group=group), header


def recv_header(
    src: int, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu"
) -> tuple[tuple, torch.dtype]:
    """The (shape, dtype) that :func:`send_header` on ``src`` sent."""
    header = torch.empty(2 + _HEADER_DIMS, dtype=torch.int64, device=device)
    dist.recv(header, src, group=group)
    code, ndim, *dims = header.tolist()
    return tuple(dims[:ndim]), _DTYPES[code]


def _describe(header: torch.Tensor) -> str:
    code, ndim, *dims = header.tolist()
    dtype = str(_DTYPES[code]).replace("torch.", "") if 0 <= code < len(_DTYPES) else "another dtype"
    return f"shape {tuple(dims[:ndim])} {dtype}"
