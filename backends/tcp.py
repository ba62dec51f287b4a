"""tcp: workers on any hosts, over one TCP connection per pair of workers.

* Listens on 127.0.0.1 unless ``listen_addr`` says otherwise; peers dial the advertised address.
* Before anything else, both ends of a new connection prove they know the world's key
  (auth.py). Nothing that arrives on a connection is handed to the engine, which unpickles it,
  before that; connections that fail are dropped.
* Frames as in framing.py, written with one ``sendmsg`` of scatter/gather buffers (tensor bytes
  are never concatenated or copied in user space), TCP_NODELAY on.
* Reading is non-blocking and resumable: ``poll`` takes whatever bytes the kernel holds and
  advances each connection's frame, so a large frame from one peer never stalls the others.
  Buffers are received straight into their final tensors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Mapping
from typing import Any, cast

import torch

from shmrpc.transport import (
    Message,
    PeerLostError,
    Transport,
    TransportConfig,
    TransportError,
    TransportHost,
    allocate_buffer,
)

from .auth import answer_challenge, deliver_challenge, recv_small, send_small
from .framing import PREFIX, Frame, describe

__all__ = ["TcpTransport"]

logger = logging.getLogger(__name__)

_IOV_MAX = 512
_BYE = PREFIX.pack(2**64 - 1, 0, 0, 0)  # a frame header no real message has
_RANK = struct.Struct("<q")
#: Most bytes one poll() reads from one connection before moving to the next.
_READ_SLICE = 8 << 20


class _Incoming:
    """A frame being received: where the next bytes go."""

    def __init__(self) -> None:
        self.prefix = bytearray(PREFIX.size)
        self.frame: Frame | None = None
        self.meta: bytearray | None = None
        self.lengths: tuple[int, ...] | None = None
        self.buffers: list[torch.Tensor] = []
        self.target: memoryview = memoryview(self.prefix)
        self.filled = 0


class _Connection:
    def __init__(self, peer: int, sock: socket.socket) -> None:
        self.peer = peer
        self.sock = sock
        self.send_lock = threading.Lock()
        self.incoming = _Incoming()
        self.lost: PeerLostError | None = None


class TcpTransport(Transport):
    name = "tcp"
    cheap_poll = False

    def __init__(self, config: TransportConfig, host: TransportHost) -> None:
        super().__init__(config, host)
        options = config.options
        self._listen_addr = str(options.get("listen_addr") or "127.0.0.1")
        self._advertise = options.get("advertise_addr") or self._listen_addr
        self._max_message = options.get("max_message_size")
        self._connections: dict[int, _Connection] = {}
        self._changed = threading.Condition()
        self._selector = selectors.DefaultSelector()
        self._ready: list[_Connection] = []
        self._read_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._closed = False

    # ----------------------------------------------------------------------- setting up
    def listen(self) -> dict[str, Any]:
        family = socket.AF_INET6 if ":" in self._listen_addr else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self._listen_addr, int(self.config.options.get("listen_port") or 0)))
        listener.listen(max(8, self.config.world_size))
        self._listener = listener
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"shmrpc-tcp-accept-{self.config.rank}", daemon=True
        )
        self._acceptor.start()
        return {"host": self._advertise, "port": listener.getsockname()[1]}

    @staticmethod
    def reaches(local: Mapping[str, Any], remote: Mapping[str, Any]) -> bool:
        return True

    def connect(self, peers: Mapping[int, Mapping[str, Any]]) -> None:
        deadline = time.monotonic() + self.config.connect_timeout
        for peer, address in sorted(peers.items()):
            if peer > self.config.rank:  # the lower rank dials; the higher one answers
                self._dial(peer, address, deadline)
        expected = set(peers)
        with self._changed:
            while not expected <= set(self._connections):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    missing = sorted(expected - set(self._connections))
                    raise TransportError(f"tcp: ranks {missing} did not connect in time")
                self._changed.wait(remaining)
        self._stop_listening()  # the world is complete: accept nobody else

    def _dial(self, peer: int, address: Mapping[str, Any], deadline: float) -> None:
        target = (str(address["host"]), int(address["port"]))
        while True:
            try:
                sock = socket.create_connection(
                    target, timeout=max(0.1, deadline - time.monotonic())
                )
                break
            except OSError as e:
                if time.monotonic() >= deadline:
                    raise TransportError(f"tcp: cannot reach rank {peer} at {target}: {e}") from e
                time.sleep(0.05)
        try:
            answer_challenge(sock, self.config.auth_key)
            deliver_challenge(sock, self.config.auth_key)
            send_small(sock, _RANK.pack(self.config.rank))
            (rank,) = _RANK.unpack(recv_small(sock))
            if rank != peer:
                raise TransportError(
                    f"tcp: dialed rank {peer} at {target} but rank {rank} answered"
                )
        except BaseException:
            sock.close()
            raise
        self._add(peer, sock)

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while True:
            try:
                sock, addr = listener.accept()
            except OSError:
                return  # closed
            try:
                sock.settimeout(self.config.connect_timeout)
                deliver_challenge(sock, self.config.auth_key)
                answer_challenge(sock, self.config.auth_key)
                (peer,) = _RANK.unpack(recv_small(sock))
                if not 0 <= peer < self.config.world_size or peer == self.config.rank:
                    raise TransportError(f"tcp: connection claims bad rank {peer}")
                send_small(sock, _RANK.pack(self.config.rank))
                self._add(peer, sock)
            except Exception as e:
                sock.close()
                if not self._closed:
                    logger.warning("tcp: refused a connection from %s: %s", addr, e)

    def _add(self, peer: int, sock: socket.socket) -> None:
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        connection = _Connection(peer, sock)
        with self._changed:
            if peer in self._connections:
                sock.close()
                raise TransportError(f"tcp: rank {peer} connected twice")
            self._connections[peer] = connection
            self._selector.register(sock, selectors.EVENT_READ, connection)
            self._changed.notify_all()

    def _stop_listening(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)

    # ------------------------------------------------------------------------------ send
    def send(self, peer: int, message: Message, timeout: float | None = None) -> None:
        connection = self._connections.get(peer)
        if connection is None:
            raise PeerLostError(f"tcp: no connection to rank {peer}")
        if connection.lost is not None:
            raise connection.lost
        head, _ = describe(message)
        views = [memoryview(head), memoryview(message.header), memoryview(message.payload)]
        views += [memoryview(cast(Any, b.numpy())) for b in message.buffers if b.numel()]
        if not connection.send_lock.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError(f"tcp: the connection to rank {peer} stayed busy for {timeout} s")
        try:
            self._send_all(connection.sock, views)
        except OSError as e:
            error = PeerLostError(f"tcp: sending to rank {peer} failed: {e}")
            self._lose(connection, error)
            raise error from e
        finally:
            connection.send_lock.release()

    @staticmethod
    def _send_all(sock: socket.socket, views: list[memoryview]) -> None:
        pending = [v.cast("B") for v in views if v.nbytes]
        while pending:
            sent = sock.sendmsg(pending[:_IOV_MAX])
            while sent:
                first = pending[0]
                if sent >= first.nbytes:
                    sent -= first.nbytes
                    pending.pop(0)
                else:
                    pending[0] = first[sent:]
                    sent = 0

    # --------------------------------------------------------------------------- receive
    def wait(self, timeout: float) -> None:
        ready = []
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            else:
                ready.append(key.data)
        self._ready = ready

    def poll(self) -> int:
        if not self._read_lock.acquire(blocking=False):
            return 0
        try:
            ready, self._ready = self._ready, []
            if not ready:
                ready = [k.data for k, _ in self._selector.select(0) if k.data is not None]
            delivered = 0
            for connection in ready:
                if connection.lost is None:
                    delivered += self._receive(connection)
            return delivered
        finally:
            self._read_lock.release()

    def _receive(self, connection: _Connection) -> int:
        """Read what the kernel has for ``connection``; deliver every frame it completes."""
        delivered = 0
        budget = _READ_SLICE
        while budget > 0:
            incoming = connection.incoming  # _advance replaces it when a frame completes
            target = incoming.target
            try:
                n = connection.sock.recv_into(target[incoming.filled :], 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as e:
                self._lose(connection, PeerLostError(f"tcp: rank {connection.peer}: {e}"))
                break
            if n == 0:
                self._lose(connection, PeerLostError(f"tcp peer rank {connection.peer} exited"))
                break
            budget -= n
            incoming.filled += n
            if incoming.filled < len(target):
                continue
            try:
                message = self._advance(connection)
            except PeerLostError as e:
                self._lose(connection, e)
                break
            if message is not None:
                delivered += 1
                self.host.deliver(connection.peer, message)
        return delivered

    def _advance(self, connection: _Connection) -> Message | None:
        """The current part is complete: aim at the next one; return a finished message."""
        incoming = connection.incoming
        if incoming.frame is None:  # the prefix is in
            if bytes(incoming.prefix) == _BYE:
                raise PeerLostError(f"tcp peer rank {connection.peer} shut down")
            frame = incoming.frame = Frame(incoming.prefix)
            if self._max_message is not None and frame.total > self._max_message + 4096:
                raise PeerLostError(
                    f"tcp: rank {connection.peer} sent a {frame.total}-byte message, over the limit"
                )
            incoming.meta = bytearray(frame.lengths_size + frame.header + frame.payload)
            incoming.target, incoming.filled = memoryview(incoming.meta), 0
            return None
        assert incoming.meta is not None
        if incoming.lengths is None:  # the buffer lengths, header and payload are in
            incoming.lengths = tuple(incoming.frame.buffer_lengths(incoming.meta))
        while len(incoming.buffers) < len(incoming.lengths):
            n = incoming.lengths[len(incoming.buffers)]
            buffer = allocate_buffer(n)
            incoming.buffers.append(buffer)
            if n:
                incoming.target, incoming.filled = memoryview(cast(Any, buffer.numpy())), 0
                return None
        frame = incoming.frame
        at = frame.lengths_size
        view = memoryview(incoming.meta)
        message = Message(
            bytes(view[at : at + frame.header]), view[at + frame.header :], incoming.buffers
        )
        connection.incoming = _Incoming()
        return message

    def _lose(self, connection: _Connection, error: PeerLostError) -> None:
        if connection.lost is not None:
            return
        connection.lost = error
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(connection.sock)
        if not self._closed:
            self.host.peer_lost(connection.peer, error)

    def interrupt(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # ---------------------------------------------------------------------------- close
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_listening()
        for connection in list(self._connections.values()):
            if connection.lost is None and connection.send_lock.acquire(timeout=1):
                with contextlib.suppress(OSError):
                    connection.sock.sendall(_BYE)
                connection.send_lock.release()
            with contextlib.suppress(OSError):
                connection.sock.close()
        with self._read_lock:
            self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
