"""shmrpc: fast, dependable RPC for PyTorch, a drop-in for ``torch.distributed.rpc``.

Replace ``import torch.distributed.rpc as rpc`` with ``import shmrpc as rpc``. The engine lives
in this package; the transports ("backends": shared memory, TCP) live in ``shmrpc.backends``
and are found through the ``shmrpc.backends`` entry point group.
"""

from __future__ import annotations


def _map_backends_source_tree() -> None:
    # In a source checkout the wires live in ../backends (installed as shmrpc.backends);
    # an installed wheel has shmrpc/backends, and an editable install maps it itself.
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    tree = os.path.join(os.path.dirname(here), "backends")
    init = os.path.join(tree, "__init__.py")
    if os.path.isdir(os.path.join(here, "backends")) or not os.path.isfile(init):
        return
    if "shmrpc.backends" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        "shmrpc.backends", init, submodule_search_locations=[tree]
    )
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["shmrpc.backends"] = module
    spec.loader.exec_module(module)


_map_backends_source_tree()
del _map_backends_source_tree


def _configure_logging(var: str = "SHMRPC_LOG_LEVEL") -> None:
    """Apply ``$SHMRPC_LOG_LEVEL`` to the "shmrpc" logger, through which every message of
    shmrpc and its backends goes: a level name (DEBUG, INFO, WARNING, ERROR, CRITICAL) or a
    number. A bad value: one warning, and the level stays as it was.

    Below WARNING, a handler writes shmrpc's records to stderr for as long as the application
    has configured no logging of its own (Python's last-resort handler shows WARNING and
    above only); once the root logger has a handler, records reach that one instead.
    """
    import logging
    import os
    import sys

    text = os.environ.get(var, "").strip()
    if not text:
        return
    log = logging.getLogger(__name__)
    level = logging.getLevelNamesMapping().get(text.upper())
    if level is None:
        try:
            level = int(text)
        except ValueError:
            level = -1
    if level < 0:
        log.warning(
            "shmrpc: ignoring %s=%r: not a level name (DEBUG, INFO, WARNING, ERROR, CRITICAL) "
            "or a number",
            var,
            text,
        )
        return
    log.setLevel(level)
    if level < logging.WARNING:

        class _StderrUntilConfigured(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if logging.getLogger().handlers:
                    return  # the application's own handlers get it (propagation)
                try:
                    sys.stderr.write(self.format(record) + "\n")
                except Exception:
                    self.handleError(record)

        handler = _StderrUntilConfigured()
        handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
        log.addHandler(handler)


_configure_logging()
del _configure_logging

from . import functions  # noqa: E402

# torch.distributed.rpc exposes these private helpers, and its users' tests call them.
from .api import _all_gather as _all_gather  # noqa: E402
from .api import _barrier as _barrier  # noqa: E402
from .api import _get_current_rpc_agent as _get_current_rpc_agent  # noqa: E402
from .api import _get_debug_info as _get_debug_info  # noqa: E402
from .api import _rref_context_get_debug_info as _rref_context_get_debug_info  # noqa: E402
from .api import _set_rpc_timeout as _set_rpc_timeout  # noqa: E402
from .api import _wait_all as _wait_all  # noqa: E402
from .api import _wait_all_workers as _wait_all_workers  # noqa: E402
from .api import (  # noqa: E402
    get_debug_info,
    get_rpc_timeout,
    get_worker_info,
    init_rpc,
    remote,
    rpc_async,
    rpc_sync,
    shutdown,
)
from .constants import (  # noqa: E402
    DEFAULT_INIT_METHOD,
    DEFAULT_NUM_WORKER_THREADS,
    DEFAULT_RPC_TIMEOUT_SEC,
    DEFAULT_SHUTDOWN_TIMEOUT,
    UNSET_RPC_TIMEOUT,
)
from .errors import MessageTooLargeError, PeerLostError, RpcTimeoutError  # noqa: E402
from .options import BackendType, RpcBackendOptions, TensorPipeRpcBackendOptions  # noqa: E402
from .rref import PyRRef, RRef  # noqa: E402
from .transport import register_transport  # noqa: E402
from .worker_info import WorkerInfo  # noqa: E402


def is_available() -> bool:
    return True


__all__ = [
    "DEFAULT_INIT_METHOD",
    "DEFAULT_NUM_WORKER_THREADS",
    "DEFAULT_RPC_TIMEOUT_SEC",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "UNSET_RPC_TIMEOUT",
    "BackendType",
    "MessageTooLargeError",
    "PeerLostError",
    "PyRRef",
    "RRef",
    "RpcBackendOptions",
    "RpcTimeoutError",
    "TensorPipeRpcBackendOptions",
    "WorkerInfo",
    "functions",
    "get_debug_info",
    "get_rpc_timeout",
    "get_worker_info",
    "init_rpc",
    "is_available",
    "register_transport",
    "remote",
    "rpc_async",
    "rpc_sync",
    "shutdown",
]
