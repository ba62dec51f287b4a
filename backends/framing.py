"""How one Message is laid out on a byte stream (the shm ring, a TCP socket).

    prefix  u64 body length | u32 header length | u32 buffer count | u64 payload length
    body    u64 length of each buffer | header | payload | buffer bytes, back to back

The prefix says how much follows, so a reader can tell whether a whole message has arrived
and allocate every destination before copying.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from shmrpc.transport import Message

__all__ = ["PREFIX", "Frame", "describe"]

PREFIX = struct.Struct("<QIIQ")


class Frame:
    """The parsed prefix of a message: sizes of its parts."""

    __slots__ = ("body", "buffer_count", "header", "payload")

    def __init__(self, prefix: bytes | bytearray | memoryview | tuple[int, int, int, int]) -> None:
        fields = prefix if isinstance(prefix, tuple) else PREFIX.unpack_from(prefix)
        self.body, self.header, self.buffer_count, self.payload = fields

    @property
    def total(self) -> int:
        return PREFIX.size + self.body

    @property
    def lengths_size(self) -> int:
        return 8 * self.buffer_count

    def buffer_lengths(self, raw: bytes | bytearray | memoryview) -> Sequence[int]:
        return struct.unpack_from(f"<{self.buffer_count}Q", raw) if self.buffer_count else ()


def describe(message: Message) -> tuple[bytes, int]:
    """The prefix and buffer-length table of ``message``, and its total size on the stream."""
    header, payload, buffers = len(message.header), len(message.payload), message.buffers
    if not buffers:
        return PREFIX.pack(header + payload, header, 0, payload), PREFIX.size + header + payload
    lengths = [b.numel() for b in buffers]
    body = 8 * len(lengths) + header + payload + sum(lengths)
    head = struct.pack(f"<QIIQ{len(lengths)}Q", body, header, len(lengths), payload, *lengths)
    return head, PREFIX.size + body
