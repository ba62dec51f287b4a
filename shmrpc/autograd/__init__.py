"""Distributed autograd, a drop-in for ``torch.distributed.autograd``.

``import shmrpc.autograd as dist_autograd`` where a program had
``import torch.distributed.autograd as dist_autograd``::

    with dist_autograd.context() as context_id:
        loss = rpc.rpc_sync("ps", forward, (x,)).sum()
        dist_autograd.backward(context_id, [loss])
        grads = dist_autograd.get_gradients(context_id)   # this worker's leaves only

How recording and the backward pass work, and where shmrpc differs from torch (it never
hangs on gradients that do not come): docs/autograd.md.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from ..errors import DescribedError, rebuild_exception
from ..functions import async_execution
from ..profiling import BACKWARD_KEY, Span, torch_profiler
from .context import NOT_INITIALIZED, DistAutogradContext
from .engine import DistAutograd

__all__ = [
    "DistAutogradContext",
    "backward",
    "context",
    "get_gradients",
    "is_available",
]

_engine: DistAutograd | None = None


def _set_engine(engine: DistAutograd | None) -> None:
    """Installed by init_rpc, removed by shutdown."""
    global _engine
    _engine = engine


def _current_engine() -> DistAutograd:
    if _engine is None:
        raise RuntimeError(NOT_INITIALIZED)
    return _engine


def is_available() -> bool:
    return True


class context:
    """``with context() as context_id``: a new distributed autograd context for this thread.

    Messages sent inside it record send and recv functions on both sides; leaving it
    releases it here and on every worker it reached.
    """

    def __enter__(self) -> int:
        self.autograd_context = _new_context()
        return self.autograd_context._context_id()

    def __exit__(self, *exc: Any) -> None:
        _release_context(self.autograd_context._context_id())


def backward(context_id: int, roots: list[torch.Tensor], retain_graph: bool = False) -> None:
    """Run the backward pass from scalar ``roots`` across every worker the graph spans.

    Gradients accumulate in the context of each worker (``get_gradients``), never in
    ``.grad``; returns when all the work it caused is done, and raises an error of any worker
    as ``Error on Node N: ...`` with its type kept.
    """
    if not isinstance(context_id, int) or isinstance(context_id, bool):
        raise TypeError(
            "backward(): incompatible function arguments. context_id must be an int, "
            f"got {type(context_id).__name__}"
        )
    span = Span(BACKWARD_KEY) if torch_profiler._is_profiler_enabled else nullcontext()
    with span:  # torch's profiler span for the whole pass
        _wait(_current_engine().backward(context_id, roots, retain_graph))


def get_gradients(context_id: int) -> dict[torch.Tensor, torch.Tensor]:
    """The gradients accumulated on this worker in the context: tensor -> gradient."""
    return _current_engine().contexts.retrieve(context_id).gradients()


def _wait(future: torch.futures.Future[Any]) -> Any:
    try:
        return future.wait()
    except DescribedError as error:
        raise rebuild_exception(error.description) from None


# ---------------------------------------------------------------- torch's private helpers
def _new_context() -> DistAutogradContext:
    return _current_engine().contexts.new_context()


def _release_context(context_id: int) -> None:
    _current_engine().release(context_id)


def _retrieve_context(context_id: int) -> DistAutogradContext:
    return _current_engine().contexts.retrieve(context_id)


def _current_context() -> DistAutogradContext:
    return _current_engine().contexts.current()


def _is_valid_context(context_id: int) -> bool:
    return _current_engine().contexts.lookup(context_id) is not None


def _get_max_id() -> int:
    return _current_engine().contexts.max_id


def _get_debug_info() -> dict[str, str]:
    return _current_engine().debug_info()


# ------------------------------------------------------------------------- RRef.backward
def _rref_backward(rref: Any, context_id: int, retain_graph: bool) -> None:
    """``RRef.backward``: a backward pass rooted at the RRef's value, run on its owner."""
    if rref.is_owner():
        value = rref.local_value()
        if not isinstance(value, torch.Tensor):
            raise RuntimeError("RRef should contain a tensor for .backward()")
        if context_id == -1:
            torch.autograd.backward(value, retain_graph=retain_graph)
        else:
            backward(context_id, [value], retain_graph)
        return
    if context_id == -1:
        raise RuntimeError("User RRefs require 'dist_autograd_ctx_id' to be specified")
    _current_engine().call(rref.owner(), _backward_on_owner, (rref, context_id, retain_graph))


@async_execution
def _backward_on_owner(rref: Any, context_id: int, retain_graph: bool) -> Any:
    """Runs on the owner: the pass rooted at the value, answered when it is done."""
    value = rref.local_value()
    if not isinstance(value, torch.Tensor):
        raise RuntimeError("RRef should contain a tensor for .backward()")
    return _current_engine().backward(context_id, [value], retain_graph)
