"""shm: workers on one host talk through rings in shared memory.

* Per ordered pair of workers one :class:`Ring` in a posix_ipc shared-memory segment, created
  by its reader. A message that does not fit streams through the ring in chunks while the
  reader copies it out, so the ring bounds memory, never message size.
* Per process one posix_ipc semaphore, its doorbell: a writer posts the reader's doorbell after
  publishing (47 ns when nobody sleeps on it). The engine polls the rings briefly before it
  blocks on the doorbell, since a blocking wake-up costs tens of microseconds here.
* Per pair one abstract Unix socket: it carries the handshake (names of rings and doorbells,
  checked against the world token and the peer's credentials) and then nothing; it becomes
  readable when the peer exits, which is how a dead peer is noticed at once.

Names look like ``/shmrpc.<world token>.<creator pid>.<rank>.<what>``, are created exclusively with
mode 0600 and are unlinked as soon as the peer has opened them, milliseconds after creation:
a running world leaves nothing in /dev/shm. Names a crash leaves behind (only possible during
that window) are removed by the next world's sweep, which unlinks names whose creator is dead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import platform
import selectors
import socket
import struct
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import posix_ipc

from shmrpc.transport import (
    Message,
    PeerLostError,
    Transport,
    TransportConfig,
    TransportError,
    TransportHost,
    allocate_buffer,
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
from .ring import CONTROL_BYTES, Ring

__all__ = ["ShmTransport", "sweep_dead_names"]

logger = logging.getLogger(__name__)

_NAME_PREFIX = "shmrpc."
#: Messages up to this size are copied out of the ring in one piece.
_WHOLE = 256 << 10
#: Largest copy into or out of the ring at once while streaming; the two sides overlap.
_CHUNK = 1 << 20
#: Most messages one poll() takes before it returns (lets the engine hand work out).
_BATCH = 32
#: Pure-Python ring polling is only ordered correctly on TSO machines (see ring.py).
_X86 = platform.machine().lower() in {"x86_64", "amd64", "i386", "i686"}
_CRED = struct.Struct("3i")


_fence_lock = threading.Lock()


def _full_fence() -> None:
    """A full memory barrier: lock acquire/release are lock-prefixed instructions on x86."""
    _fence_lock.acquire()
    _fence_lock.release()


def _host_domain(override: str | None) -> str:
    """Two workers may use shm iff their domains are equal: same kernel, namespaces, user."""
    if override:
        return f"host:{override}"
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        namespaces = [os.stat(f"/proc/self/ns/{ns}").st_ino for ns in ("net", "ipc", "mnt")]
    except OSError:
        boot, namespaces = socket.gethostname(), []
    return ":".join([boot, *map(str, namespaces), str(os.getuid())])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_dead_names() -> list[str]:
    """Unlink shmrpc segments and semaphores whose creating process is gone; return them."""
    try:
        entries = os.listdir("/dev/shm")
    except OSError:
        return []
    removed = []
    for entry in entries:
        semaphore = entry.startswith("sem." + _NAME_PREFIX)
        if not (semaphore or entry.startswith(_NAME_PREFIX)):
            continue
        name = "/" + (entry[4:] if semaphore else entry)
        fields = name[1:].split(".")
        if len(fields) < 4 or not fields[2].isdigit() or _alive(int(fields[2])):
            continue
        unlink = posix_ipc.unlink_semaphore if semaphore else posix_ipc.unlink_shared_memory
        with contextlib.suppress(posix_ipc.ExistentialError, posix_ipc.PermissionsError):
            unlink(name)
            removed.append(name)
    return removed


# ------------------------------------------------------------------------------ handshake


def _send_json(sock: socket.socket, obj: dict[str, Any]) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(struct.pack("<I", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise PeerLostError("peer closed the shm handshake socket")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv_json(sock: socket.socket) -> dict[str, Any]:
    (n,) = struct.unpack("<I", _recv_exact(sock, 4))
    if n > 1 << 16:
        raise TransportError(f"shm handshake message too large ({n} bytes)")
    obj = json.loads(_recv_exact(sock, n))
    if not isinstance(obj, dict):
        raise TransportError("malformed shm handshake message")
    return obj


class _Channel:
    """Both directions with one peer."""

    def __init__(
        self,
        peer: int,
        outbox: Ring,
        inbox: Ring,
        bell: posix_ipc.Semaphore,
        sock: socket.socket,
        segments: list[mmap.mmap],
    ) -> None:
        self.peer = peer
        self.outbox = outbox
        self.inbox = inbox
        self.bell = bell
        self.sock = sock
        self.segments = segments
        self.send_lock = threading.Lock()
        self.lost: PeerLostError | None = None

    def ring_bell(self) -> None:
        """Wake the reader, unless one of its threads is polling this ring right now.

        "Publish head, then read the polling flag" against the reader's "clear the flag, then
        poll once more" is Dekker's pattern: it needs a full fence on both sides, or a message
        could slip between them unseen. Only TSO (x86) machines skip the wake-up at all.
        """
        if _X86:
            _full_fence()
            if self.outbox.reader_polling():
                return
        try:  # noqa: SIM105 - contextlib.suppress allocates, and this runs per message
            self.bell.release()
        except ValueError:  # SEM_VALUE_MAX: the reader is awake anyway
            pass


class ShmTransport(Transport):
    name = "shm"
    cheap_poll = _X86
    devices = frozenset({"cpu", "cuda"})  # CUDA buffers by IPC handle (cuda.py)

    def __init__(self, config: TransportConfig, host: TransportHost) -> None:
        super().__init__(config, host)
        self._ring_size = int(config.options.get("ring_size") or 4 << 20)
        self._max_message = config.options.get("max_message_size")
        self._domain = _host_domain(config.options.get("host_id"))
        self._prefix = f"/{_NAME_PREFIX}{config.world_token}.{os.getpid()}.{config.rank}."
        self._names: set[str] = set()  # created here and not yet unlinked
        self._channels: dict[int, _Channel] = {}
        self._polled: list[_Channel] = []
        self._read_lock = threading.Lock()
        self._changed = threading.Condition()
        self._bell: posix_ipc.Semaphore | None = None
        self._bell_name = ""
        self._listener: socket.socket | None = None
        self._selector = selectors.DefaultSelector()
        self._to_watch: list[_Channel] = []
        self._wake_r, self._wake_w = os.pipe()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._spinning = 0
        self._spin_lock = threading.Lock()

    # ----------------------------------------------------------------------- setting up
    def listen(self) -> dict[str, Any]:
        sweep_dead_names()
        self._bell_name = self._new_name("bell")
        self._bell = posix_ipc.Semaphore(
            self._bell_name, posix_ipc.O_CREX, mode=0o600, initial_value=0
        )
        address = f"shmrpc.{self.config.world_token}.{self.config.rank}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind("\0" + address)  # abstract: no file to clean up
        listener.listen(max(8, self.config.world_size))
        self._listener = listener
        for target, role in ((self._accept_loop, "accept"), (self._monitor_loop, "monitor")):
            thread = threading.Thread(
                target=target, name=f"shmrpc-shm-{role}-{self.config.rank}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return {"domain": self._domain, "socket": address, "pid": os.getpid()}

    @staticmethod
    def reaches(local: Mapping[str, Any], remote: Mapping[str, Any]) -> bool:
        return bool(local.get("domain")) and local.get("domain") == remote.get("domain")

    def connect(self, peers: Mapping[int, Mapping[str, Any]]) -> None:
        deadline = time.monotonic() + self.config.connect_timeout
        for peer, address in sorted(peers.items()):
            if peer > self.config.rank:  # the lower rank dials; the higher one answers
                self._dial(peer, address, deadline)
        expected = set(peers)
        with self._changed:
            while not expected <= set(self._channels):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    missing = sorted(expected - set(self._channels))
                    raise TransportError(f"shm: ranks {missing} did not connect in time")
                self._changed.wait(remaining)
        # Every peer has opened our doorbell by now: drop its name.
        self._unlink(self._bell_name)

    def _new_name(self, what: str) -> str:
        name = self._prefix + what
        self._names.add(name)
        return name

    def _unlink(self, name: str) -> None:
        if name in self._names:
            self._names.discard(name)
            with contextlib.suppress(posix_ipc.ExistentialError):
                if name.endswith(".bell"):
                    posix_ipc.unlink_semaphore(name)
                else:
                    posix_ipc.unlink_shared_memory(name)

    def _create_inbox(self, peer: int) -> tuple[str, mmap.mmap, Ring]:
        name = self._new_name(f"{peer}to{self.config.rank}")
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=0)
        try:
            size = CONTROL_BYTES + self._ring_size
            os.posix_fallocate(shm.fd, 0, size)  # ENOSPC now rather than SIGBUS later
            segment = mmap.mmap(shm.fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        finally:
            shm.close_fd()
        return name, segment, Ring(segment, self._ring_size, create=True)

    def _open_outbox(self, name: str) -> tuple[mmap.mmap, Ring]:
        if not name.startswith(f"/{_NAME_PREFIX}{self.config.world_token}."):
            raise TransportError(f"shm: peer offered a ring outside this world: {name!r}")
        shm = posix_ipc.SharedMemory(name)
        try:
            segment = mmap.mmap(shm.fd, shm.size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        finally:
            shm.close_fd()
        return segment, Ring(segment, self._ring_size, create=False)

    def _check_peer(self, sock: socket.socket, pid: int) -> None:
        peer_pid, uid, _ = _CRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
        )
        if uid != os.getuid() or peer_pid != pid:
            raise TransportError(f"shm: peer credentials (pid {peer_pid}, uid {uid}) do not match")

    def _dial(self, peer: int, address: Mapping[str, Any], deadline: float) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        segments: list[mmap.mmap] = []
        try:
            sock.connect("\0" + str(address["socket"]))
            self._check_peer(sock, int(address["pid"]))
            inbox_name, inbox_segment, inbox = self._create_inbox(peer)
            segments.append(inbox_segment)
            _send_json(sock, self._hello(inbox_name))
            welcome = _recv_json(sock)
            self._check_hello(welcome, peer)
            outbox_segment, outbox = self._open_outbox(str(welcome["inbox"]))
            segments.append(outbox_segment)
            bell = posix_ipc.Semaphore(str(welcome["bell"]))
            self._unlink(inbox_name)  # the peer mapped it before it answered
            _send_json(sock, {"ready": True})
        except BaseException:
            sock.close()
            raise
        self._add(_Channel(peer, outbox, inbox, bell, sock, segments))

    def _answer(self, sock: socket.socket) -> None:
        sock.settimeout(self.config.connect_timeout)
        hello = _recv_json(sock)
        peer = int(hello.get("rank", -1))
        self._check_hello(hello, peer)
        self._check_peer(sock, int(hello["pid"]))
        outbox_segment, outbox = self._open_outbox(str(hello["inbox"]))
        bell = posix_ipc.Semaphore(str(hello["bell"]))
        inbox_name, inbox_segment, inbox = self._create_inbox(peer)
        _send_json(sock, self._hello(inbox_name))
        _recv_json(sock)  # ready: the peer mapped our inbox
        self._unlink(inbox_name)
        self._add(_Channel(peer, outbox, inbox, bell, sock, [outbox_segment, inbox_segment]))

    def _hello(self, inbox: str) -> dict[str, Any]:
        return {
            "token": self.config.world_token,
            "rank": self.config.rank,
            "pid": os.getpid(),
            "inbox": inbox,
            "bell": self._bell_name,
        }

    def _check_hello(self, hello: Mapping[str, Any], peer: int) -> None:
        if hello.get("token") != self.config.world_token:
            raise TransportError("shm: handshake from another world")
        if hello.get("rank") != peer or not 0 <= peer < self.config.world_size:
            raise TransportError(f"shm: unexpected peer rank {hello.get('rank')!r}")

    def _add(self, channel: _Channel) -> None:
        channel.sock.settimeout(None)
        with self._changed:
            if channel.peer in self._channels:
                raise TransportError(f"shm: rank {channel.peer} connected twice")
            self._channels[channel.peer] = channel
            self._polled = list(self._channels.values())
            self._to_watch.append(channel)
            self._changed.notify_all()
        os.write(self._wake_w, b"w")

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._closed:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # closed
            try:
                self._answer(sock)
            except Exception as e:
                sock.close()
                if not self._closed:
                    logger.warning("shm: refused a connection: %s", e)

    # --------------------------------------------------------------------------- liveness
    def _monitor_loop(self) -> None:
        selector = self._selector
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        while not self._closed:
            for key, _ in selector.select(timeout=1.0):
                if key.data is None:
                    os.read(self._wake_r, 4096)
                    with self._changed:
                        new, self._to_watch = self._to_watch, []
                    for channel in new:
                        selector.register(channel.sock, selectors.EVENT_READ, channel)
                    continue
                channel = key.data
                try:
                    data = channel.sock.recv(16)
                except OSError:
                    data = b""
                selector.unregister(channel.sock)
                how = "shut down" if data.startswith(b"B") else "exited"
                self._lose(channel, PeerLostError(f"shm peer rank {channel.peer} {how}"))

    def _lose(self, channel: _Channel, error: PeerLostError) -> None:
        if channel.lost is not None or self._closed:
            return
        channel.lost = error
        self.host.peer_lost(channel.peer, error)

    # ------------------------------------------------------------------------------ send
    def send(self, peer: int, message: Message, timeout: float | None = None) -> None:
        channel = self._channels.get(peer)
        if channel is None:
            raise PeerLostError(f"shm: no channel to rank {peer}")
        if channel.lost is not None:
            raise channel.lost
        lock = channel.send_lock
        if not message.buffers and len(message.payload) <= _WHOLE:
            # Bare (no buffers, so nothing on a device) and small: written in one piece.
            frame = bare_prefix(message.header, message.payload)
            frame += message.header
            frame += message.payload
            if not (lock.acquire() if timeout is None else lock.acquire(timeout=timeout)):
                raise TimeoutError(f"shm: the channel to rank {peer} stayed busy for {timeout} s")
            try:
                ring = channel.outbox
                if len(frame) <= ring.writable():
                    ring.put(0, frame)
                    ring.commit(len(frame))
                else:
                    self._stream(channel, frame[: PREFIX.size], message, timeout)
            finally:
                lock.release()
            channel.ring_bell()
            return
        message, codes = for_the_wire(message, ipc=True)  # CUDA buffers go by IPC handle
        head, total = describe(message, codes)
        if not (lock.acquire() if timeout is None else lock.acquire(timeout=timeout)):
            raise TimeoutError(f"shm: the channel to rank {peer} stayed busy for {timeout} s")
        try:
            ring = channel.outbox
            if total <= ring.writable():
                self._put_whole(ring, head, message, total)
            else:
                self._stream(channel, head, message, timeout)
        finally:
            lock.release()
        channel.ring_bell()

    @staticmethod
    def _put_whole(ring: Ring, head: bytes, message: Message, total: int) -> None:
        if len(message.payload) <= _WHOLE:
            first = head + message.header + message.payload
            ring.put(0, first)
            offset = len(first)
        else:
            ring.put(0, head + message.header)
            offset = len(head) + len(message.header)
            ring.put(offset, message.payload)
            offset += len(message.payload)
        for buffer in message.buffers:
            data = buffer.numpy()
            ring.put(offset, data)
            offset += len(data)
        ring.commit(total)

    def _stream(self, channel: _Channel, head: bytes, message: Message, timeout: float | None):
        ring = channel.outbox
        parts: list[Any] = [head + message.header, message.payload]
        parts += [b.numpy() for b in message.buffers]
        deadline = None if timeout is None else time.monotonic() + timeout
        started = False
        for part in parts:
            data = part if isinstance(part, np.ndarray) else np.frombuffer(part, dtype=np.uint8)
            done, n, idle = 0, len(data), 0
            while done < n:
                room = ring.writable()
                if room < min(n - done, ring.capacity // 4, _CHUNK // 4):
                    # A half-written message cannot be taken back: the deadline only applies
                    # until the first byte is in; after that only the peer's death stops us.
                    if not started and deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"shm: rank {channel.peer} did not make room in time")
                    self._pause(channel, idle)
                    idle += 1
                    continue
                k = min(room, n - done, _CHUNK)
                ring.put(0, data[done : done + k])
                ring.commit(k)
                channel.ring_bell()
                started, done, idle = True, done + k, 0

    def _pause(self, channel: _Channel, idle: int) -> None:
        """Wait a little for the other side of a stream; give up if it is gone."""
        if channel.lost is not None:
            raise channel.lost
        if self._closed:
            raise PeerLostError("shm transport closed")
        time.sleep(0 if idle < 100 else 0.0001)

    # --------------------------------------------------------------------------- receive
    def poll(self) -> int:
        if not self._read_lock.acquire(blocking=False):
            return 0  # another thread is reading; it delivers what is there
        delivered = 0
        try:
            progress = True
            while progress and delivered < _BATCH:
                progress = False
                for channel in self._polled:
                    if channel.inbox.readable() < PREFIX.size or channel.lost is not None:
                        continue
                    try:
                        message = self._read(channel)
                    except PeerLostError as e:
                        self._lose(channel, e)
                        continue
                    except MemoryError as e:  # the ring is out of step now: that channel ends
                        self._lose(channel, PeerLostError(f"shm: rank {channel.peer}: {e}"))
                        continue
                    delivered += 1
                    progress = True
                    self.host.deliver(channel.peer, message)
        finally:
            self._read_lock.release()
        return delivered

    def _read(self, channel: _Channel) -> Message:
        ring = channel.inbox
        prefix = ring.unpack(PREFIX)
        total = PREFIX.size + prefix[0]
        if total <= _WHOLE and ring.readable() >= total and is_bare(prefix, self._max_message):
            message = bare_message(ring.get(PREFIX.size, prefix[0]), prefix[1])
            ring.release(total)
            return message
        frame = Frame(prefix)
        check_frame(frame, self._max_message, f"shm: rank {channel.peer}")
        if frame.total <= _WHOLE and ring.readable() >= frame.total:
            return self._read_whole(ring, frame)
        ring.release(PREFIX.size)
        meta = np.empty(frame.lengths_size + frame.header + frame.payload, dtype=np.uint8)
        self._stream_into(channel, meta)
        raw = memoryview(meta)  # type: ignore[arg-type]
        lengths = frame.buffer_lengths(raw)
        check_lengths(frame, lengths, f"shm: rank {channel.peer}")
        at = frame.lengths_size
        header = bytes(raw[at : at + frame.header])
        payload = bytes(raw[at + frame.header :])
        buffers = []
        for n in lengths:
            buffer = allocate_buffer(n)
            self._stream_into(channel, buffer.numpy())
            buffers.append(buffer)
        return assemble(frame, raw, header, payload, buffers)

    @staticmethod
    def _read_whole(ring: Ring, frame: Frame) -> Message:
        """A small message that has fully arrived: copy it out and release it at once."""
        meta = ring.get(PREFIX.size, frame.lengths_size + frame.header + frame.payload)
        position = PREFIX.size + len(meta)

        def copy_buffer(n: int, out: memoryview) -> None:
            nonlocal position
            ring.get_into(position, n, out)
            position += n

        message = small_message(frame, meta, copy_buffer)
        ring.release(frame.total)
        return message

    def _stream_into(self, channel: _Channel, out: np.ndarray) -> None:
        """Copy ``len(out)`` bytes from the ring as they arrive, freeing room as we go."""
        ring = channel.inbox
        done, n, idle = 0, len(out), 0
        while done < n:
            available = ring.readable()
            if not available:
                self._pause(channel, idle)
                idle += 1
                continue
            k = min(available, n - done, _CHUNK)
            ring.get_into(0, k, out[done : done + k])
            ring.release(k)
            done, idle = done + k, 0

    def spin_begin(self) -> None:
        with self._spin_lock:
            self._spinning += 1
            if self._spinning == 1:
                for channel in self._polled:
                    channel.inbox.set_polling(True)

    def spin_end(self) -> None:
        with self._spin_lock:
            self._spinning -= 1
            if self._spinning == 0:
                for channel in self._polled:
                    channel.inbox.set_polling(False)
                _full_fence()  # the caller polls once more after this (see ring_bell)

    def wait(self, timeout: float) -> None:
        assert self._bell is not None
        with contextlib.suppress(posix_ipc.BusyError, posix_ipc.SignalError):
            self._bell.acquire(timeout)

    def interrupt(self) -> None:
        if self._bell is not None:
            with contextlib.suppress(ValueError, posix_ipc.ExistentialError):
                self._bell.release()

    # ---------------------------------------------------------------------------- close
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for channel in list(self._channels.values()):
            with contextlib.suppress(OSError):
                channel.sock.send(b"B")  # "bye": we leave on purpose
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        os.write(self._wake_w, b"x")
        for thread in self._threads:
            thread.join(timeout=5)
        for name in list(self._names):
            self._unlink(name)
        with self._read_lock:  # no poll() is reading a ring any more
            for channel in self._channels.values():
                channel.sock.close()
                channel.bell.close()
                channel.inbox.close()
                channel.outbox.close()
                for segment in channel.segments:
                    with contextlib.suppress(BufferError):  # a stray view: the GC unmaps it
                        segment.close()
        if self._bell is not None:
            self._bell.close()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
