"""The one table of torch.distributed's communication calls, and the one way of replacing them.

The launcher traces these calls (where each rank waits), the traffic counter counts them, and
the checks switch the collectives off, at the functions and at the process group's methods.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

POINT_TO_POINT = ("send", "recv", "isend", "irecv", "batch_isend_irecv")
#: Every call that moves data between the ranks of a group together (barrier moves none).
COLLECTIVE_CALLS = (
    "broadcast",
    "all_reduce",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_gather_coalesced",
    "all_reduce_coalesced",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "_reduce_scatter_base",
    "all_to_all",
    "all_to_all_single",
    "scatter",
    "gather",
    "broadcast_object_list",
    "all_gather_object",
    "gather_object",
    "scatter_object_list",
)
#: The process-group methods each collective ends in: every way of reaching a collective from
#: Python (dist.*, an import by name, group.allreduce(...)) passes through one of these.
PROCESS_GROUP_METHODS = {
    "broadcast": ("broadcast",),
    "all_reduce": ("allreduce",),
    "all_reduce_coalesced": ("allreduce_coalesced",),
    "reduce": ("reduce",),
    "all_gather": ("allgather",),
    "all_gather_into_tensor": ("_allgather_base", "allgather_into_tensor_coalesced"),
    "_all_gather_base": ("_allgather_base",),
    "all_gather_coalesced": ("allgather_coalesced",),
    "all_gather_single": ("all_gather_single",),
    "reduce_scatter": ("reduce_scatter",),
    "reduce_scatter_tensor": ("_reduce_scatter_base", "reduce_scatter_tensor_coalesced"),
    "_reduce_scatter_base": ("_reduce_scatter_base",),
    "reduce_scatter_single": ("reduce_scatter_single",),
    "all_to_all": ("alltoall",),
    "all_to_all_single": ("alltoall_base",),
    "scatter": ("scatter",),
    "gather": ("gather",),
}


def replace_dist_functions(replacements: dict[str, Callable]) -> Callable[[], None]:
    """Install ``replacements[name]`` as ``dist.<name>``; returns a function that undoes it.

    isend/irecv are replaced in c10d too: ``dist.P2POp`` accepts only the functions
    that c10d itself calls isend/irecv.
    """
    saved = [
        (module, name, getattr(module, name))
        for name in replacements
        for module in ((dist, c10d) if name in ("isend", "irecv") else (dist,))
    ]
    for module, name, _ in saved:
        setattr(module, name, replacements[name])

    def undo():
        for module, name, original in saved:
            setattr(module, name, original)

    return undo


#: The functional collectives (``torch.distributed._functional_collectives``, DTensor) each
#: collective also has: ops in ``torch.ops._c10d_functional``, below the process group's methods.
FUNCTIONAL_OPS = {
    "all_reduce": ("all_reduce", "all_reduce_", "all_reduce_coalesced", "all_reduce_coalesced_"),
    "all_reduce_coalesced": ("all_reduce_coalesced", "all_reduce_coalesced_"),
    "all_gather_into_tensor": (
        "all_gather_into_tensor",
        "all_gather_into_tensor_coalesced",
        "all_gather_into_tensor_out",
    ),
    "_all_gather_base": ("all_gather_into_tensor", "all_gather_into_tensor_out"),
    "all_gather": ("all_gather_into_tensor", "all_gather_into_tensor_coalesced"),
    "reduce_scatter_tensor": ("reduce_scatter_tensor", "reduce_scatter_tensor_coalesced"),
    "_reduce_scatter_base": ("reduce_scatter_tensor",),
    "reduce_scatter": ("reduce_scatter_tensor", "reduce_scatter_tensor_coalesced"),
    "all_to_all_single": ("all_to_all_single",),
    "all_to_all": ("all_to_all_single",),
    "broadcast": ("broadcast", "broadcast_"),
}
