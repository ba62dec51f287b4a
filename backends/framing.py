"""How one Message is laid out on a byte stream (the shm ring, a TCP socket).

    prefix  u64 body length | u32 header length | u32 buffer count | u64 payload length
    body    u64 length of each buffer | header | payload | buffer bytes, back to back

The prefix says how much follows, so a reader can tell whether a whole message has arrived
and allocate every destination before copying.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

import torch

from shmrpc.transport import Message

__all__ = ["PREFIX", "Frame", "describe", "small_message"]

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


def small_message(
    frame: Frame, meta: bytes, copy_buffer: Callable[[int, memoryview], None]
) -> Message:
    """Build a small, fully arrived message.

    ``meta`` holds the buffer lengths, header and payload; ``copy_buffer(n, out)`` copies the
    next ``n`` bytes of buffer data into ``out``. All buffers share one allocation, each at a
    16-byte aligned offset (enough for every dtype), and become tensors without another copy.
    """
    lengths = frame.buffer_lengths(meta)
    at = frame.lengths_size
    header = meta[at : at + frame.header]
    payload = memoryview(meta)[at + frame.header :]
    buffers = []
    if lengths:
        offsets, size = [], 0
        for n in lengths:
            offsets.append(size)
            size += (n + 15) & ~15
        store = bytearray(size)
        view = memoryview(store)
        for n, offset in zip(lengths, offsets, strict=True):
            copy_buffer(n, view[offset : offset + n])
            buffers.append(
                torch.frombuffer(store, dtype=torch.uint8, count=n, offset=offset)
                if n
                else torch.empty(0, dtype=torch.uint8)
            )
    return Message(header, payload, buffers)
