"""The agent's wire header: what kind of message this is and which request it belongs to.

Every message the engine sends starts with this fixed 32-byte header, followed by the tensor
table of its payload. It is the agent's protocol; transports never look inside.
"""

from __future__ import annotations

import dataclasses
import enum
import struct

__all__ = ["HEADER_SIZE", "Envelope", "Flag", "Kind", "decode", "encode"]


class Kind(enum.IntEnum):
    """Message kinds. Requests ask a peer for something; every request gets one reply."""

    # replies
    RESULT = 1  # the value a request produced
    ERROR = 2  # the request failed: payload is errors.RemoteError

    # requests served by the agent itself
    CALL = 16  # run a Python callable: payload (func, args, kwargs)
    GATHER = 17  # all-gather, follower → leader: (sequence id, worker name, object)
    BROADCAST = 18  # all-gather, leader → followers: (sequence id, {name: object})

    # RRef protocol (served by the RRef context)
    REMOTE_CALL = 32  # run a callable and keep its result in an OwnerRRef
    RREF_FETCH = 33  # to_here(): the OwnerRRef's value
    RREF_FORK_REQUEST = 34  # a new UserRRef introduces itself to the owner
    RREF_CHILD_ACCEPT = 35  # the owner knows the child: its parent may let go
    RREF_USER_DELETE = 36  # a UserRRef is gone
    RREF_TYPE = 37  # type of the owner's value (for proxies)

    # distributed autograd (served by the autograd engine)
    AUTOGRAD_BACKWARD = 48  # gradients for a send function: run the backward pass from it
    AUTOGRAD_CLEANUP = 49  # one-way: an autograd context was released; release it here too


REPLIES = frozenset({Kind.RESULT, Kind.ERROR})


class Flag:
    """Header flag bits (plain ints: they are tested on every message, enums are slow)."""

    NONE = 0
    #: Engine housekeeping (barriers, RRef bookkeeping): not counted as user work when the
    #: graceful shutdown waits for all outstanding work to finish.
    INTERNAL = 1
    #: A one-way notification: the receiver runs its handler and sends no reply.
    NO_REPLY = 2


_HEADER = struct.Struct("<BBHIqqq")
HEADER_SIZE = _HEADER.size


@dataclasses.dataclass(slots=True)
class Envelope:
    kind: int
    request_id: int
    flags: int = 0
    #: Distributed autograd: the context the message belongs to (-1: none) and the id that
    #: pairs its send and recv functions.
    autograd_context: int = -1
    autograd_message: int = -1


def encode(
    kind: int,
    request_id: int,
    flags: int = 0,
    table: bytes = b"",
    autograd_context: int = -1,
    autograd_message: int = -1,
) -> bytes:
    """The header of a message: the fixed envelope, then the tensor table."""
    header = _HEADER.pack(
        kind, flags, 0, len(table), request_id, autograd_context, autograd_message
    )
    return header + table if table else header


def decode(header: bytes) -> tuple[Envelope, bytes]:
    """The envelope and the tensor table that follows it."""
    kind, flags, _, table_len, request_id, context, message = _HEADER.unpack_from(header)
    table = header[HEADER_SIZE : HEADER_SIZE + table_len]
    return Envelope(kind, request_id, flags, context, message), table
