"""``async_execution``: functions that answer later, through a Future, without holding a thread."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["async_execution"]

_F = TypeVar("_F", bound=Callable[..., Any])


def async_execution(fn: _F) -> _F:
    """Mark ``fn`` as returning a ``torch.futures.Future`` whose value is the RPC's reply.

    The callee's worker thread is free as soon as ``fn`` returns; the reply goes out when the
    future completes. Combine with ``@staticmethod``/``@classmethod`` as the inner decorator.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    wrapper._wrapped_async_rpc_function = fn  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
