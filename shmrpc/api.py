"""The public RPC functions, with torch.distributed.rpc's names, signatures and errors."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

import torch

from . import autograd as _autograd_module
from . import rref as _rref_module
from .agent import RpcAgent
from .bootstrap import World, start_agent
from .constants import (
    BACKEND_ENV_VAR,
    DEFAULT_BACKEND,
    DEFAULT_SHUTDOWN_TIMEOUT,
    UNSET_RPC_TIMEOUT,
)
from .errors import NOT_INITIALIZED
from .options import BackendType, RpcBackendOptions
from .rref import RRef
from .worker_info import WorkerInfo, check_worker_name

__all__ = [
    "get_debug_info",
    "get_rpc_timeout",
    "get_worker_info",
    "init_rpc",
    "remote",
    "rpc_async",
    "rpc_sync",
    "shutdown",
]

logger = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")

_world: World | None = None
_agent: RpcAgent | None = None
_agent_lock = threading.RLock()
#: torch's switch: when False, graceful shutdown raises on RRefs still counted.
_ignore_rref_leak = True
#: Longest a graceful shutdown waits for owners here to be released, even with timeout=0.
_RREF_DELETION_LIMIT = 100.0
_default_timeout: float = 60.0
_thread_local = threading.local()


def _current_agent() -> RpcAgent:
    agent = _agent
    if agent is None:
        raise RuntimeError(NOT_INITIALIZED)
    return agent


def _require_initialized(func: Callable[_P, _R]) -> Callable[_P, _R]:
    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        _current_agent()
        return func(*args, **kwargs)

    return wrapper


def _backend_name(backend: BackendType | str | None) -> str:
    if backend is None:
        return os.environ.get(BACKEND_ENV_VAR, DEFAULT_BACKEND)
    if isinstance(backend, BackendType):
        return backend.value
    if isinstance(backend, str):
        return backend.lower()
    raise TypeError("Argument backend must be a member of BackendType")


def init_rpc(
    name: str,
    backend: BackendType | str | None = None,
    rank: int = -1,
    world_size: int | None = None,
    rpc_backend_options: RpcBackendOptions | None = None,
) -> None:
    """Start this process's RPC agent and wait until every worker of the world has started.

    ``backend`` is ``"shm"``, ``"tcp"``, ``"auto"`` (shm on this host, tcp elsewhere), a
    `BackendType`, or the name of a backend registered under the ``shmrpc.backends``
    entry point group; ``None`` reads ``$SHMRPC_BACKEND`` and falls back to ``auto``.

    ``rank`` and ``world_size`` not passed (``-1`` and ``None``) are read from ``$RANK`` and
    ``$WORLD_SIZE`` when those are set, as torchrun sets them, so ``init_rpc(name)`` starts a
    torchrun world (docs/torchrun.md). This is a deliberate difference from torch, whose
    ``init_rpc(name)`` ignores them (it starts a dynamic group with rank -1, and fails). A
    value that the ``init_method`` URL's query gives is not read from the environment.
    """
    global _default_timeout
    check_worker_name(name)
    backend_name = _backend_name(backend)
    if rpc_backend_options is None:
        rpc_backend_options = RpcBackendOptions()
    elif not isinstance(rpc_backend_options, RpcBackendOptions):
        raise TypeError("Argument rpc_backend_options must be an instance of RpcBackendOptions")
    rank, world_size = _rank_and_world_size_from_env(
        rank, world_size, rpc_backend_options.init_method
    )
    if world_size is None:
        raise NotImplementedError(
            "shmrpc needs a static world: pass world_size or set $WORLD_SIZE (dynamic groups "
            "are not supported yet)"
        )
    with _agent_lock:
        if _agent is not None:
            raise RuntimeError("RPC is already initialized")
        _default_timeout = rpc_backend_options.rpc_timeout
        start_agent(
            name, rank, world_size, backend_name, rpc_backend_options, get_rpc_timeout, _publish
        )


RANK_ENV_VAR = "RANK"
WORLD_SIZE_ENV_VAR = "WORLD_SIZE"


def _rank_and_world_size_from_env(
    rank: int, world_size: int | None, init_method: str
) -> tuple[int, int | None]:
    """``rank`` and ``world_size``, each taken from the environment when not passed.

    A value the ``init_method`` URL's query names stays there (torch's rendezvous refuses a
    URL that has it twice). Values from the environment must be integers, the rank in
    ``[0, world_size)``; anything else is a ValueError naming the variable.
    """
    query = urllib.parse.parse_qs(urllib.parse.urlparse(init_method).query)
    rank_from_env = world_size_from_env = False
    if rank == -1 and "rank" not in query:
        value = _int_from_env(RANK_ENV_VAR, minimum=0)
        if value is not None:
            rank, rank_from_env = value, True
    if world_size is None and "world_size" not in query:
        world_size = _int_from_env(WORLD_SIZE_ENV_VAR, minimum=1)
        world_size_from_env = world_size is not None
    if world_size is not None and rank >= world_size:
        if rank_from_env:
            origin = f" (${WORLD_SIZE_ENV_VAR})" if world_size_from_env else ""
            raise ValueError(
                f"environment variable {RANK_ENV_VAR} must be below the world size "
                f"{world_size}{origin}, got {rank}"
            )
        if world_size_from_env:
            raise ValueError(
                f"environment variable {WORLD_SIZE_ENV_VAR} must be above the rank {rank}, "
                f"got {world_size}"
            )
    return rank, world_size


def _int_from_env(var: str, minimum: int) -> int | None:
    """The integer in ``$var`` (None when unset or empty); a ValueError names a bad one."""
    text = os.environ.get(var, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(
            f"environment variable {var} must be an integer, got {os.environ[var]!r}"
        ) from None
    if value < minimum:
        raise ValueError(f"environment variable {var} must be >= {minimum}, got {value}")
    return value


def _publish(world: World | None) -> None:
    """Install (or, if init fails late, remove) the process's world for the API to use."""
    global _world, _agent
    _world, _agent = world, None if world is None else world.agent
    _rref_module._set_context(None if world is None else world.rrefs)
    _autograd_module._set_engine(None if world is None else world.autograd)


def _resolve_timeout(timeout: float) -> float:
    if timeout == UNSET_RPC_TIMEOUT:
        return _default_timeout
    if timeout < 0:
        raise ValueError(f"timeout must be >= 0 or -1 (the default), got {timeout}")
    return float(timeout)


def _to_worker_info(to: WorkerInfo | str | int, agent: RpcAgent | None = None) -> WorkerInfo:
    if isinstance(to, WorkerInfo):
        return to
    if isinstance(to, (str, int)) and not isinstance(to, bool):
        return (agent or _current_agent()).get_worker_info(to)
    raise ValueError(f"Cannot get WorkerInfo from name {to}")


@_require_initialized
def get_worker_info(worker_name: str | int | None = None) -> WorkerInfo:
    """This worker's WorkerInfo, or a peer's by name or rank."""
    return _current_agent().get_worker_info(worker_name)


def get_rpc_timeout() -> float:
    """The default timeout of calls that pass none, in seconds."""
    return _default_timeout


def _set_rpc_timeout(rpc_timeout: float) -> None:
    """Change the default timeout of calls started from now on."""
    global _default_timeout
    _default_timeout = float(rpc_timeout)


def _check_call(func: Any) -> None:
    if not callable(func):
        raise TypeError("function should be callable.")


# rpc_sync and rpc_async check for the agent themselves rather than through
# @_require_initialized: on the hot path every function call counts (docs/performance.md).


def rpc_sync(
    to: WorkerInfo | str | int,
    func: Callable[..., Any],
    args: tuple[Any, ...] | list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    timeout: float = UNSET_RPC_TIMEOUT,
) -> Any:
    """Run ``func(*args, **kwargs)`` on worker ``to`` and return its result."""
    agent = _current_agent()
    _check_call(func)
    dst = _to_worker_info(to, agent)
    return agent.call_sync(
        dst, func, tuple(args or ()), dict(kwargs or {}), _resolve_timeout(timeout)
    )


def rpc_async(
    to: WorkerInfo | str | int,
    func: Callable[..., Any],
    args: tuple[Any, ...] | list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    timeout: float = UNSET_RPC_TIMEOUT,
) -> torch.futures.Future[Any]:
    """Start ``func(*args, **kwargs)`` on worker ``to``; the future completes with its result."""
    agent = _current_agent()
    _check_call(func)
    dst = _to_worker_info(to, agent)
    future = agent.call_async(
        dst, func, tuple(args or ()), dict(kwargs or {}), _resolve_timeout(timeout)
    )
    pending = getattr(_thread_local, "future_list", None)
    if pending is not None:
        pending.append(future)
    return future


@_require_initialized
def remote(
    to: WorkerInfo | str | int,
    func: Callable[..., Any],
    args: tuple[Any, ...] | list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    timeout: float = UNSET_RPC_TIMEOUT,
) -> RRef[Any]:
    """Start ``func(*args, **kwargs)`` on worker ``to``; return an RRef to its result at once.

    The result stays on ``to`` (its owner) as long as any worker holds a reference to it. If
    the owner does not confirm the creation within ``timeout``, using the RRef raises.
    """
    _check_call(func)
    dst = _to_worker_info(to)
    assert _world is not None
    return _world.rrefs.remote(
        dst, func, tuple(args or ()), dict(kwargs or {}), _resolve_timeout(timeout)
    )


@contextlib.contextmanager
def _wait_all() -> Iterator[None]:
    """Collect the futures of rpc_async calls made in the block and wait for them on exit."""
    _thread_local.future_list = []
    try:
        yield
    finally:
        try:
            torch.futures.wait_all(_thread_local.future_list)
        finally:
            del _thread_local.future_list


@_require_initialized
def _all_gather(
    obj: Any, worker_names: list[str] | set[str] | None = None, timeout: float = UNSET_RPC_TIMEOUT
) -> dict[str, Any]:
    """Every worker's ``obj`` by name (torch's private helper, with its timeout rules)."""
    if timeout == UNSET_RPC_TIMEOUT:
        rpc_timeout, signal_timeout = get_rpc_timeout(), None
    elif timeout == DEFAULT_SHUTDOWN_TIMEOUT:
        rpc_timeout, signal_timeout = 0.0, None
    else:
        rpc_timeout = signal_timeout = timeout
    return _current_agent().all_gather(obj, worker_names, rpc_timeout, signal_timeout)


@_require_initialized
def _barrier(worker_names: list[str] | set[str]) -> None:
    try:
        _all_gather(None, set(worker_names))
    except RuntimeError:
        logger.exception("Failed to complete barrier")


@_require_initialized
def _wait_all_workers(timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> None:
    _all_gather(None, timeout=timeout)


@_require_initialized
def shutdown(graceful: bool = True, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> None:
    """Stop this worker's agent.

    Graceful: first wait until every worker has called shutdown (this worker keeps serving
    meanwhile), release this worker's RRefs and wait for the owners here to be released, wait
    until no worker has work outstanding, then stop. ``timeout`` bounds that wait in seconds;
    0 waits as long as it takes, but a peer that dies fails it promptly. The local agent is
    stopped and its resources released in every case.
    """
    global _world, _agent
    world = _world
    assert world is not None
    try:
        if graceful:
            deadline = None if timeout <= 0 else time.monotonic() + timeout
            _wait_all_workers(timeout)
            remaining = _remaining(deadline)
            _delete_all_user_and_unforked_owner_rrefs(
                _RREF_DELETION_LIMIT if remaining is None else remaining
            )
            world.agent.join(_remaining(deadline))
    finally:
        with _agent_lock:
            if _world is world:
                _world, _agent = None, None
                _rref_module._set_context(None)
                _autograd_module._set_engine(None)
        world.rrefs.close()
        world.autograd.close()
        world.agent.stop()


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.001, deadline - time.monotonic())


@_require_initialized
def _delete_all_user_and_unforked_owner_rrefs(timeout: float | None = 100.0) -> None:
    """Release this worker's user RRefs, then wait until its owners are released elsewhere."""
    assert _world is not None
    rrefs = _world.rrefs
    rrefs.delete_all_users(timeout)
    leaks = rrefs.leaks()
    if leaks:
        text = "Detected RRef Leaks during shutdown. " + "; ".join(leaks)
        if not _ignore_rref_leak:
            raise RuntimeError(text)
        logger.warning(text)


@_require_initialized
def _rref_context_get_debug_info() -> dict[str, str]:
    assert _world is not None
    return _world.rrefs.debug_info()


def _get_current_rpc_agent() -> RpcAgent:
    return _current_agent()


@_require_initialized
def get_debug_info() -> dict[str, str]:
    """This worker's RPC state, as torch's ``_get_debug_info``: a dict of str to str.

    torch's keys, as torch names them:

    * the agent's: ``agent.thread_pool_size``, ``agent.num_idle_threads``,
      ``agent.client_active_calls``, ``agent.server_active_calls``,
      ``agent.server_active_async_calls``;
    * the RRef context's: ``num_owner_rrefs`` (values owned here that some worker
      references), ``num_forks`` (references to them that their owner counts),
      ``num_pending_users`` (user RRefs here that their owner has not confirmed yet),
      ``num_pending_futures`` (RRef control messages waiting for an answer);
    * distributed autograd's: ``num_autograd_contexts``, ``num_current_backward_passes``.

    shmrpc's own:

    * ``agent.requests_sent``, ``agent.requests_served``: user requests since init;
    * the thread pool: ``agent.threads_running`` (work items running, at most
      ``agent.thread_pool_size``), ``agent.work_queued`` (waiting for a thread),
      ``agent.listener_threads`` (threads polling the transports) and
      ``agent.listener_threads_busy`` (of those, running what they received);
    * per worker ``<name>`` of the world (this one too: calls to itself),
      ``agent.peer.<name>.transport`` (``shm``, ``tcp``, or ``self``),
      ``agent.peer.<name>.state`` (``up``, ``shut down``, or ``lost``),
      ``agent.peer.<name>.messages_sent``, ``.bytes_sent``, ``.messages_received``,
      ``.bytes_received`` (all messages since init, the engine's own included; bytes count
      header, payload and tensor data; concurrent sends may be undercounted slightly), and
      ``agent.peer.<name>.pending_calls`` (requests to it not yet answered);
    * RRefs: ``num_user_rrefs`` (confirmed user RRefs alive here), ``num_pending_children``
      (user RRefs passed on whose new holders the owner has not confirmed yet),
      ``num_pending_deletions`` (user RRefs freed here whose owners have not been told yet).
    """
    assert _world is not None
    return {
        **_world.agent.get_debug_info(),
        **_world.rrefs.debug_info(),
        **_world.autograd.debug_info(),
    }


def _get_debug_info() -> dict[str, str]:
    """torch's private name for `get_debug_info`."""
    return get_debug_info()
