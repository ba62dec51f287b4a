"""The shm receive path: a streamed message never holds up other peers, a wake-up is never
lost to a busy reader, and the ring's fenced path for weakly ordered CPUs moves messages.

Every wait is bounded; the tests assert on progress (which messages arrived while what was
still incomplete), not on how long things took.
"""

from __future__ import annotations

import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch

import shmrpc as rpc
from shmrpc.backends import ring as ring_module
from shmrpc.backends import shm as shm_module
from shmrpc.backends.framing import describe
from shmrpc.backends.ring import CONTROL_BYTES, Ring
from shmrpc.backends.shm import ShmTransport
from shmrpc.backends.tcp import TcpTransport
from shmrpc.transport import Message, TransportConfig
from tests.harness import add, new_init_method, run_world, worker_options
from tests.test_backends import _Inbox


def _world(n, cls=ShmTransport, **options):
    """``n`` transports of ``cls``, every pair connected; their hosts record what arrives."""
    token = f"t{time.monotonic_ns()}"
    hosts = [_Inbox() for _ in range(n)]
    transports = [
        cls(TransportConfig(r, n, token, b"key", 5.0, dict(options)), hosts[r]) for r in range(n)
    ]
    addresses = [t.listen() for t in transports]
    errors = []

    def connect(rank):
        try:
            peers = {p: addresses[p] for p in range(n) if p != rank}
            transports[rank].connect(peers)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=connect, args=(r,)) for r in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert not any(t.is_alive() for t in threads), "connecting did not finish"
    assert not errors, errors
    return transports, hosts


@pytest.fixture
def world3():
    made = []

    def make(cls=ShmTransport, **options):
        transports, hosts = _world(3, cls, **options)
        made.extend(transports)
        return transports, hosts

    yield make
    for transport in made:
        transport.close()


def _from(host, peer):
    return [m for p, m in host.messages if p == peer]


def _raw(message):
    """``message`` as it lies on the wire (framing.py)."""
    head, total = describe(message)
    raw = head + message.header + bytes(message.payload)
    raw += b"".join(b.numpy().tobytes() for b in message.buffers)
    assert len(raw) == total
    return raw


def _write(transport, peer, raw, deadline):
    """Put ``raw`` in the ring to ``peer`` as room appears (the reader must be polling)."""
    channel = transport._channels[peer]
    done = 0
    while done < len(raw):
        assert time.monotonic() < deadline, f"the reader freed no room ({done} bytes written)"
        room = channel.outbox.writable()
        if not room:
            time.sleep(0.0005)
            continue
        k = min(room, len(raw) - done)
        channel.outbox.put(0, raw[done : done + k])
        channel.outbox.commit(k)
        channel.ring_bell()
        done += k


class _Poller:
    """Polls a transport on a thread of its own, as a listener does, until stopped."""

    def __init__(self, transport):
        self.transport = transport
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            if not self.transport.poll():
                self.transport.wait(0.005)

    def close(self):
        self.stop.set()
        self.thread.join(10)
        return not self.thread.is_alive()


def _until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.001)
    return condition()


# ------------------------------------------------------------------ streaming (issue 10.4)


def test_a_stalled_stream_does_not_hold_up_other_peers(world3):
    """Rank 1 sends half of a message larger than the ring and stops; rank 2's messages are
    delivered meanwhile; then rank 1 sends the rest and its message arrives intact."""
    (receiver, slow, other), hosts = world3(ring_size=64 << 10)
    data = np.random.default_rng(3).integers(0, 255, 1 << 20, dtype=np.uint8)
    big = Message(b"big", b"payload" * 100, [torch.from_numpy(data)])
    raw = _raw(big)
    half = 40 << 10  # fits the 64 KiB ring: in without the reader's help
    poller = _Poller(receiver)
    try:
        _write(slow, 0, raw[:half], time.monotonic() + 10)
        # The receiver has started on it (its prefix is taken) and is waiting for the rest.
        assert _until(lambda: slow._channels[0].outbox.writable() > (64 << 10) - half)
        for i in range(20):
            other.send(0, Message(b"small", str(i).encode()), timeout=5)
        assert _until(lambda: len(_from(hosts[0], 2)) == 20), (
            f"only {len(_from(hosts[0], 2))} of rank 2's 20 messages arrived while rank 1's "
            "message was incomplete"
        )
        assert _from(hosts[0], 1) == [], "a half-sent message was delivered"
        # The rest, in pieces as the receiver frees room, interleaved with more small ones.
        for start in range(half, len(raw), 100_000):
            _write(slow, 0, raw[start : start + 100_000], time.monotonic() + 10)
            other.send(0, Message(b"small", b"again"), timeout=5)
        assert _until(lambda: len(_from(hosts[0], 1)) == 1), "the streamed message never arrived"
        assert _until(lambda: len(_from(hosts[0], 2)) == 20 + len(range(half, len(raw), 100_000)))
    finally:
        assert poller.close(), "the receiver's poll is stuck"
    (got,) = _from(hosts[0], 1)
    assert got.header == b"big" and bytes(got.payload) == b"payload" * 100
    assert np.array_equal(got.buffers[0].numpy(), data)
    assert not hosts[0].lost


def test_a_writer_that_dies_half_way_ends_only_its_channel(world3):
    (receiver, slow, other), hosts = world3(ring_size=64 << 10)
    raw = _raw(Message(b"big", b"", [torch.zeros(1 << 20, dtype=torch.uint8)]))
    poller = _Poller(receiver)
    try:
        _write(slow, 0, raw[: 30 << 10], time.monotonic() + 10)
        slow.close()  # gone for good in the middle of its message
        assert _until(lambda: [p for p, _ in hosts[0].lost] == [1]), hosts[0].lost
        other.send(0, Message(b"small", b"after"), timeout=5)
        assert _until(lambda: len(_from(hosts[0], 2)) == 1)
    finally:
        assert poller.close(), "the receiver's poll is stuck"
    assert _from(hosts[0], 1) == []
    assert receiver._streaming == [], "the dead writer's partial message is still held"


def test_one_poll_never_waits_for_the_rest_of_a_message(world3):
    """Writer and reader take turns on one thread: each poll takes what is there and
    returns, so the next piece can be written."""
    (receiver, slow, _), hosts = world3(ring_size=64 << 10)
    data = np.arange(300_000, dtype=np.int64).astype(np.uint8)
    raw = _raw(Message(b"h", b"p", [torch.from_numpy(data)]))
    outbox = slow._channels[0].outbox
    polls = []

    def take_turns():
        done = 0
        while done < len(raw):
            k = min(outbox.writable(), len(raw) - done, 7_000)  # many partial polls
            outbox.put(0, raw[done : done + k])
            outbox.commit(k)
            done += k
            polls.append(receiver.poll())  # blocks here if it waits for the rest

    thread = threading.Thread(target=take_turns, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), f"a poll waited for the rest of the message ({len(polls)})"
    assert polls.count(1) == 1 and polls[-1] == 1 and len(polls) > 40
    ((peer, got),) = hosts[0].messages
    assert peer == 1 and np.array_equal(got.buffers[0].numpy(), data)


# An end-to-end case: worker1's call carries a tensor larger than its ring and stops half-way
# (a hook in its process); worker2's calls to worker0 must still be answered meanwhile.

_paused = threading.Event()
_resume = threading.Event()


def _pause_half_way():
    original = ShmTransport._stream

    def stream(self, channel, head, message, timeout):
        ring = channel.outbox
        plain_commit = ring.commit
        written = 0

        def commit(n):
            nonlocal written
            plain_commit(n)
            written += n
            if written >= 2 * ring.capacity and not _resume.is_set():
                _paused.set()
                assert _resume.wait(60), "never told to go on"

        ring.commit = commit
        try:
            original(self, channel, head, message, timeout)
        finally:
            ring.commit = plain_commit

    ShmTransport._stream = stream


def _is_paused():
    return _paused.is_set()


def _go_on():
    _resume.set()


def _checksum(tensor):
    return zlib.crc32(tensor.numpy())


def _stalled_stream_world(rank, init_method):
    opts = worker_options("shm", rank, 3, init_method, ring_size=64 << 10)
    rpc.init_rpc(f"worker{rank}", backend="shm", rank=rank, world_size=3, rpc_backend_options=opts)
    result = None
    if rank == 1:
        _pause_half_way()
        data = torch.from_numpy(np.random.default_rng(1).integers(0, 255, 8 << 20, np.uint8))
        result = rpc.rpc_sync("worker0", _checksum, (data,), timeout=90) == _checksum(data)
    elif rank == 2:
        try:
            deadline = time.monotonic() + 30
            while not rpc.rpc_sync("worker1", _is_paused, timeout=10):
                assert time.monotonic() < deadline, "worker1 never got half-way"
                time.sleep(0.01)
            result = 20
            for i in range(20):
                try:
                    assert rpc.rpc_sync("worker0", add, (i, 1), timeout=10) == i + 1
                except RuntimeError as e:  # the call timed out: worker0 is stuck
                    result = f"{i} calls answered, then: {e}"
                    break
            still_paused = rpc.rpc_sync("worker1", _is_paused, timeout=10)
            result = (result, still_paused)
        finally:
            rpc.rpc_sync("worker1", _go_on, timeout=10)
    rpc.shutdown()
    return result


def test_calls_are_answered_while_another_peers_message_is_half_sent():
    results = run_world(_stalled_stream_world, 3, (new_init_method(),), timeout=150)
    assert results[2] == (20, True), results[2]  # all answered while worker1 was half-way
    assert results[1] is True, "worker1's large call came back wrong"


# ------------------------------------------------------------ lost wake-ups (issue 10.4)


def _park_poll_after(transport):
    """Start ``transport.poll()`` on a thread and hold it inside its scan, after it has passed
    the first channel in its order; return (thread, the parked poll's result list, the rank
    of the channel it passed, a callable that lets it go on)."""
    first, second = transport._polled
    entered, go_on = threading.Event(), threading.Event()
    readable = second.inbox.readable
    calls = []

    def hooked():
        calls.append(1)
        if len(calls) == 1:
            entered.set()
            assert go_on.wait(10)
        return readable()

    second.inbox.readable = hooked
    result = []
    thread = threading.Thread(target=lambda: result.append(transport.poll()))
    thread.start()
    assert entered.wait(10), "the poll never reached the second channel"
    return thread, result, first.peer, go_on.set


def test_a_wake_up_that_finds_the_reader_busy_is_not_lost(world3):
    """The reader R has passed ring A when a message lands there; the woken thread W finds R
    reading and returns. R must look again before it returns, or the message would wait
    for a later wake-up (up to a second in a listener's wait)."""
    (receiver, *_senders), hosts = world3()
    senders = dict(enumerate(_senders, start=1))
    thread, result, passed, go_on = _park_poll_after(receiver)
    try:
        senders[passed].send(0, Message(b"late", b"behind the reader"), timeout=5)
        # W: woken by that message's doorbell, polls while R holds the lock.
        receiver.wait(5)
        assert receiver.poll() == 0, "the parked poll should hold the read lock"
    finally:
        go_on()
        thread.join(10)
    assert not thread.is_alive()
    # No further poll: R's own poll delivered it.
    assert result == [1] and [(p, m.header) for p, m in hosts[0].messages] == [(passed, b"late")]


def test_tcp_wake_ups_are_level_triggered(world3):
    """tcp's poll has the same try-lock, but its wait is level-triggered epoll: a message R
    passed by is still reported to the next wait, so it is not lost (no flag needed)."""
    (receiver, *_senders), hosts = world3(TcpTransport)
    senders = dict(enumerate(_senders, start=1))
    sock_of = {c.sock.fileno(): c.peer for c in receiver._connections.values()}
    entered, go_on = threading.Event(), threading.Event()
    original = receiver._receive

    def receive(connection):
        entered.set()
        assert go_on.wait(10)
        return original(connection)

    receiver._receive = receive
    senders[1].send(0, Message(b"first", b""), timeout=5)
    receiver.wait(5)  # reports rank 1's connection
    thread = threading.Thread(target=receiver.poll)
    thread.start()
    try:
        assert entered.wait(10)
        senders[2].send(0, Message(b"late", b""), timeout=5)
        receiver.wait(5)  # W: woken for rank 2
        assert receiver.poll() == 0, "the parked poll should hold the read lock"
    finally:
        go_on.set()
        thread.join(10)
    receiver._receive = original
    assert [m.header for _, m in hosts[0].messages] == [b"first"]
    ready = [sock_of.get(fd) for fd, _ in receiver._epoll.poll(0)]
    assert 2 in ready, "rank 2's message is no longer reported: a lost wake-up"
    assert _until(lambda: receiver.poll() or len(hosts[0].messages) == 2)
    assert [m.header for _, m in hosts[0].messages] == [b"first", b"late"]


# ----------------------------------------------------- weakly ordered CPUs (issue 10.7)


@pytest.fixture
def weakly_ordered(monkeypatch):
    """Run the path meant for CPUs other than x86: fenced ring, doorbell always rung."""
    fences = []
    fence = ring_module.ordering_fence
    monkeypatch.setattr(ring_module, "TSO", False)
    monkeypatch.setattr(shm_module, "_X86", False)
    monkeypatch.setattr(ring_module, "ordering_fence", lambda: (fences.append(1), fence()))
    return fences


def test_the_fenced_ring_fences_each_step(weakly_ordered):
    import mmap

    segment = mmap.mmap(-1, CONTROL_BYTES + (1 << 16))
    producer = Ring(segment, 1 << 16, create=True)
    consumer = Ring(segment, 1 << 16, create=False)
    assert consumer.readable() == 0 and weakly_ordered == [], "an empty ring needs no fence"
    assert producer.writable() == 1 << 16 and len(weakly_ordered) == 1
    producer.put(0, b"abc")
    producer.commit(3)
    assert len(weakly_ordered) == 2
    assert consumer.readable() == 3 and len(weakly_ordered) == 3
    assert consumer.get(0, 3) == b"abc"
    consumer.release(3)
    assert len(weakly_ordered) == 4 and producer.writable() == 1 << 16
    for ring in (producer, consumer):
        ring.close()
    # x86 rings stay plain: no per-instance overrides, no fence calls.
    ring_module.TSO = True
    plain = Ring(mmap.mmap(-1, CONTROL_BYTES + (1 << 16)), 1 << 16, create=True)
    assert "commit" not in vars(plain) and "readable" not in vars(plain)


def test_messages_flow_on_the_weakly_ordered_path(weakly_ordered):
    transports, hosts = _world(2, ring_size=64 << 10)
    try:
        assert all("commit" in vars(c.outbox) for c in transports[0]._channels.values())
        rng = np.random.default_rng(5)
        sent = []
        for i in range(60):
            n = int(rng.choice([0, 10, 5000, 100_000, 300_000]))  # some exceed the ring
            buffers = [torch.from_numpy(rng.integers(0, 255, n, dtype=np.uint8))] if i % 2 else []
            sent.append(Message(f"h{i}".encode(), rng.bytes(int(rng.integers(0, 3000))), buffers))
        poller = _Poller(transports[1])
        try:
            for message in sent:
                transports[0].send(1, message, timeout=10)
            assert _until(lambda: len(hosts[1].messages) == len(sent), 30)
        finally:
            assert poller.close()
        for a, (_, b) in zip(sent, hosts[1].messages, strict=True):
            assert a.header == b.header and bytes(a.payload) == bytes(b.payload)
            assert [t.numpy().tobytes() for t in a.buffers] == [
                t.numpy().tobytes() for t in b.buffers
            ]
        assert len(weakly_ordered) > len(sent)
    finally:
        for transport in transports:
            transport.close()


@pytest.mark.parametrize(
    "length", [1 << 50, (1 << 63) + 5], ids=["more-than-memory", "more-than-an-address-space"]
)
def test_a_buffer_larger_than_this_process_can_hold_ends_its_channel(world3, length):
    """The frame is consistent, so its table is read first; the buffer it announces cannot be
    allocated: that channel ends, the poll returns, and the other peers go on."""
    (receiver, hostile, other), hosts = world3()
    raw = struct.pack("<QIIQQ", 8 + length, 0, 1, 0, length)
    channel = hostile._channels[0]
    channel.outbox.put(0, raw)
    channel.outbox.commit(len(raw))
    assert _until(lambda: receiver.poll() or hosts[0].lost)
    ((peer, error),) = hosts[0].lost
    assert peer == 1 and isinstance(error, ConnectionError) and "cannot hold" in str(error)
    other.send(0, Message(b"small", b"after"), timeout=5)
    assert _until(lambda: receiver.poll() or _from(hosts[0], 2))
    assert [m.header for m in _from(hosts[0], 2)] == [b"small"] and _from(hosts[0], 1) == []
