"""The backend interface: choosing transports, registering new ones, authentication, rings."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch

import shmrpc as rpc
from shmrpc.backends.auth import AuthenticationError, answer_challenge, deliver_challenge
from shmrpc.backends.ring import CONTROL_BYTES, Ring
from shmrpc.backends.shm import ShmTransport
from shmrpc.backends.tcp import TcpTransport
from shmrpc.transport import Message, TransportConfig, TransportError, resolve_backend
from tests.harness import add, new_init_method, run_world, worker_options

# ------------------------------------------------------------------------------ routing


def _routes():
    return rpc.api._get_current_rpc_agent().route_names()


def test_routes_follow_the_backend(world):
    routes = world.run(_routes)
    expected = {
        "shm": {"worker0": "self", "worker1": "shm", "worker2": "shm"},
        "tcp": {"worker0": "self", "worker1": "tcp", "worker2": "tcp"},
        # under auto, worker2 stands in for a worker on another host
        "auto": {"worker0": "self", "worker1": "shm", "worker2": "tcp"},
    }[world.backend]
    assert routes == expected


def _shm_across_hosts(rank, init_method):
    opts = rpc.RpcBackendOptions(init_method=init_method, rpc_timeout=10, host_id=f"host{rank}")
    try:
        rpc.init_rpc(
            f"worker{rank}", backend="shm", rank=rank, world_size=2, rpc_backend_options=opts
        )
    except RuntimeError as e:
        assert "cannot reach worker" in str(e) and "'tcp' or 'auto'" in str(e), str(e)
        return "refused"
    rpc.shutdown()
    return "started"


def test_shm_refuses_peers_on_other_hosts():
    assert run_world(_shm_across_hosts, 2, (new_init_method(),)) == ["refused", "refused"]


def test_builtin_backends_are_entry_points():
    names = {ep.name for ep in importlib.metadata.entry_points(group="shmrpc.backends")}
    assert {"shm", "tcp", "auto"} <= names
    assert resolve_backend("auto") == [ShmTransport, TcpTransport]
    assert rpc.BackendType.TENSORPIPE is rpc.BackendType.AUTO


# ----------------------------------------------------------------------- third party


class CountingTcp(TcpTransport):
    """A "third-party" backend: tcp that counts the messages it sends."""

    name = "counting-tcp"
    sent = 0

    def send(self, peer, message, timeout=None):
        type(self).sent += 1
        super().send(peer, message, timeout)


def _third_party(rank, init_method):
    rpc.register_transport("counting-tcp", CountingTcp)
    rpc.register_transport("tcp-then-shm", ("counting-tcp", "shm"))
    try:
        rpc.register_transport("counting-tcp", CountingTcp)
    except RuntimeError as e:
        assert "already registered" in str(e)
    for backend in ("counting-tcp", "tcp-then-shm"):
        rpc.init_rpc(
            f"worker{rank}",
            backend=backend,
            rank=rank,
            world_size=2,
            rpc_backend_options=rpc.RpcBackendOptions(init_method=f"{init_method}-{backend}"),
        )
        before = CountingTcp.sent
        assert rpc.rpc_sync(f"worker{1 - rank}", add, (rank, 10)) == rank + 10
        assert CountingTcp.sent > before
        assert _routes()[f"worker{1 - rank}"] == "counting-tcp"
        rpc.shutdown()


def test_third_party_backend():
    run_world(_third_party, 2, (new_init_method(),))


# ---------------------------------------------------------------------- authentication


def test_challenge_response():
    good, bad = b"k" * 32, b"x" * 32
    for server_key, client_key, ok in ((good, good, True), (good, bad, False)):
        a, b = socket.socketpair()
        errors: list[AuthenticationError] = []

        def client(sock=b, key=client_key, errors=errors):
            try:
                answer_challenge(sock, key)
                deliver_challenge(sock, key)
            except AuthenticationError as e:
                errors.append(e)

        thread = threading.Thread(target=client)
        thread.start()
        try:
            deliver_challenge(a, server_key)
            answer_challenge(a, server_key)
            assert ok
        except AuthenticationError:
            assert not ok
        thread.join(5)
        assert bool(errors) == (not ok)
        a.close()
        b.close()


class _Inbox:
    def __init__(self):
        self.messages = []
        self.lost = []

    def deliver(self, peer, message):
        self.messages.append((peer, message))

    def peer_lost(self, peer, error):
        self.lost.append((peer, error))


def _pair(cls, keys=(b"key", b"key"), options=None):
    token = f"t{time.monotonic_ns()}"
    hosts = [_Inbox(), _Inbox()]
    transports = [
        cls(TransportConfig(r, 2, token, keys[r], 3.0, dict(options or {})), hosts[r])
        for r in range(2)
    ]
    addresses = [t.listen() for t in transports]
    return transports, hosts, addresses


def _connect(transports, addresses):
    errors = []

    def higher():
        try:
            transports[1].connect({0: addresses[0]})
        except Exception as e:
            errors.append(e)

    thread = threading.Thread(target=higher)
    thread.start()
    try:
        transports[0].connect({1: addresses[1]})
    except Exception as e:
        errors.append(e)
    thread.join(10)
    return errors


def test_tcp_rejects_wrong_key_and_listens_on_loopback():
    transports, hosts, addresses = _pair(TcpTransport, keys=(b"right", b"wrong"))
    try:
        assert addresses[0]["host"] == "127.0.0.1"
        errors = _connect(transports, addresses)
        assert errors and all(isinstance(e, (TransportError, ConnectionError)) for e in errors)
        assert hosts[0].messages == hosts[1].messages == []
    finally:
        for t in transports:
            t.close()


@pytest.mark.parametrize("cls", [ShmTransport, TcpTransport])
def test_transport_pair_moves_messages(cls):
    transports, hosts, addresses = _pair(cls, options={"ring_size": 64 << 10})
    try:
        assert not _connect(transports, addresses)
        rng = np.random.default_rng(0)
        sent = []
        for i in range(200):
            n = int(rng.choice([0, 1, 100, 5000, 100_000, 300_000]))  # some exceed the ring
            buffers = [torch.from_numpy(rng.integers(0, 255, n, dtype=np.uint8))] if i % 3 else []
            message = Message(f"h{i}".encode(), rng.bytes(int(rng.integers(0, 2000))), buffers)
            sent.append(message)
        receiver = threading.Thread(target=_drain, args=(transports[1], hosts[1], len(sent)))
        receiver.start()
        for message in sent:
            transports[0].send(1, message, timeout=10)
        receiver.join(30)
        got = [m for _, m in hosts[1].messages]
        assert len(got) == len(sent)
        for a, b in zip(sent, got, strict=True):
            assert bytes(a.header) == bytes(b.header) and bytes(a.payload) == bytes(b.payload)
            assert [t.numpy().tobytes() for t in a.buffers] == [
                t.numpy().tobytes() for t in b.buffers
            ]
            assert all(t.data_ptr() % 16 == 0 for t in b.buffers if t.numel())
    finally:
        for t in transports:
            t.close()


def _drain(transport, host, count):
    deadline = time.monotonic() + 20
    while len(host.messages) < count and time.monotonic() < deadline:
        if not transport.poll():
            transport.wait(0.01)


def test_ring_wraps_around():
    import mmap

    capacity = 1 << 16
    segment = mmap.mmap(-1, CONTROL_BYTES + capacity)
    producer = Ring(segment, capacity, create=True)
    consumer = Ring(segment, capacity, create=False)
    rng = np.random.default_rng(1)
    for _ in range(500):
        data = rng.bytes(int(rng.integers(1, 20_000)))
        assert producer.writable() >= len(data)
        producer.put(0, data if len(data) % 2 else np.frombuffer(data, dtype=np.uint8))
        producer.commit(len(data))
        assert consumer.readable() == len(data)
        out = bytearray(len(data))
        consumer.get_into(0, len(data), memoryview(out))
        assert bytes(out) == data == consumer.get(0, len(data))
        consumer.release(len(data))
    assert producer.writable() == capacity


# ------------------------------------------------------------------- cross-process stress


def _stress(rank, backend, init_method, count):
    opts = worker_options(backend, rank, 2, init_method, ring_size=64 << 10)
    rpc.init_rpc(
        f"worker{rank}", backend=backend, rank=rank, world_size=2, rpc_backend_options=opts
    )
    if rank == 0:
        rng = np.random.default_rng(7)
        futures = []
        for seq in range(count):
            n = int(rng.choice([1, 64, 4096, 70_000, 200_000]))
            data = torch.from_numpy(rng.integers(0, 255, n, dtype=np.uint8))
            futures.append(
                (seq, zlib.crc32(data.numpy()), rpc.rpc_async("worker1", _checksum, (seq, data)))
            )
        for seq, crc, fut in futures:
            assert fut.wait() == (seq, crc), seq
    rpc.shutdown()


def _checksum(seq, data):
    return seq, zlib.crc32(data.numpy())


def test_stress_with_checksums(backend):
    """Many concurrent messages of mixed sizes (several larger than the 64 KiB ring)."""
    run_world(_stress, 2, (backend, new_init_method(), 600), timeout=120)


# ------------------------------------------------------------- strangers at the tcp door


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flood(port, stop, sockets):
    """Open connections to ``port`` until told to stop: half stay silent, half send garbage."""
    while not stop.is_set():
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=0.2)
        except OSError:
            time.sleep(0.001)  # not listening yet (or any more)
            continue
        if len(sockets) % 2:
            with contextlib.suppress(OSError):
                sock.sendall(os.urandom(100))
        sockets.append(sock)
        if len(sockets) > 300:
            time.sleep(0.01)


def _init_and_call(rank, init_method, port):
    # rank 0 dials rank 1, whose listener is under attack
    options = worker_options("tcp", rank, 2, init_method, listen_port=port if rank else 0)
    rpc.init_rpc(
        f"worker{rank}", backend="tcp", rank=rank, world_size=2, rpc_backend_options=options
    )
    result = rpc.rpc_sync(f"worker{1 - rank}", add, (torch.ones(2), rank))
    rpc.shutdown()
    return result.tolist()


def test_strangers_connections_do_not_keep_a_world_from_forming():
    port = _free_port()
    stop, sockets = threading.Event(), []
    attackers = [threading.Thread(target=_flood, args=(port, stop, sockets)) for _ in range(3)]
    for attacker in attackers:
        attacker.start()
    try:
        results = run_world(_init_and_call, 2, (new_init_method(), port), timeout=90)
    finally:
        stop.set()
        for attacker in attackers:
            attacker.join(5)
        for sock in sockets:
            sock.close()
    assert not any(a.is_alive() for a in attackers)
    assert len(sockets) >= 4, "the flood hardly reached the listener"
    assert results == [[1.0, 1.0], [2.0, 2.0]]


def test_tcp_finds_a_dead_host_in_seconds():
    """Keepalive and the user timeout are set, so a crashed host is lost in ~25 s, not 2 h."""
    transports, _, addresses = _pair(TcpTransport)
    try:
        assert not _connect(transports, addresses)
        for transport in transports:
            (connection,) = transport._connections.values()
            sock = connection.sock
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            idle = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
            interval = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
            probes = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
            assert idle + interval * probes <= 60, (idle, interval, probes)
            assert 0 < sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) <= 60_000
    finally:
        for t in transports:
            t.close()


# ------------------------------------------------------------------------- hostile frames


def _raw_frame(body, header, count, payload, rest=b""):
    return struct.pack("<QIIQ", body, header, count, payload) + rest


_BAD_FRAMES = {
    "parts exceed the frame": (_raw_frame(10, 8, 0, 8, b"x" * 10), "malformed frame"),
    "buffers do not add up": (
        _raw_frame(8 + 2 + 2 + 5, 2, 1, 2, struct.pack("<Q", 999) + b"hhpp" + b"b" * 5),
        "do not add up",
    ),
    "over the size limit": (_raw_frame(1 << 30, 0, 0, 1 << 30), "over the limit"),
    "more than memory": (_raw_frame(1 << 50, 0, 0, 1 << 50), "rank 0"),
}


def _inject(transport, raw):
    """Put bytes on the wire to the peer as they are, bypassing the framing."""
    if isinstance(transport, TcpTransport):
        transport._connections[1].sock.sendall(raw)
    else:
        channel = transport._channels[1]
        channel.outbox.put(0, raw)
        channel.outbox.commit(len(raw))
        channel.ring_bell()


@pytest.mark.parametrize("case", list(_BAD_FRAMES))
@pytest.mark.parametrize("cls", [ShmTransport, TcpTransport])
def test_a_bad_frame_ends_that_channel_with_a_clear_error(cls, case):
    raw, text = _BAD_FRAMES[case]
    limit = {"max_message_size": 1 << 20} if case == "over the size limit" else {}
    transports, hosts, addresses = _pair(cls, options=limit)
    try:
        assert not _connect(transports, addresses)
        _inject(transports[0], raw)
        deadline = time.monotonic() + 10
        while not hosts[1].lost and time.monotonic() < deadline:
            transports[1].poll()
            time.sleep(0.001)
        assert hosts[1].lost, "the receiver did not give up on the channel"
        ((peer, error),) = hosts[1].lost
        assert peer == 0 and isinstance(error, ConnectionError) and text in str(error), error
        assert hosts[1].messages == []
        # nothing more is read from that channel, and it stays lost
        assert transports[1].poll() == 0
    finally:
        for t in transports:
            t.close()


def test_tcp_send_to_a_peer_that_stops_reading_ends_at_its_deadline():
    transports, hosts, addresses = _pair(TcpTransport)
    outcome = []

    def send_big():
        message = Message(b"h", b"p", [torch.zeros(256 << 20, dtype=torch.uint8)])
        try:
            transports[0].send(1, message, timeout=0.5)  # rank 1 never polls
        except Exception as e:
            outcome.append(e)
        else:
            outcome.append(None)

    try:
        assert not _connect(transports, addresses)
        sender = threading.Thread(target=send_big)
        sender.start()
        sender.join(30)
        assert not sender.is_alive(), "the send is still blocked"
        (error,) = outcome
        # some bytes went before the peer's buffers filled: the stream is cut, the peer lost
        assert isinstance(error, rpc.PeerLostError) and "stopped reading" in str(error), error
        assert hosts[0].lost and hosts[0].lost[0][0] == 1
        expect = rpc.PeerLostError
        try:
            transports[0].send(1, Message(b"h", b"p"), timeout=0.5)
        except expect:
            pass
        else:
            raise AssertionError("a lost peer accepted another message")
    finally:
        for t in transports:
            t.close()
