"""Errors: remote exceptions, bad input, timeouts. The agent must stay usable after each."""

from __future__ import annotations

import sys
import threading
import time
import types

import pytest
import torch

import shmrpc as rpc
from tests.harness import add, expect_raises, new_init_method, run_world, sleep_then, worker_options

# --------------------------------------------------------------------- remote functions


class CustomError(Exception):
    pass


class TwoArgError(Exception):
    def __init__(self, a, b):
        super().__init__(a, b)


def raise_(kind, message="Expected error"):
    if kind == "two-arg":
        raise TwoArgError(1, 2)
    if kind == "exit":
        raise SystemExit(3)
    if kind == "local-class":
        local = type("LocalOnlyError", (Exception,), {"__module__": "nowhere.at.all"})
        raise local(message)
    raise {
        "value": ValueError,
        "type": TypeError,
        "key": KeyError,
        "index": IndexError,
        "custom": CustomError,
        "zero": ZeroDivisionError,
        "runtime": RuntimeError,
    }[kind](message)


def return_lock():
    return threading.Lock()


def return_future():
    return torch.futures.Future()


# ---------------------------------------------------------------------------- bodies


def _body_remote_exception_types():
    for kind, exc_type in [
        ("value", ValueError),
        ("type", TypeError),
        ("key", KeyError),
        ("index", IndexError),
        ("custom", CustomError),
        ("zero", ZeroDivisionError),
        ("runtime", RuntimeError),
    ]:
        for call in (rpc.rpc_sync, lambda *a: rpc.rpc_async(*a).wait()):
            e = expect_raises(exc_type, call, "worker1", raise_, (kind,), match="Expected error")
            assert isinstance(e, RuntimeError), "remote errors are also RuntimeErrors"
            text = str(e)
            assert "On WorkerInfo(id=1, name=worker1)" in text and "Traceback" in text
            assert "\n" in text and "\\n" not in text, "the remote traceback keeps real newlines"
    # every wait() of a failed future raises again
    fut = rpc.rpc_async("worker2", raise_, ("key",))
    for _ in range(3):
        expect_raises(KeyError, fut.wait)
    assert fut.done()
    # the agent is still fine
    assert rpc.rpc_sync("worker1", add, (1, 2)) == 3


def test_remote_exception_types(world):
    world.run(_body_remote_exception_types)


def _body_unusual_exceptions():
    e = expect_raises(RuntimeError, rpc.rpc_sync, "worker1", raise_, ("two-arg",))
    assert "Original exception on remote side was" in str(e) and "TwoArgError" in str(e)
    e = expect_raises(RuntimeError, rpc.rpc_sync, "worker1", raise_, ("local-class",))
    assert "LocalOnlyError" in str(e) and "Expected error" in str(e)
    expect_raises(RuntimeError, rpc.rpc_sync, "worker1", raise_, ("exit",), match="SystemExit")
    assert rpc.rpc_sync("worker1", add, (2, 2)) == 4, "a SystemExit in a UDF must not kill it"


def test_unusual_exceptions(world):
    world.run(_body_unusual_exceptions)


def _body_function_missing_on_callee():
    module = sys.modules[__name__]
    fn = types.FunctionType(add.__code__, module.__dict__, "only_on_caller")
    fn.__qualname__ = "only_on_caller"
    module.only_on_caller = fn  # exists here only
    try:
        e = expect_raises(RuntimeError, rpc.rpc_sync, "worker1", fn, (1, 2))
        assert isinstance(e, AttributeError)
        assert "RPC pickler does not serialize" in str(e)
    finally:
        del module.only_on_caller


def test_function_missing_on_callee(world):
    world.run(_body_function_missing_on_callee)


def _body_bad_input():
    expect_raises(
        RuntimeError,
        rpc.rpc_sync,
        "nobody",
        add,
        (1, 2),
        match="could not find destination name nobody",
    )
    expect_raises(
        RuntimeError, rpc.rpc_async, 17, add, (1, 2), match="could not find destination id 17"
    )
    expect_raises(
        RuntimeError, rpc.rpc_sync, -1, add, (1, 2), match="could not find destination id -1"
    )
    expect_raises(
        ValueError, rpc.rpc_sync, 3.5, add, (1, 2), match="Cannot get WorkerInfo from name 3.5"
    )
    expect_raises(TypeError, rpc.rpc_sync, "worker1", 42, match="function should be callable.")
    expect_raises(RuntimeError, rpc.get_worker_info, "nobody", match="could not find destination")
    # unpicklable argument: raised at the caller, before anything is sent, with its own type
    e = expect_raises(
        TypeError, rpc.rpc_sync, "worker1", add, (threading.Lock(), 1), match="pickle"
    )
    assert any("could not serialize the request to worker1" in n for n in e.__notes__)
    expect_raises(TypeError, rpc.rpc_async, "worker1", add, (threading.Lock(), 1), match="pickle")
    expect_raises(
        RuntimeError,
        rpc.rpc_sync,
        "worker1",
        add,
        (torch.futures.Future(), 1),
        match="Can not pickle torch.futures.Future",
    )
    expect_raises(AttributeError, rpc.rpc_sync, "worker1", lambda: 1, match="local object")
    # unpicklable results come back as errors
    expect_raises(TypeError, rpc.rpc_sync, "worker1", return_lock, match="pickle")
    expect_raises(
        RuntimeError,
        rpc.rpc_sync,
        "worker1",
        return_future,
        match="Can not pickle torch.futures.Future",
    )
    assert rpc.rpc_sync("worker1", add, (1, 1)) == 2


def test_bad_input(world):
    world.run(_body_bad_input)


def _body_timeouts():
    for call in (rpc.rpc_sync, lambda *a, **k: rpc.rpc_async(*a, **k).wait()):
        start = time.monotonic()
        e = expect_raises(
            rpc.RpcTimeoutError,
            call,
            "worker1",
            sleep_then,
            (1, 2.0),
            timeout=0.2,
            match="RPC ran for more than set timeout (200 ms)",
        )
        assert isinstance(e, RuntimeError) and isinstance(e, TimeoutError)
        assert time.monotonic() - start < 1.5
    assert rpc.rpc_sync("worker1", sleep_then, (7, 0.3), timeout=0) == 7  # 0: no timeout
    old = rpc.get_rpc_timeout()
    rpc.api._set_rpc_timeout(0.1)
    try:
        expect_raises(
            RuntimeError,
            rpc.rpc_sync,
            "worker2",
            sleep_then,
            (1, 1.0),
            match="RPC ran for more than",
        )
        assert rpc.rpc_sync("worker2", sleep_then, (3, 0.3), timeout=5) == 3
    finally:
        rpc.api._set_rpc_timeout(old)
    assert rpc.get_rpc_timeout() == old
    time.sleep(2.0)  # the timed-out calls finish on the callee; their late replies are dropped
    assert rpc.rpc_sync("worker1", add, (1, 2)) == 3


def test_timeouts(world):
    world.run(_body_timeouts)


def _too_large(rank, init_method, backend):
    opts = worker_options(backend, rank, 2, init_method, max_message_size=1 << 20)
    rpc.init_rpc(
        f"worker{rank}", backend=backend, rank=rank, world_size=2, rpc_backend_options=opts
    )
    if rank == 0:
        e = expect_raises(
            rpc.MessageTooLargeError, rpc.rpc_sync, "worker1", add, (torch.ones(1 << 19), 1)
        )
        assert "exceeds max_message_size=1048576" in str(e) and isinstance(e, RuntimeError)
        assert torch.equal(rpc.rpc_sync("worker1", add, (torch.ones(4), 1)), torch.full((4,), 2.0))
        # A reply too large to send comes back as that error, at once: with no limit on the
        # call (timeout 0) the caller would otherwise wait forever.
        e = expect_raises(
            rpc.MessageTooLargeError,
            rpc.rpc_sync,
            "worker1",
            torch.ones,
            (1 << 19,),
            timeout=0,
            match="exceeds max_message_size=1048576",
        )
        assert "to worker0" in str(e)
    rpc.shutdown()


def test_message_too_large(backend):
    run_world(_too_large, 2, (new_init_method(), backend))


def test_call_before_init():
    expect_raises(
        RuntimeError, rpc.rpc_sync, "worker1", add, (1, 2), match="RPC has not been initialized"
    )
    expect_raises(
        RuntimeError, rpc.rpc_async, "worker1", add, (1, 2), match="RPC has not been initialized"
    )
    expect_raises(RuntimeError, rpc.get_worker_info, match="RPC has not been initialized")
    expect_raises(RuntimeError, rpc.shutdown, match="RPC has not been initialized")


def test_bad_init_arguments():
    expect_raises(
        RuntimeError,
        rpc.init_rpc,
        "bad name!",
        rank=0,
        world_size=1,
        match="Worker name must match",
    )
    expect_raises(RuntimeError, rpc.init_rpc, "", rank=0, world_size=1, match="must be non-empty")
    expect_raises(
        RuntimeError, rpc.init_rpc, "x" * 200, rank=0, world_size=1, match="shorter than 128"
    )
    expect_raises(
        TypeError, rpc.init_rpc, "a", backend=3, rank=0, world_size=1, match="BackendType"
    )
    expect_raises(
        TypeError,
        rpc.init_rpc,
        "a",
        rank=0,
        world_size=1,
        rpc_backend_options=object(),
        match="RpcBackendOptions",
    )
    expect_raises(
        ValueError,
        rpc.init_rpc,
        "a",
        backend="carrier-pigeon",
        rank=0,
        world_size=1,
        rpc_backend_options=rpc.RpcBackendOptions(init_method=new_init_method()),
        match="unknown shmrpc backend 'carrier-pigeon'",
    )
    expect_raises(ValueError, rpc.RpcBackendOptions, ring_size=1000, match="power of two")
    expect_raises(TypeError, rpc.RpcBackendOptions, rpc_timeout="soon")
    with pytest.raises(TypeError):
        rpc.TensorPipeRpcBackendOptions(8)  # keyword-only, as in torch


class _Captured:
    """A route that keeps what is sent instead of sending it."""

    devices = frozenset({"cpu"})

    def __init__(self) -> None:
        self.sent: list = []

    def send(self, peer, message, timeout=None):
        self.sent.append((peer, message))


def test_a_reply_from_the_wrong_peer_leaves_the_call_waiting():
    from shmrpc.agent import RpcAgent
    from shmrpc.envelope import Kind, decode, encode

    infos = [rpc.WorkerInfo(f"worker{i}", i) for i in range(3)]
    route = _Captured()
    agent = RpcAgent(
        infos[0], infos, {1: route, 2: route}, [], num_worker_threads=2, spin_seconds=0
    )
    agent.start()
    try:
        future = agent.request_async(infos[1], Kind.CALL, (add, (1, 2), {}), timeout=30)
        envelope, _ = decode(route.sent[0][1].header)
        pickled = agent.serializer.dumps(3)
        reply = rpc.transport.Message(encode(Kind.RESULT, envelope.request_id), pickled.data)
        agent.deliver(2, reply)  # worker2 answers a call it was never sent
        time.sleep(0.05)
        assert not future.done(), "a stranger's reply completed the call"
        agent.deliver(1, reply)
        deadline = time.monotonic() + 10
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert future.done(), "the real reply did not complete the call"
        assert future.wait() == 3
    finally:
        agent.stop()
