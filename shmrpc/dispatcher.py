"""The agent's threads: a pool that runs work and listens on the transports.

What makes a call fast on a 2-core machine is fewer thread switches, not faster code: a
thread-pool hand-off costs ~40 µs here, a blocking wake-up tens of µs, and two threads
spinning in one process fight over the GIL. So:

* **Listeners run what they receive.** Each transport has listener threads that poll it and
  block on its doorbell (``Transport.wait``) when idle. The listener that finds requests runs
  them itself, one after another (no hand-off), then returns to listening.
* **Helpers only for blocked work.** Waking a thread per queued item would cost more than the
  item, so idle threads are called in only when work waits and no thread has taken any for
  ``_STALL`` seconds, i.e. when the threads running work are blocked, not merely busy. A
  watcher thread checks every ``_STALL`` while there is traffic, and sleeps when there is none
  (so nothing wakes it per message).
* **Two listeners, not a watchdog.** While a listener runs a request it is not polling, so a
  peer sending another message rings the doorbell, which wakes the spare listener blocked on
  it. A handler that blocks (``time.sleep``, a lock, a nested call) therefore never stalls
  other traffic, and in a ping-pong the spare just sleeps: no timer, no per-call hand-off.
  Before a listener starts work that would leave no free listener, it recruits an idle
  thread. Any thread that returns from ``wait`` polls before anything else, so a doorbell
  ring is never lost, whoever consumed it.
* **A busy listener keeps the doorbell quiet.** A listener that found work on a cheap
  transport keeps advertising that it polls (``Transport.spin_begin``) while it runs that
  work, and polls again as soon as it is done: a message that arrives meanwhile waits
  microseconds for it instead of waking the spare, which would cost a wake-up and then fight
  the busy thread for the GIL at every torch call that releases it. The hold ends, and the
  spare is woken (``interrupt``) to take over, as soon as the work blocks: at once when it
  waits for a reply in the engine (``before_block``), within a few milliseconds when it blocks
  in user code (the watcher notices; it checks every ``_STALL`` at first, less often while
  nothing stalls). So blocked work still never stalls other traffic for long.
* **One spinner.** A listener that just served a request spins briefly on cheap transports
  (a server expecting the next one) before it blocks, but only while no other work runs and
  no caller spins in this process (``wait_reply`` spins for sync callers). Completing a reply
  is no reason to spin: the thread waiting for it is the one that will need the GIL. A
  spinning thread holds the GIL: a thread waiting for it gets it only when the spin ends or
  after the 5 ms switch interval, so every spin is short and bounded.
* **Polite spinning.** A spin that has not paid off after ``_POLITE_AFTER`` yields the CPU
  between polls (``sched_yield``, which also lets go of the GIL). When more workers than
  cores are busy, the peer a thread waits for may be queued behind it on its own core; a
  plain spin would keep it off until the spin ends.

At most ``num_threads`` work items run at once (torch's ``num_worker_threads``); two threads
more per transport exist so a transport always has a free listener, even when every worker is
blocked in user code, which is what keeps nested calls from deadlocking.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from .transport import Transport

__all__ = ["Dispatcher"]

_yield_cpu = getattr(os, "sched_yield", lambda: time.sleep(0))

logger = logging.getLogger(__name__)

#: A unit of work: a callable, its arguments, and whether it serves a request (after which a
#: listener expects more requests and may spin; after completing a reply it must not).
Work = tuple[Callable[..., None], tuple[Any, ...], bool]

#: Longest single block inside Transport.wait; listeners re-check for shutdown after it.
_WAIT_SLICE = 1.0
#: Listeners a transport keeps when nothing is busy: one to run work, one spare.
_LISTENERS = 2
#: Queued work that no thread took up for this long calls in idle helpers; a listener that
#: holds its doorbell quiet for this long hands it over to the spare.
_STALL = 0.001
#: The watcher stops checking after this long without traffic (the next traffic wakes it).
_LINGER = 0.05
#: A thread that has spun this long without result yields the CPU between polls (a system
#: call of a microsecond when nobody else wants the core): the peer it waits for may share
#: its core, and would otherwise run only when the spin ends (730 µs vs 100-180 µs per call
#: here with both workers pinned to one core).
_POLITE_AFTER = 50e-6
#: While only holds are active and none ever stalls, the watcher checks ever less often, down
#: to once per this long: in a busy ping-pong a check per millisecond costs a tenth of a core.
_PATROL_MAX = 0.008


class _Hold:
    """A listener keeping its transport's doorbell quiet while it runs what it received."""

    __slots__ = ("released", "since", "transport")

    def __init__(self, transport: Transport, since: float) -> None:
        self.transport = transport
        self.since = since
        self.released = False


class Dispatcher:
    def __init__(self, num_threads: int, spin_seconds: float, name: str = "shmrpc") -> None:
        self._max_running = num_threads
        self._spin = spin_seconds
        self._name = name
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # idle pool threads wait here
        self._backlog = threading.Condition(lock)  # the backlog watcher waits here
        self._queue: deque[Work] = deque()
        self._last_take = 0.0  # when a thread last took work off the queue
        self._running = 0
        self._listeners: dict[Transport, int] = {}
        self._busy: dict[Transport, int] = {}  # listeners of the transport running work
        self._cheap: list[Transport] = []
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._local = threading.local()
        self._last_request = 0.0  # when a request last finished running here
        self._spinners = 0
        self._spin_lock = threading.Lock()
        self._holds: set[_Hold] = set()
        self._watcher_parked = False  # the watcher waits for traffic (notify it) or patrols

    # ------------------------------------------------------------------------------ control
    def start(self, transports: Sequence[Transport]) -> None:
        self._listeners = dict.fromkeys(transports, 0)
        self._busy = dict.fromkeys(transports, 0)
        self._cheap = [t for t in transports if t.cheap_poll]
        targets = [self._run] * (self._max_running + _LISTENERS * len(transports))
        for i, target in enumerate([*targets, self._watch]):
            thread = threading.Thread(target=target, name=f"{self._name}-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking work; wait up to ``timeout`` for threads still running user code.

        Requests not yet started are dropped. Completions already queued (future results,
        callbacks: work that is not a request) run here, so that no future is left pending
        for ever; any submitted from now on run at once on the submitting thread.
        """
        with self._cond:
            self._stopping = True
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
            self._backlog.notify_all()
        self._settle(queued)
        for transport in self._listeners:
            for _ in range(self._listeners[transport]):
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

    def usage(self) -> dict[str, int]:
        """What the threads do right now (for debug info): work items running (at most
        ``thread_count``), work items queued, listener threads, and those of them running work.
        """
        with self._cond:
            return {
                "running": self._running,
                "queued": len(self._queue),
                "listeners": sum(self._listeners.values()),
                "listeners_busy": sum(self._busy.values()),
            }

    # ------------------------------------------------------------------------------- intake
    def submit(self, fn: Callable[..., None], *args: Any, request: bool = False) -> None:
        """Run ``fn(*args)`` on a pool thread (a listener collects it into its batch).

        ``request``: the work serves a peer's request (see ``Work``).
        """
        batch: list[Work] | None = getattr(self._local, "batch", None)
        if batch is not None:
            batch.append((fn, args, request))
            return
        with self._cond:
            if not self._stopping:
                self._enqueue([(fn, args, request)])
                self._cond.notify()
                return
        self._settle([(fn, args, request)])

    def submit_quick(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)``: quick engine work that never blocks (no user code).

        Unlike ``submit``, a caller spinning in ``wait_reply`` runs it itself (after its poll,
        outside any transport lock) instead of waking a pool thread for it.
        """
        quick: list[Work] | None = getattr(self._local, "quick", None)
        if quick is not None:
            quick.append((fn, args, False))
        else:
            self.submit(fn, *args)

    def wait_reply(
        self, done: Callable[[], bool], latch: threading.Lock, timeout: float, extra_spin: float = 0
    ) -> bool:
        """Wait until ``done()``; ``latch`` is released when it is. False on timeout.

        Spins first (see ``spin_until``), then blocks on ``latch``.
        """
        if self.spin_until(done, extra_spin):
            return True
        self.before_block()
        return latch.acquire(timeout=timeout if timeout > 0 else -1)

    def before_block(self) -> None:
        """The calling thread is about to block: if it is a listener keeping its doorbell
        quiet, let the spare listener take over now."""
        hold: _Hold | None = getattr(self._local, "hold", None)
        if hold is not None:
            self._release(hold, handover=True)

    def spin_until(self, done: Callable[[], bool], extra_spin: float = 0) -> bool:
        """Poll the cheap transports until ``done()`` or the spin budget is spent.

        A reply usually arrives within microseconds, and polling delivers it on this very
        thread. ``extra_spin`` lengthens the spin for requests whose bytes take a while to
        cross. Returns ``done()``.
        """
        cheap = self._cheap
        if not cheap or not self._spin or done():
            return done()
        local = self._local
        quick: list[Work] = []
        outer, local.quick = getattr(local, "quick", None), quick
        with self._spin_lock:
            self._spinners += 1
        for transport in cheap:
            transport.spin_begin()
        try:
            polls = [t.poll for t in cheap]
            now = time.monotonic()
            end, polite = now + self._spin + extra_spin, now + _POLITE_AFTER
            while not done() and (now := time.monotonic()) < end:
                for poll in polls:
                    poll()
                if now > polite:
                    _yield_cpu()
                while quick:
                    self._run_one(quick.pop(0))
        finally:
            for transport in cheap:
                transport.spin_end()
            with self._spin_lock:
                self._spinners -= 1
            try:
                for transport in cheap:
                    transport.poll()  # what arrived while peers thought we were polling
            finally:
                local.quick = outer
                while quick:
                    self._run_one(quick.pop(0))
        return done()

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
                    transport = self._needing_listener()
                    if transport is not None:
                        self._listeners[transport] += 1
                        break
                    if self._queue and self._running < self._max_running:
                        work = self._take()
                        self._running += 1
                        break
                    cond.wait()
            if transport is not None:
                self._listen(transport)
            elif work is not None:
                try:
                    self._run_one(work)
                    self._drain()
                finally:
                    with cond:
                        self._running -= 1

    def _take(self) -> Work:
        """Pop queued work (caller holds the lock)."""
        self._last_take = time.monotonic()
        return self._queue.popleft()

    def _drain(self) -> None:
        """Run queued work on this thread, in the slot it holds, until the queue is empty."""
        while self._queue:  # (a racy peek; the lock decides)
            with self._cond:
                if not self._queue or self._stopping:
                    return
                work = self._take()
            self._run_one(work)

    def _watch(self) -> None:
        """Call in help when work stalls: queued work that nobody takes up, or a listener
        whose work blocks while it keeps its doorbell quiet."""
        cond = self._cond
        quiet_since = time.monotonic()
        period = _STALL
        with cond:
            while not self._stopping:
                now = time.monotonic()
                stalled = [h for h in self._holds if now - h.since >= _STALL]
                if stalled:
                    period = _STALL  # blocking handlers come in runs: look closely again
                    cond.release()
                    try:
                        for hold in stalled:
                            self._release(hold, handover=True)
                    finally:
                        cond.acquire()
                if self._queue and now - self._last_take >= _STALL:
                    helpers = min(len(self._queue), self._max_running - self._running)
                    if helpers:
                        self._last_take = now  # give the helpers a moment to start
                        cond.notify(helpers)
                if self._queue:
                    quiet_since, period = now, _STALL
                elif self._holds:
                    quiet_since = now
                elif now - quiet_since >= _LINGER:
                    self._watcher_parked = True
                    self._backlog.wait()  # until traffic: _enqueue or _hold notify
                    self._watcher_parked = False
                    quiet_since, period = time.monotonic(), _STALL
                    continue
                self._backlog.wait(period)
                period = min(2 * period, _PATROL_MAX)

    def _release(self, hold: _Hold | None, handover: bool) -> None:
        """End ``hold`` (once, whoever gets here first); ``handover`` wakes a listener to
        poll what arrived while the doorbell was quiet."""
        if hold is None:
            return
        with self._cond:
            if hold.released:
                return
            hold.released = True
            self._holds.discard(hold)
        hold.transport.spin_end()
        if handover:
            hold.transport.interrupt()

    def _needing_listener(self) -> Transport | None:
        for transport, count in self._listeners.items():
            if count < _LISTENERS or count - self._busy[transport] < 1:
                return transport
        return None

    def _settle(self, items: list[Work]) -> None:
        """Stopping: run the completions among ``items`` on this thread, drop the requests."""
        for work in items:
            if not work[2]:
                self._run_one(work)

    def _run_one(self, work: Work) -> None:
        fn, args, request = work
        try:
            fn(*args)
        except BaseException:
            logger.exception("shmrpc: unhandled error in %s", getattr(fn, "__qualname__", fn))
        finally:
            if request:
                self._last_request = time.monotonic()

    def _listen(self, transport: Transport) -> None:
        """Poll ``transport`` and run what arrives, until this thread is not needed here."""
        local = self._local
        batch: list[Work] = []
        local.batch = batch
        spinning = False  # a spin that found work is still up: it becomes the work's hold
        try:
            while not self._stopping:
                if not batch:
                    transport.poll()  # also right after wait(): whoever woke handles the ring
                if batch:
                    held, spinning = spinning, False
                    if not self._run_received(transport, batch, held):
                        return  # enough listeners without us: back to the pool
                elif self._may_spin(transport):
                    spinning = self._spin_on(transport, batch)
                else:
                    transport.wait(_WAIT_SLICE)
        except Exception:
            logger.exception("shmrpc: transport %s failed while receiving", transport.name)
            time.sleep(0.01)
        finally:
            if spinning:
                transport.spin_end()
            local.batch = None
            if self._stopping:
                self._settle(batch)  # what the last poll received
            with self._cond:
                self._listeners[transport] -= 1
                self._cond.notify()  # a replacement, if the transport needs one

    def _may_spin(self, transport: Transport) -> bool:
        return (
            transport.cheap_poll
            and self._spin > 0
            and not self._running
            and not self._spinners
            and time.monotonic() - self._last_request < self._spin
        )

    def _spin_on(self, transport: Transport, batch: list[Work]) -> bool:
        """Poll until work arrives, another thread gets busy, or the spin budget is spent.

        Returns whether work arrived; then the spin is still up (``spin_begin`` without its
        ``spin_end``), for ``_run_received`` to keep as its hold: the doorbell stays quiet
        without a moment's gap, and nothing is undone only to be done again.
        """
        transport.spin_begin()
        found = False
        try:
            poll = transport.poll
            polite = time.monotonic() + _POLITE_AFTER
            while not batch and self._may_spin(transport) and not self._stopping:
                poll()
                if time.monotonic() > polite:
                    _yield_cpu()
            found = bool(batch)
        finally:
            if not found:
                transport.spin_end()
        return found

    def _run_received(self, transport: Transport, batch: list[Work], spinning: bool) -> bool:
        """Run ``batch`` (and whatever else is queued) on this thread, keeping the doorbell
        quiet meanwhile (a hold, see the module docstring). ``spinning``: this thread's spin
        is still up (``_spin_on``); the hold takes it over, or it ends here.

        Returns whether this thread should keep listening. Staying, the poll at the top of the
        listen loop sees what came meanwhile; leaving, it wakes a listener to look.
        """
        hold = None
        if transport.cheap_poll:  # (only cheap transports spin: ``_may_spin``)
            if not spinning:
                transport.spin_begin()
            hold = _Hold(transport, time.monotonic())
        cond = self._cond
        with cond:
            if self._running >= self._max_running:
                self._enqueue(batch)  # every worker is busy: queue, keep listening
                work = None
            else:
                work = batch[0]
                self._running += 1
                self._busy[transport] += 1
                self._enqueue(batch[1:])
                batch.clear()
                if self._listeners[transport] - self._busy[transport] < 1:
                    cond.notify()  # we were the last free listener: recruit one
                if hold is not None:
                    self._holds.add(hold)
                    if self._watcher_parked:
                        self._backlog.notify()
        if work is None:
            if hold is not None:
                hold.released = True
                transport.spin_end()
            return True
        local = self._local
        local.batch = None  # what the work itself receives goes to other threads
        local.hold = hold
        keep = False
        try:
            self._run_one(work)
            self._drain()
        finally:
            local.batch = batch
            local.hold = None
            with cond:
                self._running -= 1
                self._busy[transport] -= 1
                listeners, busy = self._listeners[transport], self._busy[transport]
                keep = listeners <= _LISTENERS or listeners - busy <= 1
                ended = hold is not None and not hold.released
                if hold is not None and ended:
                    hold.released = True
                    self._holds.discard(hold)
            if ended:
                transport.spin_end()
                if not keep:
                    transport.interrupt()
        return keep

    def _enqueue(self, items: list[Work]) -> None:
        """Queue work for this or another thread to take (caller holds the lock)."""
        if items:
            if not self._queue:
                self._last_take = time.monotonic()  # the stall clock starts now
                if self._watcher_parked:
                    self._backlog.notify()
            self._queue.extend(items)
            items.clear()
