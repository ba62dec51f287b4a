"""Observability: profiler spans, debug info, and logging.

Test bodies (``_body_*``) run on worker0 of a live 3-worker world; functions they call
remotely live at module level so every worker can import them. The logging tests start worlds
of their own in a subprocess, to see exactly what a run writes to stdout and stderr.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from typing import Any

import torch

import shmrpc as rpc
import shmrpc.autograd as dist_autograd
from shmrpc.agent import RpcAgent
from shmrpc.transport import PeerLostError, PeerShutDown
from tests.harness import expect_raises, new_init_method, run_world, sleep_then

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------- remote functions


def echo(x: Any) -> Any:
    return x


def fail(text: str) -> None:
    raise ValueError(text)


@rpc.functions.async_execution
def later_echo(x: Any, delay: float) -> torch.futures.Future[Any]:
    """Answers from another thread after ``delay`` seconds."""
    future: torch.futures.Future[Any] = torch.futures.Future()
    threading.Timer(delay, future.set_result, (x,)).start()
    return future


def call_back(dst: str, x: torch.Tensor) -> torch.Tensor:
    return rpc.rpc_sync(dst, torch.add, (x, 1))


def _all_threads() -> Any:
    """A profiler that records every thread (shmrpc serves requests on its own threads)."""
    config = torch.profiler._ExperimentalConfig(profile_all_threads=True)
    return torch.profiler.profile(experimental_config=config)


_profiler: Any = None


def start_profiler() -> None:
    global _profiler
    _profiler = _all_threads()
    _profiler.__enter__()


def stop_profiler(trace: str | None = None, timed: str | None = None) -> Any:
    """Stop the profiler start_profiler started; its event names (and a chrome trace; and
    the durations in µs of the spans whose names contain ``timed``)."""
    global _profiler
    profiler, _profiler = _profiler, None
    profiler.__exit__(None, None, None)
    if trace is not None:
        profiler.export_chrome_trace(trace)
    names = sorted({event.name for event in profiler.events()})
    if timed is None:
        return names
    durations = [e.time_range.elapsed_us() for e in profiler.events() if timed in e.name]
    return names, durations


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_capture: _Records | None = None


def start_capture() -> None:
    global _capture
    _capture = _Records()
    logging.getLogger("shmrpc").addHandler(_capture)


def stop_capture() -> list[tuple[str, int, str]]:
    global _capture
    capture, _capture = _capture, None
    assert capture is not None
    logging.getLogger("shmrpc").removeHandler(capture)
    return [(r.name, r.levelno, r.getMessage()) for r in capture.records]


def debug_info() -> dict[str, str]:
    return rpc.get_debug_info()


# ------------------------------------------------------------------------------ profiler


def _names(events: Any) -> set[str]:
    return {event.name for event in events}


def _body_caller_spans() -> dict[str, Any]:
    with torch.profiler.profile() as prof:
        rpc.rpc_sync("worker1", torch.add, (torch.ones(2), 1))
        rpc.rpc_async("worker2", sleep_then, (1, 0.05)).wait()
        rref = rpc.remote("worker1", echo, (torch.ones(3),))
        rref.to_here()
        assert rref.rpc_sync().size() == torch.Size([3])  # a proxy: torch's _local_invoke
        rpc.rpc_sync("worker0", echo, (1,))
        future = rpc.rpc_async("worker2", fail, ("in a span",))
        expect_raises(ValueError, future.wait, match="in a span")
    names = _names(prof.events())
    durations = {
        event.name: event.time_range.elapsed_us()
        for event in prof.events()
        if event.name.startswith("rpc_async#sleep_then")
    }
    with torch.autograd.profiler.profile() as legacy:
        rpc.rpc_sync("worker2", echo, (2,))
        rpc.rpc_async("worker1", echo, (3,)).wait()
    return {"names": names, "durations": durations, "legacy": _names(legacy.function_events)}


def test_caller_spans(world):
    got = world.run(_body_caller_spans)
    names = got["names"]
    for key in (
        "rpc_sync#aten::add(worker0 -> worker1)",  # torch names builtins by their op
        "rpc_async#sleep_then(worker0 -> worker2)",
        "rpc_remote#echo(worker0 -> worker1)",
        "to_here#(worker0)->(worker1)",
        "rpc_sync#_local_invoke(worker0 -> worker1)",
        "rpc_sync#echo(worker0 -> worker0)",
        "rpc_async#fail(worker0 -> worker2)",  # a failed call's span ends too
    ):
        assert key in names, (key, sorted(n for n in names if "#" in n))
    # an rpc_async span lasts until its future completes, not just while it is sent
    assert min(got["durations"].values()) >= 45_000, got["durations"]
    assert "rpc_sync#echo(worker0 -> worker2)" in got["legacy"]
    assert "rpc_async#echo(worker0 -> worker1)" in got["legacy"]


def _body_callee_spans() -> dict[str, Any]:
    rpc.rpc_sync("worker1", start_profiler)
    try:
        rpc.rpc_sync("worker1", echo, (torch.ones(2),))
        rpc.rpc_async("worker1", echo, (1,)).wait()
        rpc.remote("worker1", echo, (2,)).to_here()
        assert rpc.rpc_sync("worker1", later_echo, (4, 0.05)) == 4
    finally:
        callee = rpc.rpc_sync("worker1", stop_profiler, (None, "later_echo"))
    with _all_threads() as prof:  # worker0 as the callee of a nested call, and of itself
        rpc.rpc_sync("worker1", call_back, ("worker0", torch.ones(2)))
        rpc.rpc_sync("worker0", echo, (3,))
    return {"callee": set(callee[0]), "later": callee[1], "nested": _names(prof.events())}


def test_callee_spans(world):
    got = world.run(_body_callee_spans)
    callee = got["callee"]
    assert "rpc#echo(worker0 -> worker1)#remote_op" in callee, sorted(callee)
    assert "rpc_remote#echo(worker0 -> worker1)#remote_op" in callee, sorted(callee)
    assert not any(n.startswith("rpc_sync#echo") for n in callee), "caller spans on the callee"
    # an @async_execution function's span lasts until its future completes
    assert "rpc#later_echo(worker0 -> worker1)#remote_op" in callee, sorted(callee)
    assert got["later"] and min(got["later"]) >= 45_000, got["later"]
    nested = got["nested"]
    for key in (
        "rpc_sync#call_back(worker0 -> worker1)",
        "rpc#aten::add(worker1 -> worker0)#remote_op",
        "rpc_sync#echo(worker0 -> worker0)",
        "rpc#echo(worker0 -> worker0)#remote_op",
    ):
        assert key in nested, (key, sorted(n for n in nested if "#" in n))


def _body_backward_spans() -> dict[str, Any]:
    rpc.rpc_sync("worker1", start_profiler)
    try:
        with _all_threads() as prof, dist_autograd.context() as context_id:
            x = torch.ones(3, requires_grad=True)
            loss = rpc.rpc_sync("worker1", torch.mul, (x, 2)).sum()
            dist_autograd.backward(context_id, [loss])
            grads = dist_autograd.get_gradients(context_id)
            assert torch.equal(grads[x], torch.full((3,), 2.0))
    finally:
        callee = rpc.rpc_sync("worker1", stop_profiler)
    return {"caller": _names(prof.events()), "callee": set(callee)}


def test_backward_spans(world):
    got = world.run(_body_backward_spans)
    assert "torch::distributed::autograd::backward" in got["caller"]
    assert "dist_autograd_backward" in got["caller"]  # worker0's piece of the pass
    assert "dist_autograd_backward" in got["callee"]  # worker1's, started by its gradients
    assert "rpc#aten::mul(worker0 -> worker1)#remote_op" in got["callee"]


def _body_chrome_trace(caller_trace: str, callee_trace: str) -> None:
    rpc.rpc_sync("worker1", start_profiler)
    try:
        with torch.profiler.profile() as prof:
            rpc.rpc_sync("worker1", echo, (torch.ones(2),))
            rpc.rpc_async("worker1", echo, (1,)).wait()
    finally:
        rpc.rpc_sync("worker1", stop_profiler, (callee_trace,))
    prof.export_chrome_trace(caller_trace)


def _trace_spans(path: str) -> dict[str, dict[str, Any]]:
    with open(path) as f:
        trace = json.load(f)  # what Perfetto and chrome://tracing open
    return {e["name"]: e for e in trace["traceEvents"] if "#" in e.get("name", "")}


def test_chrome_trace(world, tmp_path):
    caller, callee = str(tmp_path / "worker0.json"), str(tmp_path / "worker1.json")
    world.run(_body_chrome_trace, caller, callee)
    spans = _trace_spans(caller)
    for key in ("rpc_sync#echo(worker0 -> worker1)", "rpc_async#echo(worker0 -> worker1)"):
        assert key in spans, sorted(spans)
        assert spans[key]["ph"] == "X" and spans[key]["dur"] > 0
    assert "rpc#echo(worker0 -> worker1)#remote_op" in _trace_spans(callee)


# ---------------------------------------------------------------------------- debug info


def _body_debug_info() -> dict[str, Any]:
    agent = rpc._get_current_rpc_agent()
    before = rpc.get_debug_info()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in before.items())
    assert rpc._get_debug_info().keys() == before.keys()
    assert dist_autograd._get_debug_info().keys() == {
        "num_current_backward_passes",
        "num_autograd_contexts",
    }
    parts = [agent.get_debug_info(), rpc._rref_context_get_debug_info()]
    parts.append(dist_autograd._get_debug_info())
    assert sum(len(p) for p in parts) == len(before), "the parts' keys overlap"
    for name, transport in agent.route_names().items():
        assert before[f"agent.peer.{name}.transport"] == transport
        assert before[f"agent.peer.{name}.state"] == "up"

    callee_before = rpc.rpc_sync("worker1", debug_info)
    big = torch.zeros(1 << 18)  # 1 MiB, there and back
    rpc.rpc_sync("worker1", echo, (big,))
    callee_after = rpc.rpc_sync("worker1", debug_info)
    after = rpc.get_debug_info()

    slow = rpc.rpc_async("worker2", sleep_then, (1, 1.0))
    time.sleep(0.2)
    busy = rpc.get_debug_info()
    busy_callee = rpc.rpc_sync("worker2", debug_info)
    slow.wait()

    rref = rpc.remote("worker1", echo, (torch.ones(2),))
    rref.to_here()
    with_rref = rpc.get_debug_info()
    owner = rpc.rpc_sync("worker1", debug_info)
    with dist_autograd.context():
        in_context = rpc.get_debug_info()
    del rref
    return {
        "before": before,
        "after": after,
        "callee_before": callee_before,
        "callee_after": callee_after,
        "busy": busy,
        "busy_callee": busy_callee,
        "with_rref": with_rref,
        "owner": owner,
        "in_context": in_context,
    }


def _delta(after: dict[str, str], before: dict[str, str], key: str) -> int:
    return int(after[key]) - int(before[key])


def test_debug_info(world):
    got = world.run(_body_debug_info)
    before, after = got["before"], got["after"]
    for key in (  # torch's
        "agent.thread_pool_size",
        "agent.num_idle_threads",
        "agent.client_active_calls",
        "agent.server_active_calls",
        "agent.server_active_async_calls",
        "num_owner_rrefs",
        "num_pending_futures",
        "num_pending_users",
        "num_forks",
        "num_autograd_contexts",
        "num_current_backward_passes",
    ):
        assert key in before, key
    for key in ("threads_running", "work_queued", "listener_threads", "listener_threads_busy"):
        assert int(before[f"agent.{key}"]) >= 0
    assert int(before["agent.threads_running"]) <= int(before["agent.thread_pool_size"])
    assert int(before["agent.listener_threads"]) >= 2
    for rank in range(3):
        for key in (
            "messages_sent",
            "bytes_sent",
            "messages_received",
            "bytes_received",
            "pending_calls",
        ):
            assert int(before[f"agent.peer.worker{rank}.{key}"]) >= 0

    mib = 1 << 20
    to_callee, from_caller = "agent.peer.worker1.", "agent.peer.worker0."
    assert _delta(after, before, to_callee + "messages_sent") >= 2  # the echo, the debug call
    assert _delta(after, before, to_callee + "messages_received") >= 2
    assert _delta(after, before, to_callee + "bytes_sent") >= mib
    assert _delta(after, before, to_callee + "bytes_received") >= mib
    callee_before, callee_after = got["callee_before"], got["callee_after"]
    assert _delta(callee_after, callee_before, from_caller + "bytes_received") >= mib
    assert _delta(callee_after, callee_before, from_caller + "bytes_sent") >= mib
    assert int(after["agent.requests_sent"]) > int(before["agent.requests_sent"])

    busy = got["busy"]
    assert int(busy["agent.peer.worker2.pending_calls"]) >= 1
    assert int(busy["agent.client_active_calls"]) >= 1
    assert int(got["busy_callee"]["agent.server_active_calls"]) >= 1
    assert int(got["busy_callee"]["agent.threads_running"]) >= 1

    assert int(got["with_rref"]["num_user_rrefs"]) >= 1
    assert int(got["owner"]["num_owner_rrefs"]) >= 1
    assert int(got["owner"]["num_forks"]) >= 1
    assert int(got["in_context"]["num_autograd_contexts"]) >= 1


def test_debug_info_needs_rpc():
    expect_raises(RuntimeError, rpc.get_debug_info, match="RPC has not been initialized")


# ------------------------------------------------------------------------------- logging


def _body_remote_error_logged() -> dict[str, Any]:
    start_capture()
    try:
        expect_raises(ValueError, rpc.rpc_sync, "worker0", fail, ("boom here",))
    finally:
        here = stop_capture()
    rpc.rpc_sync("worker1", start_capture)
    try:
        expect_raises(ValueError, rpc.rpc_sync, "worker1", fail, ("boom there",))
    finally:
        there = rpc.rpc_sync("worker1", stop_capture)
    return {"here": here, "there": there}


def test_remote_error_logged(world):
    got = world.run(_body_remote_error_logged)
    for worker, text, records in (
        ("worker0", "boom here", got["here"]),
        ("worker1", "boom there", got["there"]),
    ):
        errors = [r for r in records if r[1] == logging.ERROR and text in r[2]]
        assert len(errors) == 1, records
        name, _, message = errors[0]
        assert name.startswith("shmrpc."), name
        assert worker in message and "ValueError" in message and "Traceback" in message


def test_peer_shut_down_is_info_and_crash_is_warning():
    """A peer that says goodbye is logged at INFO, one that vanishes at WARNING."""
    infos = [rpc.WorkerInfo("worker0", 0), rpc.WorkerInfo("worker1", 1)]
    records = _Records()
    shmrpc_logger = logging.getLogger("shmrpc")
    shmrpc_logger.addHandler(records)
    level_before = shmrpc_logger.level
    shmrpc_logger.setLevel(logging.INFO)
    try:
        for error, level, state in (
            (PeerShutDown("test peer rank 1 shut down"), logging.INFO, "shut down"),
            (PeerLostError("test peer rank 1 exited"), logging.WARNING, "lost"),
        ):
            agent = RpcAgent(
                infos[0], infos, {}, [], num_worker_threads=1, spin_seconds=0
            )  # not started: no transports, no threads but the timer's
            try:
                agent.peer_lost(1, error)
                assert agent.get_debug_info()["agent.peer.worker1.state"] == state
            finally:
                agent.stop()
            lost = [r for r in records.records if "lost" in r.getMessage()]
            assert [r.levelno for r in lost] == [level], [r.getMessage() for r in lost]
            assert lost[0].name == "shmrpc.agent"
            records.records.clear()
    finally:
        shmrpc_logger.setLevel(level_before)
        shmrpc_logger.removeHandler(records)


def _small_run(rank: int, backend: str, init_method: str) -> None:
    options = rpc.RpcBackendOptions(init_method=init_method, rpc_timeout=30)
    rpc.init_rpc(
        f"worker{rank}", backend=backend, rank=rank, world_size=2, rpc_backend_options=options
    )
    peer = f"worker{1 - rank}"
    for _ in range(5):
        rpc.rpc_sync(peer, torch.add, (torch.ones(2), 1))
        rpc.rpc_async(peer, echo, (torch.ones(1000),)).wait()
    rpc.remote(peer, echo, (1,)).to_here()
    print(f"user output of rank {rank}", flush=True)
    rpc.shutdown()


def small_world(backend: str) -> None:
    """A 2-worker world that makes a few calls and prints one line per worker."""
    run_world(_small_run, 2, args=(backend, new_init_method()))


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "SHMRPC_LOG_LEVEL"}
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _user_lines(stdout: str) -> list[str]:
    """The workers' own lines, in order of rank; nothing else may be on stdout. (Two processes
    share the pipe: one's line may land inside the other's, so lines are not compared.)"""
    found = re.findall(r"user output of rank \d", stdout)
    assert re.sub(r"user output of rank \d", "", stdout).strip() == "", stdout
    return sorted(found)


def test_normal_run_is_quiet(backend):
    code = f"from tests.test_observability import small_world; small_world({backend!r})"
    quiet = _run_python(code)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "", quiet.stderr
    assert _user_lines(quiet.stdout) == ["user output of rank 0", "user output of rank 1"]


def test_debug_level_takes_effect(backend):
    code = f"from tests.test_observability import small_world; small_world({backend!r})"
    chatty = _run_python(code, SHMRPC_LOG_LEVEL="DEBUG")
    assert chatty.returncode == 0, chatty.stderr
    assert "DEBUG:shmrpc.agent:shmrpc: WorkerInfo(id=0, name=worker0) started" in chatty.stderr
    assert "DEBUG:shmrpc.agent:shmrpc: WorkerInfo(id=1, name=worker1) stopped" in chatty.stderr
    assert _user_lines(chatty.stdout) == ["user output of rank 0", "user output of rank 1"]


def test_log_level_variable():
    show = "import logging, shmrpc; print(logging.getLogger('shmrpc').level)"
    for value, level in (("DEBUG", 10), ("info", 20), ("Warning", 30), ("15", 15)):
        done = _run_python(show, SHMRPC_LOG_LEVEL=value)
        assert (done.stdout.strip(), done.stderr) == (str(level), ""), (value, done)
    for bad in ("LOUD", "-1", "1.5"):
        done = _run_python(show, SHMRPC_LOG_LEVEL=bad)
        assert done.stdout.strip() == "0", done  # ignored
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and "SHMRPC_LOG_LEVEL" in lines[0] and bad in lines[0], lines
    # once the application configures logging, shmrpc's records go to its handlers, once
    configured = (
        "import logging, shmrpc; logging.basicConfig(format='app:%(name)s:%(message)s'); "
        "logging.getLogger('shmrpc.agent').debug('hello')"
    )
    done = _run_python(configured, SHMRPC_LOG_LEVEL="DEBUG")
    assert done.stderr.splitlines() == ["app:shmrpc.agent:hello"], done.stderr
    unconfigured = "import logging, shmrpc; logging.getLogger('shmrpc.agent').debug('hello')"
    done = _run_python(unconfigured, SHMRPC_LOG_LEVEL="DEBUG")
    assert done.stderr.splitlines() == ["DEBUG:shmrpc.agent:hello"], done.stderr
