"""Every public function and method of course_lib's modules carries type hints.

The modules use ``from __future__ import annotations``, so annotations are strings: the check reads
them with ``inspect.signature`` without evaluating them, and only asks that each one is present.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

MODULES = [
    "course_lib.alpha_beta",
    "course_lib.build",
    "course_lib.collectives",
    "course_lib.cost",
    "course_lib.data_parallel",
    "course_lib.ddp",
    "course_lib.demo",
    "course_lib.env",
    "course_lib.moe",
    "course_lib.p2p",
    "course_lib.parallel_3d",
    "course_lib.ring_allreduce",
    "course_lib.tensor_parallel",
    "course_lib.torchrun",
    "course_lib.traffic",
    "course_lib.units",
    "course_lib.figures",
    "course_lib.viz_collectives",
    "course_lib.viz_moe",
    "course_lib.viz_parallel_3d",
    "course_lib.viz_pipeline_parallel",
    "course_lib.viz_ring_allreduce",
    "course_lib.viz_tensor_parallel",
    "course_lib.viz_zero",
    "course_lib.workspace",
    "course_lib.zero",
    "course_lib.chapters",
    "course_lib.grade",
    "course_lib.launch",
    "course_lib.checks.collectives",
    "course_lib.checks.compare",
    "course_lib.checks.data_parallel",
    "course_lib.checks.debugging",
    "course_lib.checks.moe",
    "course_lib.checks.parallel_3d",
    "course_lib.checks.pipeline_parallel",
    "course_lib.checks.refusal",
    "course_lib.checks.registry",
    "course_lib.checks.ring_allreduce",
    "course_lib.checks.running",
    "course_lib.checks.sequence_parallel",
    "course_lib.checks.submission",
    "course_lib.checks.tensor_parallel",
    "course_lib.checks.zero",
]

# Parameters that never need a hint: the bound instance or class, and catch-alls.
_EXEMPT_KINDS = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _missing_hints(func) -> list[str]:
    """What ``func`` lacks: the names of unannotated parameters, and "return" if that is missing."""
    try:
        sig = inspect.signature(func, eval_str=False)
    except (TypeError, ValueError):
        return []
    missing = [
        name
        for name, param in sig.parameters.items()
        if name not in ("self", "cls")
        and param.kind not in _EXEMPT_KINDS
        and param.annotation is inspect.Parameter.empty
    ]
    if sig.return_annotation is inspect.Signature.empty:
        missing.append("return")
    return missing


def _public_callables(module):
    """(qualified name, function) for each public function and public method defined in ``module``."""
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield obj.__qualname__, obj
        elif inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_"):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                elif isinstance(member, property):
                    member = member.fget
                # Skip what a library writes into the class (matplotlib adds an ``Artist.set`` to
                # each subclass): only what this module's source defines needs hints here.
                if inspect.isfunction(member) and member.__module__ == module.__name__:
                    yield f"{obj.__qualname__}.{attr}", member


@pytest.mark.parametrize("module_name", MODULES)
def test_public_functions_are_annotated(module_name):
    module = importlib.import_module(module_name)
    unannotated = []
    for qualname, func in _public_callables(module):
        missing = _missing_hints(func)
        if missing:
            unannotated.append(f"{module_name}.{qualname} ({', '.join(missing)})")
    assert not unannotated, "public functions without full type hints:\n  " + "\n  ".join(unannotated)
