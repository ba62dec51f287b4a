"""A single timer thread for the deadlines of asynchronous calls.

Synchronous waits enforce their own timeouts; futures returned by ``rpc_async`` need someone
to fail them when their time is up. One thread and one heap serve every call: scheduling costs
a heap push. Cancelled entries are dropped when they reach the top of the heap, and calls
mostly end in the order they began, so the heap holds about as many entries as there are
calls in flight. The thread is woken only by a deadline earlier than the one it sleeps until.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections.abc import Callable

__all__ = ["Deadlines"]

#: The smallest heap that is swept of cancelled entries below its top.
_COMPACT_AT = 4096


class _Entry:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Deadlines:
    """Runs callbacks at monotonic times. Callbacks must be quick and must not raise."""

    def __init__(self, name: str = "shmrpc-deadlines") -> None:
        self._heap: list[tuple[float, int, _Entry]] = []
        self._order = itertools.count()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        #: The time the timer thread sleeps until (inf: until notified; -inf: it is awake and
        #: looks at the heap before it sleeps again). Only an earlier deadline wakes it.
        self._sleeping_until = -math.inf
        #: The heap's size that triggers a sweep (amortized: twice the live entries after one).
        self._compact_at = _COMPACT_AT
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def schedule(self, when: float, callback: Callable[[], None]) -> _Entry:
        entry = _Entry(when, callback)
        with self._cond:
            if self._closed:
                raise RuntimeError("deadline timer is closed")
            # Calls mostly end in the order they began, so the entries of finished ones
            # gather at the top: dropping them here keeps the heap as small as the number
            # of calls in flight. (Left in, thousands of dead entries made the garbage
            # collector run full collections: several µs per call.)
            self._drop_cancelled_top()
            heap = self._heap
            heapq.heappush(heap, (when, next(self._order), entry))
            if when < self._sleeping_until:
                self._sleeping_until = -math.inf
                self._cond.notify()
            if len(heap) > self._compact_at:  # dead entries below the top: sweep them out
                self._heap = [item for item in heap if not item[2].cancelled]
                heapq.heapify(self._heap)
                self._compact_at = max(_COMPACT_AT, 2 * len(self._heap))
        return entry

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    self._drop_cancelled_top()
                    heap = self._heap
                    if not heap:
                        self._sleep(math.inf)
                        continue
                    delay = heap[0][0] - time.monotonic()
                    if delay <= 0:
                        entry = heapq.heappop(heap)[2]
                        break
                    self._sleep(heap[0][0], delay)
                else:
                    return
            entry.callback()

    def _drop_cancelled_top(self) -> None:
        """Pop cancelled entries off the top of the heap (the caller holds the condition)."""
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)

    def _sleep(self, until: float, delay: float | None = None) -> None:
        """Wait (holding the condition) until ``delay`` passes or an earlier deadline comes."""
        self._sleeping_until = until
        self._cond.wait(delay)
        self._sleeping_until = -math.inf
