"""RRef: a reference to a value that lives on one worker (its owner), usable from any worker.

This module is the user-facing side: the RRef object, its methods and its proxies. The
protocol that keeps references counted and owners informed lives in ``rref_context.py``;
an RRef only asks its context to act. One class serves both roles torch splits into
OwnerRRef and UserRRef (``is_owner()`` tells them apart), and ``PyRRef`` names it too.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from .autograd import _rref_backward
from .constants import UNSET_RPC_TIMEOUT
from .functions import async_execution
from .worker_info import WorkerInfo

if TYPE_CHECKING:
    from .rref_context import RRefContext, _OwnerState

__all__ = ["GloballyUniqueId", "PyRRef", "RRef"]

T = TypeVar("T")

#: Identifies an RRef (RRefId) or one user's copy of it (ForkId): the worker that made it and
#: a number from that worker's counter.
GloballyUniqueId = collections.namedtuple("GloballyUniqueId", ["created_on", "local_id"])

_NOT_SET = (
    "Current RPC agent is not set! Did you initialize the RPC framework "
    "(e.g. by calling `rpc.init_rpc`)?"
)

# The process's RRef context, installed by init_rpc (so that RRef(value) finds it).
_context: RRefContext | None = None


def _set_context(context: RRefContext | None) -> None:
    global _context
    _context = context


def _current_context() -> RRefContext:
    if _context is None:
        raise RuntimeError(_NOT_SET)
    return _context


class RRef(Generic[T]):
    """A reference to a value owned by one worker.

    ``RRef(value)`` makes a local reference this worker owns; ``shmrpc.remote(...)`` returns
    one to a value another worker computes and owns. Pass RRefs in arguments and results of
    any call: the owner keeps the value as long as any worker references it.
    """

    # The constructor is for users; the context builds RRefs with _make.
    def __init__(self, value: T, type_hint: Any = None) -> None:
        if type_hint is not None:
            raise RuntimeError(
                "type_hint should only be specified when the RRef being created contains a "
                "ScriptModule."
            )
        context = _current_context()
        state = context.new_local_owner(value)
        self._init(context, context.worker_id, state.rref_id, None, state)

    @classmethod
    def _make(
        cls,
        context: RRefContext,
        owner: int,
        rref_id: GloballyUniqueId,
        fork_id: GloballyUniqueId | None,
        state: _OwnerState | None,
    ) -> RRef[Any]:
        rref = cls.__new__(cls)
        rref._init(context, owner, rref_id, fork_id, state)
        return rref

    def _init(
        self,
        context: RRefContext,
        owner: int,
        rref_id: GloballyUniqueId,
        fork_id: GloballyUniqueId | None,
        state: _OwnerState | None,
    ) -> None:
        self._context = context
        self._owner = owner
        self._rref_id = rref_id
        self._fork_id = fork_id  # None on the owner
        self._state = state  # the owner's value holder; None on users
        self._confirmed = state is not None
        self._deleted = False
        self._timed_out = False
        self._creation: torch.futures.Future[Any] | None = None
        self._type_future: torch.futures.Future[type] | None = None

    # -------------------------------------------------------------------------- identity
    def is_owner(self) -> bool:
        return self._state is not None

    def owner(self) -> WorkerInfo:
        return self._context.worker_info(self._owner)

    def owner_name(self) -> str:
        return self.owner().name

    def confirmed_by_owner(self) -> bool:
        """Whether the owner knows of this reference (always true on the owner)."""
        return self._confirmed

    # ----------------------------------------------------------------------------- value
    def local_value(self) -> T:
        """The value itself (owner only); blocks until the owner has it."""
        return self._context.local_value(self)

    def to_here(self, timeout: float = UNSET_RPC_TIMEOUT) -> T:
        """The value: itself on the owner, a copy fetched from the owner elsewhere."""
        return self._context.to_here(self, timeout)

    # --------------------------------------------------------------------------- proxies
    def rpc_sync(self, timeout: float = UNSET_RPC_TIMEOUT) -> Any:
        """``rref.rpc_sync().method(*args)`` runs ``value.method(*args)`` on the owner."""
        return _Proxy(self, "sync", timeout)

    def rpc_async(self, timeout: float = UNSET_RPC_TIMEOUT) -> Any:
        """Like ``rpc_sync()``, but each method call returns a Future."""
        return _Proxy(self, "async", timeout)

    def remote(self, timeout: float = UNSET_RPC_TIMEOUT) -> Any:
        """Like ``rpc_sync()``, but each method call returns an RRef to its result."""
        return _Proxy(self, "remote", timeout)

    # -------------------------------------------------------------------------- autograd
    def backward(self, dist_autograd_ctx_id: int = -1, retain_graph: bool = False) -> None:
        """Backward pass from the value (a scalar tensor), run on the owner.

        With a context id: distributed backward in that context (gradients in
        ``get_gradients``); without (owner only): a plain local ``torch.autograd.backward``.
        """
        _rref_backward(self, dist_autograd_ctx_id, retain_graph)

    # ---------------------------------------------------------------------------- private
    def _get_future(self) -> torch.futures.Future[Any]:
        """Completes when the owner confirmed the creating ``remote()`` (torch's private API)."""
        return self._context.creation_future(self)

    def _get_type(self, timeout: float = UNSET_RPC_TIMEOUT, blocking: bool = True) -> Any:
        """The type of the value (fetched from the owner once, then cached)."""
        return self._context.value_type(self, timeout, blocking)

    # ------------------------------------------------------------------------- protocols
    def __repr__(self) -> str:
        if self.is_owner():
            return f"OwnerRRef({self._rref_id})"
        return f"UserRRef(RRefId = {self._rref_id}, ForkId = {self._fork_id})"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise RuntimeError(
            "Can not pickle rref in python pickler, rref can only be pickled when using RPC"
        )


#: torch's name for the type of RRefs that ``remote()`` returns.
PyRRef = RRef


# --------------------------------------------------------------------------------- proxies


def _local_invoke(
    rref: RRef[Any], method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    return getattr(rref.local_value(), method)(*args, **kwargs)


@async_execution
def _local_invoke_async(
    rref: RRef[Any], method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    return getattr(rref.local_value(), method)(*args, **kwargs)


class _Proxy:
    """``rref.rpc_sync()`` and friends: attribute access gives a callable for that method."""

    def __init__(self, rref: RRef[Any], mode: str, timeout: float) -> None:
        self._rref = rref
        self._mode = mode
        self._timeout = timeout

    def __getattr__(self, method: str) -> Callable[..., Any]:
        return functools.partial(self._call, method)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._rref._context.invoke(
            self._rref, self._mode, method, args, kwargs, self._timeout
        )
