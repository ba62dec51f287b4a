"""Fuzzing what an untrusted or broken peer can put on the wire (hypothesis).

Every case must end cleanly: either the bytes form good messages and arrive intact, or the
receiver ends that peer's channel with a clear error; it never hangs, crashes its poll, or
delivers garbage. The handshake must refuse anything but the right key's answer.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmrpc.backends.auth import AuthenticationError, answer_challenge, deliver_challenge
from shmrpc.backends.framing import PREFIX, describe
from shmrpc.backends.shm import ShmTransport
from shmrpc.backends.tcp import TcpTransport
from shmrpc.transport import Message
from tests.test_backends import _connect, _inject, _pair

FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
#: Each wire case sets up a pair of transports: fewer examples, the same variety of kinds.
WIRE_FUZZ = settings(FUZZ, max_examples=25)


def _frame(header: bytes, payload: bytes, buffers: list[bytes]) -> bytes:
    tensors = [torch.tensor(list(b), dtype=torch.uint8) for b in buffers]
    head, _ = describe(Message(header, payload, tensors))
    return head + header + payload + b"".join(buffers)


@st.composite
def wire_bytes(draw):
    """Random bytes, good frames, good frames cut short, and frames with one field changed."""
    kind = draw(st.sampled_from(["random", "good", "truncated", "mutated"]))
    if kind == "random":
        return kind, draw(st.binary(min_size=1, max_size=512))
    parts = draw(
        st.tuples(
            st.binary(max_size=64),
            st.binary(max_size=256),
            st.lists(st.binary(max_size=300), max_size=3),
        )
    )
    raw = _frame(*parts)
    if kind == "good":
        return kind, raw
    if kind == "truncated":
        return kind, raw[: draw(st.integers(1, len(raw) - 1))]
    field = draw(st.integers(0, 3))
    value = draw(st.sampled_from([0, 1, 7, 1 << 20, 1 << 31, (1 << 32) - 1]))
    fields = list(PREFIX.unpack_from(raw))
    fields[field] = min(value, (1 << 32) - 1) if field in (1, 2) else value
    mutated = PREFIX.pack(*fields) + raw[PREFIX.size :]
    return ("good" if mutated == raw else kind), mutated


def _drain(transport, until, seconds=10.0):
    """Poll until ``until()`` or ``seconds`` pass. A poll never waits for the rest of a
    message (both transports keep per-channel receive state), so one thread does it all."""
    deadline = time.monotonic() + seconds
    while not until() and time.monotonic() < deadline:
        transport.poll()
        time.sleep(0.0005)


@pytest.mark.parametrize("cls", [ShmTransport, TcpTransport])
@WIRE_FUZZ
@given(case=wire_bytes())
def test_what_a_peer_puts_on_the_wire_ends_cleanly(cls, case):
    kind, raw = case
    transports, hosts, addresses = _pair(cls, options={"max_message_size": 1 << 20})
    try:
        assert not _connect(transports, addresses)
        host = hosts[1]
        _inject(transports[0], raw)
        if kind == "good":
            _drain(transports[1], lambda: host.messages or host.lost)
            assert not host.lost and len(host.messages) == 1, (host.lost, host.messages)
            return
        _drain(transports[1], lambda: host.lost, 0.05)  # a short frame waits for more
        if kind == "truncated":
            assert not host.messages, "part of a frame was delivered as a message"
        # incomplete or inconsistent: once the sender is gone, the channel must end
        transports[0].close()
        _drain(transports[1], lambda: host.lost)
        assert host.lost, "the receiver never gave up on a broken stream"
        assert all(isinstance(error, ConnectionError) for _, error in host.lost)
    finally:
        for t in transports:
            t.close()


@pytest.mark.parametrize("cls", [ShmTransport, TcpTransport])
def test_a_slow_sender_byte_by_byte_is_read_intact(cls):
    transports, hosts, addresses = _pair(cls)
    try:
        assert not _connect(transports, addresses)
        raw = _frame(b"header", b"payload" * 20, [bytes(range(256)) * 4, b"x" * 99])
        for i in range(len(raw)):  # a byte, then a poll that takes it and returns
            _inject(transports[0], raw[i : i + 1])
            transports[1].poll()
        _drain(transports[1], lambda: hosts[1].messages)
        ((peer, message),) = hosts[1].messages
        assert peer == 0 and message.header == b"header"
        assert bytes(message.payload) == b"payload" * 20
        assert [bytes(b.numpy()) for b in message.buffers] == [bytes(range(256)) * 4, b"x" * 99]
    finally:
        for t in transports:
            t.close()


@FUZZ
@given(replies=st.lists(st.binary(max_size=300), min_size=1, max_size=4))
def test_the_handshake_refuses_anything_but_the_right_answer(replies):
    ours, theirs = socket.socketpair()
    ours.settimeout(2)
    try:
        for reply in replies:  # a stranger's answers, length-prefixed as the protocol wants
            theirs.sendall(struct.pack("<H", min(len(reply), 0xFFFF)) + reply)
        theirs.shutdown(socket.SHUT_WR)
        with pytest.raises((AuthenticationError, ConnectionError, TimeoutError)):
            deliver_challenge(ours, b"the world's key")
    finally:
        ours.close()
        theirs.close()


@FUZZ
@given(challenge=st.binary(max_size=300))
def test_answering_a_stranger_reveals_nothing_useful_and_fails(challenge):
    ours, theirs = socket.socketpair()
    ours.settimeout(2)
    try:
        theirs.sendall(struct.pack("<H", len(challenge)) + challenge)
        theirs.shutdown(socket.SHUT_WR)
        with pytest.raises((AuthenticationError, ConnectionError, TimeoutError)):
            answer_challenge(ours, b"the world's key")
    finally:
        ours.close()
        theirs.close()
