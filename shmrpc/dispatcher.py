"""The agent's threads: a pool that runs work and keeps one thread watching each transport.

What makes a call fast on a 2-core machine is fewer thread switches, not faster code: a
thread-pool hand-off costs ~40 µs here, a blocking wake-up tens of µs, and two threads
spinning in one process fight over the GIL. So:

* **Inline first.** The thread watching a transport runs the request it finds itself and keeps
  watching afterwards; a ping-pong of calls runs on one hot thread. A batch of requests fans
  out: the watcher keeps one, idle pool threads take the rest.
* **Watchdog.** A handler may block (``time.sleep``, a lock, I/O). While inline work is under
  way a watchdog looks every ``grace`` seconds, and hands the watch of a transport whose
  watcher has been busy longer than that to an idle thread, so other messages keep flowing.
* **One spinner.** A watcher spins briefly on cheap transports before it blocks, but only when
  no handler runs and no caller spins in this process (``wait_reply`` spins for sync callers).
  Spinning is always bounded in time.
* **Hand-off before blocking.** A sync caller that holds the watch (a nested call inside an
  inline handler) gives the watch away before it blocks.

At most ``num_threads`` work items run at once (torch's ``num_worker_threads``); one thread
more per transport exists so a transport can always be watched, even when every worker is
blocked in user code, which is what keeps nested calls from deadlocking.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from .transport import Transport

__all__ = ["Dispatcher"]

logger = logging.getLogger(__name__)

#: A unit of work: a callable and its arguments.
Work = tuple[Callable[..., None], tuple[Any, ...]]

#: Longest single block inside Transport.wait; the watcher re-checks for shutdown after it.
_WAIT_SLICE = 1.0
#: How long inline work may hold a transport's watch before the watchdog frees it.
_GRACE = 0.002
#: The watchdog stops ticking after this long without inline work.
_WATCHDOG_IDLE = 1.0


class Dispatcher:
    def __init__(self, num_threads: int, spin_seconds: float, name: str = "shmrpc") -> None:
        self._max_running = num_threads
        self._spin = spin_seconds
        self._name = name
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[Work] = deque()
        self._running = 0
        self._watchers: dict[Transport, threading.Thread | None] = {}
        self._inline_since: dict[Transport, tuple[float, threading.Thread]] = {}
        self._cheap: list[Transport] = []
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._local = threading.local()
        self._last_activity = 0.0
        self._spinners = 0
        self._spin_lock = threading.Lock()
        self._watchdog_cond = threading.Condition(threading.Lock())
        self._watchdog_ticking = False

    # ------------------------------------------------------------------------------ control
    def start(self, transports: Sequence[Transport]) -> None:
        self._watchers = dict.fromkeys(transports)
        self._cheap = [t for t in transports if t.cheap_poll]
        targets = [self._run] * (self._max_running + len(transports)) + [self._watchdog]
        for i, target in enumerate(targets):
            thread = threading.Thread(target=target, name=f"{self._name}-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking work; wait up to ``timeout`` for threads still running user code."""
        with self._cond:
            self._stopping = True
            self._queue.clear()
            self._cond.notify_all()
        with self._watchdog_cond:
            self._watchdog_cond.notify_all()
        for transport in self._watchers:
            transport.interrupt()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def thread_count(self) -> int:
        return self._max_running

    def idle_threads(self) -> int:
        return self._max_running - self._running

    # ------------------------------------------------------------------------------- intake
    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on a pool thread (a watcher collects it into its batch)."""
        batch: list[Work] | None = getattr(self._local, "batch", None)
        if batch is not None:
            batch.append((fn, args))
            return
        with self._cond:
            if self._stopping:
                return
            self._queue.append((fn, args))
            self._cond.notify()

    def wait_reply(self, done: Callable[[], bool], latch: threading.Lock, timeout: float) -> bool:
        """Wait until ``done()``; ``latch`` is released when it is. False on timeout.

        Spins on the cheap transports first (the reply usually arrives within microseconds,
        and polling delivers it on this very thread), then blocks on ``latch``.
        """
        cheap = self._cheap
        if cheap and self._spin and not done():
            with self._spin_lock:
                self._spinners += 1
            for transport in cheap:
                transport.spin_begin()
            try:
                polls = [t.poll for t in cheap]
                end = time.monotonic() + self._spin
                while not done() and time.monotonic() < end:
                    for poll in polls:
                        poll()
            finally:
                for transport in cheap:
                    transport.spin_end()
                with self._spin_lock:
                    self._spinners -= 1
            for transport in cheap:
                transport.poll()  # what arrived while peers thought we were polling
        if done():
            return True
        self._give_up_watch()
        return latch.acquire(timeout=timeout if timeout > 0 else -1)

    # ------------------------------------------------------------------------------ threads
    def _run(self) -> None:
        cond = self._cond
        while True:
            work: Work | None = None
            transport: Transport | None = None
            with cond:
                while True:
                    if self._stopping:
                        return
                    transport = next((t for t, w in self._watchers.items() if w is None), None)
                    if transport is not None:
                        self._watchers[transport] = threading.current_thread()
                        break
                    if self._queue and self._running < self._max_running:
                        work = self._queue.popleft()
                        self._running += 1
                        if self._queue and self._running < self._max_running:
                            cond.notify()
                        break
                    cond.wait()
            if transport is not None:
                self._watch(transport)
            elif work is not None:
                self._execute(work)

    def _execute(self, work: Work) -> None:
        fn, args = work
        try:
            fn(*args)
        except BaseException:
            logger.exception("shmrpc: unhandled error in %s", getattr(fn, "__qualname__", fn))
        finally:
            self._last_activity = time.monotonic()
            with self._cond:
                self._running -= 1
                if self._queue:
                    self._cond.notify()

    def _watch(self, transport: Transport) -> None:
        """Watch ``transport``, running what it yields, until another thread takes the watch."""
        local = self._local
        me = threading.current_thread()
        batch: list[Work] = []
        local.watching, local.batch = transport, batch
        try:
            while not self._stopping and self._watchers.get(transport) is me:
                if transport.poll():
                    self._last_activity = time.monotonic()
                if batch:
                    if not self._run_inline(transport, batch):
                        return  # the watchdog gave our watch away while we ran
                elif self._may_spin(transport):
                    self._spin_on(transport, batch)
                else:
                    transport.wait(_WAIT_SLICE)
        except Exception:
            logger.exception("shmrpc: transport %s failed while receiving", transport.name)
            time.sleep(0.01)
            with self._cond:
                if self._watchers.get(transport) is me:
                    self._watchers[transport] = None
                    self._cond.notify()
        finally:
            local.watching = local.batch = None

    def _may_spin(self, transport: Transport) -> bool:
        return (
            transport.cheap_poll
            and self._spin > 0
            and not self._running
            and not self._spinners
            and time.monotonic() - self._last_activity < self._spin
        )

    def _spin_on(self, transport: Transport, batch: list[Work]) -> None:
        """Poll until work arrives, another thread gets busy, or the spin budget is spent."""
        transport.spin_begin()
        try:
            poll = transport.poll
            while not batch and self._may_spin(transport) and not self._stopping:
                if poll():
                    self._last_activity = time.monotonic()
        finally:
            transport.spin_end()

    def _run_inline(self, transport: Transport, batch: list[Work]) -> bool:
        """Run the first item of ``batch`` here, queue the rest. False: we lost the watch."""
        with self._cond:
            if self._running >= self._max_running:
                self._queue.extend(batch)  # every worker is busy: queue and keep watching
                batch.clear()
                return True
            work = batch[0]
            self._running += 1
            if len(batch) > 1:
                self._queue.extend(batch[1:])
                self._cond.notify(len(batch) - 1)
            batch.clear()
        self._inline_since[transport] = (time.monotonic(), threading.current_thread())
        if not self._watchdog_ticking:
            with self._watchdog_cond:
                self._watchdog_cond.notify()
        local = self._local
        local.batch = None  # what the handler itself receives goes to other threads
        try:
            self._execute(work)
        finally:
            local.batch = batch
            self._inline_since.pop(transport, None)
        return self._watchers.get(transport) is threading.current_thread()

    def _give_up_watch(self) -> None:
        """Before this thread blocks, let an idle thread watch what it was watching."""
        transport: Transport | None = getattr(self._local, "watching", None)
        if transport is None:
            return
        with self._cond:
            if self._watchers.get(transport) is threading.current_thread():
                self._watchers[transport] = None
                self._cond.notify()

    def _watchdog(self) -> None:
        last_inline = time.monotonic()
        while not self._stopping:
            if not self._inline_since and time.monotonic() - last_inline > _WATCHDOG_IDLE:
                with self._watchdog_cond:
                    self._watchdog_ticking = False
                    if not self._inline_since and not self._stopping:
                        self._watchdog_cond.wait()
                    self._watchdog_ticking = True
                continue
            time.sleep(_GRACE)
            now = time.monotonic()
            for transport, (since, thread) in list(self._inline_since.items()):
                last_inline = now
                if now - since < _GRACE:
                    continue
                with self._cond:
                    if self._watchers.get(transport) is thread:
                        self._watchers[transport] = None  # the busy watcher loses the watch
                        self._cond.notify()
