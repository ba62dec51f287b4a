"""tcp: workers on any hosts, over one TCP connection per pair of workers.

* Listens on 127.0.0.1 unless ``listen_addr`` says otherwise; peers dial the advertised address.
* Before anything else, both ends of a new connection prove they know the world's key
  (auth.py). Nothing that arrives on a connection is handed to the engine, which unpickles it,
  before that; connections that fail are dropped.
* Frames as in framing.py, written with one ``sendmsg`` of scatter/gather buffers (tensor bytes
  are never concatenated or copied in user space), TCP_NODELAY on.
* Reading is non-blocking and resumable: ``poll`` takes whatever bytes the kernel holds and
  advances each connection's frame, so a large frame from one peer never stalls the others.
  Small messages are read many at a time into a scratch buffer (one ``recv`` per poll); large
  buffers are received straight into their final tensors.
* Two epoll sets: listeners block in one, spinners poll the other. While a thread spins, the
  sockets are muted in the listeners' set, so data it will read anyway wakes nobody.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
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
    PeerShutDown,
    Transport,
    TransportConfig,
    TransportError,
    TransportHost,
    allocate_buffer,
)

from .auth import (
    AuthenticationError,
    answer_challenge,
    deliver_challenge,
    recv_small,
    send_small,
)
from .framing import (
    PREFIX,
    Frame,
    assemble,
    bare_message,
    bare_prefix,
    check_frame,
    check_lengths,
    describe,
    for_the_wire,
    is_bare,
    small_message,
)

__all__ = ["TcpTransport"]

logger = logging.getLogger(__name__)

_IOV_MAX = 512
#: A sender with no deadline checks this often whether its peer is still there.
_SEND_SLICE = 1.0
_BYE = PREFIX.pack(2**64 - 1, 0, 0, 0)  # a frame header no real message has
_RANK = struct.Struct("<q")
#: Longest an unauthenticated connection may take to prove itself (each side, per attempt).
_HANDSHAKE_TIMEOUT = 5.0
#: Connections authenticated at once; a newer one pushes the oldest out.
_MAX_HANDSHAKES = 32
#: Most bytes one poll() reads from one connection before moving to the next.
_READ_SLICE = 8 << 20
#: Messages up to this size are read many at a time into a per-connection scratch buffer.
_SCRATCH = 64 << 10


#: A peer whose host died (no FIN, no RST) is found by keepalive probes: after this many seconds
#: of silence, then every ``_KEEPALIVE_INTERVAL`` s, lost after ``_KEEPALIVE_PROBES`` misses.
_KEEPALIVE_IDLE = 10
_KEEPALIVE_INTERVAL = 5
_KEEPALIVE_PROBES = 3
#: Data sent to a dead host and never acknowledged for this long ends the connection too.
_USER_TIMEOUT_MS = 30_000


def _detect_dead_hosts(sock: socket.socket) -> None:
    """Notice a crashed host in about 25 s, not the kernel's default two hours."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", _KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", _KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", _KEEPALIVE_PROBES),
        ("TCP_USER_TIMEOUT", _USER_TIMEOUT_MS),
    ):
        option = getattr(socket, name, None)  # Linux has them all; elsewhere, what exists
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


class _Partial:
    """A message too large for the scratch buffer, received into its own memory."""

    def __init__(self, frame: Frame) -> None:
        self.frame = frame
        self.meta = bytearray(frame.lengths_size + frame.header + frame.payload)
        self.lengths: tuple[int, ...] | None = None
        self.buffers: list[torch.Tensor] = []
        self.target = memoryview(self.meta)
        self.filled = 0

    def feed(self, data: memoryview) -> Message | None:
        """Take bytes that arrived in the scratch buffer; the message once it is complete."""
        while data:
            n = min(len(data), len(self.target) - self.filled)
            self.target[self.filled : self.filled + n] = data[:n]
            self.filled += n
            data = data[n:]
            if self.filled == len(self.target) and (message := self.advance()) is not None:
                return message
        return None

    def advance(self) -> Message | None:
        """The current target is full: aim at the next one; the message once it is done."""
        if self.lengths is None:  # buffer lengths, header and payload are in
            self.lengths = tuple(self.frame.buffer_lengths(self.meta))
            check_lengths(self.frame, self.lengths, "tcp: the peer")
        while len(self.buffers) < len(self.lengths):
            n = self.lengths[len(self.buffers)]
            buffer = allocate_buffer(n)
            self.buffers.append(buffer)
            if n:
                self.target, self.filled = memoryview(cast(Any, buffer.numpy())), 0
                return None
        at = self.frame.lengths_size
        view = memoryview(self.meta)
        header = view[at : at + self.frame.header]
        return assemble(self.frame, view, header, view[at + self.frame.header :], self.buffers)


class _Connection:
    def __init__(self, peer: int, sock: socket.socket) -> None:
        self.peer = peer
        self.sock = sock
        self.send_lock = threading.Lock()
        self.lost: PeerLostError | None = None
        # received bytes not yet consumed: scratch[start:end]
        self.scratch = bytearray(_SCRATCH)
        self.view = memoryview(self.scratch)
        self.start = self.end = 0
        self.partial: _Partial | None = None


class TcpTransport(Transport):
    name = "tcp"
    cheap_poll = True
    devices = frozenset({"cpu", "cuda"})  # CUDA buffers staged through host memory (cuda.py)

    def __init__(self, config: TransportConfig, host: TransportHost) -> None:
        super().__init__(config, host)
        options = config.options
        self._listen_addr = str(options.get("listen_addr") or "127.0.0.1")
        self._advertise = options.get("advertise_addr") or self._listen_addr
        self._max_message = options.get("max_message_size")
        self._connections: dict[int, _Connection] = {}
        self._by_fd: dict[int, _Connection] = {}
        self._changed = threading.Condition()
        self._epoll = select.epoll()  # listeners block here (sockets muted while spinning)
        self._spin_epoll = select.epoll()  # spinners poll here
        self._ready: list[_Connection] = []
        self._read_lock = threading.Lock()
        self._spinning = 0
        self._spin_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._handshakes: list[socket.socket] = []  # being authenticated now, oldest first
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
        """Connect and authenticate, retrying until ``deadline``: the listener may be busy with
        strangers' connections, or drop ours; only a wrong key ends the attempts early."""
        target = (str(address["host"]), int(address["port"]))
        while True:
            remaining = deadline - time.monotonic()
            try:
                sock = socket.create_connection(target, timeout=max(0.1, remaining))
            except OSError as e:
                if remaining <= 0:
                    raise TransportError(f"tcp: cannot reach rank {peer} at {target}: {e}") from e
                time.sleep(0.05)
                continue
            try:
                sock.settimeout(max(0.1, min(_HANDSHAKE_TIMEOUT, remaining)))
                answer_challenge(sock, self.config.auth_key)
                deliver_challenge(sock, self.config.auth_key)
                send_small(sock, _RANK.pack(self.config.rank))
                (rank,) = _RANK.unpack(recv_small(sock))
                if rank != peer:
                    raise TransportError(
                        f"tcp: dialed rank {peer} at {target} but rank {rank} answered"
                    )
            except (AuthenticationError, TransportError):
                sock.close()
                raise
            except OSError as e:  # reset, closed, or too slow: try again while time is left
                sock.close()
                if time.monotonic() >= deadline:
                    raise TransportError(f"tcp: handshake with rank {peer} failed: {e}") from e
                time.sleep(0.05)
                continue
            except BaseException:
                sock.close()
                raise
            self._add(peer, sock)
            return

    def _accept_loop(self) -> None:
        """Accept connections and authenticate each on a thread of its own, with a short
        deadline and at most ``_MAX_HANDSHAKES`` at once. When all are taken, the oldest is
        dropped: a real peer proves itself in about a millisecond, so a stranger would have to
        open that many connections within it to keep the peer out (and the peer retries).
        Nothing a stranger's connection does (stay silent, send garbage, come by the hundred)
        costs more than a bounded number of threads and sockets."""
        listener = self._listener
        assert listener is not None
        while True:
            try:
                sock, addr = listener.accept()
            except OSError:
                return  # closed
            with self._changed:
                if len(self._handshakes) >= _MAX_HANDSHAKES:
                    oldest = self._handshakes.pop(0)
                    with contextlib.suppress(OSError):
                        oldest.shutdown(socket.SHUT_RDWR)  # its thread fails and closes it
                self._handshakes.append(sock)
            threading.Thread(
                target=self._handshake,
                args=(sock, addr),
                name=f"shmrpc-tcp-handshake-{self.config.rank}",
                daemon=True,
            ).start()

    def _handshake(self, sock: socket.socket, addr: Any) -> None:
        try:
            sock.settimeout(min(_HANDSHAKE_TIMEOUT, self.config.connect_timeout))
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
        finally:
            with self._changed:
                if sock in self._handshakes:
                    self._handshakes.remove(sock)

    def _add(self, peer: int, sock: socket.socket) -> None:
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _detect_dead_hosts(sock)
        connection = _Connection(peer, sock)
        with self._changed:
            if peer in self._connections:
                sock.close()
                raise TransportError(f"tcp: rank {peer} connected twice")
            self._connections[peer] = connection
            self._by_fd[sock.fileno()] = connection
            self._epoll.register(sock.fileno(), select.EPOLLIN)
            self._spin_epoll.register(sock.fileno(), select.EPOLLIN)
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
        if message.buffers:
            message, codes = for_the_wire(message, ipc=False)  # CUDA buffers go staged
            head, total = describe(message, codes)
            views = [head, message.header, message.payload]
            views += [memoryview(cast(Any, b.numpy())) for b in message.buffers if b.numel()]
        else:  # bare: no buffers, so nothing on a device
            views = [bare_prefix(message.header, message.payload), message.header, message.payload]
            total = PREFIX.size + len(message.header) + len(message.payload)
        deadline = None if timeout is None else time.monotonic() + timeout
        lock = connection.send_lock
        while not lock.acquire(timeout=_SEND_SLICE if timeout is None else timeout):
            if deadline is not None:
                raise TimeoutError(f"tcp: the connection to rank {peer} stayed busy {timeout} s")
            if connection.lost is not None:
                raise connection.lost
        try:
            try:
                sent = connection.sock.sendmsg(views, [], socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            if sent < total:
                self._send_rest(connection, views, sent, deadline)
        except PeerLostError as lost:
            self._lose(connection, lost)
            raise
        except TimeoutError:  # nothing of it was sent: the connection is as it was
            raise
        except OSError as e:
            error = PeerLostError(f"tcp: sending to rank {peer} failed: {e}")
            self._lose(connection, error)
            raise error from e
        finally:
            lock.release()

    @staticmethod
    def _send_rest(
        connection: _Connection, views: list[Any], sent: int, deadline: float | None
    ) -> None:
        """Finish a partial send (large messages, full socket buffers), waiting for room.

        A peer that stops reading cannot hold the sender past ``deadline``: before the first
        byte that is a TimeoutError (nothing was sent); after it, the stream is out of step,
        and the peer is lost. Without a deadline it waits as long as the connection lives
        (keepalive and the user timeout end it if the peer's host dies).
        """
        sock, first = connection.sock, sent == 0
        pending = [memoryview(v).cast("B") for v in views]
        writable = select.poll()
        writable.register(sock, select.POLLOUT)
        while True:
            while pending and sent >= pending[0].nbytes:
                sent -= pending.pop(0).nbytes
            if not pending:
                return
            pending[0] = pending[0][sent:]
            while True:
                if connection.lost is not None:
                    raise connection.lost
                left = _SEND_SLICE if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    if first:
                        raise TimeoutError(f"tcp: rank {connection.peer} took no bytes in time")
                    raise PeerLostError(
                        f"tcp: rank {connection.peer} stopped reading in the middle of a message"
                    )
                if writable.poll(1000 * min(left, _SEND_SLICE)):
                    break
            try:
                sent = sock.sendmsg(pending[:_IOV_MAX], [], socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            first = first and sent == 0

    # --------------------------------------------------------------------------- receive
    def wait(self, timeout: float) -> None:
        ready = []
        for fd, _ in self._epoll.poll(timeout):
            if fd == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            elif (connection := self._by_fd.get(fd)) is not None:
                ready.append(connection)
        self._ready = ready

    def spin_begin(self) -> None:
        with self._spin_lock:
            self._spinning += 1
            if self._spinning == 1:
                self._mute(True)

    def spin_end(self) -> None:
        with self._spin_lock:
            self._spinning -= 1
            if self._spinning == 0:
                self._mute(False)

    def _mute(self, muted: bool) -> None:
        events = 0 if muted else select.EPOLLIN
        for fd, connection in list(self._by_fd.items()):
            if connection.lost is None:
                with contextlib.suppress(OSError):
                    self._epoll.modify(fd, events)

    def poll(self) -> int:
        # A thread woken by epoll that finds another thread reading returns 0 and waits
        # again. Unlike shm's doorbell (a semaphore, consumed by the wake-up), the listeners'
        # epoll set is level-triggered: a connection whose bytes the reader has not taken is
        # reported again by the next wait, so no wake-up is lost and poll needs no "look
        # again" flag (tests/test_shm_streaming.py checks this).
        if not self._read_lock.acquire(blocking=False):
            return 0
        try:
            ready, self._ready = self._ready, []
            if not ready:
                by_fd = self._by_fd
                ready = [by_fd[fd] for fd, _ in self._spin_epoll.poll(0) if fd in by_fd]
            delivered = 0
            for connection in ready:
                if connection.lost is None:
                    delivered += self._receive(connection)
            return delivered
        finally:
            self._read_lock.release()

    def _receive(self, connection: _Connection) -> int:
        """Read what the kernel has for ``connection``; deliver every message it completes."""
        delivered = 0
        budget = _READ_SLICE
        sock = connection.sock
        try:
            while budget > 0:
                partial = connection.partial
                if partial is not None:  # a large message: straight into its memory
                    n = sock.recv_into(partial.target[partial.filled :], 0, socket.MSG_DONTWAIT)
                    if not n:
                        raise EOFError
                    budget -= n
                    partial.filled += n
                    if partial.filled == len(partial.target):
                        message = partial.advance()
                        if message is not None:
                            connection.partial = None
                            delivered += 1
                            self.host.deliver(connection.peer, message)
                    continue
                if connection.start == connection.end:
                    connection.start = connection.end = 0
                elif connection.end == _SCRATCH:
                    self._compact(connection)
                room = _SCRATCH - connection.end
                n = sock.recv_into(connection.view[connection.end :], room, socket.MSG_DONTWAIT)
                if not n:
                    raise EOFError
                budget -= n
                connection.end += n
                delivered += self._parse(connection)
                if n < room:
                    break  # the kernel had no more
        except BlockingIOError:
            pass
        except EOFError:
            self._lose(connection, PeerLostError(f"tcp peer rank {connection.peer} exited"))
        except PeerLostError as e:
            self._lose(connection, e)
        except OSError as e:
            self._lose(connection, PeerLostError(f"tcp: rank {connection.peer}: {e}"))
        except MemoryError as e:  # a message this worker cannot hold: that channel ends
            error = PeerLostError(f"tcp: rank {connection.peer}: no memory for its message: {e}")
            self._lose(connection, error)
        return delivered

    def _parse(self, connection: _Connection) -> int:
        """Deliver the complete messages in the scratch buffer; start a partial if needed."""
        delivered = 0
        view = connection.view
        while connection.end - connection.start >= PREFIX.size:
            start = connection.start
            if view[start : start + PREFIX.size] == _BYE:
                raise PeerShutDown(f"tcp peer rank {connection.peer} shut down")
            prefix = PREFIX.unpack_from(view, start)
            available = connection.end - start
            body = prefix[0]
            if PREFIX.size + body <= available and is_bare(prefix, self._max_message):
                at = start + PREFIX.size
                message = bare_message(bytes(view[at : at + body]), prefix[1])
                connection.start = at + body
                delivered += 1
                self.host.deliver(connection.peer, message)
                continue
            frame = Frame(prefix)
            check_frame(frame, self._max_message, f"tcp: rank {connection.peer}")
            if frame.total <= available:
                meta_at = start + PREFIX.size
                meta = bytes(
                    view[meta_at : meta_at + frame.lengths_size + frame.header + frame.payload]
                )
                position = meta_at + len(meta)

                def copy_buffer(n: int, out: memoryview) -> None:
                    nonlocal position
                    out[:] = view[position : position + n]
                    position += n

                message = small_message(frame, meta, copy_buffer)
                connection.start = start + frame.total
                delivered += 1
                self.host.deliver(connection.peer, message)
            elif frame.total <= _SCRATCH:
                if start + frame.total > _SCRATCH:
                    self._compact(connection)  # make room for the rest behind it
                break
            else:
                partial = _Partial(frame)
                connection.partial = partial
                connection.start = connection.end
                done = partial.feed(view[start + PREFIX.size : connection.end])
                assert done is None, "larger than the scratch buffer: cannot be complete yet"
                break
        return delivered

    @staticmethod
    def _compact(connection: _Connection) -> None:
        pending = connection.end - connection.start
        connection.view[:pending] = connection.view[connection.start : connection.end]
        connection.start, connection.end = 0, pending

    def _lose(self, connection: _Connection, error: PeerLostError) -> None:
        if connection.lost is not None:
            return
        connection.lost = error
        fd = connection.sock.fileno()
        for epoll in (self._epoll, self._spin_epoll):
            with contextlib.suppress(OSError, ValueError):
                epoll.unregister(fd)
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
        with self._changed:
            pending = list(self._handshakes)
        for sock in pending:  # their threads fail at once and close them
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for connection in list(self._connections.values()):
            if connection.lost is None and connection.send_lock.acquire(timeout=1):
                with contextlib.suppress(OSError):
                    connection.sock.sendall(_BYE)
                connection.send_lock.release()
            with contextlib.suppress(OSError):
                connection.sock.close()
        with self._read_lock:
            self._epoll.close()
            self._spin_epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
