"""The environment check a learner runs first (chapter 00)."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence

import torch

from course_lib import launch


def report(world_sizes: Sequence[int] = (1, 2, 4, 8)) -> dict:
    """Print and return what this machine offers the course."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu cores": os.cpu_count(),
        "cuda available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)],
        "gloo available": torch.distributed.is_gloo_available(),
        "nccl available": torch.distributed.is_nccl_available(),
        "backend for N ranks": {n: launch.choose_backend("auto", n) for n in world_sizes},
        "collective timeout (s)": launch.PG_TIMEOUT,
    }
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:>{width}} : {value}")
    if info["cpu cores"] and info["cpu cores"] < max(world_sizes):
        print(
            f"\nNote: {max(world_sizes)} ranks on {info['cpu cores']} cores take turns on the CPU; "
            "results stay exact, timings grow."
        )
    return info
