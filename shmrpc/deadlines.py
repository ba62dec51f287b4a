"""A single timer thread for the deadlines of asynchronous calls.

Synchronous waits enforce their own timeouts; futures returned by ``rpc_async`` need someone
to fail them when their time is up. One thread and one heap serve every call: scheduling costs
a heap push, and cancelled entries are dropped lazily.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

__all__ = ["Deadlines"]


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
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def schedule(self, when: float, callback: Callable[[], None]) -> _Entry:
        entry = _Entry(when, callback)
        with self._cond:
            if self._closed:
                raise RuntimeError("deadline timer is closed")
            heap = self._heap
            heapq.heappush(heap, (when, next(self._order), entry))
            if heap[0][2] is entry:
                self._cond.notify()
            if len(heap) > 4096 and len(heap) > 2 * sum(not e.cancelled for _, _, e in heap):
                self._heap = [item for item in heap if not item[2].cancelled]
                heapq.heapify(self._heap)
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
                    heap = self._heap
                    while heap and heap[0][2].cancelled:
                        heapq.heappop(heap)
                    if not heap:
                        self._cond.wait()
                        continue
                    delay = heap[0][0] - time.monotonic()
                    if delay <= 0:
                        entry = heapq.heappop(heap)[2]
                        break
                    self._cond.wait(delay)
                else:
                    return
            entry.callback()
