"""The course's chapters in reading order, and how their files are named.

A chapter's lesson ``notebooks/NN_stem.py``, its solutions ``solutions/NN_stem.py``, its
exercises ``exercises/NN_stem.ipynb``, its checks ``course_lib/checks/stem.py`` and its library
module ``course_lib/stem.py`` share one stem. ``NN`` shows the reading order in a file browser.

Numbers never change once a chapter exists, so a learner's saved notebooks and a class's
grade tables keep their names: a chapter inserted after chapter 04 is ``04b``, the next one
``04c``. Its exercises are numbered ``4b.1``, ``4b.2``, … Inserting a chapter is one step: add
its row below where it belongs (``tests/test_chapters.py`` checks the files agree).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Chapter:
    number: str  # "04", "04b": the file name's prefix
    stem: str  # the shared name of lesson, checks and library module
    title: str
    library: tuple[str, ...] = ()  # course_lib modules the lesson builds, the stem's first if it has one

    @property
    def id(self) -> str:
        """The chapter as exercise ids spell it: "4b" for 04b (exercise 4b.1)."""
        return self.number.lstrip("0") or "0"

    @property
    def name(self) -> str:
        return f"{self.number}_{self.stem}"


CHAPTERS: tuple[Chapter, ...] = (
    Chapter("00", "setup", "Setup: ranks from a notebook cell", ("launch", "env")),
    Chapter("01", "collectives", "Collectives", ("collectives", "alpha_beta")),
    Chapter("02", "data_parallel", "Data parallel", ("data_parallel",)),
    Chapter("03", "ring_allreduce", "Ring all-reduce and bucketed DDP", ("ring_allreduce", "ddp")),
    Chapter("04", "tensor_parallel", "1D tensor parallel (Megatron)", ("tensor_parallel",)),
    Chapter("04b", "tensor_parallel_nd", "Tensor parallel in 2D, 2.5D and 3D", ("tensor_parallel_nd",)),
    Chapter("05", "sequence_parallel", "Sequence parallel", ("tensor_parallel",)),
    Chapter("05b", "context_parallel", "Context parallel: ring attention and Ulysses", ("context_parallel",)),
    Chapter("06", "pipeline_parallel", "Pipeline parallel: GPipe and 1F1B", ("pipeline_parallel",)),
    Chapter(
        "06b",
        "pipeline_schedules",
        "Pipeline schedules: interleaved, zero bubble, DualPipe-V",
        ("pipeline_schedules", "pipeline_parallel"),
    ),
    Chapter("07", "zero", "ZeRO-1/2/3", ("zero",)),
    Chapter("07b", "fsdp", "FSDP: per-unit sharding, prefetch, mixed precision", ("fsdp",)),
    Chapter("08", "moe", "Mixture of experts", ("moe",)),
    Chapter("09", "parallel_3d", "3D parallel", ("parallel_3d", "mesh", "cost")),
    Chapter("09b", "train", "Capstone: a small GPT with every axis at once", ("train", "gpt")),
    Chapter("09c", "checkpoint", "Checkpoints across layouts, and a killed rank", ("checkpoint",)),
    Chapter("09d", "step_time", "A time model that predicts the step", ("step_time",)),
    Chapter("10", "debugging", "Debugging, torchrun and many nodes", ("torchrun", "demo")),
)

_NAME = re.compile(r"^(\d\d[a-z]?)_([a-z][a-z0-9_]*)$")
_EXERCISE_ID = re.compile(r"^(\d+[a-z]?)\.(\d+)$")


def chapter_id(name: str) -> str:
    """ "04b_tensor_parallel_nd" -> "4b"; ValueError if the name is not NN_stem or NNx_stem."""
    match = _NAME.match(name)
    if not match:
        raise ValueError(f"{name!r} is not a chapter name (NN_stem or NNx_stem, e.g. 04_tensor_parallel)")
    return match[1].lstrip("0") or "0"


def by_id(chapter: str) -> Chapter:
    for c in CHAPTERS:
        if c.id == chapter:
            return c
    raise KeyError(f"no chapter {chapter!r}; chapters are {[c.id for c in CHAPTERS]}")


def exercise_key(ex_id: str) -> tuple[int, str, int]:
    """Sort key of an exercise id: "4b.2" -> (4, "b", 2); ValueError if it is not one."""
    match = _EXERCISE_ID.match(ex_id)
    if not match:
        raise ValueError(f"{ex_id!r} is not an exercise id (chapter.number, e.g. 3.1 or 4b.2)")
    chapter, number = match[1], int(match[2])
    digits = chapter.rstrip("abcdefghijklmnopqrstuvwxyz")
    return int(digits), chapter[len(digits) :], number


def chapter_of_exercise(ex_id: str) -> str:
    """ "4b.2" -> "4b"."""
    exercise_key(ex_id)
    return ex_id.split(".")[0]
