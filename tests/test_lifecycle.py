"""Starting, stopping and losing workers. Each test runs its own fresh world."""

from __future__ import annotations

import contextlib
import os
import threading
import time

import pytest
import torch

import shmrpc as rpc
from tests.harness import (
    add,
    kill_self,
    new_init_method,
    run_world,
    shmrpc_names_in_dev_shm,
    sleep_then,
    worker_options,
)


def die_after(delay):
    time.sleep(delay)
    kill_self()


def init(rank, world_size, backend, init_method, name=None, **options):
    opts = worker_options(backend, rank, world_size, init_method, **options)
    rpc.init_rpc(
        name or f"worker{rank}",
        backend=backend,
        rank=rank,
        world_size=world_size,
        rpc_backend_options=opts,
    )


# --------------------------------------------------------------------------- init twice


def _init_twice(rank, backend, init_method):
    init(rank, 2, backend, init_method)
    try:
        rpc.init_rpc(
            "again",
            backend=backend,
            rank=rank,
            world_size=2,
            rpc_backend_options=rpc.RpcBackendOptions(init_method=new_init_method()),
        )
    except RuntimeError as e:
        assert "RPC is already initialized" in str(e)
    else:
        raise AssertionError("second init_rpc did not fail")
    assert rpc.rpc_sync(f"worker{1 - rank}", add, (rank, 1)) == rank + 1
    rpc.shutdown()


def test_init_twice(backend):
    run_world(_init_twice, 2, (backend, new_init_method()))


def _duplicate_names(rank, backend, init_method):
    try:
        init(rank, 2, backend, init_method, name="same")
    except RuntimeError as e:
        assert "RPC worker name same is not unique" in str(e), str(e)
        return "refused"
    rpc.shutdown()
    return "accepted"


def test_duplicate_names(backend):
    assert run_world(_duplicate_names, 2, (backend, new_init_method())) == ["refused", "refused"]


def _reinit(rank, backend, first, second):
    for init_method in (first, second):
        init(rank, 2, backend, init_method)
        peer = f"worker{1 - rank}"
        assert torch.equal(
            rpc.rpc_sync(peer, torch.add, (torch.ones(2), rank)), torch.ones(2) + rank
        )
        assert rpc.rpc_sync(peer, add, (1, 2)) == 3
        rpc.shutdown()
    try:
        rpc.rpc_sync("worker0", add, (1, 2))
    except RuntimeError as e:
        assert str(e).startswith("RPC has not been initialized")
    else:
        raise AssertionError("call after shutdown did not fail")


def test_init_shutdown_init(backend):
    run_world(_reinit, 2, (backend, new_init_method(), new_init_method()))


def _world_of_one(rank, backend, init_method):
    init(rank, 1, backend, init_method)
    assert rpc.rpc_sync("worker0", add, (1, 2)) == 3
    assert rpc.rpc_async(0, add, (2, 2)).wait() == 4
    assert rpc.get_worker_info().id == 0
    rpc.shutdown()


def test_world_of_one(backend):
    run_world(_world_of_one, 1, (backend, new_init_method()))


def whoami():
    return rpc.get_worker_info().name, rpc.RRef(1).owner_name()


def _called_right_after_init(rank, backend, init_method):
    init(rank, 3, backend, init_method)
    futures = [rpc.rpc_async(f"worker{peer}", whoami) for peer in range(3)]
    names = [future.wait() for future in futures]
    rpc.shutdown()
    return names


def test_peers_called_right_after_init_find_the_api_ready(backend):
    # A peer may call as soon as it passes the init barrier; the functions it runs here must
    # already see this worker's API (get_worker_info, RRef) initialized.
    expected = [(f"worker{peer}", f"worker{peer}") for peer in range(3)]
    results = run_world(_called_right_after_init, 3, (backend, new_init_method()))
    assert results == [expected] * 3


# ------------------------------------------------------------------------------ shutdown


def _graceful_with_work_in_flight(rank, backend, init_method):
    init(rank, 3, backend, init_method)
    futures = []
    if rank == 0:
        futures = [rpc.rpc_async("worker1", sleep_then, (i, 0.3)) for i in range(10)]
        futures += [rpc.rpc_async("worker2", sleep_then, (i, 0.5)) for i in range(10)]
    if rank == 2:
        time.sleep(1.0)  # arrives late: the others keep serving meanwhile
    rpc.shutdown()  # waits for every worker and all outstanding work
    assert all(f.done() for f in futures)
    return [f.wait() for f in futures]


def test_graceful_shutdown_waits_for_work(backend):
    results = run_world(_graceful_with_work_in_flight, 3, (backend, new_init_method()))
    assert results[0] == list(range(10)) * 2


def _non_graceful(rank, backend, init_method):
    init(rank, 2, backend, init_method)
    assert rpc.rpc_sync(f"worker{1 - rank}", add, (1, 1)) == 2
    rpc.api._barrier(["worker0", "worker1"])
    rpc.shutdown(graceful=False)


def test_non_graceful_shutdown(backend):
    run_world(_non_graceful, 2, (backend, new_init_method()))


def _pending_at_shutdown(rank, backend, init_method):
    init(rank, 2, backend, init_method)
    if rank == 1:
        time.sleep(3.0)  # still running worker0's call when worker0 leaves
        rpc.shutdown(graceful=False)
        return None
    plain = rpc.rpc_async("worker1", sleep_then, (1, 2.0))
    chained = rpc.rpc_async("worker1", sleep_then, (2, 2.0)).then(lambda f: f.wait())
    time.sleep(0.2)  # both requests are on worker1 now
    rpc.shutdown(graceful=False)
    outcomes = []
    for future in (plain, chained):
        waiter = threading.Thread(target=lambda f=future: outcomes.append(_outcome(f)))
        waiter.start()
        waiter.join(10)
        assert not waiter.is_alive(), "a call pending at shutdown never completed"
    return outcomes


def _outcome(future):
    try:
        future.wait()
    except RuntimeError as e:
        return str(e)
    return "completed"


def test_calls_pending_at_shutdown_fail(backend):
    """A non-graceful shutdown fails the calls still waiting for replies, callbacks and all."""
    outcomes = run_world(_pending_at_shutdown, 2, (backend, new_init_method()))[0]
    assert len(outcomes) == 2
    for outcome in outcomes:
        assert "shut down" in outcome, outcome


def _shutdown_timeout(rank, backend, init_method):
    init(rank, 2, backend, init_method)
    if rank == 1:
        time.sleep(4.0)  # late to the barrier
        with contextlib.suppress(RuntimeError):  # its peer gave up waiting and left
            rpc.shutdown()
        return None
    start = time.monotonic()
    try:
        rpc.shutdown(timeout=1.0)
    except RuntimeError:
        elapsed = time.monotonic() - start
        assert elapsed < 3.0, elapsed
        return "timed out"
    return "no timeout"


def test_shutdown_timeout_is_honoured(backend):
    assert run_world(_shutdown_timeout, 2, (backend, new_init_method()))[0] == "timed out"


# ----------------------------------------------------------------------------- dead peers


def _peer_dies(rank, backend, init_method):
    init(rank, 3, backend, init_method, rpc_timeout=60)
    if rank == 1:
        time.sleep(30)  # killed by worker0's call before this ends
        return None
    if rank == 2:
        # keeps serving worker0 after worker1 is gone, then leaves without a barrier
        assert _may_leave.wait(60), "worker0 never said goodbye"
        rpc.shutdown(graceful=False)
        return None
    pending = rpc.rpc_async("worker1", sleep_then, (1, 20))
    start = time.monotonic()
    try:
        rpc.rpc_sync("worker1", die_after, (0.2,))
    except RuntimeError as e:
        assert "worker1" in str(e), str(e)
    else:
        raise AssertionError("a call to a dying worker did not fail")
    assert time.monotonic() - start < 10, "the failure must not wait for the 60 s timeout"
    try:
        pending.wait()
    except RuntimeError as e:
        assert isinstance(e, rpc.PeerLostError) and "worker1" in str(e)
    else:
        raise AssertionError("the pending call to the dead worker did not fail")
    start = time.monotonic()
    for _ in range(5):  # new calls fail fast
        try:
            rpc.rpc_sync("worker1", add, (1, 2))
        except RuntimeError as e:
            assert "worker1" in str(e) and "gone" in str(e)
        else:
            raise AssertionError("a call to a dead worker succeeded")
    failed = rpc.rpc_async("worker1", add, (1, 2))
    try:
        failed.wait()
    except rpc.PeerLostError:
        assert failed.done()
    else:
        raise AssertionError("rpc_async to a dead worker succeeded")
    assert time.monotonic() - start < 2
    assert rpc.rpc_sync("worker2", add, (2, 3)) == 5, "the other peers keep working"
    rpc.rpc_sync("worker2", let_leave)
    try:
        rpc.shutdown()  # graceful, but a peer is dead: fails promptly instead of hanging
    except RuntimeError as e:
        assert "worker1" in str(e) or "gone" in str(e), str(e)
        return "shutdown failed cleanly"
    return "shutdown succeeded"


_may_leave = threading.Event()


def let_leave():
    _may_leave.set()


def test_killed_peer(backend):
    results = run_world(_peer_dies, 3, (backend, new_init_method()), expect_exit=[1], timeout=90)
    assert results[0] == "shutdown failed cleanly"
    assert shmrpc_names_in_dev_shm() == []


def _shutdown_after_the_only_peer_died(rank, backend, init_method):
    init(rank, 2, backend, init_method, rpc_timeout=60)
    if rank == 1:
        time.sleep(30)  # killed by worker0's call before this ends
        return None
    try:
        rpc.rpc_sync("worker1", die_after, (0.1,))
    except RuntimeError:
        pass
    else:
        raise AssertionError("a call to a dying worker did not fail")
    start = time.monotonic()
    try:
        rpc.shutdown()  # graceful, default timeout (none): the gathering must see the loss
    except RuntimeError as e:
        assert "worker1" in str(e) or "gone" in str(e), str(e)
        assert time.monotonic() - start < 10, "noticed the loss, but only after a long wait"
        return "shutdown failed cleanly"
    return "shutdown succeeded"


def test_graceful_shutdown_after_the_peer_died_does_not_hang(backend):
    """The peer was lost before shutdown() began, so no gathering existed to be woken."""
    results = run_world(
        _shutdown_after_the_only_peer_died,
        2,
        (backend, new_init_method()),
        expect_exit=[1],
        timeout=60,
    )
    assert results[0] == "shutdown failed cleanly"


@pytest.mark.parametrize("victim", [0, 1])
def test_peer_killed_during_init_leaves_nothing(backend, victim):
    """A worker that dies during rendezvous: the others fail init cleanly, nothing leaks."""

    results = run_world(
        _die_during_init, 2, (backend, new_init_method(), victim), expect_exit=[victim], timeout=90
    )
    assert results[1 - victim] == "init failed"
    time.sleep(0.5)
    assert shmrpc_names_in_dev_shm() == []


def _die_during_init(rank, backend, init_method, victim):
    if rank == victim:
        kill_self()
    try:
        init(rank, 2, backend, init_method, rpc_timeout=3)
    except RuntimeError:
        return "init failed"
    rpc.shutdown(graceful=False)
    return "init succeeded"


def test_environment_chooses_backend(backend, monkeypatch):
    monkeypatch.setenv("SHMRPC_BACKEND", backend)
    run_world(_default_backend, 2, (new_init_method(),))


def _default_backend(rank, init_method):
    rpc.init_rpc(
        f"worker{rank}",
        rank=rank,
        world_size=2,
        rpc_backend_options=rpc.RpcBackendOptions(init_method=init_method),
    )
    agent = rpc.api._get_current_rpc_agent()
    assert agent.route_names()[f"worker{1 - rank}"] == {"auto": "shm"}.get(
        os.environ["SHMRPC_BACKEND"], os.environ["SHMRPC_BACKEND"]
    )
    rpc.shutdown()
