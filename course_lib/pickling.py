"""Pickling a learner's function so that a rank, a worker or the grader can rebuild it.

Its own module, free of torch: a grader's kernel hands answers over with it, and a kernel
whose chapter needs no torch then starts without importing it (about 2 s of CPU each).
"""

from __future__ import annotations

import sys
from typing import Any

import cloudpickle


def dumps_by_value(obj: Any) -> bytes:
    """cloudpickle ``obj``, sending the caller's own modules by value.

    Functions from a notebook (``__main__``) always travel by value. Functions
    from a module the ranks may not import (a test file, a script) would travel
    by reference and fail in the rank, so the modules of the functions found in
    ``obj`` (and in its top-level tuples, lists and dicts) go by value too.
    """
    modules = {
        m
        for m in map(_module_of, _top_level_items(obj))
        if m is not None and m.__name__ != "__main__" and not _importable_everywhere(m)
    }
    for module in modules:
        cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps(obj)
    finally:
        for module in modules:
            cloudpickle.unregister_pickle_by_value(module)


def _top_level_items(obj, depth=2):
    yield obj
    if depth and isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _top_level_items(item, depth - 1)
    elif depth and isinstance(obj, dict):
        for item in obj.values():
            yield from _top_level_items(item, depth - 1)


def _module_of(obj):
    return sys.modules.get(getattr(obj, "__module__", None) or "") if callable(obj) else None


def _importable_everywhere(module) -> bool:
    name = module.__name__.split(".")[0]
    return name in ("course_lib", "torch", "builtins", "functools", "operator") or "site-packages" in (
        getattr(module, "__file__", "") or ""
    )
