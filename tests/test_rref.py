"""Remote references: creation, sharing in every direction, proxies, errors, lifetime."""

from __future__ import annotations

import contextlib
import gc
import pickle
import re
import sys
import threading
import time
import types
import weakref

import pytest
import torch

import shmrpc as rpc
from shmrpc.functions import async_execution
from tests.harness import (
    add,
    expect_raises,
    kill_self,
    new_init_method,
    run_world,
    sleep_then,
    worker_options,
)

# --------------------------------------------------------------------- remote functions


def make(x):
    return torch.ones(2) * x


def raise_value_error():
    raise ValueError("Expected error")


def to_here_plus(rref, n):
    return rref.to_here() + n


def confirmed(rref):
    return rref.confirmed_by_owner()


def sum_nested(obj):
    """The sum of the values of all RRefs in nested dicts, lists and tuples."""
    if isinstance(obj, rpc.RRef):
        return obj.to_here()
    items = obj.values() if isinstance(obj, dict) else obj
    return sum(sum_nested(item) for item in items)


def remote_on(owner, x):
    """Return an RRef owned by ``owner``, created here (a user RRef when owner is elsewhere)."""
    return rpc.remote(owner, make, (x,))


def local_rref(x):
    return rpc.RRef(torch.full((2,), float(x)))


def pass_along(hops, rref):
    """Forward the RRef through ``hops`` more workers, returning it in a list each time."""
    if hops == 0:
        return [rref]
    me = rpc.get_worker_info().id
    nxt = f"worker{(me + 1) % 3}"
    return rpc.rpc_sync(nxt, pass_along, (hops - 1, rref))


def pass_along_remote(hops, rref):
    if hops == 0:
        return [rref]
    nxt = f"worker{(rpc.get_worker_info().id + 1) % 3}"
    return rpc.remote(nxt, pass_along_remote, (hops - 1, rref)).to_here()


class Counter:
    def __init__(self, start=0):
        self.count = start

    def increment(self, n=1):
        self.count += n
        return self.count

    def get(self):
        return self.count

    def nap(self, delay):
        time.sleep(delay)
        return self.count

    @staticmethod
    @async_execution
    def later(x):
        future = torch.futures.Future()
        threading.Timer(0.05, future.set_result, (x * 2,)).start()
        return future


def increment_local(rref, n):
    return rref.local_value().increment(n)


_tracked: list[weakref.ref] = []


class Tracked:
    def __init__(self, i):
        self.i = i


def make_tracked(i):
    obj = Tracked(i)
    _tracked.append(weakref.ref(obj))
    return obj


def live_tracked():
    gc.collect()
    return sum(ref() is not None for ref in _tracked)


def clear_tracked():
    _tracked.clear()


def debug_info():
    return rpc._rref_context_get_debug_info()


def settle(workers=("worker0", "worker1", "worker2"), timeout=30.0):
    """Wait until no RRef control message is in flight anywhere."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gc.collect()
        infos = [rpc.rpc_sync(w, debug_info) for w in workers]
        pending = ("num_pending_users", "num_pending_futures", "num_pending_deletions")
        if all(info[key] == "0" for info in infos for key in pending):
            return infos
        time.sleep(0.02)
    raise AssertionError(f"RRef traffic did not settle: {infos}")


# ---------------------------------------------------------------------------- creation


def _body_remote_basics():
    r = rpc.remote("worker1", torch.add, (torch.ones(2), 1))
    assert isinstance(r, rpc.RRef) and isinstance(r, rpc.PyRRef)
    assert torch.equal(r.to_here(), torch.full((2,), 2.0))
    assert not r.is_owner() and r.owner() == rpc.get_worker_info("worker1")
    assert r.owner_name() == "worker1" and r.confirmed_by_owner()
    assert rpc.remote("worker2", add, kwargs={"a": 1, "b": 2}).to_here() == 3
    rrefs = [rpc.remote(f"worker{1 + i % 2}", make, (i,)) for i in range(10)]
    assert [r.to_here()[0].item() for r in rrefs] == [float(i) for i in range(10)]
    assert rpc.remote(2, make, (4,)).to_here()[0].item() == 4.0  # rank as destination
    local = rpc.RRef(35)
    assert local.is_owner() and local.confirmed_by_owner() and local.local_value() == 35
    assert local.to_here() == 35 and local.owner() == rpc.get_worker_info()
    assert rpc.RRef(torch.ones(1)).rpc_sync().size() == torch.Size([1])


def test_remote_basics(world):
    world.run(_body_remote_basics)


def _body_remote_to_self():
    r = rpc.remote("worker0", make, (7,))
    assert r.is_owner()
    assert torch.equal(r.to_here(), make(7)) and torch.equal(r.local_value(), make(7))
    assert r.to_here() is r.local_value(), "on the owner, to_here() returns the value itself"
    assert torch.equal(rpc.rpc_sync("worker1", to_here_plus, (r, 1)), make(7) + 1)
    assert torch.equal(rpc.rpc_sync("worker0", to_here_plus, (r, 2)), make(7) + 2)


def test_remote_to_self(world):
    world.run(_body_remote_to_self)


def _body_formats_and_errors():
    r = rpc.remote("worker1", make, (1,))
    r.to_here()
    gid = r"GloballyUniqueId\(created_on=0, local_id=\d+\)"
    assert re.fullmatch(rf"UserRRef\(RRefId = {gid}, ForkId = {gid}\)", str(r)), str(r)
    assert re.fullmatch(rf"OwnerRRef\({gid}\)", repr(rpc.RRef(1)))
    rid, fid = r._rref_id, r._fork_id
    assert fid.local_id == rid.local_id + 1, "RRefId first, then ForkId, from one counter"
    expect_raises(
        RuntimeError,
        r.local_value,
        match=(
            f"For UserRRef(rref_id={rid}, fork_id={fid}), can't call localValue() "
            "on user WorkerInfo(id=0, name=worker0). Call it on owner "
            "WorkerInfo(id=1, name=worker1)"
        ),
    )
    expect_raises(RuntimeError, pickle.dumps, r, match="Can not pickle rref in python pickler")
    expect_raises(RuntimeError, torch.save, rpc.RRef(35), "/dev/null", match="Can not pickle rref")
    expect_raises(
        RuntimeError, rpc.RRef, 1, type_hint=int, match="type_hint should only be specified"
    )


def test_formats_and_errors(world):
    world.run(_body_formats_and_errors)


# ----------------------------------------------------------------------------- sharing


def _body_sharing_directions():
    owned_by_1 = rpc.remote("worker1", make, (1,))
    # user -> owner, and user -> another user
    assert torch.equal(rpc.rpc_sync("worker1", to_here_plus, (owned_by_1, 10)), make(1) + 10)
    assert torch.equal(rpc.rpc_sync("worker2", to_here_plus, (owned_by_1, 20)), make(1) + 20)
    assert torch.equal(
        rpc.remote("worker2", to_here_plus, (owned_by_1, 30)).to_here(), make(1) + 30
    )
    # owner -> user: a local RRef
    local = rpc.RRef(torch.tensor(40.0))
    for call in (
        rpc.rpc_sync,
        lambda *a: rpc.rpc_async(*a).wait(),
        lambda *a: rpc.remote(*a).to_here(),
    ):
        assert call("worker1", to_here_plus, (local, 50)).item() == 90.0
    # several RRefs, nested in containers, to their owners and others
    rrefs = [rpc.remote(f"worker{i % 3}", make, (i,)) for i in range(6)]
    nested = {"x": rrefs[:2], "y": [(rrefs[2], [rrefs[3]]), {"z": rrefs[4]}], "w": rrefs[5]}
    assert torch.equal(
        rpc.rpc_sync("worker2", sum_nested, (nested,)), sum(make(i) for i in range(6))
    )
    # a received UserRRef is confirmed before the function runs
    assert rpc.rpc_sync("worker2", confirmed, (owned_by_1,))
    assert rpc.remote("worker2", confirmed, (owned_by_1,)).to_here()
    settle()


def test_sharing_directions(world):
    world.run(_body_sharing_directions)


def _body_rrefs_in_results():
    for _ in range(20):
        # worker1 creates an RRef owned by worker2 and returns it: worker0 becomes a user
        r = rpc.rpc_sync("worker1", remote_on, ("worker2", 5))
        assert r.owner_name() == "worker2" and torch.equal(r.to_here(), make(5))
        pair = rpc.rpc_sync("worker1", lambda_free_pair, ())
        assert [p.owner_name() for p in pair] == ["worker2", "worker1"]
        assert torch.equal(pair[0].to_here(), make(2)) and torch.equal(
            pair[1].to_here(), make(3) * 0 + 3
        )
    # an RRef the callee owns locally, returned and then used through its owner
    counters = rpc.rpc_sync("worker2", make_counters, (3,))
    for i, counter in enumerate(counters):
        assert rpc.rpc_sync(counter.owner(), increment_local, (counter, i)) == 10 + i
        assert rpc.rpc_sync(counter.owner(), increment_local, (counter, 1)) == 11 + i
    settle()


def lambda_free_pair():
    return (rpc.remote("worker2", make, (2,)), rpc.RRef(torch.full((2,), 3.0)))


def make_counters(n):
    return [rpc.RRef(Counter(10)) for _ in range(n)]


def test_rrefs_in_results(world):
    world.run(_body_rrefs_in_results)


def _body_fork_chains():
    start = rpc.remote("worker1", make, (9,))
    [end] = rpc.rpc_sync("worker2", pass_along, (8, start))  # 8 hops around the world
    assert end.owner_name() == "worker1" and torch.equal(end.to_here(), make(9))
    [end] = pass_along_remote(6, start)
    assert torch.equal(end.to_here(), make(9))
    self_owned = rpc.remote("worker0", make, (4,))
    [back] = rpc.rpc_sync("worker1", pass_along, (5, self_owned))
    assert back.is_owner() and torch.equal(back.local_value(), make(4))
    settle()


def test_fork_chains(world):
    world.run(_body_fork_chains)


def _body_concurrent_forks():
    shared = rpc.remote("worker1", make, (2,))
    errors = []

    def fork_many():
        try:
            for _ in range(20):
                assert torch.equal(rpc.rpc_sync("worker2", to_here_plus, (shared, 1)), make(2) + 1)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=fork_many) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    settle()
    owner_forks_before = int(rpc.rpc_sync("worker1", debug_info)["num_forks"])
    shared = None  # the last reference: its deletion reaches the owner
    gc.collect()
    settle()
    assert int(rpc.rpc_sync("worker1", debug_info)["num_forks"]) == owner_forks_before - 1


def test_concurrent_forks(world):
    world.run(_body_concurrent_forks)


# ----------------------------------------------------------------------------- proxies


def _body_proxies():
    module = rpc.remote("worker1", torch.nn.Linear, (4, 2))
    x = torch.randn(3, 4)
    assert torch.allclose(module.rpc_sync().forward(x), module.to_here()(x))
    assert torch.allclose(module.rpc_async().forward(x).wait(), module.to_here()(x))
    assert torch.allclose(module.remote().forward(x).to_here(), module.to_here()(x))
    counter = rpc.remote("worker2", Counter, (5,))
    assert counter.rpc_sync().increment(2) == 7
    assert counter.rpc_async().increment(3).wait() == 10
    assert counter.remote().get().to_here() == 10
    assert counter.rpc_sync().later(21) == 42  # an async_execution static method
    proxy = counter.rpc_sync()
    assert proxy.get() == proxy.get() == 10  # proxies are reusable
    expect_raises(
        AttributeError, counter.rpc_sync().non_exist, match="has no attribute 'non_exist'"
    )
    expect_raises(AttributeError, counter.rpc_async().non_exist().wait, match="non_exist")
    own = rpc.RRef(Counter(1))
    assert own.rpc_sync().increment() == 2 and own.local_value().count == 2


def test_proxies(world):
    world.run(_body_proxies)


# ---------------------------------------------------------------------- errors, timeouts


def _body_remote_exceptions():
    failed = rpc.remote("worker1", raise_value_error)
    for _ in range(3):
        e = expect_raises(ValueError, failed.to_here, match="Expected error")
        assert isinstance(e, RuntimeError)
    assert failed._get_future().wait() is None  # the call itself completed: the value is the error
    assert failed.confirmed_by_owner()
    assert rpc.rpc_sync("worker1", lambda_free_raises, (failed,)) == "ValueError"
    own_failed = rpc.remote("worker0", raise_value_error)
    expect_raises(ValueError, own_failed.local_value, match="Expected error")


def lambda_free_raises(rref):
    try:
        rref.local_value()
    except ValueError as e:
        return type(e).__name__
    return "no error"


def test_remote_exceptions(world):
    world.run(_body_remote_exceptions)


def _body_remote_timeouts():
    r = rpc.remote("worker1", sleep_then, (1, 1.5), timeout=0.2)
    expect_raises(RuntimeError, r._get_future().wait, match="RPC ran for more than")
    expect_raises(RuntimeError, r.to_here, match="RRef creation via rpc.remote() timed out")
    expect_raises(
        RuntimeError, rpc.rpc_sync, "worker2", to_here_plus, (r, 1), match="RRef creation"
    )
    slow_value = rpc.remote("worker2", sleep_then, (5, 1.0))
    expect_raises(rpc.RpcTimeoutError, slow_value.to_here, 0.2, match="RPC ran for more than")
    assert slow_value.to_here() == 5
    counter = rpc.remote("worker2", Counter, ())
    counter.to_here()
    expect_raises(
        rpc.RpcTimeoutError, counter.rpc_sync(timeout=0.1).nap, 1.0, match="RPC ran for more"
    )
    expect_raises(
        rpc.RpcTimeoutError, counter.rpc_async(timeout=0.1).nap(1.0).wait, match="RPC ran for"
    )
    time.sleep(1.6)  # the timed-out remote completes on worker1; its late answer is dropped
    settle()


def test_remote_timeouts(world):
    world.run(_body_remote_timeouts)


# -------------------------------------------------------------------------------- lifetime


def _body_ten_thousand_rrefs():
    settle()
    owners_before = rpc.rpc_sync("worker1", debug_info)["num_owner_rrefs"]
    rpc.rpc_sync("worker1", clear_tracked)
    for i in range(10_000):
        rpc.remote("worker1", make_tracked, (i,))  # dropped at once
        if i % 1000 == 999:
            gc.collect()
    gc.collect()
    settle()
    deadline = time.monotonic() + 30
    while rpc.rpc_sync("worker1", live_tracked) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rpc.rpc_sync("worker1", live_tracked) == 0, "the owner still holds dropped values"
    while rpc.rpc_sync("worker1", debug_info)["num_owner_rrefs"] != owners_before:
        assert time.monotonic() < deadline, "the owner still counts dropped RRefs"
        time.sleep(0.05)


def test_ten_thousand_rrefs_leave_nothing(world):
    world.run(_body_ten_thousand_rrefs, timeout=300)


def _body_debug_counters():
    settle()
    base = int(rpc.rpc_sync("worker0", debug_info)["num_owner_rrefs"])
    local = rpc.RRef(torch.ones(1))
    assert int(debug_info()["num_owner_rrefs"]) == base, "a local RRef counts once it is shared"
    keep = rpc.rpc_sync("worker1", echo_rref, (local,))
    settle()
    info = debug_info()
    assert int(info["num_owner_rrefs"]) == base + 1 and int(info["num_forks"]) >= 1
    del keep  # the owner's own reference: the user kept on worker1 still counts
    gc.collect()
    settle()
    assert int(debug_info()["num_owner_rrefs"]) == base + 1
    rpc.rpc_sync("worker1", release_kept)
    settle()
    assert int(debug_info()["num_owner_rrefs"]) == base


_kept: list = []


def echo_rref(rref):
    _kept.append(rref)  # keeps a user alive on this worker
    return rref


def release_kept():
    _kept.clear()
    gc.collect()


def test_debug_counters(world):
    world.run(_body_debug_counters)


# ------------------------------------------------------------------ fresh worlds: shutdown


def _shutdown_deletes_users(rank, backend, init_method):
    opts = worker_options(backend, rank, 3, init_method)
    rpc.init_rpc(
        f"worker{rank}", backend=backend, rank=rank, world_size=3, rpc_backend_options=opts
    )
    rpc.api._ignore_rref_leak = False  # leaks fail the shutdown
    user = rpc.remote(f"worker{(rank + 1) % 3}", make, (rank,))
    cycle = {"rref": rpc.remote(f"worker{(rank + 2) % 3}", make, (rank,))}
    cycle["self"] = cycle  # kept alive by a reference cycle
    assert torch.equal(user.to_here(), make(rank))
    rpc.shutdown()
    expect_raises(
        RuntimeError,
        user.to_here,
        match="has been deleted. Cannot call to_here() on it after deletion.",
    )
    expect_raises(RuntimeError, rpc.RRef, 1, match="Current RPC agent is not set")
    return "ok"


def test_graceful_shutdown_deletes_user_rrefs(backend):
    assert run_world(_shutdown_deletes_users, 3, (backend, new_init_method())) == ["ok"] * 3


def slow_counter(delay):
    time.sleep(delay)
    return Counter(7)


def _failed_remotes_leave_nothing(rank, backend, init_method):
    """remote() calls that fail in every way: none may leak or hang the shutdown."""
    opts = worker_options(backend, rank, 2, init_method, rpc_timeout=20)
    rpc.init_rpc(
        f"worker{rank}", backend=backend, rank=rank, world_size=2, rpc_backend_options=opts
    )
    rpc.api._ignore_rref_leak = False  # leaks fail the shutdown
    if rank == 0:
        # Nothing sent (the argument cannot be pickled), to a peer and to self.
        for to in ("worker1", "worker0"):
            expect_raises(TypeError, rpc.remote, to, add, (threading.Lock(), 1))
        info = debug_info()
        assert (info["num_pending_users"], info["num_owner_rrefs"]) == ("0", "0"), info
        # RRefs forked into a message that then fails to pickle: the forks are taken back.
        mine = rpc.RRef(torch.ones(1))
        theirs = rpc.remote("worker1", make, (1,))
        theirs.to_here()
        for rref in (mine, theirs):
            expect_raises(TypeError, rpc.rpc_sync, "worker1", add, (rref, threading.Lock()))
        info = debug_info()
        assert (info["num_forks"], info["num_pending_children"]) == ("0", "0"), info
        # Timed out, but it ran on the owner: kept alive through shutdown, whose deletion
        # must still reach the owner.
        late = rpc.remote("worker1", sleep_then, (1, 0.5), timeout=0.1)
        expect_raises(rpc.RpcTimeoutError, late._get_future().wait)
        expect_raises(RuntimeError, late.to_here, match="RRef creation via rpc.remote() timed out")
        # The function does not exist on the owner: the call never runs there.
        module = sys.modules[__name__]
        missing = types.FunctionType(add.__code__, module.__dict__, "only_on_caller")
        missing.__qualname__ = "only_on_caller"
        module.only_on_caller = missing
        try:
            raced = rpc.remote("worker1", missing, (1, 2))
            # Fetched before the failure is known here: the owner waits for a value that
            # never comes, until this to_here times out (and shutdown releases the owner).
            expect_raises(RuntimeError, raced.to_here, 0.5)
            known = rpc.remote("worker1", missing, (1, 2))
            expect_raises(RuntimeError, known._get_future().wait)
            expect_raises(AttributeError, known.to_here, match="RPC pickler does not serialize")
            expect_raises(AttributeError, known.to_here)  # every time
        finally:
            del module.only_on_caller
        time.sleep(0.6)  # the late call completes on worker1
        # rpc_async() through a proxy does not block for the value's type.
        counter = rpc.remote("worker1", slow_counter, (1.0,))
        start = time.monotonic()
        future = counter.rpc_async().increment(2)
        assert time.monotonic() - start < 0.5, "rpc_async() waited for the remote value"
        assert future.wait() == 9
        assert counter.rpc_async().get().wait() == 9
        expect_raises(AttributeError, counter.rpc_async().no_such_method().wait)
    rpc.shutdown()
    return "ok"


def test_failed_remotes_leave_nothing(backend):
    assert run_world(_failed_remotes_leave_nothing, 2, (backend, new_init_method())) == ["ok"] * 2


def _owner_dies(rank, backend, init_method):
    opts = worker_options(backend, rank, 3, init_method, rpc_timeout=60)
    rpc.init_rpc(
        f"worker{rank}", backend=backend, rank=rank, world_size=3, rpc_backend_options=opts
    )
    if rank == 1:
        time.sleep(30)  # killed before this ends
        return None
    if rank == 2:
        assert _may_leave.wait(60), "worker0 never said goodbye"
        rpc.shutdown(graceful=False)
        return None
    r = rpc.remote("worker1", make, (1,))
    assert torch.equal(r.to_here(), make(1))
    slow_value = rpc.remote("worker1", sleep_then, (2, 20))
    with contextlib.suppress(RuntimeError):  # the callee dies before it answers
        rpc.rpc_sync("worker1", kill_self)
    start = time.monotonic()
    for rref in (r, slow_value):
        expect_raises(RuntimeError, rref.to_here, match="worker1")
    assert time.monotonic() - start < 5, "using an RRef of a dead owner must fail promptly"
    expect_raises(RuntimeError, rpc.rpc_sync, "worker2", to_here_plus, (r, 1), match="worker1")
    assert rpc.remote("worker2", make, (3,)).to_here()[0].item() == 3.0
    rpc.rpc_sync("worker2", let_leave)
    rpc.shutdown(graceful=False)
    return "ok"


_may_leave = threading.Event()


def let_leave():
    _may_leave.set()


def test_owner_death(backend):
    assert run_world(_owner_dies, 3, (backend, new_init_method()), expect_exit=[1])[0] == "ok"


def test_rref_before_init():
    expect_raises(RuntimeError, rpc.RRef, 1, match="Current RPC agent is not set")
    expect_raises(
        RuntimeError, rpc.remote, "worker1", make, (1,), match="RPC has not been initialized"
    )


@pytest.mark.parametrize("n", [1])
def test_no_rref_leaks_left_in_worlds(world, n):
    infos = world.run(settle)
    assert all(i["num_pending_users"] == "0" for i in infos)
