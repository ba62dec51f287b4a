"""A single-producer, single-consumer byte stream in shared memory (shm.py maps a memfd).

Layout: a 4 KiB control page, then ``capacity`` data bytes (a power of two). The control page
holds ``head`` (bytes ever written; stored only by the producer) and ``tail`` (bytes ever
read; stored only by the consumer) on separate cache lines. Both only grow, so the position
in the data area is ``count & (capacity - 1)`` and no wrap flag is needed; a record may
straddle the end of the area, and copies split in two there.

Memory ordering. The producer copies data, then stores ``head``; the consumer loads ``head``,
copies data out, then stores ``tail``; the producer loads ``tail`` before it overwrites what
the consumer released. Each step is a separate C call (memoryview/numpy), so program order
is kept at the compiler level; what remains is the CPU:

* x86 (`TSO`): stores become visible in program order, loads are not reordered with
  older loads, and stores not with older loads; the one reordering it allows (a load ahead
  of an older store) does not matter to these four steps, so they need no barrier. The
  ring's methods are plain loads and stores; this is the path that runs on x86-64.
* Elsewhere (ARM, POWER, RISC-V: weakly ordered), each ring gets fenced methods at
  construction: a barrier between the data copy and the store of ``head`` (release, in
  `Ring.commit`), between the load of ``head`` and the copy out (acquire, in
  `Ring.readable` when it finds data), between the copy out and the store of ``tail``
  (in `Ring.release`), and between the load of ``tail`` and the copy in (in
  `Ring.writable`). Python has no fence instruction; `ordering_fence` takes and
  drops a lock twice, so that a release (the first unlock) is followed in program order by an
  acquire (the second lock): on ARMv8 a store-release followed by a load-acquire is not
  reordered, and POWER's release is an ``lwsync``, so nothing before the fence is reordered
  with anything after it in the ways the ring cares about (two uncontended lock round trips:
  0.2 µs on this x86 machine, where it is not used).

The doorbell protocol in ``shm.py`` (skip the wake-up when the reader says it polls) needs a
store-load fence that only x86's locked instructions give cheaply, so off x86 the doorbell is
always rung and nothing spins; the fences above are what make a poll that does not follow a
wake-up (any poll, on any thread) read whole messages there.
"""

from __future__ import annotations

import mmap
import platform
import struct
import threading
from typing import Any

import numpy as np

__all__ = ["CONTROL_BYTES", "TSO", "Ring", "full_fence", "ordering_fence"]

CONTROL_BYTES = 4096
# Indexes into the control page as u64, each on its own cache line. POLLING is stored by the
# consumer ("a thread of mine is polling this ring: no need to ring my doorbell").
_HEAD, _TAIL, _CAPACITY, _MAGIC, _POLLING = 0, 8, 16, 24, 32
_MAGIC_VALUE = 0x5348_4D52_5043_5231  # "SHMRPCR1"

#: Total store order: x86 keeps the ring's stores and loads in program order by itself.
#: Read when a Ring is built (tests set it False to run the fenced path here).
TSO = platform.machine().lower() in {"x86_64", "amd64", "i386", "i686"}

_fence_lock = threading.Lock()


def full_fence() -> None:
    """A full memory barrier on x86: lock acquire/release are lock-prefixed instructions."""
    _fence_lock.acquire()
    _fence_lock.release()


def ordering_fence() -> None:
    """Order every load and store before it with every one after it, on any CPU.

    One acquire/release pair is not enough off x86: an acquire only keeps later accesses
    after it and a release only keeps earlier ones before it, so accesses on both sides may
    meet inside the pair and swap. Twice over, the first release is followed by the second
    acquire, which weakly ordered CPUs keep in order (ARMv8's acquire/release are RCsc;
    POWER's release is a two-sided ``lwsync``).
    """
    lock = _fence_lock
    lock.acquire()
    lock.release()
    lock.acquire()
    lock.release()


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
        if not TSO:  # weakly ordered CPU: the fenced variants (module docstring)
            self.writable = self._writable_fenced  # type: ignore[method-assign]
            self.commit = self._commit_fenced  # type: ignore[method-assign]
            self.readable = self._readable_fenced  # type: ignore[method-assign]
            self.release = self._release_fenced  # type: ignore[method-assign]

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

    # ------------------------------------------------------- weakly ordered CPUs (not x86)
    def _writable_fenced(self) -> int:
        room = self.capacity - (self._head - self._control[_TAIL])
        ordering_fence()  # the consumer's copy out is done before we overwrite those bytes
        return room

    def _commit_fenced(self, n: int) -> None:
        ordering_fence()  # the data is visible before the head that publishes it
        self._head += n
        self._control[_HEAD] = self._head

    def _readable_fenced(self) -> int:
        available = self._control[_HEAD] - self._tail
        if available:
            ordering_fence()  # the data is read only after the head that published it
        return available

    def _release_fenced(self, n: int) -> None:
        ordering_fence()  # the copy out is done before the producer may reuse the bytes
        self._tail += n
        self._control[_TAIL] = self._tail
