"""Mutual HMAC challenge-response: prove knowledge of the world's key before any pickle flows.

The shape of CPython's multiprocessing.connection ``deliver_challenge``/``answer_challenge``:
one side sends a random nonce, the other answers with HMAC-SHA256(key, nonce), and the roles
then swap, so each side has authenticated the other. Messages are short length-prefixed byte
strings; nothing here is ever unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct

__all__ = [
    "AuthenticationError",
    "answer_challenge",
    "deliver_challenge",
    "recv_small",
    "send_small",
]

_CHALLENGE = b"#SHMRPC-CHALLENGE#"
_WELCOME = b"#SHMRPC-WELCOME#"
_FAILURE = b"#SHMRPC-FAILURE#"
_NONCE_BYTES = 32
_MAX = 256


class AuthenticationError(ConnectionError):
    """The other side does not know the world's key."""


def send_small(sock: socket.socket, data: bytes) -> None:
    sock.sendall(struct.pack("<H", len(data)) + data)


def recv_small(sock: socket.socket) -> bytes:
    (n,) = struct.unpack("<H", _recv_exact(sock, 2))
    if n > _MAX:
        raise AuthenticationError(f"handshake message of {n} bytes is too long")
    return _recv_exact(sock, n)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:  # not a wrong key: the other side went away (a dialer may retry)
            raise ConnectionResetError("connection closed during the handshake")
        data += chunk
    return data


def _digest(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def deliver_challenge(sock: socket.socket, key: bytes) -> None:
    """Challenge the peer; raise AuthenticationError unless it proves it knows ``key``."""
    message = _CHALLENGE + os.urandom(_NONCE_BYTES)
    send_small(sock, message)
    response = recv_small(sock)
    if hmac.compare_digest(response, _digest(key, message)):
        send_small(sock, _WELCOME)
    else:
        send_small(sock, _FAILURE)
        raise AuthenticationError("peer failed the challenge: wrong key")


def answer_challenge(sock: socket.socket, key: bytes) -> None:
    """Answer the peer's challenge; raise AuthenticationError if it rejects the answer."""
    message = recv_small(sock)
    if not message.startswith(_CHALLENGE) or len(message) != len(_CHALLENGE) + _NONCE_BYTES:
        raise AuthenticationError("peer sent no valid challenge")
    send_small(sock, _digest(key, message))
    if recv_small(sock) != _WELCOME:
        raise AuthenticationError("peer rejected our key")
