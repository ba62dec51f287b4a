"""Errors shmrpc raises, and how exceptions raised by remote functions travel back.

torch collapses most remote exception types into RuntimeError. shmrpc re-raises the original
type instead, as an instance of a subclass that also derives from RuntimeError, so both
``except KeyError`` and torch-style ``except RuntimeError`` catch it.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from typing import Any

from .transport import PeerLostError, TransportError

__all__ = [
    "NOT_INITIALIZED",
    "DescribedError",
    "PeerLostError",
    "RemoteError",
    "RpcTimeoutError",
    "TransportError",
    "describe_exception",
    "rebuild_exception",
]

NOT_INITIALIZED = "RPC has not been initialized. Call torch.distributed.rpc.init_rpc first."


class RpcTimeoutError(RuntimeError, TimeoutError):
    """An RPC did not complete within its timeout. The worker stays usable."""

    @classmethod
    def after(cls, timeout: float, what: str) -> RpcTimeoutError:
        return cls(
            f"RPCErr:1:RPC ran for more than set timeout ({round(timeout * 1000)} ms) and will "
            f"now be marked with an error ({what})"
        )


class MessageTooLargeError(RuntimeError, ValueError):
    """A message is larger than the ``max_message_size`` the options allow."""


class DescribedError(Exception):
    """An error whose description for the caller was made when it happened.

    The owner of an RRef keeps a failed remote() this way: the exception without its
    traceback (tracebacks pin frames), and the description with it, sent on every fetch.
    """

    def __init__(self, description: tuple[str, str, str]) -> None:
        super().__init__(description[2])
        self.description = description


# --------------------------------------------------------------------------------------------
# Remote exceptions

#: What crosses the wire for a remote exception: the type's module and qualified name (never
#: the pickled class, which the caller may be unable to import) and the formatted message.
RemoteError = tuple[str, str, str]

_dual_types: dict[type[BaseException], type[BaseException] | None] = {}


def describe_exception(exc: BaseException, where: object) -> RemoteError:
    """Format ``exc`` raised on worker ``where`` as torch does: origin, repr, traceback."""
    original = getattr(type(exc), "_shmrpc_original", type(exc))
    if not isinstance(
        exc, Exception
    ):  # SystemExit, KeyboardInterrupt: torch sends these as RuntimeError
        original = RuntimeError
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    message = f"On {where}:\n{exc!r}\n{tb}"
    return (original.__module__, original.__qualname__, message)


def _resolve(module: str, qualname: str) -> Any:
    names = [module] + (["__mp_main__"] if module == "__main__" else [])
    for name in names:
        mod = sys.modules.get(name)
        if mod is None:
            try:
                mod = importlib.import_module(name)
            except Exception:
                continue
        obj: Any = mod
        try:
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    return None


def _str_of_message(self: BaseException) -> str:
    # KeyError's str() is repr(arg), which would escape the newlines of the remote traceback.
    if len(self.args) == 1 and isinstance(self.args[0], str):
        return self.args[0]
    return BaseException.__str__(self)


def _make_dual(original: type[BaseException], args: tuple[Any, ...]) -> BaseException:
    cls = dual_type(original)
    return cls(*args) if cls is not None else RuntimeError(*args)


def _reduce_dual(self: BaseException) -> tuple[Any, ...]:
    return (_make_dual, (type(self)._shmrpc_original, self.args))  # type: ignore[attr-defined]


def dual_type(original: type[BaseException]) -> type[BaseException] | None:
    """A subclass of ``original`` and RuntimeError named like ``original`` (None if impossible)."""
    if issubclass(original, RuntimeError):
        return original
    if original in _dual_types:
        return _dual_types[original]
    try:
        dual: type[BaseException] | None = type(
            original.__name__,
            (original, RuntimeError),
            {
                "__module__": original.__module__,
                "__qualname__": original.__qualname__,
                "__str__": _str_of_message,
                "__reduce__": _reduce_dual,
                "_shmrpc_original": original,
            },
        )
    except TypeError:  # incompatible layouts or a metaclass that refuses
        dual = None
    _dual_types[original] = dual
    return dual


def rebuild_exception(remote: RemoteError) -> BaseException:
    """The exception to raise in the caller for ``remote``."""
    module, qualname, message = remote
    original = _resolve(module, qualname)
    if not (isinstance(original, type) and issubclass(original, BaseException)):
        return RuntimeError(f"{module}.{qualname}: {message}")
    cls = dual_type(original)
    if cls is None:
        return RuntimeError(f"{qualname}: {message}")
    try:
        return cls(message)
    except Exception as ctor_error:
        error = RuntimeError(
            f"Failed to create original exception type. Error msg was {ctor_error} "
            f"Original exception on remote side was {message}"
        )
        error.__cause__ = ctor_error
        return error
