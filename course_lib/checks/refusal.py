"""Switching built-ins and the course's own implementations off while a learner's code runs."""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from course_lib import dist_calls, launch

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from course_lib.checks.submission import Submitted

#: Everything in torch.distributed that moves data between ranks except point-to-point.
COLLECTIVES = tuple(name for name in dist_calls.COLLECTIVE_CALLS if hasattr(c10d, name))


class BuiltinUsed(RuntimeError):
    """A learner's function called a built-in that its exercise asks them to build."""


def learner_functions(fn: Callable[..., Any]) -> list:
    """``fn`` and the learner's functions it reaches through globals and closures (not libraries')."""
    module_dicts = {id(vars(m)) for m in list(sys.modules.values()) if m is not None}
    fn = getattr(fn, "__wrapped__", fn)  # a Refusing wrapper: the learner's function inside
    found, todo, seen = [], [fn], set()
    while todo:
        f = todo.pop()
        if not isinstance(f, types.FunctionType) or id(f) in seen:
            continue
        seen.add(id(f))
        if f is not fn and id(f.__globals__) in module_dicts:
            continue  # a library's function: its module namespace is patched separately
        found.append(f)
        todo += list(f.__globals__.values()) + [
            c.cell_contents for c in f.__closure__ or () if _cell_is_set(c)
        ]
    return found


def _cell_is_set(cell) -> bool:
    try:
        _ = cell.cell_contents
        return True
    except ValueError:  # a closure variable not assigned yet
        return False


def send_recv_only(
    ex_id: str, learner_fn: Callable[..., Any] | Submitted
) -> contextlib.AbstractContextManager[None]:
    """Make every built-in collective raise while the learner's function runs."""
    return builtins_switched_off(
        learner_fn, COLLECTIVES, f"exercise {ex_id} must be built from send/recv only"
    )


@contextlib.contextmanager
def builtins_switched_off(
    learner_fn: Callable[..., Any] | Submitted,
    names: Sequence[str],
    why: str,
    namespaces: Sequence[types.ModuleType] = (dist, c10d),
    shown_as: str = "dist",
) -> Iterator[None]:
    """Make ``dist.<name>`` for each of ``names`` raise :class:`BuiltinUsed` saying ``why``.

    Also where the learner imported one by name (``from torch.distributed import
    broadcast``): by now that is the original function in their globals or a
    closure, so it is swapped there too, and everything is restored afterwards.
    ``namespaces`` and ``shown_as`` switch off a library's functions instead (``moe.route``).
    """
    from course_lib.checks.submission import Submitted

    if isinstance(learner_fn, Submitted):  # it runs in a worker process: switch them off there
        spec = (tuple(names), why, tuple(ns.__name__ for ns in namespaces), shown_as)
        learner_fn.refusals.append(spec)
        try:
            yield
        finally:
            learner_fn.refusals.remove(spec)
        return
    saved = [(ns, name, getattr(ns, name)) for ns in namespaces for name in names if hasattr(ns, name)]
    by_identity = {id(fn): name for _, name, fn in saved}
    functions = learner_functions(learner_fn)
    in_globals = {
        (id(f.__globals__), key): (f.__globals__, key, v)
        for f in functions
        for key, v in list(f.__globals__.items())
        if id(v) in by_identity
    }
    in_cells = [
        (c, c.cell_contents)
        for f in functions
        for c in f.__closure__ or ()
        if _cell_is_set(c) and id(c.cell_contents) in by_identity
    ]

    def refusing(name):
        def refuse(*args, **kwargs):
            raise BuiltinUsed(f"{why}: you called {shown_as}.{name}")

        return refuse

    # However the learner reached them (a default argument, functools.partial, an attribute
    # of their own object): the course's functions refuse from the inside, by their code...
    codes = [
        (fn, fn.__code__, _refusing_code(f"{why}: you called {shown_as}.{name}", fn.__code__.co_freevars))
        for _, name, fn in saved
        if isinstance(fn, types.FunctionType) and _is_course_code(fn)
    ]
    codes = [c for c in codes if c[2] is not None]
    # ...and the built-in collectives at the process group, where every Python route ends.
    group_methods = [
        (method, f"{shown_as}.{name}")
        for name in names
        for method in dist_calls.PROCESS_GROUP_METHODS.get(name, ())
        if namespaces == (dist, c10d) and hasattr(_GROUP, method)
    ]
    group_saved = [(method, getattr(_GROUP, method)) for method, _ in group_methods]
    # ...and the functional collectives' ops, which reach the backend without those methods.
    functional = sorted(
        {
            (op, f"{shown_as}.{name}")
            for name in names
            for op in dist_calls.FUNCTIONAL_OPS.get(name, ())
            if namespaces == (dist, c10d) and hasattr(_FUNCTIONAL, op)
        }
    )
    functional_saved = [(op, getattr(_FUNCTIONAL, op)) for op, _ in functional]
    try:
        for ns, name, _ in saved:
            setattr(ns, name, refusing(name))
        for g, key, v in in_globals.values():
            g[key] = refusing(by_identity[id(v)])
        for cell, v in in_cells:
            cell.cell_contents = refusing(by_identity[id(v)])
        for fn, _, stub in codes:
            fn.__code__ = stub
        for method, shown in group_methods:
            setattr(_GROUP, method, _refusing_method(f"{why}: you called {shown} (process group .{method})"))
        for op, shown in functional:
            setattr(_FUNCTIONAL, op, _refusing_op(f"{why}: you called {shown} (functional collective {op})"))
        yield
    finally:
        for ns, name, fn in saved:
            setattr(ns, name, fn)
        for g, key, v in in_globals.values():
            g[key] = v
        for cell, v in in_cells:
            cell.cell_contents = v
        for fn, code, _ in codes:
            fn.__code__ = code
        for method, original in group_saved:
            setattr(_GROUP, method, original)
        for op, original in functional_saved:
            setattr(_FUNCTIONAL, op, original)


_GROUP = dist.ProcessGroup
_FUNCTIONAL = torch.ops._c10d_functional


def _is_course_code(fn) -> bool:
    return (getattr(fn, "__module__", None) or "").startswith("course_lib.")


def _refusing_code(message: str, freevars: tuple[str, ...] = ()):
    """A code object that raises BuiltinUsed(message), for any function's ``__code__``: its
    names resolve through builtins only, whatever module the function lives in, and it has
    the same free variables as the code it replaces (a method that calls super() has one)."""
    raise_line = f"raise __import__('course_lib.checks.refusal', fromlist=['_']).BuiltinUsed({message!r})"
    source = "def outer():\n"
    source += "".join(f"    {name} = None\n" for name in freevars)
    source += "    def refuse(*args, **kwargs):\n"
    source += f"        {', '.join(freevars)}\n" if freevars else ""
    source += f"        {raise_line}\n    return refuse\n"
    namespace = {}
    exec(compile(source, "<refused>", "exec"), namespace)
    code = namespace["outer"]().__code__
    return code if code.co_freevars == freevars else None


# ----------------------------------------------------------------------------
# the course's own implementation of what an exercise asks, refused however it is reached


def _resolve(target: str):
    """ "course_lib.zero:ZeroAdam.step" -> that object (a function, method or class)."""
    module, _, path = target.partition(":")
    obj = importlib.import_module(module)
    for part in path.split("."):
        obj = vars(obj)[part] if isinstance(obj, type) else getattr(obj, part)
    return obj


def _functions_of(obj) -> list:
    if isinstance(obj, (classmethod, staticmethod)):
        obj = obj.__func__
    if isinstance(obj, types.FunctionType):
        return [obj]
    if isinstance(obj, property):
        return [f for f in (obj.fget, obj.fset) if f is not None]
    if isinstance(obj, type):  # a class: every function it defines (constructor, forward, ...)
        return [
            f for value in vars(obj).values() if not isinstance(value, type) for f in _functions_of(value)
        ]
    return []


@contextlib.contextmanager
def course_code_switched_off(ex_id: str, targets: tuple[str, ...]) -> Iterator[None]:
    """While the block runs, the course's functions and classes named by ``targets``
    ("module:qualname") raise :class:`BuiltinUsed` from the inside, however the learner's
    code reached them: a name, an import by name, a default argument, a partial, an attribute."""
    why = f"exercise {ex_id} asks you to write this yourself, not to call the course's own"
    swaps = []
    for target in targets:
        shown = target.replace("course_lib.", "").replace(":", ".")
        for fn in _functions_of(_resolve(target)):
            stub = _refusing_code(f"{why}: you called {shown}", fn.__code__.co_freevars)
            if stub is not None:
                swaps.append((fn, fn.__code__, stub))
    try:
        for fn, _, stub in swaps:
            fn.__code__ = stub
        yield
    finally:
        for fn, code, _ in swaps:
            fn.__code__ = code


class Refusing:
    """A learner's function that, whenever it is called, runs with the course's own answer to
    its exercise switched off (:func:`course_code_switched_off`). Travels to ranks by value."""

    def __init__(self, fn, ex_id: str, targets: tuple[str, ...], payload: bytes | None = None):
        self._fn, self._payload, self.ex_id, self.targets = fn, payload, ex_id, tuple(targets)

    @property
    def __wrapped__(self):
        if self._fn is None:
            import cloudpickle

            (self._fn,) = cloudpickle.loads(self._payload)
        return self._fn

    def __call__(self, *args, **kwargs):
        fn = self.__wrapped__
        with course_code_switched_off(self.ex_id, self.targets):
            return fn(*args, **kwargs)

    def __getattr__(self, name: str):  # a class answer: its attributes (apply, from_dense, ...)
        if name.startswith("__") or name in ("_fn", "_payload", "ex_id", "targets"):
            raise AttributeError(name)
        return getattr(self.__wrapped__, name)

    def __reduce__(self):
        payload = self._payload if self._payload is not None else launch.dumps_by_value((self._fn,))
        return Refusing, (None, self.ex_id, self.targets, payload)


class _RefusingOp:
    """Stands in for a functional-collective op: calling it, or its overloads (.default), raises."""

    def __init__(self, message: str):
        self.message = message

    def __call__(self, *args, **kwargs):
        raise BuiltinUsed(self.message)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self


def _refusing_op(message: str) -> _RefusingOp:
    return _RefusingOp(message)


def _refusing_method(message: str):
    def refuse(self, *args, **kwargs):
        raise BuiltinUsed(message)

    return refuse


class CourseCodeUsed(BuiltinUsed):
    """A learner's function used one of the course's own names that its exercise builds."""


class _Refused:
    """Stands in for a name of a course module: calling it, or any attribute (from_dense), raises."""

    def __init__(self, ex_id: str, shown: str):
        self.ex_id, self.shown = ex_id, shown

    def __call__(self, *args, **kwargs):
        raise CourseCodeUsed(f"exercise {self.ex_id} asks you to build this yourself: you used {self.shown}")

    def __getattr__(self, attribute):
        self()


@contextlib.contextmanager
def module_names_switched_off(
    ex_id: str, learner: Callable[..., Any] | type, module: types.ModuleType, shown_as: str
) -> Iterator[None]:
    """Every public function and class defined in ``module`` is replaced, by name, with one that
    raises while the block runs, in the module and where the learner imported it by name.
    Objects made before the block (a process grid, a layer) keep working, unlike
    :func:`course_code_switched_off`, which refuses from the inside."""
    originals = {
        name: obj
        for name, obj in vars(module).items()
        if not name.startswith("_") and callable(obj) and getattr(obj, "__module__", "") == module.__name__
    }
    namespace = getattr(getattr(learner, "forward", learner), "__globals__", {})
    by_id = {id(obj): name for name, obj in originals.items()}
    imported = {key: value for key, value in namespace.items() if id(value) in by_id}
    try:
        for name in originals:
            setattr(module, name, _Refused(ex_id, f"{shown_as}.{name}"))
        for key, value in imported.items():
            namespace[key] = _Refused(ex_id, f"{shown_as}.{by_id[id(value)]}")
        yield
    finally:
        for name, obj in originals.items():
            setattr(module, name, obj)
        namespace.update(imported)
