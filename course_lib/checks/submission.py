"""A learner's answer handed to the grader, judged where the learner's code cannot reach.

In a grader's kernel (``$COURSE_SUBMIT`` set) a check cell does not judge: it pickles the
answer it was given (by value, as the ranks receive it) and shows it as one output of type
:data:`MIME`. The grader reads those outputs from the check cells and runs each check in its
own process with a :class:`Submitted` answer: bytes it never unpickles. The ranks unpickle
them (they run the learner's code and send back tensors and numbers in a format that cannot
carry code, see ``launch.run(safe_results=True)``); a check that calls the answer as a plain
function calls it in a separate worker process (forked from the launcher's forkserver),
with the same built-ins switched off there, and reads its result in the same safe format.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import dis
import io
import os
import pickle
import sys
import types
from typing import Any

# No torch and no launcher at import: a grader's kernel only hands answers over (submit), and a
# kernel whose chapter needs no torch then starts without it. What judges imports them.
from course_lib.pickling import dumps_by_value

SUBMIT_ENV = "COURSE_SUBMIT"
MIME = "application/vnd.course.submission+json"
#: Seconds one call of a plain function may take in the worker (an endless loop ends there).
CALL_TIMEOUT = 60.0


def grading() -> bool:
    return bool(os.environ.get(SUBMIT_ENV))


def submit(ex_id: str, title: str, args: tuple, kwargs: dict) -> None:
    """Show the answer as a submission output, for the grader to read (in the grader's kernel)."""
    from IPython.display import display

    try:
        record = {
            "id": ex_id,
            "args": [_encode(dumps_by_value((a,))) for a in args],
            "kwargs": {k: _encode(dumps_by_value((v,))) for k, v in kwargs.items()},
        }
        answers = (*args, *kwargs.values())
        if answers and all(untouched(a) for a in answers):
            # Only ever a claim against the learner (it earns nothing), so the grader may take
            # the kernel's word for it and skip launching ranks or a worker to find it out.
            record["untouched"] = True
        line = f"· {ex_id} {title} — handed to the grader"
    except Exception as exc:  # noqa: BLE001 - e.g. an answer that holds an open file
        record = {"id": ex_id, "error": f"your answer cannot be sent to the checks: {exc!r}"[:500]}
        line = f"✘ {ex_id} {title} — {record['error']}"
    display({MIME: record, "text/plain": line}, raw=True)


_STUB_OPS = {"RESUME", "NOP", "CACHE", "PUSH_NULL", "LOAD_GLOBAL", "LOAD_CONST", "PRECALL", "CALL"}


def untouched(answer: object) -> bool:
    """Whether an answer is still the exercise's stub: every function it defines only raises
    NotImplementedError (a function, or a class all of whose own methods are such functions)."""
    if isinstance(answer, type):
        functions = [getattr(f, "__func__", f) for f in vars(answer).values()]
        functions = [f for f in functions if isinstance(f, types.FunctionType)]
        return bool(functions) and all(_raises_not_implemented_only(f) for f in functions)
    return isinstance(answer, types.FunctionType) and _raises_not_implemented_only(answer)


def _raises_not_implemented_only(fn: types.FunctionType) -> bool:
    code = fn.__code__
    if code.co_names != ("NotImplementedError",) or code.co_freevars:
        return False
    ops = [ins.opname for ins in dis.get_instructions(code)]
    return ops[-1:] == ["RAISE_VARARGS"] and set(ops[:-1]) <= _STUB_OPS


def _encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def read_submission(record: object) -> tuple[list[Submitted], dict[str, Submitted]] | str:
    """The answer of one submission output; a string saying what is wrong with it otherwise."""
    if not isinstance(record, dict):
        return "the submission is not a record"
    if "error" in record:
        return str(record["error"])
    try:
        args = [Submitted(base64.b64decode(a, validate=True)) for a in record.get("args", [])]
        kwargs = {str(k): Submitted(base64.b64decode(v, validate=True)) for k, v in record["kwargs"].items()}
    except (TypeError, ValueError, KeyError, AttributeError):
        return "the submission is malformed"
    return args, kwargs


class Submitted:
    """A learner's answer as the grader holds it: the pickled bytes, never unpickled here.

    :func:`course_lib.checks.run_learner` sends the bytes to the ranks as they are. Calling
    it runs the answer in a worker process; :func:`builtins_switched_off` around the call
    is applied in that worker.
    """

    def __init__(self, payload: bytes):
        self.payload = payload  # cloudpickle of the 1-tuple (answer,)
        self.refusals: list[tuple] = []
        self.course_refusals: tuple = ("", ())  # (exercise id, the course code it refuses)
        self._worker = None

    def in_ranks(self) -> bytes:
        """The bytes a rank unpickles into the answer (wrapped to refuse the course's own code)."""
        ex_id, targets = self.course_refusals
        if not targets:
            return self.payload
        from course_lib.checks.refusal import Refusing

        return dumps_by_value((Refusing(None, ex_id, targets, payload=self.payload),))

    def __repr__(self):
        return f"<submitted answer, {len(self.payload)} bytes>"

    def __call__(self, *args, **kwargs):
        worker = self._worker or _Worker()
        self._worker = worker
        reply = worker.call((self.payload, args, kwargs, list(self.refusals), self.course_refusals))
        if reply[0] in ("timeout", "ended"):
            from course_lib.checks.registry import Mismatch

            self._worker = None
            if reply[0] == "ended":
                raise Mismatch(f"your function ended its process (exit code {reply[1]}) instead of returning")
            raise Mismatch(f"your function did not return within {CALL_TIMEOUT:g} s (an endless loop?)")
        if reply[0] == "ok":
            _copy_back(args, reply[2])
            return reply[1]
        _, type_name, message = reply
        raise _rebuilt(type_name, message)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None


def _rebuilt(type_name: str, message: str) -> BaseException:
    from course_lib.checks.refusal import BuiltinUsed

    if type_name == "BuiltinUsed":
        return BuiltinUsed(message)
    cls = getattr(builtins, type_name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except Exception:  # noqa: BLE001 - an exception type with another signature
            pass
    return RuntimeError(f"{type_name}: {message}")


def _state(obj):
    """What a call may have changed in place: tensors, and modules' parameters and gradients."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, torch.nn.Module):
        return {n: (p.detach(), p.grad) for n, p in obj.named_parameters()}
    if isinstance(obj, (list, tuple)):
        return [_state(x) for x in obj]
    return None


def _copy_back(args, states) -> None:
    import torch

    for obj, state in zip(args, states):
        if isinstance(obj, torch.Tensor) and isinstance(state, torch.Tensor) and state.shape == obj.shape:
            with torch.no_grad():
                obj.copy_(state)
        elif isinstance(obj, torch.nn.Module) and isinstance(state, dict):
            for name, p in obj.named_parameters():
                if name in state:
                    value, grad = state[name]
                    with torch.no_grad():
                        p.copy_(value)
                    p.grad = None if grad is None else grad.clone()
        elif isinstance(obj, (list, tuple)) and isinstance(state, list):
            _copy_back(obj, state)


class _Worker:
    """One worker process serving calls of one answer, over a pair of one-way pipes.

    It is forked from the launcher's forkserver, which has torch imported and never runs a
    learner's code: a worker starts in tens of milliseconds, not the seconds a fresh
    ``import torch`` takes (one per plain-function exercise adds up over a class).
    """

    def __init__(self):
        from course_lib import launch

        ctx = launch._context()
        requests, self.to_worker = ctx.Pipe(duplex=False)
        self.from_worker, replies = ctx.Pipe(duplex=False)
        with launch._main_module_not_rerun():
            self.proc = ctx.Process(target=_serve_pipes, args=(requests, replies), daemon=True)
            self.proc.start()
        requests.close()
        replies.close()

    def call(self, message: object) -> Any:
        """The worker's reply; ("timeout",) or ("ended", exit code) when there is none."""
        try:
            self.to_worker.send_bytes(pickle.dumps(message))
            if not self.from_worker.poll(CALL_TIMEOUT):
                self.close()
                return ("timeout",)
            # recv_bytes, never recv: what the worker sends is read only as torch's safe format.
            data = self.from_worker.recv_bytes()
        except (OSError, EOFError):
            self.proc.join(2)
            code = self.proc.exitcode
            self.close()
            return ("ended", code)
        import torch

        try:
            return torch.load(io.BytesIO(data), weights_only=True)
        except Exception as exc:  # noqa: BLE001 - anything but the safe format
            return ("raise", "TypeError", f"your function returned something the check cannot read: {exc}")

    def close(self) -> None:
        for conn in (self.to_worker, self.from_worker):
            with contextlib.suppress(OSError):
                conn.close()
        # The worker leads its own session: its group holds whatever the answer started too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, 9)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.proc.pid, 9)
        self.proc.join(5)


def _serve_pipes(requests, replies) -> None:
    """The worker, forked from the launcher's forkserver: its own session, dies with its parent."""
    from course_lib import launch

    os.setsid()
    launch._die_with_parent()

    def receive():
        try:
            return requests.recv_bytes()
        except EOFError:
            return None

    _serve(receive, replies.send_bytes)


def _serve(receive, reply_with) -> None:
    """Call the answer on each request; reply in the safe format."""
    import cloudpickle
    import torch

    from course_lib.checks.refusal import builtins_switched_off, course_code_switched_off

    torch.set_num_threads(1)
    answer = None
    while (data := receive()) is not None:
        payload, args, kwargs, refusals, (ex_id, course_code) = pickle.loads(data)  # from the grader: trusted
        try:
            if answer is None:
                (answer,) = cloudpickle.loads(payload)
            with contextlib.ExitStack() as stack:
                stack.enter_context(course_code_switched_off(ex_id, course_code))
                for names, why, namespaces, shown_as in refusals:
                    modules = tuple(sys.modules.get(m) or __import__(m, fromlist=["_"]) for m in namespaces)
                    stack.enter_context(builtins_switched_off(answer, names, why, modules, shown_as))
                result = answer(*args, **kwargs)
            reply = ("ok", result, [_state(a) for a in args])
        except BaseException as exc:  # noqa: B902 - every failure goes back as data
            reply = ("raise", type(exc).__name__, str(exc)[:2000])
        buffer = io.BytesIO()
        try:
            torch.save(reply, buffer)
        except Exception as exc:  # noqa: BLE001 - e.g. a generator returned
            buffer = io.BytesIO()
            returned = type(reply[1]).__name__
            message = f"your function returned a {returned} the check cannot read: {exc}"
            torch.save(("raise", "TypeError", message), buffer)
        reply_with(buffer.getvalue())
