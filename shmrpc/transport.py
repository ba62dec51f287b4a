"""The backend interface: what the engine asks of a transport, and how transports are found.

A transport moves `Message` objects between this process and some of its peers. The
engine (agent, RRef context, distributed autograd) sees only this module, and backends
(``shmrpc.backends``) import only this module, so either side can change without the other.

The split follows TensorPipe: a message is a small opaque header and payload (CPU bytes the
engine encoded) plus a list of buffers, and the transport alone decides how each buffer travels
(copied through a ring, sent with scatter/gather I/O, or passed as a CUDA IPC handle).

Receiving is pulled, not pushed, so the engine can run a request on the very thread that read
it (no thread-pool hop): engine threads block in `Transport.wait`, and any thread may
call `Transport.poll`, which hands complete messages to `TransportHost.deliver`
on the calling thread.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import importlib.metadata
import threading
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol

import torch

from .buffers import allocate_buffer

__all__ = [
    "ENTRY_POINT_GROUP",
    "Message",
    "PeerLostError",
    "PeerShutDown",
    "Transport",
    "TransportConfig",
    "TransportError",
    "TransportHost",
    "allocate_buffer",
    "register_transport",
    "resolve_backend",
]

ENTRY_POINT_GROUP = "shmrpc.backends"


class TransportError(RuntimeError):
    """A transport could not do what it was asked (bad address, failed handshake, ...)."""


class PeerLostError(TransportError, ConnectionError):
    """The peer process is gone, or its channel broke; nothing more can reach it."""


class PeerShutDown(PeerLostError):
    """The peer is gone because it shut down deliberately (it said goodbye), not a crash."""


class Message(NamedTuple):
    """One unit a transport carries.

    ``header`` and ``payload`` are CPU bytes the engine encoded; a transport delivers them
    verbatim. ``buffers`` are 1-D contiguous ``torch.uint8`` tensors on any device. On the
    receiving side every buffer is memory the receiver owns (never a view into a shared ring
    or into the sender's memory) and its storage offset is a multiple of 64 bytes.

    ``targets`` says on which device each buffer must arrive (empty: host memory for all, the
    usual case). How a buffer gets there is the transport's choice: copied through a ring,
    sent with scatter/gather I/O, staged through host memory, or passed as a CUDA IPC handle.
    A CUDA buffer is ordered by the sending thread's current stream at ``send()``: the
    transport reads it only after the work queued there so far.

    (A NamedTuple rather than a frozen dataclass: one is built per message, and frozen
    dataclasses pay for their immutability on every construction.)
    """

    header: bytes
    payload: bytes | bytearray | memoryview
    buffers: Sequence[torch.Tensor] = ()
    targets: Sequence[torch.device] = ()

    @property
    def nbytes(self) -> int:
        return len(self.header) + len(self.payload) + sum(b.numel() for b in self.buffers)


class TransportHost(Protocol):
    """What the engine offers a transport: somewhere to hand what arrives."""

    def deliver(self, peer: int, message: Message) -> None:
        """Take one complete message from ``peer``. Called on the thread that polled."""

    def peer_lost(self, peer: int, error: BaseException) -> None:
        """``peer`` is unreachable from now on. Called at most once per peer, on any thread."""


@dataclasses.dataclass(frozen=True)
class TransportConfig:
    """What every transport is told about the world it joins."""

    rank: int
    world_size: int
    #: Random per world; names of shared objects carry it so worlds never collide.
    world_token: str
    #: Per-world secret: a connection must prove it knows it before it is trusted.
    auth_key: bytes
    #: Deadline, in seconds, for connecting to peers during init.
    connect_timeout: float
    #: Backend-specific options from RpcBackendOptions (ring_size, listen_addr, ...).
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class Transport(abc.ABC):
    """A way of moving messages between this process and some of its peers.

    Life cycle: ``listen()`` → (the engine publishes addresses through the rendezvous store) →
    ``connect(peers)`` → any number of ``send``/``poll``/``wait`` → ``close()``.

    Threading contract: ``send`` may be called from any thread concurrently; ``poll`` may be
    called from any thread and must never block for long (a transport keeps its reads
    single-consumer itself); several threads may block in ``wait`` at once, and each calls
    ``poll`` when it returns, so a wake-up consumed by any of them is never lost.
    """

    #: Name under which the transport is registered and addresses are published.
    name: ClassVar[str] = ""
    #: True when ``poll`` costs no system call, so spinning on it is cheap.
    cheap_poll: ClassVar[bool] = False
    #: Device types whose buffers this transport can carry.
    devices: ClassVar[frozenset[str]] = frozenset({"cpu"})

    def __init__(self, config: TransportConfig, host: TransportHost) -> None:
        self.config = config
        self.host = host

    @abc.abstractmethod
    def listen(self) -> dict[str, Any]:
        """Start accepting peers; return the JSON-serializable address they need."""

    @staticmethod
    @abc.abstractmethod
    def reaches(local: Mapping[str, Any], remote: Mapping[str, Any]) -> bool:
        """Whether a transport at address ``local`` can talk to one at ``remote``.

        Must be symmetric: both ends of a pair decide independently and must agree.
        """

    @abc.abstractmethod
    def connect(self, peers: Mapping[int, Mapping[str, Any]]) -> None:
        """Open channels to ``peers`` (rank → the address it published). Blocks until done."""

    @abc.abstractmethod
    def send(self, peer: int, message: Message, timeout: float | None = None) -> None:
        """Queue ``message`` for ``peer``; returns once the buffers may be reused.

        Raises PeerLostError if the peer is gone and TimeoutError if it could not take the
        message within ``timeout`` seconds (None waits as long as the peer is alive).
        """

    @abc.abstractmethod
    def poll(self) -> int:
        """Deliver every message that has arrived; return how many. Never blocks for long."""

    def spin_begin(self) -> None:  # noqa: B027 - an optional hint, no-op by default
        """A thread starts calling ``poll`` in a loop (hint: peers need not wake us)."""

    def spin_end(self) -> None:  # noqa: B027 - an optional hint, no-op by default
        """That thread stops; it calls ``poll`` once more afterwards, then may block."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> None:
        """Block until ``poll`` may find something, ``interrupt`` is called, or ``timeout``."""

    @abc.abstractmethod
    def interrupt(self) -> None:
        """Wake the thread blocked in ``wait`` (used at shutdown)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release every resource (sockets, segments, semaphores). Idempotent."""


# --------------------------------------------------------------------------------------------
# Registry

#: What a backend name resolves to: a Transport subclass, or a preference list of names
#: (the first transport that reaches a given peer carries its traffic, as ``auto`` does).
BackendTarget = type[Transport] | Sequence[str]

_registered: dict[str, BackendTarget] = {}
_registry_lock = threading.Lock()

# Used only when package metadata is missing (running from a source tree that was never
# installed); an installed shmrpc finds the same names through its entry points.
_BUILTIN = {
    "shm": "shmrpc.backends.shm:ShmTransport",
    "tcp": "shmrpc.backends.tcp:TcpTransport",
    "auto": "shmrpc.backends.auto:PREFERENCE",
}


def register_transport(name: str, target: BackendTarget) -> None:
    """Register a backend in this process, as an entry point in ``shmrpc.backends`` would."""
    with _registry_lock:
        if name in _registered:
            raise RuntimeError(f"RPC backend {name}: already registered")
        _registered[name] = target


def available_backends() -> list[str]:
    names = set(_registered) | set(_BUILTIN)
    names.update(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def _load(name: str) -> BackendTarget:
    with _registry_lock:
        if name in _registered:
            return _registered[name]
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name):
        target = ep.load()
        break
    else:
        if name not in _BUILTIN:
            raise ValueError(
                f"unknown shmrpc backend {name!r}; available: {', '.join(available_backends())}"
            )
        module, _, attr = _BUILTIN[name].partition(":")
        target = getattr(importlib.import_module(module), attr)
    with _registry_lock:
        _registered.setdefault(name, target)
    return target


def resolve_backend(name: str) -> list[type[Transport]]:
    """The transports a backend name stands for, in order of preference."""
    target = _load(name)
    if isinstance(target, type) and issubclass(target, Transport):
        return [target]
    if isinstance(target, (list, tuple)):
        resolved: list[type[Transport]] = []
        for inner in target:
            if inner == name:
                raise ValueError(f"backend {name!r} lists itself")
            resolved.extend(t for t in resolve_backend(inner) if t not in resolved)
        return resolved
    raise TypeError(
        f"backend {name!r} must be a Transport subclass or a list of backend names, got {target!r}"
    )
