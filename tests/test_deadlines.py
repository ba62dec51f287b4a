"""The timer thread behind rpc_async's timeouts (shmrpc/deadlines.py)."""

from __future__ import annotations

import threading
import time

import pytest

from shmrpc.deadlines import Deadlines


@pytest.fixture
def deadlines():
    timer = Deadlines("test-deadlines")
    yield timer
    timer.close()
    assert not timer._thread.is_alive(), "the timer thread did not end"


def test_due_callback_runs_and_cancelled_one_does_not(deadlines):
    fired = threading.Event()
    cancelled = threading.Event()
    deadlines.schedule(time.monotonic() + 0.05, cancelled.set).cancel()
    deadlines.schedule(time.monotonic() + 0.1, fired.set)
    assert fired.wait(10), "a due callback never ran"
    assert not cancelled.is_set(), "a cancelled callback ran"


def test_earlier_deadline_wakes_a_timer_sleeping_for_a_later_one(deadlines):
    late = threading.Event()
    early = threading.Event()
    deadlines.schedule(time.monotonic() + 60, late.set)
    time.sleep(0.05)  # the timer thread now sleeps until the late deadline
    deadlines.schedule(time.monotonic() + 0.05, early.set)
    assert early.wait(10), "an earlier deadline waited for the later one"
    assert not late.is_set()


def test_calls_that_end_in_order_leave_no_entries_behind(deadlines):
    """Each call's entry is cancelled when its reply comes. Left in the heap, thousands of
    dead entries kept objects alive and made the garbage collector run full collections."""
    for _ in range(10_000):
        deadlines.schedule(time.monotonic() + 60, lambda: None).cancel()
    assert len(deadlines._heap) <= 1
    live = [deadlines.schedule(time.monotonic() + 60, lambda: None) for _ in range(16)]
    for _ in range(10_000):  # a window of 16 in flight: the oldest ends, a new one starts
        live.pop(0).cancel()
        live.append(deadlines.schedule(time.monotonic() + 60, lambda: None))
    assert len(deadlines._heap) <= 17


def test_calls_that_end_out_of_order_are_swept_out(deadlines):
    """The newest call ends first (the oldest stays in flight): dead entries sit below a live
    top, and the heap is swept once it has twice as many entries as live ones."""
    oldest = deadlines.schedule(time.monotonic() + 60, lambda: None)
    for _ in range(20_000):
        deadlines.schedule(time.monotonic() + 60, lambda: None).cancel()
    assert len(deadlines._heap) <= 4097
    assert not oldest.cancelled
