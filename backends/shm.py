"""shm: workers on one host talk through rings in shared memory.

* Per ordered pair of workers one `Ring` in a memfd object (``memfd_create``: shared
  memory with no name anywhere), created by its reader and handed to the writer as a file
  descriptor over the pair's Unix socket (``SCM_RIGHTS``). The kernel frees it when both
  sides have unmapped it, however they end, and it lives in the kernel's internal shmem
  mount, so the size of /dev/shm does not limit it (a container's 64 MiB is no obstacle).
* A message that does not fit streams through the ring in chunks. The reader keeps a
  per-channel receive state: each poll copies out what has arrived, frees that room for the
  writer and moves on to the other channels, so the ring bounds memory, never message size,
  and a slow or stalled writer holds up only its own message (the writer's ``send`` blocks
  its own caller until the reader has taken the rest).
* Per process one posix_ipc semaphore, its doorbell: a writer posts the reader's doorbell after
  publishing (47 ns when nobody sleeps on it). The engine polls the rings briefly before it
  blocks on the doorbell, since a blocking wake-up costs tens of microseconds here. A poll
  that finds another thread reading leaves it a "look again" flag, so a wake-up is never
  lost to a busy reader (see ``poll``).
* Per pair one abstract Unix socket: it carries the handshake (the ring's descriptor and the
  doorbell's name, checked against the world token and the peer's credentials) and then
  nothing; it becomes readable when the peer exits, which is how a dead peer is noticed at
  once.

Names. The doorbell is the only named object: ``/shmrpc.<world token>.<pid>.<rank>.bell-<pid
namespace inode>`` (``sem.shmrpc...`` in /dev/shm), created exclusively with mode 0600 when the
first handshake needs it and unlinked as soon as every peer has opened it, at the end of
``connect``: it exists for milliseconds during init, and a running world has no name in
/dev/shm (``listen`` also creates and at once unlinks a probe semaphore, to check /dev/shm).
A worker killed inside that window leaves the name behind until someone unlinks it: its peers
do when they see it die in a handshake or on its channel, and `sweep_dead_names` (run by
every ``listen`` and ``close``, so by the peers when their init fails) unlinks names whose
creator is dead. The sweep judges only names made in its own PID namespace: a PID from another
one (a container sharing /dev/shm through ``--ipc=host``) means nothing here.

If /dev/shm is missing, read-only or full (or memfd_create fails), ``listen`` publishes an
address that says ``unavailable`` with the reason and ``reaches`` is false for it, so both ends
of every pair agree: ``auto`` falls back to tcp (the engine warns once), ``shm`` fails at
init with the reason and the fix.

Memory ordering: on x86 (TSO) the ring needs no barrier and the engine spins on it; the
doorbell is skipped while the reader polls. Elsewhere the ring fences its own loads and
stores (ring.py), the doorbell is always rung and nothing spins.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import mmap
import os
import secrets
import selectors
import socket
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import posix_ipc

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
from .ring import CONTROL_BYTES, TSO, Ring, full_fence

__all__ = ["ShmTransport", "sweep_dead_names"]

logger = logging.getLogger(__name__)

_NAME_PREFIX = "shmrpc."
#: Messages up to this size are copied out of the ring in one piece.
_WHOLE = 256 << 10
#: Largest copy into or out of the ring at once while streaming; the two sides overlap.
_CHUNK = 1 << 20
#: Most bytes of one streamed message a poll copies before it moves on.
_SLICE = 8 << 20
#: Most messages one poll() takes before it returns (lets the engine hand work out).
_BATCH = 32
#: Extra passes a poll makes for threads that found it reading (see ``poll``).
_LOOKS = 4
#: Skipping the doorbell while the reader polls needs a cheap store-load fence (ring.py).
_X86 = TSO
_full_fence = full_fence
_CRED = struct.Struct("3i")
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def _host_domain(override: str | None) -> str:
    """Two workers may use shm iff their domains are equal: same kernel, namespaces, user."""
    if override:
        return f"host:{override}"
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        # net: the abstract Unix sockets of the handshake; pid: the peer's pid checked
        # against its credentials; /dev/shm itself (not the mount namespace: `ip netns exec`
        # and pod containers make new ones that still share it): the doorbell semaphores.
        namespaces = [os.stat(f"/proc/self/ns/{ns}").st_ino for ns in ("net", "pid")]
        dev_shm = os.stat("/dev/shm")
        namespaces += [dev_shm.st_dev, dev_shm.st_ino]
    except OSError:
        boot, namespaces = socket.gethostname(), []
    return ":".join([boot, *map(str, namespaces), str(os.getuid())])


def _pid_namespace() -> str:
    """This process's PID namespace (the inode of /proc/self/ns/pid), or "" if unknown."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this PID namespace still runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[:1]
    except OSError:
        return True  # no /proc to ask: trust kill()
    return state not in ([b"Z"], [b"X"])


def sweep_dead_names() -> list[str]:
    """Unlink shmrpc names in /dev/shm whose creator is dead; return them.

    Only names made in this PID namespace are judged: their last field ends in its inode
    (``.bell-<inode>``), and their PID field is then one this process can check. Names from
    other PID namespaces, and names without one, are left alone.
    """
    namespace = _pid_namespace()
    if not namespace:
        return []
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
        if (
            len(fields) != 5
            or not fields[2].isdigit()
            or fields[4].rpartition("-")[2] != namespace
            or _alive(int(fields[2]))
        ):
            continue
        unlink = posix_ipc.unlink_semaphore if semaphore else posix_ipc.unlink_shared_memory
        with contextlib.suppress(posix_ipc.ExistentialError, posix_ipc.PermissionsError):
            unlink(name)
            removed.append(name)
    return removed


def _no_dev_shm(error: BaseException) -> str:
    return (
        f"shm cannot create its doorbell semaphore in /dev/shm ({error}). It needs a writable "
        "/dev/shm with a few KiB free; its rings are memfd objects and take none of it. In a "
        "container, share the host's (docker run --ipc=host) or give the container its own "
        "(--shm-size=64m; any size will do), or mount a tmpfs on /dev/shm. Backend 'tcp' "
        "works without it, and 'auto' falls back to tcp"
    )


# ------------------------------------------------------------------------------ handshake


def _send_json(sock: socket.socket, obj: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """One length-prefixed JSON message; ``fds`` travel with its first byte (SCM_RIGHTS)."""
    data = json.dumps(obj).encode()
    packet = struct.pack("<I", len(data)) + data
    sent = socket.send_fds(sock, [packet], list(fds)) if fds else 0
    if sent < len(packet):
        sock.sendall(packet[sent:])


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise PeerLostError("peer closed the shm handshake socket")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


def _recv_json(sock: socket.socket, nfds: int = 0) -> tuple[dict[str, Any], list[int]]:
    """A message of `_send_json` and exactly ``nfds`` descriptors (the caller's)."""
    fds: list[int] = []
    try:
        if nfds:
            # Descriptors arrive with the first byte of the message they were sent with.
            head, fds, flags, _ = socket.recv_fds(sock, 4, nfds, socket.MSG_CMSG_CLOEXEC)
            if not head:
                raise PeerLostError("peer closed the shm handshake socket")
            if flags & socket.MSG_CTRUNC:
                raise TransportError("shm: handshake message with too many descriptors")
            head += _recv_exact(sock, 4 - len(head))
        else:
            head = _recv_exact(sock, 4)
        (n,) = struct.unpack("<I", head)
        if n > 1 << 16:
            raise TransportError(f"shm handshake message too large ({n} bytes)")
        obj = json.loads(_recv_exact(sock, n))
        if not isinstance(obj, dict):
            raise TransportError("malformed shm handshake message")
        if len(fds) != nfds:
            raise TransportError("shm: handshake message without its ring")
    except BaseException:
        _close_all(fds)
        raise
    return obj, fds


def _forget(name: str) -> None:
    """Unlink the doorbell name of a peer that died before it could (none if it did)."""
    if name:
        with contextlib.suppress(posix_ipc.ExistentialError, posix_ipc.PermissionsError):
            posix_ipc.unlink_semaphore(name)


def _allocate(n: int) -> Any:
    """Receive memory for ``n`` bytes; MemoryError for any size this process cannot hold (the
    channel then ends), whatever torch raises for it (RuntimeError, or an overflow)."""
    try:
        return allocate_buffer(n)
    except (MemoryError, RuntimeError, ValueError, TypeError, OverflowError) as e:
        raise MemoryError(f"cannot hold a {n}-byte message here: {e}") from e


class _Incoming:
    """A message being received over several polls: its table, header and payload first
    (``meta``), then each buffer into its own memory; ``target[:filled]`` is in so far."""

    __slots__ = ("buffers", "filled", "frame", "lengths", "meta", "target", "who")

    def __init__(self, frame: Frame, who: str) -> None:
        self.frame = frame
        self.who = who
        n = frame.lengths_size + frame.header + frame.payload
        try:
            self.meta = np.empty(n, dtype=np.uint8)
        except (ValueError, OverflowError) as e:  # more than an address space
            raise MemoryError(f"cannot hold a {n}-byte message here: {e}") from e
        self.lengths: Sequence[int] | None = None
        self.buffers: list[Any] = []
        self.target: np.ndarray = self.meta
        self.filled = 0

    def advance(self) -> Message | None:
        """The current target is full: aim at the next one; the message once it is done."""
        raw = memoryview(self.meta)  # type: ignore[arg-type]
        if self.lengths is None:
            self.lengths = self.frame.buffer_lengths(raw)
            check_lengths(self.frame, self.lengths, self.who)
        while len(self.buffers) < len(self.lengths):
            n = self.lengths[len(self.buffers)]
            buffer = _allocate(n)
            self.buffers.append(buffer)
            if n:
                self.target, self.filled = buffer.numpy(), 0
                return None
        at = self.frame.lengths_size
        header = bytes(raw[at : at + self.frame.header])
        payload = bytes(raw[at + self.frame.header :])
        return assemble(self.frame, raw, header, payload, self.buffers)


class _Channel:
    """Both directions with one peer."""

    def __init__(
        self,
        peer: int,
        outbox: Ring,
        inbox: Ring,
        bell: posix_ipc.Semaphore,
        bell_name: str,
        sock: socket.socket,
        segments: list[mmap.mmap],
    ) -> None:
        self.peer = peer
        self.outbox = outbox
        self.inbox = inbox
        self.bell = bell
        self.bell_name = bell_name  # the peer's doorbell (unlinked by the peer after connect)
        self.sock = sock
        self.segments = segments
        self.send_lock = threading.Lock()
        self.lost: PeerLostError | None = None
        self.partial: _Incoming | None = None  # a message arriving over several polls

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
        self._namespace = _pid_namespace() or "unknown"
        self._prefix = f"/{_NAME_PREFIX}{config.world_token}."
        self._unavailable: str | None = None
        self._channels: dict[int, _Channel] = {}
        self._polled: list[_Channel] = []
        self._streaming: list[_Channel] = []  # channels with a partial message (read lock)
        self._read_lock = threading.Lock()
        self._look_again = False
        self._changed = threading.Condition()
        self._bell: posix_ipc.Semaphore | None = None
        self._bell_name = ""
        self._bell_named = False  # the name is in /dev/shm (created, not yet unlinked)
        self._bell_lock = threading.Lock()
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
        self._unavailable = self._check_available()
        if self._unavailable is not None:
            return {"domain": self._domain, "unavailable": self._unavailable}
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

    def _check_available(self) -> str | None:
        """Why shm cannot work in this process (None: it can): memfd_create must work, and a
        semaphore must be creatable in /dev/shm (tried under a name that lives microseconds)."""
        try:
            os.close(os.memfd_create("shmrpc-probe", os.MFD_CLOEXEC))
        except (OSError, AttributeError) as e:
            return f"shm needs memfd_create (Linux 3.17 or later), which failed: {e}"
        name = self._name(f"probe{secrets.token_hex(4)}")
        try:
            probe = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o600, initial_value=0)
        except (OSError, posix_ipc.Error) as e:
            return _no_dev_shm(e)
        with contextlib.suppress(posix_ipc.ExistentialError):
            probe.unlink()
        probe.close()
        return None

    @staticmethod
    def reaches(local: Mapping[str, Any], remote: Mapping[str, Any]) -> bool:
        if "unavailable" in local or "unavailable" in remote:
            return False
        return bool(local.get("domain")) and local.get("domain") == remote.get("domain")

    def connect(self, peers: Mapping[int, Mapping[str, Any]]) -> None:
        if self._unavailable is not None:
            raise TransportError(self._unavailable)
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
        self._unlink_bell()

    def _name(self, what: str) -> str:
        """``/shmrpc.<token>.<pid>.<rank>.<what>-<pid namespace>`` (see sweep_dead_names)."""
        return f"{self._prefix}{os.getpid()}.{self.config.rank}.{what}-{self._namespace}"

    def _ensure_bell(self) -> str:
        """Our doorbell's name, creating the doorbell when the first handshake needs it."""
        with self._bell_lock:
            if self._closed:
                raise TransportError("shm transport closed")
            if self._bell is None:
                name = self._name("bell")
                try:
                    self._bell = posix_ipc.Semaphore(
                        name, posix_ipc.O_CREX, mode=0o600, initial_value=0
                    )
                except (OSError, posix_ipc.Error) as e:
                    raise TransportError(_no_dev_shm(e)) from e
                self._bell_name, self._bell_named = name, True
            return self._bell_name

    def _unlink_bell(self) -> None:
        with self._bell_lock:
            if self._bell_named:
                self._bell_named = False
                with contextlib.suppress(posix_ipc.ExistentialError):
                    posix_ipc.unlink_semaphore(self._bell_name)

    def _create_inbox(self, peer: int) -> tuple[int, mmap.mmap, Ring]:
        """A new ring for ``peer`` to write to: its memfd (the caller closes it) and mapping."""
        size = CONTROL_BYTES + self._ring_size
        label = f"shmrpc.{self.config.world_token}.{peer}to{self.config.rank}"  # in /proc/*/maps
        fd = os.memfd_create(label, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            try:
                os.posix_fallocate(fd, 0, size)  # ENOSPC now rather than SIGBUS later
            except OSError as e:
                raise TransportError(
                    f"shm: no memory for a {size}-byte ring ({e}); lower ring_size"
                ) from e
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)  # its size is fixed from now on
            segment = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except BaseException:
            os.close(fd)
            raise
        return fd, segment, Ring(segment, self._ring_size, create=True)

    def _open_outbox(self, fd: int) -> tuple[mmap.mmap, Ring]:
        """Map the ring a peer passed us; refuse anything that could shrink under us."""
        size = CONTROL_BYTES + self._ring_size
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError as e:
            raise TransportError(f"shm: the peer's ring is not a sealed memfd: {e}") from e
        if not seals & fcntl.F_SEAL_SHRINK or os.fstat(fd).st_size < size:
            raise TransportError("shm: the peer's ring is not a sealed memfd of the right size")
        segment = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
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
        peer_bell = ""
        try:
            sock.connect("\0" + str(address["socket"]))
            self._check_peer(sock, int(address["pid"]))
            inbox_fd, inbox_segment, inbox = self._create_inbox(peer)
            segments.append(inbox_segment)
            try:
                _send_json(sock, self._hello(), [inbox_fd])
            finally:
                os.close(inbox_fd)
            welcome, fds = _recv_json(sock, 1)
            try:
                self._check_hello(welcome, peer)
                peer_bell = str(welcome["bell"])
                outbox_segment, outbox = self._open_outbox(fds[0])
            finally:
                _close_all(fds)
            segments.append(outbox_segment)
            bell = posix_ipc.Semaphore(peer_bell)
            _send_json(sock, {"ready": True})  # we mapped its ring and opened its doorbell
        except BaseException as e:
            sock.close()
            if isinstance(e, ConnectionError):  # it died in the handshake, maybe named
                _forget(peer_bell)
            if isinstance(e, TransportError) or not isinstance(e, (OSError, posix_ipc.Error)):
                raise
            lost = PeerLostError if isinstance(e, ConnectionError) else TransportError
            raise lost(f"shm: handshake with rank {peer} failed: {e!r}") from e
        self._add(_Channel(peer, outbox, inbox, bell, peer_bell, sock, segments))

    def _answer(self, sock: socket.socket) -> None:
        sock.settimeout(self.config.connect_timeout)
        hello, fds = _recv_json(sock, 1)
        peer_bell = ""
        try:
            try:
                peer = int(hello.get("rank", -1))
                self._check_hello(hello, peer)
                self._check_peer(sock, int(hello["pid"]))
                peer_bell = str(hello["bell"])
                outbox_segment, outbox = self._open_outbox(fds[0])
            finally:
                _close_all(fds)
            bell = posix_ipc.Semaphore(peer_bell)
            inbox_fd, inbox_segment, inbox = self._create_inbox(peer)
            try:
                _send_json(sock, self._hello(), [inbox_fd])
            finally:
                os.close(inbox_fd)
            _recv_json(sock)  # ready: the peer mapped our inbox and opened our doorbell
        except ConnectionError:  # reset or closed: it died in the handshake, maybe named
            _forget(peer_bell)
            raise
        channel = _Channel(
            peer, outbox, inbox, bell, peer_bell, sock, [outbox_segment, inbox_segment]
        )
        self._add(channel)

    def _hello(self) -> dict[str, Any]:
        return {
            "token": self.config.world_token,
            "rank": self.config.rank,
            "pid": os.getpid(),
            "bell": self._ensure_bell(),
        }

    def _check_hello(self, hello: Mapping[str, Any], peer: int) -> None:
        if hello.get("token") != self.config.world_token:
            raise TransportError("shm: handshake from another world")
        if hello.get("rank") != peer or not 0 <= peer < self.config.world_size:
            raise TransportError(f"shm: unexpected peer rank {hello.get('rank')!r}")
        bell = str(hello.get("bell"))
        if not bell.startswith(f"{self._prefix}{hello.get('pid')}.{peer}.bell-"):
            raise TransportError(f"shm: peer offered a doorbell outside this world: {bell!r}")

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
                if data.startswith(b"B"):
                    lost: PeerLostError = PeerShutDown(f"shm peer rank {channel.peer} shut down")
                else:  # killed: maybe before its connect() ended and unlinked its doorbell
                    lost = PeerLostError(f"shm peer rank {channel.peer} exited")
                    _forget(channel.bell_name)
                self._lose(channel, lost)

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
        """Write a message larger than the free room chunk by chunk as the reader frees room.
        Blocks this caller (only this channel's sends wait on it) until the last chunk is in."""
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
        """Wait a little for the reader to make room; give up if it is gone."""
        if channel.lost is not None:
            raise channel.lost
        if self._closed:
            raise PeerLostError("shm transport closed")
        time.sleep(0 if idle < 100 else 0.0001)

    # --------------------------------------------------------------------------- receive
    def poll(self) -> int:
        # A lost wake-up: a thread woken by the doorbell polls, finds another thread reading
        # and would go back to sleep, while that reader may already have passed the ring the
        # new message is in. So a poll first raises ``_look_again``; the reader clears it at
        # the start of each pass and checks it after letting go of the lock. Interleavings of
        # the woken thread W (its flag store F, its failed try-lock T, which follows F) with
        # the last reader R to clear the flag before F (clear C, scan S, unlock U, check K):
        # * F before C: S starts after F, so after the doorbell W woke for, so after that
        #   message was published (the semaphore orders it; the GIL orders F before C), and
        #   S reads it.
        # * F after C: K follows U, which follows T (T found the lock held, by R or by a later
        #   reader), so K sees the flag (only a reader clears it, and its own clear would be
        #   a C after F, the first case), and R passes again, or, if another thread holds the
        #   lock by then, that thread's C comes after F: the first case for that reader.
        # R passes again only while the flag keeps being raised (a spinner's polls), at most
        # ``_LOOKS`` times, or with a full batch; then it rings its own doorbell, so a
        # listener looks instead.
        self._look_again = True
        if not self._read_lock.acquire(blocking=False):
            return 0  # the reader passes again when it is done (above)
        delivered = 0
        looks = 0
        while True:
            self._look_again = False
            try:
                progress = True
                while progress and delivered < _BATCH:
                    progress = False
                    if self._streaming:  # messages arriving over several polls
                        n = self._resume()
                        delivered += n
                        progress = n > 0
                    for channel in self._polled:
                        if (
                            channel.inbox.readable() < PREFIX.size
                            or channel.lost is not None
                            or channel.partial is not None
                        ):
                            continue
                        try:
                            message = self._read(channel)
                        except PeerLostError as e:
                            self._fail(channel, e)
                            continue
                        except MemoryError as e:  # the ring is out of step now: channel ends
                            self._fail(channel, PeerLostError(f"shm: rank {channel.peer}: {e}"))
                            continue
                        if message is None:  # started arriving; the rest comes later
                            continue
                        delivered += 1
                        progress = True
                        self.host.deliver(channel.peer, message)
            finally:
                self._read_lock.release()
            if not self._look_again:
                return delivered
            looks += 1
            if delivered >= _BATCH or looks > _LOOKS:
                self.interrupt()  # a listener looks instead (see above)
                return delivered
            if not self._read_lock.acquire(blocking=False):
                return delivered  # another reader took over: it checks the flag in turn

    def _read(self, channel: _Channel) -> Message | None:
        """The next message on ``channel`` if it has fully arrived; else start receiving it
        (``channel.partial``), copy what is there, and return None."""
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
        incoming = _Incoming(frame, f"shm: rank {channel.peer}")
        ring.release(PREFIX.size)
        channel.partial = incoming
        self._streaming.append(channel)
        return self._advance(channel, incoming)

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

    def _advance(self, channel: _Channel, incoming: _Incoming) -> Message | None:
        """Copy what has arrived of ``channel``'s partial message (up to ``_SLICE`` bytes),
        freeing its room for the writer; the message once it is complete. Never waits."""
        ring = channel.inbox
        budget = _SLICE
        while True:
            target = incoming.target
            want = len(target) - incoming.filled
            if not want:
                message = incoming.advance()
                if message is not None:
                    self._drop_partial(channel)
                    return message
                continue
            available = ring.readable()
            if not available or budget <= 0:
                return None
            k = min(available, want, _CHUNK)
            ring.get_into(0, k, target[incoming.filled : incoming.filled + k])
            ring.release(k)
            incoming.filled += k
            budget -= k

    def _resume(self) -> int:
        """Go on receiving the partial messages; deliver those that complete."""
        delivered = 0
        for channel in list(self._streaming):
            incoming = channel.partial
            if channel.lost is not None or incoming is None:
                self._drop_partial(channel)
                continue
            try:
                message = self._advance(channel, incoming)
            except PeerLostError as e:
                self._fail(channel, e)
                continue
            except MemoryError as e:
                self._fail(channel, PeerLostError(f"shm: rank {channel.peer}: {e}"))
                continue
            if message is not None:
                delivered += 1
                self.host.deliver(channel.peer, message)
        return delivered

    def _drop_partial(self, channel: _Channel) -> None:
        channel.partial = None
        if channel in self._streaming:
            self._streaming.remove(channel)

    def _fail(self, channel: _Channel, error: PeerLostError) -> None:
        """A channel's stream cannot go on (malformed, no memory): it ends (read lock held)."""
        self._drop_partial(channel)
        self._lose(channel, error)

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
        bell = self._bell
        if bell is None:  # no peer has connected: nothing can ring
            time.sleep(min(timeout, 0.01))
            return
        with contextlib.suppress(posix_ipc.BusyError, posix_ipc.SignalError):
            bell.acquire(timeout)

    def interrupt(self) -> None:
        bell = self._bell
        if bell is not None:
            with contextlib.suppress(ValueError, posix_ipc.ExistentialError):
                bell.release()

    # ---------------------------------------------------------------------------- close
    def close(self) -> None:
        if self._closed:
            return
        with self._bell_lock:  # no doorbell is created after this
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
        self._unlink_bell()
        with self._read_lock:  # no poll() is reading a ring any more
            self._streaming.clear()
            for channel in self._channels.values():
                channel.partial = None
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
        sweep_dead_names()  # a peer that died in its handshake may have left its doorbell
