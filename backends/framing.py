"""How one Message is laid out on a byte stream (the shm ring, a TCP socket).

    prefix  u64 body length | u32 header length | u32 buffer count | u64 payload length
    body    u64 length of each buffer | [i64 device code of each buffer] | header | payload |
            buffer bytes, back to back

The prefix says how much follows, so a reader can tell whether a whole message has arrived
and allocate every destination before copying. Device codes are present only when the top
bit of the buffer count is set (a message that involves a GPU): -1 for host memory, ``k`` for
bytes that land on ``cuda:k``, ``cuda.IPC | k`` for an IPC descriptor of memory that is copied
onto ``cuda:k`` (see ``cuda.py``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

import torch

from shmrpc.transport import Message, PeerLostError

from . import cuda

__all__ = [
    "PREFIX",
    "Frame",
    "assemble",
    "bare_message",
    "bare_prefix",
    "check_frame",
    "check_lengths",
    "describe",
    "for_the_wire",
    "is_bare",
    "small_message",
]

PREFIX = struct.Struct("<QIIQ")
#: What a frame may carry beyond ``max_message_size``: the envelope and tensor table.
_LIMIT_SLACK = 4096
_PLACED = 1 << 31  # buffer count flag: device codes follow the lengths
_HOST = -1


class Frame:
    """The parsed prefix of a message: sizes of its parts."""

    __slots__ = ("body", "buffer_count", "header", "payload", "placed")

    def __init__(self, prefix: bytes | bytearray | memoryview | tuple[int, int, int, int]) -> None:
        fields = prefix if isinstance(prefix, tuple) else PREFIX.unpack_from(prefix)
        self.body, self.header, count, self.payload = fields
        self.placed = bool(count & _PLACED)
        self.buffer_count = count & ~_PLACED

    @property
    def total(self) -> int:
        return PREFIX.size + self.body

    @property
    def lengths_size(self) -> int:
        """Bytes of the per-buffer table (lengths, and device codes if any)."""
        return (16 if self.placed else 8) * self.buffer_count

    def buffer_lengths(self, raw: bytes | bytearray | memoryview) -> Sequence[int]:
        return struct.unpack_from(f"<{self.buffer_count}Q", raw) if self.buffer_count else ()

    def device_codes(self, raw: bytes | bytearray | memoryview) -> Sequence[int]:
        if not self.placed:
            return ()
        return struct.unpack_from(f"<{self.buffer_count}q", raw, 8 * self.buffer_count)


def check_frame(frame: Frame, limit: int | None, who: str) -> None:
    """Refuse a prefix before anything is allocated for it: larger than ``limit`` (plus room
    for the envelope), or parts that do not fit in the length it claims. The channel cannot
    go on after a bad frame (the stream is out of step), so the peer is lost."""
    if limit is not None and frame.total > limit + _LIMIT_SLACK:
        raise PeerLostError(f"{who} sent a {frame.total}-byte message, over the limit")
    if frame.lengths_size + frame.header + frame.payload > frame.body:
        raise PeerLostError(f"{who} sent a malformed frame: its parts exceed its length")


def check_lengths(frame: Frame, lengths: Sequence[int], who: str) -> None:
    """The buffer lengths must fill the frame exactly."""
    if frame.lengths_size + frame.header + frame.payload + sum(lengths) != frame.body:
        raise PeerLostError(f"{who} sent a malformed frame: its buffers do not add up")


def for_the_wire(message: Message, ipc: bool) -> tuple[Message, list[int]]:
    """``message`` with host-memory buffers only, and the device code of each buffer.

    A CUDA buffer becomes an IPC descriptor (``ipc``: the peer shares this host and lands it
    on a GPU) or a staged host copy. Host messages pass unchanged, with no codes.
    """
    targets = message.targets
    if not targets and all(b.is_cpu for b in message.buffers):
        return message, []
    buffers: list[torch.Tensor] = []
    codes: list[int] = []
    for i, buffer in enumerate(message.buffers):
        target = targets[i] if targets else torch.device("cpu")
        to_gpu = target.type == "cuda"
        index = target.index or 0
        if buffer.is_cuda and ipc and to_gpu:
            buffers.append(cuda.share(buffer))
            codes.append(cuda.IPC | index)
            continue
        buffers.append(cuda.stage(buffer) if buffer.is_cuda else buffer)
        codes.append(index if to_gpu else _HOST)
    return Message(message.header, message.payload, buffers), codes


def describe(message: Message, codes: Sequence[int] = ()) -> tuple[bytes, int]:
    """The prefix and buffer table of ``message``, and its total size on the stream."""
    header, payload, buffers = len(message.header), len(message.payload), message.buffers
    if not buffers:
        return PREFIX.pack(header + payload, header, 0, payload), PREFIX.size + header + payload
    lengths = [b.numel() for b in buffers]
    n = len(lengths)
    if not codes:
        body = 8 * n + header + payload + sum(lengths)
        return struct.pack(f"<QIIQ{n}Q", body, header, n, payload, *lengths), PREFIX.size + body
    body = 16 * n + header + payload + sum(lengths)
    head = struct.pack(f"<QIIQ{n}Q{n}q", body, header, n | _PLACED, payload, *lengths, *codes)
    return head, PREFIX.size + body


def assemble(
    frame: Frame,
    table: bytes | bytearray | memoryview,
    header: bytes | bytearray | memoryview,
    payload: bytes | bytearray | memoryview,
    buffers: list[torch.Tensor],
) -> Message:
    """The received message, each buffer on the device its code names."""
    for i, code in enumerate(frame.device_codes(table)):
        if code == _HOST:
            continue
        device = torch.device("cuda", code & ~cuda.IPC)
        try:
            if code & cuda.IPC:
                buffers[i] = cuda.open_shared(buffers[i], device)
            else:
                buffers[i] = cuda.land(buffers[i], device)
        except Exception as e:  # the channel cannot go on past a message it cannot deliver
            raise PeerLostError(f"could not place a buffer on {device}: {e}") from e
    return Message(bytes(header), payload, buffers)


def small_message(
    frame: Frame, meta: bytes, copy_buffer: Callable[[int, memoryview], None]
) -> Message:
    """Build a small, fully arrived message.

    ``meta`` holds the buffer lengths, header and payload; ``copy_buffer(n, out)`` copies the
    next ``n`` bytes of buffer data into ``out``. All buffers share one allocation, each at a
    16-byte aligned offset (enough for every dtype), and become tensors without another copy.
    """
    lengths = frame.buffer_lengths(meta)
    check_lengths(frame, lengths, "the peer")
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
    return assemble(frame, meta, header, payload, buffers)


# A *bare* message has no buffers: prefix, header and payload only. Most small calls are bare
# (their tensors travel inline in the header's tensor table), so both transports read and write
# them on a short path that builds no Frame and checks only what matters.


def bare_prefix(header: bytes, payload: bytes | bytearray | memoryview) -> bytes:
    """The prefix of a bare message."""
    return PREFIX.pack(len(header) + len(payload), len(header), 0, len(payload))


def is_bare(prefix: tuple[int, int, int, int], limit: int | None) -> bool:
    """Whether ``prefix`` announces a well-formed bare message within ``limit``.

    Anything else (buffers, a malformed or oversized frame) takes the general path, which
    checks it in full (`check_frame`).
    """
    body, header, count, payload = prefix
    within = limit is None or body <= limit + _LIMIT_SLACK
    return not count and header + payload == body and within


def bare_message(body: bytes, header_size: int) -> Message:
    """The message whose prefix said ``header_size`` and whose body is ``body``."""
    return Message(body[:header_size], memoryview(body)[header_size:])
