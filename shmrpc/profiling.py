"""Profiler spans: how RPCs and distributed backward passes appear in torch's profiler.

torch's own RPC recorded every call in the profiler under a key that names the kind of call,
the function and both workers; torch 2.13 no longer does, so shmrpc records them itself, with
torch's names (``torch.distributed.rpc.internal._build_rpc_profiling_key``):

* on the caller, ``rpc_sync#f(worker0 -> worker1)``, ``rpc_async#...`` and ``rpc_remote#...``
  (``remote()``), spanning the call until its result is there: for ``rpc_async`` and
  ``remote`` until the future completes (the span ends before its waiters wake), as torch's
  ``_call_end_callbacks_on_future`` did; ``to_here#(worker0)->(worker1)`` for fetching an
  RRef's value;
* on the callee, the same key with the mode the callee knows (``rpc`` for ``rpc_sync`` and
  ``rpc_async`` alike, ``rpc_remote``) and torch's ``#remote_op`` suffix, spanning the run of
  the function (for ``@async_execution``, until its future completes);
* ``torch::distributed::autograd::backward`` around ``shmrpc.autograd.backward`` (torch's
  key), and ``dist_autograd_backward`` around each worker's piece of the pass.

``f`` is named as torch named it: ``aten::add`` for a builtin operator, ``__qualname__`` for
anything else.

Cost when no profiler runs: the call sites test `torch_profiler`'s
``_is_profiler_enabled`` (a module attribute: a few nanoseconds) before anything else here runs.
That flag is set for the whole process while any ``torch.profiler.profile`` or
``torch.autograd.profiler.profile`` is active. torch's profiler records only the threads it
covers, though: the thread that started it, unless it was started with
``experimental_config=torch.profiler._ExperimentalConfig(profile_all_threads=True)``. Spans
on the caller's thread always appear; spans that run on shmrpc's threads (the callee's, and
the pieces of a backward pass that a peer's gradients start) appear in profiles of all threads.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.profiler

__all__ = [
    "BACKWARD_KEY",
    "BACKWARD_PIECE_KEY",
    "REMOTE_OP_SUFFIX",
    "Span",
    "callee_key",
    "caller_key",
    "function_name",
    "to_here_key",
    "torch_profiler",
]

#: torch's key for ``torch.distributed.autograd.backward``.
BACKWARD_KEY = "torch::distributed::autograd::backward"
#: One worker's piece of a distributed backward pass.
BACKWARD_PIECE_KEY = "dist_autograd_backward"
#: torch's suffix for what ran on the callee of an RPC.
REMOTE_OP_SUFFIX = "#remote_op"


class _ProfilerFlag:
    """Stands in for ``torch.autograd.profiler`` in a torch without ``_is_profiler_enabled``."""

    @property
    def _is_profiler_enabled(self) -> bool:
        return bool(torch._C._autograd._profiler_enabled())


#: Test ``torch_profiler._is_profiler_enabled`` (true while a profiler runs in this process)
#: before building a span: it is the cheapest correct check.
torch_profiler: Any = (
    torch.autograd.profiler
    if hasattr(torch.autograd.profiler, "_is_profiler_enabled")
    else _ProfilerFlag()
)


def function_name(func: Any) -> str:
    """How torch's RPC named ``func`` in profiling keys."""
    try:
        builtin = torch.jit._builtins._find_builtin(func)
    except Exception:  # unhashable callables, and whatever the table cannot look up
        builtin = None
    if builtin is not None:
        return str(builtin)
    name = getattr(func, "__qualname__", None)
    return name if isinstance(name, str) else type(func).__qualname__


def caller_key(mode: str, func: Any, caller: str, callee: str) -> str:
    """torch's key: ``rpc_<mode>#<function>(<caller> -> <callee>)``, mode sync, async or
    remote."""
    return f"rpc_{mode}#{function_name(func)}({caller} -> {callee})"


def callee_key(remote: bool, func: Any, caller: str, callee: str) -> str:
    """The callee's span: the key with the mode it knows (``rpc`` or ``rpc_remote``) and
    torch's ``#remote_op`` suffix."""
    mode = "rpc_remote" if remote else "rpc"
    return f"{mode}#{function_name(func)}({caller} -> {callee}){REMOTE_OP_SUFFIX}"


def to_here_key(caller: str, owner: str) -> str:
    """torch's key for ``RRef.to_here()``."""
    return f"to_here#({caller})->({owner})"


class Span:
    """A profiler range that may end on another thread than the one that began it (an
    ``rpc_async`` ends when its future completes). Ending it twice ends it once."""

    __slots__ = ("_handles",)

    def __init__(self, name: str) -> None:
        self._handles = [torch.ops.profiler._record_function_enter_new(name, None)]

    def end(self) -> None:
        try:
            handle = self._handles.pop()  # atomic: whoever gets here first ends it
        except IndexError:
            return
        with torch._C.DisableTorchFunctionSubclass():
            torch.ops.profiler._record_function_exit._RecordFunction(handle)

    def __enter__(self) -> Span:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.end()
