"""Every public function and method of course_lib's modules carries type hints.

The modules use ``from __future__ import annotations``, so annotations are strings: the check reads
them with ``inspect.signature`` without evaluating them, and only asks that each one is present.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys

import pytest

import course_lib


def _course_modules() -> list[str]:
    """Every module of the course_lib package, found on disk, so a new module is covered at once.

    Left out: the short alias modules (``course_lib.comm``, ``dp``, ``tp``, ...), which replace
    themselves in ``sys.modules`` with the module they name: that module is checked under its own name.
    """
    names = []
    for info in pkgutil.walk_packages(course_lib.__path__, prefix="course_lib."):
        importlib.import_module(info.name)
        if sys.modules[info.name].__name__ == info.name:  # an alias holds the module it names
            names.append(info.name)
    return sorted(names)


MODULES = _course_modules()

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
