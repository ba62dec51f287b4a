"""A single-producer, single-consumer byte stream in a shared-memory segment.

Layout: a 4 KiB control page, then ``capacity`` data bytes (a power of two). The control page
holds ``head`` (bytes ever written; stored only by the producer) and ``tail`` (bytes ever
read; stored only by the consumer) on separate cache lines. Both only grow, so the position
in the data area is ``count & (capacity - 1)`` and no wrap flag is needed; a record may
straddle the end of the area, and copies split in two there.

Memory ordering: the producer copies data, then stores ``head``; the consumer loads ``head``,
copies data out, then stores ``tail``. Each step is a separate C call (memoryview/numpy), and
x86-64 keeps stores in program order (TSO), so a consumer that sees a new ``head`` sees its
data. On weakly ordered CPUs only the doorbell semaphore (sem_post/sem_wait synchronise
memory) orders them; the shm transport therefore spins only on x86-64.
"""

from __future__ import annotations

import mmap
import struct
from typing import Any

import numpy as np

__all__ = ["CONTROL_BYTES", "Ring"]

CONTROL_BYTES = 4096
# Indexes into the control page as u64, each on its own cache line. POLLING is stored by the
# consumer ("a thread of mine is polling this ring: no need to ring my doorbell").
_HEAD, _TAIL, _CAPACITY, _MAGIC, _POLLING = 0, 8, 16, 24, 32
_MAGIC_VALUE = 0x5348_4D52_5043_5231  # "SHMRPCR1"


class Ring:
    """One direction of a channel. The producer and the consumer are different processes."""

    def __init__(self, segment: mmap.mmap, capacity: int, *, create: bool) -> None:
        if capacity & (capacity - 1) or len(segment) < CONTROL_BYTES + capacity:
            raise ValueError(f"bad ring capacity {capacity} for a {len(segment)}-byte segment")
        self._segment = segment
        self._control = memoryview(segment)[:CONTROL_BYTES].cast("Q")
        if create:
            self._control[_HEAD] = self._control[_TAIL] = self._control[_POLLING] = 0
            self._control[_CAPACITY] = capacity
            self._control[_MAGIC] = _MAGIC_VALUE
        elif self._control[_MAGIC] != _MAGIC_VALUE or self._control[_CAPACITY] != capacity:
            raise ValueError("shared segment does not hold a shmrpc ring of this size")
        self.capacity = capacity
        self._mask = capacity - 1
        self._bytes = memoryview(segment)[CONTROL_BYTES : CONTROL_BYTES + capacity]
        self._array = np.frombuffer(segment, dtype=np.uint8, count=capacity, offset=CONTROL_BYTES)
        # Each side caches the counter it alone stores.
        self._head = self._control[_HEAD]
        self._tail = self._control[_TAIL]

    def close(self) -> None:
        """Drop this process's views so the segment can be unmapped."""
        self._control.release()
        self._bytes.release()
        del self._array

    # ---------------------------------------------------------------------------- producer
    def writable(self) -> int:
        """Bytes the producer may write now."""
        return self.capacity - (self._head - self._control[_TAIL])

    def put(self, offset: int, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        """Copy ``data`` to ``offset`` bytes past the head. The caller checked ``writable``."""
        n = len(data)
        start = (self._head + offset) & self._mask
        first = min(n, self.capacity - start)
        if isinstance(data, np.ndarray):
            self._array[start : start + first] = data[:first]
            if first < n:
                self._array[: n - first] = data[first:]
        else:
            self._bytes[start : start + first] = data[:first] if first < n else data
            if first < n:
                self._bytes[: n - first] = data[first:]

    def commit(self, n: int) -> None:
        """Publish ``n`` written bytes to the consumer."""
        self._head += n
        self._control[_HEAD] = self._head

    def reader_polling(self) -> bool:
        """Whether the consumer said it is polling (then it needs no wake-up)."""
        return bool(self._control[_POLLING])

    # ---------------------------------------------------------------------------- consumer
    def readable(self) -> int:
        """Bytes the consumer may read now."""
        return self._control[_HEAD] - self._tail

    def get(self, offset: int, n: int) -> bytes:
        """``n`` bytes from ``offset`` past the tail, as a new bytes object."""
        start = (self._tail + offset) & self._mask
        first = self.capacity - start
        if n <= first:
            return bytes(self._bytes[start : start + n])
        return bytes(self._bytes[start:]) + bytes(self._bytes[: n - first])

    def unpack(self, layout: struct.Struct, offset: int = 0) -> tuple[Any, ...]:
        """Unpack ``layout`` from ``offset`` bytes past the tail."""
        start = (self._tail + offset) & self._mask
        if start + layout.size <= self.capacity:
            return layout.unpack_from(self._bytes, start)
        return layout.unpack(self.get(offset, layout.size))

    def get_into(self, offset: int, n: int, out: np.ndarray | memoryview) -> None:
        """Copy ``n`` bytes from ``offset`` past the tail into ``out[:n]``."""
        start = (self._tail + offset) & self._mask
        first = min(n, self.capacity - start)
        source: Any = self._array if isinstance(out, np.ndarray) else self._bytes
        out[:first] = source[start : start + first]
        if first < n:
            out[first:n] = source[: n - first]

    def set_polling(self, polling: bool) -> None:
        self._control[_POLLING] = int(polling)

    def release(self, n: int) -> None:
        """Give ``n`` read bytes back to the producer."""
        self._tail += n
        self._control[_TAIL] = self._tail
