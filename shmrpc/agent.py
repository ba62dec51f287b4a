"""The RPC agent: sends requests, runs incoming ones, and matches replies to their callers.

Every message leaves through `RpcAgent._transmit` and arrives through
`RpcAgent.deliver`. Between pickling and sending, and between unpacking a message's
tensors and unpickling it, each message passes the agent's `MessageGate` with all of its
tensors: distributed autograd records its send/recv functions there. Device maps apply as a
message is pickled: the serializer asks the peer's placement (``devices.py``) where each tensor
lands. Whoever serves a kind of request (the agent itself for calls and all-gathers, the RRef
context for its protocol) registers a handler with `RpcAgent.register_handler`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager as ContextManager
from typing import Any, Protocol

import torch

from .deadlines import Deadlines
from .devices import DeviceMaps
from .dispatcher import Dispatcher
from .envelope import HEADER_SIZE, Envelope, Flag, Kind, decode, encode
from .errors import (
    DescribedError,
    MessageTooLargeError,
    PeerLostError,
    RpcTimeoutError,
    describe_exception,
    rebuild_exception,
)
from .profiling import Span, callee_key, caller_key, to_here_key, torch_profiler
from .serialization import Pickled, Received, Serializer
from .transport import Message, PeerShutDown, Transport, allocate_buffer
from .worker_info import WorkerInfo

__all__ = [
    "CallFuture",
    "Inbound",
    "Later",
    "MessageGate",
    "Messenger",
    "RpcAgent",
    "failed_future",
]

logger = logging.getLogger(__name__)

_REPLY_KINDS = (int(Kind.RESULT), int(Kind.ERROR))
#: Bytes per second a request crosses at, end to end, for lengthening the caller's spin.
_CROSSING_RATE = 2e9
_MAX_EXTRA_SPIN = 0.002
_INTERNAL = Flag.INTERNAL
_NO_REPLY = Flag.NO_REPLY
_REQUEST_ID_AT = 8  # byte offset of the request id in the envelope
#: Requests recorded as profiler spans while a profiler runs (profiling.py): on the caller
#: (rpc_sync/rpc_async, remote, to_here), and on the callee (the function's run).
_CALLER_SPANS = frozenset({int(Kind.CALL), int(Kind.REMOTE_CALL), int(Kind.RREF_FETCH)})
_CALLEE_SPANS = frozenset({int(Kind.CALL), int(Kind.REMOTE_CALL)})


class Route(Protocol):
    """Where messages for one peer go: a Transport, or the agent's own loopback."""

    @property
    def devices(self) -> frozenset[str]: ...

    def send(self, peer: int, message: Message, timeout: float | None = None) -> None: ...


class MessageGate(Protocol):
    """What sees every message with all of its tensors, on both sides (distributed autograd).

    Requests that are not internal carry the sending thread's autograd context; a reply
    carries the context of its request. The gate records what it must and says which
    autograd message id the envelope carries.
    """

    def current_context(self) -> int:
        """The autograd context of the calling thread (-1: none)."""

    def outgoing(self, to: int, context_id: int, tensors: Sequence[torch.Tensor]) -> int:
        """A message of context ``context_id`` (not -1) is about to go to rank ``to`` with
        ``tensors``; return its autograd message id (-1: nothing recorded)."""

    def incoming(self, peer: int, envelope: Envelope, received: Received) -> None:
        """A message arrived with ``received.tensors``; set their ``requires_grad`` as sent,
        or replace them (same shape and dtype) with tensors recorded for autograd."""

    def serving(self, context_id: int) -> ContextManager[None]:
        """Run a request's handler within the context its caller sent (-1: none)."""


class Messenger(Protocol):
    """What the layers above the agent (the RRef context, distributed autograd) may ask of it.

    The agent implements it; they see nothing else of it, and never a transport.
    """

    worker_info: WorkerInfo
    serializer: Serializer

    def get_worker_info(self, worker: str | int | None = None) -> WorkerInfo: ...

    def register_handler(
        self, kind: int, handler: Callable[[Inbound, Any], Any], *, internal: bool = False
    ) -> None: ...

    def set_gate(self, gate: MessageGate) -> None: ...

    def request_async(
        self,
        to: WorkerInfo,
        kind: int,
        payload: Any,
        timeout: float,
        flags: int = 0,
        quick: bool = False,
        backward: bool = False,
    ) -> torch.futures.Future[Any]: ...

    def request_sync(
        self, to: WorkerInfo, kind: int, payload: Any, timeout: float, flags: int = 0
    ) -> Any: ...

    def call_sync(
        self, to: WorkerInfo, func: Callable[..., Any], args: tuple, kwargs: dict, timeout: float
    ) -> Any: ...

    def notify(self, to: WorkerInfo, kind: int, payload: Any) -> None: ...


class PlainGate:
    """The gate when distributed autograd is not installed: tensors arrive as they were sent."""

    def current_context(self) -> int:
        return -1

    def outgoing(self, to: int, context_id: int, tensors: Sequence[torch.Tensor]) -> int:
        return -1

    def incoming(self, peer: int, envelope: Envelope, received: Received) -> None:
        restore_requires_grad(received)

    def serving(self, context_id: int) -> ContextManager[None]:
        return contextlib.nullcontext()


def restore_requires_grad(received: Received) -> None:
    if True not in received.requires_grad:
        return
    for t, wanted in zip(received.tensors, received.requires_grad, strict=True):
        if wanted:
            t.requires_grad_(True)


@dataclasses.dataclass(slots=True)
class Inbound:
    """A request being served: who sent it, its envelope, and what it must wait for.

    Deserializing may discover that the request must not run yet (an RRef in its arguments
    that the owner has not confirmed); such code appends a future to ``waits`` and the agent
    runs the handler once they all complete.
    """

    peer: int
    envelope: Envelope
    waits: list[torch.futures.Future[Any]] = dataclasses.field(default_factory=list)


def failed_future(error: BaseException) -> torch.futures.Future[Any]:
    """A future already failed with ``error``.

    The traceback is dropped: it references the frames that made the future, a torch Future
    keeps its exception in C++ where Python's GC cannot see it, and the cycle future →
    exception → traceback → frame → future would never be collected.
    """
    future: torch.futures.Future[Any] = torch.futures.Future()
    future.set_exception(error.with_traceback(None))
    return future


class CallFuture(torch.futures.Future[Any]):
    """The future ``rpc_async`` returns: ``wait()`` polls for the reply before it blocks.

    torch's own ``wait()`` blocks at once, and on an idle core a wake-up costs far more than
    the round trip; polling first makes ``rpc_async(...).wait()`` as fast as ``rpc_sync``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._agent: RpcAgent | None = None
        self._call: _Call | None = None
        #: Whether a callback was added through ``then``/``add_done_callback``. Completing a
        #: future without one runs no user code, so whichever thread polled its reply may do
        #: it at once instead of handing it to a pool thread.
        self.has_callbacks = False

    def then(self, callback: Callable[[Any], Any]) -> Any:
        self.has_callbacks = True
        return super().then(callback)

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self.has_callbacks = True
        super().add_done_callback(callback)

    def wait(self) -> Any:
        call, agent = self._call, self._agent
        if call is not None and agent is not None and not self.done():
            call.waiter = threading.get_ident()  # its reply completes on this thread
            try:
                if not agent._dispatcher.spin_until(self.done, call.size / _CROSSING_RATE):
                    agent._dispatcher.before_block()
            finally:
                call.waiter = 0
        return super().wait()


class _SpannedCallFuture(CallFuture):
    """A CallFuture while a profiler runs: its span ends just before it completes, so the
    span is closed by the time anyone waiting for the future wakes."""

    def __init__(self, span: Span) -> None:
        super().__init__()
        self.span = span

    def set_result(self, result: Any) -> None:
        self.span.end()
        super().set_result(result)

    def set_exception(self, result: Any) -> None:
        self.span.end()
        super().set_exception(result)


def _settled(call: _Call) -> None:
    """The call's future is about to complete: drop its links back (no polling, no cycle)."""
    if isinstance(call.future, CallFuture):
        call.future._agent = call.future._call = None


class Later:
    """A handler's result that is not ready yet: the reply goes out when ``future`` completes."""

    __slots__ = ("future",)

    def __init__(self, future: torch._C.Future[Any]) -> None:
        self.future = future


Handler = Callable[[Inbound, Any], Any]


class _Call:
    """An outstanding request: how its reply reaches whoever waits for it."""

    __slots__ = (
        "future",
        "internal",
        "latch",
        "peer",
        "quick",
        "reply",
        "request_id",
        "size",
        "timer",
        "waiter",
    )

    def __init__(self, request_id: int, peer: int, internal: bool, size: int) -> None:
        self.request_id = request_id
        self.peer = peer
        self.internal = internal
        self.size = size  # bytes of buffers the request carries
        self.quick = False  # the future's callbacks are quick engine code
        self.waiter = 0  # ident of a thread spinning in CallFuture.wait for this call
        self.future: torch.futures.Future[Any] | None = None
        self.latch: threading.Lock | None = None
        self.reply: Message | BaseException | None = None
        self.timer: Any = None


class _Loopback:
    """Route for calls to self: full serialization and private copies, as torch does."""

    name = "self"
    devices = frozenset({"cpu", "cuda"})

    def __init__(self, agent: RpcAgent) -> None:
        self._agent = agent

    def send(self, peer: int, message: Message, timeout: float | None = None) -> None:
        copies = []
        for i, buffer in enumerate(message.buffers):
            target = message.targets[i] if message.targets else buffer.device
            if target.type == "cpu":
                copies.append(allocate_buffer(buffer.numel()).copy_(buffer))
            else:
                copies.append(buffer.to(target, copy=True))
        if message.targets or any(b.is_cuda for b in message.buffers):
            # The copies were queued on this thread's stream; another thread will read them.
            torch.cuda.synchronize()
        self._agent.deliver(peer, Message(message.header, bytes(message.payload), copies))


@dataclasses.dataclass
class _Gathering:
    names: frozenset[str]
    objects: dict[str, Any] = dataclasses.field(default_factory=dict)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


class RpcAgent:
    """One worker's endpoint in an RPC world."""

    def __init__(
        self,
        worker_info: WorkerInfo,
        worker_infos: Sequence[WorkerInfo],
        routes: Mapping[int, Route],
        transports: Sequence[Transport],
        *,
        num_worker_threads: int,
        spin_seconds: float,
        max_message_size: int | None = None,
        serializer: Serializer | None = None,
        device_maps: DeviceMaps | None = None,
    ) -> None:
        self.worker_info = worker_info
        self._infos = list(worker_infos)
        self._by_name = {info.name: info for info in self._infos}
        self._routes: dict[int, Route] = dict(routes)
        self._routes[worker_info.id] = _Loopback(self)
        self._transports = list(transports)
        self._max_message_size = max_message_size
        names = [info.name for info in self._infos]
        self._devices = device_maps or DeviceMaps(worker_info.name, names, {})
        self.serializer = serializer or Serializer()
        self._gate: MessageGate = PlainGate()
        self._dispatcher = Dispatcher(num_worker_threads, spin_seconds, f"shmrpc-{worker_info.id}")
        self._deadlines = Deadlines(f"shmrpc-{worker_info.id}-deadlines")

        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count(1)
        self._handlers: dict[int, tuple[Handler, bool]] = {}
        self._lost: dict[int, BaseException] = {}
        self._lost_lock = threading.Lock()
        self._stopped = False

        # Work accounting, for the graceful shutdown's "all outstanding work is done" (user
        # requests still waiting for a reply are the non-internal entries of _calls).
        self._stats_lock = threading.Lock()
        self._requests_sent = 0  # user (non-internal) requests sent
        self._requests_served = 0  # user requests received
        self._serving = 0  # user requests received and not yet answered
        self._serving_async = 0  # of those, waiting on an async_execution future

        # Traffic per peer rank, for get_debug_info: counted in _transmit and deliver with
        # plain increments and no lock. ``+=`` on a list item is not atomic across threads,
        # so concurrent sends to one peer may undercount a little: fine for debug info, and
        # it costs next to nothing per message.
        peers = len(self._infos)
        self._sent_messages = [0] * peers
        self._sent_bytes = [0] * peers
        self._received_messages = [0] * peers
        self._received_bytes = [0] * peers

        self._gather_lock = threading.Lock()
        self._gather_sequence: dict[str, int] = {}
        self._gatherings: dict[str, _Gathering] = {}

        self.register_handler(Kind.CALL, self._serve_call)
        self.register_handler(Kind.GATHER, self._serve_gather, internal=True)
        self.register_handler(Kind.BROADCAST, self._serve_broadcast, internal=True)

    # ------------------------------------------------------------------------ life cycle
    def start(self) -> None:
        self._dispatcher.start(self._transports)
        logger.debug("shmrpc: %s started; routes: %s", self.worker_info, self.route_names())

    def stop(self) -> None:
        """Stop at once: fail what is outstanding, stop threads, release transports."""
        if self._stopped:
            return
        self._stopped = True
        closed = RuntimeError(f"RPC agent of {self.worker_info} was shut down")
        for request_id in list(self._calls):
            call = self._take(request_id)
            if call is not None:
                self._fail(call, closed)
        self._dispatcher.stop()
        self._deadlines.close()
        for transport in self._transports:
            try:
                transport.close()
            except Exception:
                logger.exception("shmrpc: closing transport %s failed", transport.name)
        logger.debug("shmrpc: %s stopped", self.worker_info)

    def register_handler(self, kind: int, handler: Handler, *, internal: bool = False) -> None:
        """Serve requests of ``kind`` with ``handler(inbound, payload) -> reply value``.

        ``internal`` requests are engine housekeeping, not user work: the graceful shutdown
        does not wait for them.
        """
        if kind in self._handlers:
            raise ValueError(f"a handler for message kind {kind} is already registered")
        self._handlers[int(kind)] = (handler, internal)

    def set_gate(self, gate: MessageGate) -> None:
        """Install the gate every message passes (before peers can send anything)."""
        self._gate = gate

    # --------------------------------------------------------------------------- workers
    def get_worker_info(self, worker: str | int | None = None) -> WorkerInfo:
        if worker is None:
            return self.worker_info
        if isinstance(worker, str):
            info = self._by_name.get(worker)
            if info is None:
                raise RuntimeError(
                    f"name:{self.worker_info.name},rank:{self.worker_info.id} could not find "
                    f"destination name {worker}"
                )
            return info
        if isinstance(worker, int) and not isinstance(worker, bool):
            if 0 <= worker < len(self._infos):
                return self._infos[worker]
            raise RuntimeError(
                f"name:{self.worker_info.name},rank:{self.worker_info.id} could not find "
                f"destination id {worker}"
            )
        raise ValueError(f"Cannot get WorkerInfo from name {worker}")

    def get_worker_infos(self) -> list[WorkerInfo]:
        return list(self._infos)

    def is_lost(self, rank: int) -> bool:
        return rank in self._lost

    def route_names(self) -> dict[str, str]:
        """Which transport carries the traffic to each peer (``"self"`` for this worker)."""
        return {
            self._infos[rank].name: getattr(route, "name", "self")
            for rank, route in sorted(self._routes.items())
        }

    # -------------------------------------------------------------------------- requests
    def call_sync(
        self, to: WorkerInfo, func: Callable[..., Any], args: tuple, kwargs: dict, timeout: float
    ) -> Any:
        return self.request_sync(to, Kind.CALL, (func, args, kwargs), timeout)

    def call_async(
        self, to: WorkerInfo, func: Callable[..., Any], args: tuple, kwargs: dict, timeout: float
    ) -> torch.futures.Future[Any]:
        return self.request_async(to, Kind.CALL, (func, args, kwargs), timeout)

    def request_sync(
        self,
        to: WorkerInfo,
        kind: int,
        payload: Any,
        timeout: float,
        flags: int = 0,
        *,
        spanned: bool = False,
    ) -> Any:
        """Send a request and block for its reply (``timeout`` 0: no limit).

        ``spanned``: the call's profiler span is open already (profiling.py).
        """
        if torch_profiler._is_profiler_enabled and not spanned and kind in _CALLER_SPANS:
            with Span(self._caller_key("sync", to, kind, payload)):
                return self.request_sync(to, kind, payload, timeout, flags, spanned=True)
        call = self._start(to, kind, payload, timeout, flags, sync=True)
        reply = self._await(call, timeout, to, call.size / _CROSSING_RATE)
        if isinstance(reply, BaseException):
            raise reply
        ok, value = self._decode_reply(to.id, reply)
        if not ok:
            raise value
        return value

    def request_async(
        self,
        to: WorkerInfo,
        kind: int,
        payload: Any,
        timeout: float,
        flags: int = 0,
        quick: bool = False,
        backward: bool = False,
    ) -> torch.futures.Future[Any]:
        """Send a request; its reply completes the returned future.

        Mistakes of the caller (unpicklable payload, message too large) raise here; failures
        of the peer or the wire complete the future with an error. ``quick``: the future's
        callbacks are short engine code, fine to run on whichever thread got the reply.
        ``backward``: the request goes back along the path of one of ``to``'s requests
        (gradients), so its tensors take the inverse of ``to``'s device map, as a reply does.
        """
        if torch_profiler._is_profiler_enabled and kind in _CALLER_SPANS:
            return self._request_async_spanned(to, kind, payload, timeout, flags, quick, backward)
        try:
            call = self._start(
                to, kind, payload, timeout, flags, sync=False, quick=quick, backward=backward
            )
        except (PeerLostError, RpcTimeoutError) as error:
            return failed_future(error)
        assert call.future is not None
        return call.future

    def _request_async_spanned(
        self,
        to: WorkerInfo,
        kind: int,
        payload: Any,
        timeout: float,
        flags: int,
        quick: bool,
        backward: bool,
    ) -> torch.futures.Future[Any]:
        """request_async while a profiler runs: the call's span ends when its future
        completes (profiling.py)."""
        span = Span(self._caller_key("async", to, kind, payload))
        try:
            call = self._start(
                to,
                kind,
                payload,
                timeout,
                flags,
                sync=False,
                quick=quick,
                backward=backward,
                span=span,
            )
        except (PeerLostError, RpcTimeoutError) as error:
            span.end()
            return failed_future(error)
        except BaseException:
            span.end()
            raise
        assert call.future is not None
        return call.future

    def _caller_key(self, mode: str, to: WorkerInfo, kind: int, payload: Any) -> str:
        """The caller's span name of a request (mode: "sync" or "async")."""
        me = self.worker_info.name
        if kind == Kind.RREF_FETCH:
            return to_here_key(me, to.name)
        return caller_key("remote" if kind == Kind.REMOTE_CALL else mode, payload[0], me, to.name)

    def notify(self, to: WorkerInfo, kind: int, payload: Any) -> None:
        """Send a one-way internal message (no reply); raises if it cannot be sent."""
        pickled = self.serializer.dumps(payload, self._devices.requests[to.name])
        header = encode(kind, 0, _INTERNAL | _NO_REPLY, pickled.table)
        try:
            self._transmit(to.id, header, pickled, 0)
        except BaseException:
            pickled.cancel()
            raise

    def _start(
        self,
        to: WorkerInfo,
        kind: int,
        payload: Any,
        timeout: float,
        flags: int,
        *,
        sync: bool,
        quick: bool = False,
        backward: bool = False,
        span: Span | None = None,
    ) -> _Call:
        if self._stopped:
            raise RuntimeError(f"RPC agent of {self.worker_info} was shut down")
        placements = self._devices.responses if backward else self._devices.requests
        try:
            pickled = self.serializer.dumps(payload, placements[to.name])
        except Exception as e:
            e.add_note(f"shmrpc: could not serialize the request to {to.name}")
            raise
        internal = bool(flags & _INTERNAL)
        size = sum(b.numel() for b in pickled.buffers) if pickled.buffers else 0
        call = _Call(next(self._ids), to.id, internal, size)
        call.quick = quick
        if sync:
            call.latch = threading.Lock()
            call.latch.acquire()
        else:
            future = CallFuture() if span is None else _SpannedCallFuture(span)
            future._agent, future._call = self, call
            call.future = future
        self._calls[call.request_id] = call
        if not internal:
            with self._stats_lock:
                self._requests_sent += 1
        if not sync and timeout > 0:
            expire = functools.partial(self._expire, call.request_id, timeout, to.name)
            call.timer = self._deadlines.schedule(time.monotonic() + timeout, expire)
        try:
            context_id = -1 if internal else self._gate.current_context()
            message_id = -1
            if context_id != -1:
                message_id = self._gate.outgoing(to.id, context_id, pickled.tensors)
            header = encode(kind, call.request_id, flags, pickled.table, context_id, message_id)
            self._transmit(to.id, header, pickled, timeout)
        except BaseException:
            pickled.cancel()
            if self._take(call.request_id) is not None and call.timer is not None:
                call.timer.cancel()
            if not internal:  # it never left: do not count it as sent
                with self._stats_lock:
                    self._requests_sent -= 1
            raise
        return call

    def _await(
        self, call: _Call, timeout: float, to: WorkerInfo, extra_spin: float
    ) -> Message | BaseException:
        """Wait for a synchronous call's reply (the dispatcher spins, then blocks)."""
        latch = call.latch
        assert latch is not None
        extra_spin = min(extra_spin, _MAX_EXTRA_SPIN)
        if not self._dispatcher.wait_reply(
            lambda: call.reply is not None, latch, timeout, extra_spin
        ):
            if self._take(call.request_id) is not None:
                raise RpcTimeoutError.after(timeout, f"call to {to.name}")
            latch.acquire()  # the reply raced the timeout; it is being handed over
        reply = call.reply
        assert reply is not None
        return reply

    def _expire(self, request_id: int, timeout: float, name: str) -> None:
        call = self._take(request_id)
        if call is not None:
            self._fail(call, RpcTimeoutError.after(timeout, f"call to {name}"))

    def _take(self, request_id: int) -> _Call | None:
        """Remove a pending call (whoever takes it answers it); None if already taken."""
        return self._calls.pop(request_id, None)

    def _fail(self, call: _Call, error: BaseException) -> None:
        if call.latch is not None:
            call.reply = error
            call.latch.release()
        else:
            if call.timer is not None:
                call.timer.cancel()
            assert call.future is not None
            _settled(call)
            self._dispatcher.submit(call.future.set_exception, error)

    # -------------------------------------------------------------------------- the wire
    def _transmit(self, rank: int, header: bytes, pickled: Pickled, timeout: float) -> None:
        """Every outgoing message passes here."""
        message = Message(header, pickled.data, pickled.buffers, pickled.targets)
        limit = self._max_message_size
        if limit is not None and message.nbytes > limit:
            raise MessageTooLargeError(
                f"message of {message.nbytes} bytes to {self._infos[rank].name} exceeds "
                f"max_message_size={limit}"
            )
        lost = self._lost.get(rank)
        if lost is not None:
            raise PeerLostError(f"{self._infos[rank]} is gone: {lost}")
        route = self._routes[rank]
        if message.targets and "cuda" not in route.devices:
            raise RuntimeError(
                f"the {getattr(route, 'name', 'self')} transport to {self._infos[rank].name} "
                "cannot carry CUDA tensors; move them to the CPU before sending"
            )
        route.send(rank, message, timeout if timeout > 0 else None)
        size = len(header) + len(message.payload)
        if message.buffers:
            for buffer in message.buffers:  # (a loop: a generator costs 0.2 µs more)
                size += buffer.numel()
        self._sent_messages[rank] += 1  # (not atomic: see __init__)
        self._sent_bytes[rank] += size

    def deliver(self, peer: int, message: Message) -> None:
        """Every incoming message passes here (TransportHost.deliver)."""
        header = message.header
        size = len(header) + len(message.payload)
        if message.buffers:
            for buffer in message.buffers:  # (a loop: a generator costs 0.2 µs more)
                size += buffer.numel()
        self._received_messages[peer] += 1  # (not atomic: see __init__)
        self._received_bytes[peer] += size
        if header[0] in _REPLY_KINDS:
            request_id = int.from_bytes(header[_REQUEST_ID_AT : HEADER_SIZE - 16], "little")
            pending = self._calls.get(request_id)
            if pending is None or pending.peer != peer:
                # The call timed out, or its peer was declared lost; or the reply is not from
                # the worker asked, and the call keeps waiting for the real one.
                return
            call = self._take(request_id)
            if call is None:
                return  # it expired meanwhile
            if call.latch is not None:
                call.reply = message
                call.latch.release()
            else:
                if call.timer is not None:
                    call.timer.cancel()
                quick = (
                    call.quick
                    or call.waiter == threading.get_ident()
                    or not getattr(call.future, "has_callbacks", True)
                )
                submit = self._dispatcher.submit_quick if quick else self._dispatcher.submit
                submit(self._complete, call, peer, message)
            return
        self._dispatcher.submit(self._serve, peer, message, request=True)

    def peer_lost(self, peer: int, error: BaseException) -> None:
        """TransportHost.peer_lost: fail everything waiting on ``peer``; refuse new calls."""
        with self._lost_lock:
            if peer in self._lost or self._stopped:
                return
            self._lost[peer] = error
        who = self._infos[peer]
        # A peer that shut down deliberately is news, not trouble; one that crashed is.
        level = logging.INFO if isinstance(error, PeerShutDown) else logging.WARNING
        logger.log(level, "shmrpc: %s lost %s: %s", self.worker_info, who, error)
        for request_id, call in list(self._calls.items()):
            if call.peer == peer and self._take(request_id) is not None:
                self._fail(call, PeerLostError(f"{who} is gone ({error}); the call failed"))
        with self._gather_lock:
            gatherings = [g for g in self._gatherings.values() if who.name in g.names]
        for gathering in gatherings:
            gathering.done.set()  # wakes the waiter, which notices the loss

    # --------------------------------------------------------------------------- replies
    def _unpickle(
        self, peer: int, envelope: Envelope, table: bytes, message: Message, context: Any = None
    ) -> Any:
        """The message's payload, its tensors through the gate first."""
        received = self.serializer.unpack(table, message.buffers)
        if received.tensors or envelope.autograd_context != -1:
            self._gate.incoming(peer, envelope, received)
        return self.serializer.load(message.payload, received, context)

    def _decode_reply(self, peer: int, message: Message) -> tuple[bool, Any]:
        try:
            envelope, table = decode(message.header)
            value = self._unpickle(peer, envelope, table, message)
        except Exception as e:
            e.add_note("shmrpc: could not deserialize a reply")
            return False, e
        if envelope.kind == Kind.ERROR:
            return False, rebuild_exception(value)
        return True, value

    def _complete(self, call: _Call, peer: int, message: Message) -> None:
        ok, value = self._decode_reply(peer, message)
        assert call.future is not None
        _settled(call)
        if ok:
            call.future.set_result(value)
        else:
            call.future.set_exception(value)

    # ------------------------------------------------------------------------- requests in
    def _serve(self, peer: int, message: Message) -> None:
        envelope, table = decode(message.header)
        entry = self._handlers.get(envelope.kind)
        internal = entry is None or entry[1]
        if not internal:
            with self._stats_lock:
                self._requests_served += 1
                self._serving += 1
        inbound = Inbound(peer, envelope)
        try:
            if entry is None:
                raise RuntimeError(f"{self.worker_info} cannot serve message kind {envelope.kind}")
            payload = self._unpickle(peer, envelope, table, message, inbound)
        except BaseException as exc:
            self._finish(inbound, internal, error=exc)
            return
        if inbound.waits:
            gate = torch.futures.collect_all(inbound.waits)
            inbound.waits = []
            gate.add_done_callback(
                functools.partial(self._open_gate, entry[0], inbound, payload, internal)
            )
            return
        self._run(entry[0], inbound, payload, internal)

    def _open_gate(
        self,
        handler: Handler,
        inbound: Inbound,
        payload: Any,
        internal: bool,
        gate: torch.futures.Future[Any],
    ) -> None:
        """What the request waited for is done: run it, unless a wait failed (an RRef in its
        arguments that its owner never confirmed), which fails the request instead."""
        try:
            gate.value()
        except BaseException as exc:
            error = exc.with_traceback(None)  # the gate keeps it out of the GC's sight
            reply = functools.partial(self._finish, inbound, internal, error=error)
            self._dispatcher.submit(reply, request=True)
            return
        self._dispatcher.submit(self._run, handler, inbound, payload, internal, request=True)

    def _run(self, handler: Handler, inbound: Inbound, payload: Any, internal: bool) -> None:
        try:
            if torch_profiler._is_profiler_enabled and inbound.envelope.kind in _CALLEE_SPANS:
                handler = self._spanned(handler, inbound, payload)
            context_id = inbound.envelope.autograd_context
            if context_id == -1:
                result = handler(inbound, payload)
            else:
                with self._gate.serving(context_id):
                    result = handler(inbound, payload)
        except BaseException as exc:
            self._finish(inbound, internal, error=exc)
            return
        if isinstance(result, Later):
            if not internal:
                with self._stats_lock:
                    self._serving_async += 1
            result.future.add_done_callback(
                functools.partial(self._finish_later, inbound, internal)
            )
            return
        self._finish(inbound, internal, value=result)

    def _spanned(self, handler: Handler, inbound: Inbound, payload: Any) -> Handler:
        """``handler`` within the callee's profiler span (profiling.py); an
        ``@async_execution`` function's span lasts until its future completes."""
        name = callee_key(
            inbound.envelope.kind == Kind.REMOTE_CALL,
            payload[0],
            self._infos[inbound.peer].name,
            self.worker_info.name,
        )

        def run(inbound: Inbound, payload: Any) -> Any:
            span = Span(name)
            try:
                result = handler(inbound, payload)
            except BaseException:
                span.end()
                raise
            if isinstance(result, Later):
                result.future.add_done_callback(lambda _: span.end())
            else:
                span.end()
            return result

        return run

    def _finish_later(
        self, inbound: Inbound, internal: bool, future: torch.futures.Future[Any]
    ) -> None:
        if not internal:
            with self._stats_lock:
                self._serving_async -= 1
        try:
            value = future.value()
        except BaseException as exc:
            try:
                self._finish(inbound, internal, error=exc)
            finally:
                # The future keeps exc in C++, out of the GC's sight; a traceback through this
                # frame (which holds the future) would make a cycle that is never freed.
                exc.__traceback__ = None
        else:
            self._finish(inbound, internal, value=value)

    def _finish(
        self,
        inbound: Inbound,
        internal: bool,
        *,
        value: Any = None,
        error: BaseException | None = None,
    ) -> None:
        """Reply to ``inbound`` with ``value`` or ``error``.

        A value that cannot be sent (unpicklable, too large, on a device with no map back to
        the caller) is answered with that error instead: the caller never waits for a reply
        that is not coming.
        """
        if inbound.envelope.flags & _NO_REPLY:
            if error is not None:
                logger.warning("shmrpc: notification %s failed: %s", inbound.envelope.kind, error)
            return
        try:
            if error is None:
                error = self._reply(inbound, Kind.RESULT, value)
            if error is not None:
                failed = self._reply(inbound, Kind.ERROR, self._describe(error))
                if failed is not None:
                    logger.warning("shmrpc: could not send an error reply: %s", failed)
        finally:
            if not internal:
                with self._stats_lock:
                    self._serving -= 1

    def _describe(self, error: BaseException) -> tuple[str, str, str]:
        """What an error reply carries (errors.RemoteError)."""
        if isinstance(error, DescribedError):
            return error.description
        if isinstance(error, Exception):
            remote = describe_exception(error, self.worker_info)
            # torch prints remote errors on the callee; shmrpc logs them there
            logger.error("shmrpc: %s: a request failed: %s", self.worker_info.name, remote[2])
            return remote
        # SystemExit, KeyboardInterrupt in a UDF: report, keep the worker alive
        return ("builtins", "RuntimeError", f"{type(error).__name__}: {error}")

    def _reply(self, inbound: Inbound, kind: int, value: Any) -> Exception | None:
        """Send one reply; return the error that kept it from going (a lost caller is none)."""
        caller = self._infos[inbound.peer]
        try:
            pickled = self.serializer.dumps(value, self._devices.responses[caller.name])
        except Exception as exc:
            exc.add_note("shmrpc: could not serialize the return value")
            return exc
        context_id = inbound.envelope.autograd_context
        message_id = -1
        if context_id != -1:
            message_id = self._gate.outgoing(inbound.peer, context_id, pickled.tensors)
        flags = inbound.envelope.flags & _INTERNAL
        header = encode(
            kind, inbound.envelope.request_id, flags, pickled.table, context_id, message_id
        )
        try:
            self._transmit(inbound.peer, header, pickled, 0)
        except PeerLostError:
            pickled.cancel()
            logger.debug("shmrpc: caller %s is gone; reply dropped", caller)
        except Exception as exc:
            pickled.cancel()
            return exc
        return None

    def _serve_call(self, inbound: Inbound, payload: tuple[Any, Any, Any]) -> Any:
        func, args, kwargs = payload
        wrapped = getattr(func, "_wrapped_async_rpc_function", None)
        if wrapped is None:
            return func(*args, **kwargs)
        future = wrapped(*args, **kwargs)
        if not isinstance(future, torch._C.Future):
            raise RuntimeError(
                "Functions decorated with @rpc.async_function must return a "
                "torch.futures.Future object, but got "
                f"{type(future).__module__}.{type(future).__qualname__}"
            )
        return Later(future)

    # ------------------------------------------------------------------------- all-gather
    def all_gather(
        self,
        obj: Any,
        worker_names: Iterable[str] | None = None,
        rpc_timeout: float = 0,
        signal_timeout: float | None = None,
    ) -> dict[str, Any]:
        """Every worker's ``obj`` by name, through the worker with the smallest name."""
        names = frozenset(worker_names) if worker_names else frozenset(self._by_name)
        leader = min(names)
        me = self.worker_info.name
        with self._gather_lock:
            key = "".join(sorted(names))
            sequence = self._gather_sequence.get(key, 0)
            self._gather_sequence[key] = sequence + 1
            sequence_id = f"{key}{sequence}"
            gathering = self._gatherings.setdefault(sequence_id, _Gathering(names))
        try:
            if me == leader:
                self._arrive(sequence_id, me, obj, names)
            else:
                payload = (sequence_id, me, obj, sorted(names))
                self.request_sync(
                    self._by_name[leader], Kind.GATHER, payload, rpc_timeout, Flag.INTERNAL
                )
            self._await_gathering(gathering, signal_timeout, leader if me != leader else None)
            if me == leader:
                futures = {
                    name: self.request_async(
                        self._by_name[name],
                        Kind.BROADCAST,
                        (sequence_id, gathering.objects),
                        rpc_timeout,
                        Flag.INTERNAL,
                    )
                    for name in names - {leader}
                }
                errors = []
                for name, future in futures.items():
                    try:
                        future.wait()
                    except RuntimeError as e:
                        errors.append((name, e))
                if errors:
                    raise RuntimeError(
                        f"Followers {[n for n, _ in errors]} timed out in _all_gather after "
                        f"{rpc_timeout:.2f} seconds. The first exception is {errors[0][1]}"
                    )
            return gathering.objects
        finally:
            with self._gather_lock:
                self._gatherings.pop(sequence_id, None)

    def _await_gathering(
        self, gathering: _Gathering, timeout: float | None, leader: str | None
    ) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        # peer_lost wakes gatherings that exist when the loss is noticed; one that starts
        # later (a shutdown after a peer died) sees the loss here, within one slice.
        while not self._gathering_lost(gathering) and not gathering.done.wait(
            0.5 if deadline is None else min(0.5, max(0.0, deadline - time.monotonic()))
        ):
            if deadline is not None and time.monotonic() >= deadline:
                missing = sorted(gathering.names - set(gathering.objects))
                raise RuntimeError(
                    f"_all_gather timed out after {timeout:.2f} seconds waiting for {missing}"
                )
        lost = sorted(
            i.name for i in self._infos if i.id in self._lost and i.name in gathering.names
        )
        if lost and not (leader is None and gathering.names <= set(gathering.objects)):
            raise PeerLostError(f"_all_gather cannot complete: {lost} are gone")

    def _gathering_lost(self, gathering: _Gathering) -> bool:
        """Whether a worker that has not arrived in ``gathering`` is lost."""
        return any(
            i.id in self._lost and i.name not in gathering.objects
            for i in self._infos
            if i.name in gathering.names
        )

    def _arrive(self, sequence_id: str, name: str, obj: Any, names: frozenset[str]) -> None:
        with self._gather_lock:
            gathering = self._gatherings.setdefault(sequence_id, _Gathering(names))
            if name in gathering.objects:
                raise AssertionError(f"{name} reported intent sequence id {sequence_id} twice.")
            gathering.objects[name] = obj
            if gathering.names <= set(gathering.objects):
                gathering.done.set()

    def _serve_gather(self, inbound: Inbound, payload: tuple[str, str, Any, list[str]]) -> None:
        sequence_id, name, obj, names = payload
        self._arrive(sequence_id, name, obj, frozenset(names))

    def _serve_broadcast(self, inbound: Inbound, payload: tuple[str, dict[str, Any]]) -> None:
        sequence_id, objects = payload
        with self._gather_lock:
            gathering = self._gatherings.setdefault(sequence_id, _Gathering(frozenset(objects)))
            gathering.objects = objects
            gathering.done.set()

    # ------------------------------------------------------------------------ shutdown
    def work_counts(self) -> tuple[int, int, int]:
        """(user requests sent, user requests served, user work in progress here)."""
        outstanding = sum(not call.internal for call in list(self._calls.values()))
        with self._stats_lock:
            return self._requests_sent, self._requests_served, outstanding + self._serving

    def join(self, timeout: float | None) -> None:
        """Block until no worker has user work outstanding (the graceful-shutdown barrier).

        Counts, not time: workers exchange (sent, served, in progress) in rounds of
        all-gather until two consecutive rounds agree, nothing is in progress, and every
        request sent has been served, so no message can still be in flight.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        previous: tuple[int, int] | None = None
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise RuntimeError(f"shutdown timed out after {timeout:.2f} s waiting for work")
            reports = self.all_gather(
                self.work_counts(), rpc_timeout=remaining or 0, signal_timeout=remaining
            )
            sent = sum(r[0] for r in reports.values())
            served = sum(r[1] for r in reports.values())
            busy = sum(r[2] for r in reports.values())
            if busy == 0 and sent == served:
                if previous == (sent, served):
                    return
                previous = (sent, served)
            else:
                previous = None
                time.sleep(0.005)

    # ------------------------------------------------------------------------------ debug
    def get_debug_info(self) -> dict[str, str]:
        """The agent's state, every value a string (torch's shape).

        torch's keys (its TensorPipe agent's): ``agent.thread_pool_size``,
        ``agent.num_idle_threads``, ``agent.client_active_calls`` (requests sent here and not
        yet answered), ``agent.server_active_calls`` (user requests received and not yet
        answered), ``agent.server_active_async_calls`` (of those, waiting on an
        ``@async_execution`` future).

        shmrpc's, named so as not to clash with torch's:

        * ``agent.requests_sent``, ``agent.requests_served``: user requests since init;
        * ``agent.threads_running``, ``agent.work_queued``: work items running now (at most
          the thread pool size) and waiting for a thread; ``agent.listener_threads``,
          ``agent.listener_threads_busy``: threads polling the transports, and those of them
          running what they received;
        * per worker ``<name>`` (this one included: its calls to itself),
          ``agent.peer.<name>.transport`` (``shm``, ``tcp``, or ``self``),
          ``agent.peer.<name>.state`` (``up``, ``shut down``, or ``lost``),
          ``agent.peer.<name>.messages_sent``, ``.bytes_sent``, ``.messages_received``,
          ``.bytes_received`` (every message since init, engine messages included; bytes
          are header, payload and tensor data), and ``agent.peer.<name>.pending_calls``
          (requests to it not yet answered). Traffic counts may fall a little short under
          concurrent sends (they are counted without a lock).
        """
        with self._stats_lock:
            serving, serving_async = self._serving, self._serving_async
            sent, served = self._requests_sent, self._requests_served
        usage = self._dispatcher.usage()
        info = {
            "agent.thread_pool_size": str(self._dispatcher.thread_count),
            "agent.num_idle_threads": str(self._dispatcher.idle_threads()),
            "agent.client_active_calls": str(len(self._calls)),
            "agent.server_active_calls": str(serving),
            "agent.server_active_async_calls": str(serving_async),
            "agent.requests_sent": str(sent),
            "agent.requests_served": str(served),
            "agent.threads_running": str(usage["running"]),
            "agent.work_queued": str(usage["queued"]),
            "agent.listener_threads": str(usage["listeners"]),
            "agent.listener_threads_busy": str(usage["listeners_busy"]),
        }
        pending = [0] * len(self._infos)
        for call in list(self._calls.values()):
            pending[call.peer] += 1
        routes = self.route_names()
        for worker in self._infos:
            rank, prefix = worker.id, f"agent.peer.{worker.name}."
            lost = self._lost.get(rank)
            state = "up" if lost is None else "lost"
            if isinstance(lost, PeerShutDown):
                state = "shut down"
            info[prefix + "transport"] = routes.get(worker.name, "none")
            info[prefix + "state"] = state
            info[prefix + "messages_sent"] = str(self._sent_messages[rank])
            info[prefix + "bytes_sent"] = str(self._sent_bytes[rank])
            info[prefix + "messages_received"] = str(self._received_messages[rank])
            info[prefix + "bytes_received"] = str(self._received_bytes[rank])
            info[prefix + "pending_calls"] = str(pending[rank])
        return info
