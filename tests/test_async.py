"""Futures, concurrency, then-callbacks and @async_execution."""

from __future__ import annotations

import threading
import time

import torch

import shmrpc as rpc
from shmrpc.functions import async_execution
from tests.harness import add, sleep_then

# --------------------------------------------------------------------- remote functions


def slow_add(a, b, delay=0.2):
    time.sleep(delay)
    return a + b


@async_execution
def async_add_chained(to, x, y, z):
    return rpc.rpc_async(to, torch.add, (x, y)).then(lambda fut: fut.wait() + z)


@async_execution
def async_fanout(tos, x):
    futures = [rpc.rpc_async(to, torch.add, (x, 1)) for to in tos]
    result = torch.futures.Future()
    lock = threading.Lock()
    state = {"left": len(futures), "sum": torch.zeros_like(x)}

    def collect(fut):
        with lock:
            state["sum"] += fut.wait()
            state["left"] -= 1
            done = state["left"] == 0
        if done:
            result.set_result(state["sum"])

    for fut in futures:
        fut.then(collect)
    return result


@async_execution
def async_later(value, delay):
    future = torch.futures.Future()

    def complete():
        time.sleep(delay)
        future.set_result(value)

    threading.Thread(target=complete, daemon=True).start()
    return future


@async_execution
def async_raises():
    raise ValueError("Expected error")


@async_execution
def async_wrong_type():
    return 5


class AsyncMath:
    @staticmethod
    @async_execution
    def add_static(to, x, y):
        return rpc.rpc_async(to, torch.add, (x, y))


_barrier_state = {"arrived": 0, "future": None}
_barrier_lock = threading.Lock()


@async_execution
def wait_for_all(n):
    """Completes once n calls arrived: each caller's worker thread is free meanwhile."""
    with _barrier_lock:
        if _barrier_state["future"] is None:
            _barrier_state["future"] = torch.futures.Future()
        _barrier_state["arrived"] += 1
        future = _barrier_state["future"]
        if _barrier_state["arrived"] == n:
            _barrier_state["arrived"], _barrier_state["future"] = 0, None
            future.set_result(n)
    return future


# ---------------------------------------------------------------------------- bodies


def _body_future_type_and_then():
    fut = rpc.rpc_async("worker1", add, (1, 2))
    assert isinstance(fut, torch.futures.Future) and isinstance(fut, torch._C.Future)
    chained = fut.then(lambda f: f.wait() * 10).then(lambda f: f.wait() + 1)
    assert chained.wait() == 31 and fut.done() and fut.wait() == 3
    futs = [rpc.rpc_async("worker2", add, (i, i)) for i in range(10)]
    assert torch.futures.wait_all(futs) == [2 * i for i in range(10)]
    collected = torch.futures.collect_all(futs).wait()
    assert [f.wait() for f in collected] == [2 * i for i in range(10)]


def test_future_type_and_then(world):
    world.run(_body_future_type_and_then)


def _body_many_concurrent():
    futs = [
        rpc.rpc_async(f"worker{1 + i % 2}", add, (torch.full((i % 7,), i), 1)) for i in range(1000)
    ]
    for i, fut in enumerate(futs):
        assert torch.equal(fut.wait(), torch.full((i % 7,), i) + 1)


def test_1000_concurrent_rpc_async(world):
    world.run(_body_many_concurrent)


def _body_threads():
    errors = []

    def hammer(k):
        try:
            for i in range(100):
                assert rpc.rpc_sync(f"worker{1 + (i + k) % 2}", add, (i, k)) == i + k
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_many_threads_calling(world):
    world.run(_body_threads)


def _body_parallel_blocking_udfs():
    # 20 calls that each block 0.5 s, on a pool of 16 threads: two rounds, not twenty.
    start = time.monotonic()
    futs = [rpc.rpc_async("worker1", sleep_then, (i, 0.5)) for i in range(20)]
    assert [f.wait() for f in futs] == list(range(20))
    elapsed = time.monotonic() - start
    assert elapsed < 5.0, f"blocking calls ran serially ({elapsed:.1f} s)"


def test_blocking_udfs_run_in_parallel(world):
    world.run(_body_parallel_blocking_udfs)


_event = threading.Event()


def wait_for_event(timeout):
    try:
        return _event.wait(timeout)
    finally:
        _event.clear()


def set_event():
    _event.set()


def _body_handler_blocked_in_user_code():
    # The listener that runs wait_for_event blocks in user code while it keeps its doorbell
    # quiet; set_event can only run if the spare listener is sent in. It should be within
    # milliseconds; a listener's periodic shutdown check (1 s) would also get there, late.
    for _ in range(3):
        fut = rpc.rpc_async("worker1", wait_for_event, (30.0,))
        time.sleep(0.05)  # it is blocked by now
        start = time.monotonic()
        rpc.rpc_sync("worker1", set_event)
        waited = time.monotonic() - start
        assert fut.wait() is True, "the second call waited for the blocked one"
        assert waited < 0.5, f"the second call waited {waited:.2f} s for a free listener"


def test_handler_blocked_in_user_code_does_not_stall_others(world):
    world.run(_body_handler_blocked_in_user_code)


def _body_async_execution():
    x, y, z = torch.ones(2), torch.ones(2) * 2, 3
    assert torch.equal(
        rpc.rpc_sync("worker1", async_add_chained, ("worker2", x, y, z)), torch.full((2,), 6.0)
    )
    assert torch.equal(
        rpc.rpc_async("worker1", async_add_chained, ("worker0", x, y, z)).wait(),
        torch.full((2,), 6.0),
    )
    total = rpc.rpc_sync("worker1", async_fanout, (["worker0", "worker2", "worker1"], x))
    assert torch.equal(total, torch.full((2,), 6.0))
    assert rpc.rpc_sync("worker2", async_later, ("later", 0.1)) == "later"
    assert torch.equal(rpc.rpc_sync("worker1", AsyncMath.add_static, ("worker2", x, y)), x + y)


def test_async_execution(world):
    world.run(_body_async_execution)


def _body_async_execution_frees_threads():
    # More waiting calls than worker threads: only works if waiting holds no thread.
    n = 24
    futs = [rpc.rpc_async("worker1", wait_for_all, (n,)) for _ in range(n)]
    assert [f.wait() for f in futs] == [n] * n


def test_async_execution_does_not_hold_threads(world):
    world.run(_body_async_execution_frees_threads)


def _body_async_execution_errors():
    for call in (rpc.rpc_sync, lambda *a: rpc.rpc_async(*a).wait()):
        try:
            call("worker1", async_raises)
        except ValueError as e:
            assert "Expected error" in str(e)
        else:
            raise AssertionError("no error")
        try:
            call("worker1", async_wrong_type)
        except RuntimeError as e:
            assert "must return a torch.futures.Future" in str(e) and "int" in str(e)
        else:
            raise AssertionError("no error")


def test_async_execution_errors(world):
    world.run(_body_async_execution_errors)


def _body_wait_all_context():
    with rpc.api._wait_all():
        futs = [rpc.rpc_async("worker1", slow_add, (i, 1, 0.05)) for i in range(5)]
    assert all(f.done() for f in futs)
    assert [f.wait() for f in futs] == [1, 2, 3, 4, 5]


def test_wait_all_context(world):
    world.run(_body_wait_all_context)
