"""Soak: many small calls with flat memory, and many RRefs created and dropped with none left.

Each backend (shm, tcp) gets a 2-worker world of its own, spawned here and driven over a Pipe
(the pytest process is no RPC worker), kept for both soaks of that backend:

* ``test_soak_rpc_sync``: worker0 makes 1,000,000 ``rpc_sync`` calls of a no-op with a
  four-element tensor to worker1 (``BENCH_QUICK=1``: 20,000). The RSS of both
  workers (``VmRSS`` of ``/proc/<pid>/status``, after a ``gc.collect()`` on each) is sampled
  after a warm-up of 5% of the calls and then every 10%; the last sample of each worker must be
  within 10% of its post-warm-up sample (more is a leak: this is no timing assertion).
* ``test_soak_remote_drop``: worker0 makes 10,000 ``remote()`` calls that create a small tensor
  on worker1 and drops each RRef at once, then ``gc.collect()``; within
  a bounded wait worker1 must own no RRef and count no fork, and worker0 hold no pending user
  or deletion (``_rref_context_get_debug_info``, and the RRef context's own tables).

The figures (RSS samples, calls per second of each tenth, drain time) go into
pytest-benchmark's ``extra_info`` and are printed (``pytest -s``); the benchmark's one round is
the whole soak. The row names are not rows of bench/rows.py: bench/report.py leaves them out of
docs/benchmarks.md's tables.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest

from bench.rows import QUICK

BACKENDS = ("shm", "tcp")
CALLS = 20_000 if QUICK else 1_000_000
REMOTES = 10_000  # cheap (seconds): the same in quick mode
WARMUP_FRACTION = 0.05
SAMPLES = 10  # after the warm-up, one sample every 10% of the calls
RSS_TOLERANCE = 0.10
DRAIN_TIMEOUT = 60.0  # for the owner to hear of every dropped RRef
START_TIMEOUT = 180.0
SOAK_TIMEOUT = 900.0 if QUICK else 3600.0
RPC_TIMEOUT = 120.0
PR_SET_PDEATHSIG = 1

_ctx = mp.get_context("spawn")


# ------------------------------------------------------------------ run by the workers


def noop(tensor: Any) -> None:
    return None


def small_tensor(i: int) -> Any:
    import torch

    return torch.full((4,), float(i))


def collect() -> None:
    gc.collect()


def rss_kib(pid: int | str = "self") -> int:
    """Resident set size of process ``pid`` in KiB (``VmRSS``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def rref_counts() -> dict[str, int]:
    """This worker's RRef counts: the debug info, and the sizes of the context's tables."""
    import shmrpc
    from shmrpc import api

    counts = {k: int(v) for k, v in shmrpc._rref_context_get_debug_info().items()}
    context = api._world.rrefs  # type: ignore[union-attr]  # internal: no public accessor
    with context._lock:
        for table in ("owners", "forks", "pending_users", "pending_children", "confirmed"):
            counts[f"table_{table}"] = len(getattr(context, f"_{table}", ()))
        counts["table_finalizers"] = len(getattr(context, "_finalizers", ()))
        counts["table_tombstones"] = len(getattr(context, "_tombstones", ()))
    return counts


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _soak_calls(rpc: Any, calls: int) -> dict[str, Any]:
    """worker0: ``calls`` rpc_sync no-ops to worker1, sampling both workers' RSS."""
    import torch

    peer = "worker1"
    peer_pid = rpc.rpc_sync(peer, os.getpid)
    args = (torch.ones(4),)
    warmup = max(1, int(calls * WARMUP_FRACTION))
    marks = [warmup + (calls - warmup) * k // SAMPLES for k in range(SAMPLES + 1)]

    def sample(done: int, seconds: float) -> dict[str, Any]:
        gc.collect()
        rpc.rpc_sync(peer, collect)
        return {
            "calls": done,
            "seconds": seconds,
            "caller_rss_kib": rss_kib(),
            "callee_rss_kib": rss_kib(peer_pid),
        }

    samples = [{"calls": 0, "seconds": 0.0, "caller_rss_kib": rss_kib(), "callee_rss_kib": 0}]
    samples[0]["callee_rss_kib"] = rss_kib(peer_pid)
    done, busy = 0, 0.0
    for mark in marks:
        start = time.perf_counter()
        for _ in range(mark - done):
            rpc.rpc_sync(peer, noop, args)
        busy += time.perf_counter() - start
        done = mark
        samples.append(sample(done, busy))
    return {
        "samples": samples,
        "warmup_calls": warmup,
        "caller_debug": rpc._get_debug_info(),
        "callee_debug": rpc.rpc_sync(peer, _debug_info),
    }


def _debug_info() -> dict[str, str]:
    import shmrpc

    return shmrpc._get_debug_info()


def _soak_remote(rpc: Any, n: int) -> dict[str, Any]:
    """worker0: ``n`` remote() + drop to worker1, then wait until worker1 owns nothing."""
    peer = "worker1"
    peer_pid = rpc.rpc_sync(peer, os.getpid)
    rpc.rpc_sync(peer, collect)
    rss_before = rss_kib(peer_pid)
    start = time.perf_counter()
    for i in range(n):
        rref = rpc.remote(peer, small_tensor, (i,))
        del rref
    issued = time.perf_counter() - start
    gc.collect()
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while True:
        mine, owner = rref_counts(), rpc.rpc_sync(peer, rref_counts)
        drained = all(v == 0 for v in owner.values()) and all(v == 0 for v in mine.values())
        if drained or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
        gc.collect()
    drain = time.perf_counter() - start - issued
    rpc.rpc_sync(peer, collect)
    return {
        "issued_s": issued,
        "drained_s": drain,
        "drained": drained,
        "caller_counts": mine,
        "owner_counts": owner,
        "owner_rss_before_kib": rss_before,
        "owner_rss_after_kib": rss_kib(peer_pid),
    }


def _serve(rank: int, backend: str, init_method: str, conn: Connection) -> None:
    """A worker: init, then (rank 0) run the commands it gets; shut down on ``None``."""
    _die_with_parent()
    try:
        import shmrpc as rpc

        options = rpc.RpcBackendOptions(init_method=init_method, rpc_timeout=RPC_TIMEOUT)
        rpc.init_rpc(
            f"worker{rank}", backend=backend, rank=rank, world_size=2, rpc_backend_options=options
        )
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    while rank == 0:
        job = conn.recv()
        if job is None:
            break
        name, arg = job
        try:
            result = (_soak_calls if name == "calls" else _soak_remote)(rpc, arg)
        except BaseException:
            conn.send(("error", traceback.format_exc()))
        else:
            conn.send(("ok", result))
    rpc.shutdown()
    conn.send(("done", None))


# ------------------------------------------------------------------- run by pytest


class SoakWorld:
    """Two spawned workers of one backend; every wait on them is bounded."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._dir = tempfile.mkdtemp(prefix="shmrpc-soak-")
        init_method = f"file://{self._dir}/store"
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for rank in range(2):
            parent, child = _ctx.Pipe()
            proc = _ctx.Process(
                target=_serve,
                args=(rank, backend, init_method, child),
                name=f"soak-{backend}-{rank}",
                daemon=True,
            )
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        for rank in range(2):
            status, detail = self._recv(rank, START_TIMEOUT, "to start")
            if status != "ready":
                self.kill()
                raise RuntimeError(f"soak {backend} worker{rank} failed to start:\n{detail}")

    def _recv(self, rank: int, timeout: float, what: str) -> tuple[str, Any]:
        conn = self._conns[rank]
        if not conn.poll(timeout):
            self.kill()
            raise TimeoutError(f"soak {self.backend}: worker{rank} took over {timeout} s {what}")
        try:
            return conn.recv()
        except EOFError:
            self.kill()
            raise RuntimeError(f"soak {self.backend}: worker{rank} died {what}") from None

    def run(self, job: str, arg: int) -> dict[str, Any]:
        self._conns[0].send((job, arg))
        status, detail = self._recv(0, SOAK_TIMEOUT, f"running {job}")
        if status != "ok":
            raise AssertionError(f"soak {self.backend} {job} failed on worker0:\n{detail}")
        return detail

    def close(self) -> None:
        try:
            if all(p.is_alive() for p in self._procs):
                self._conns[0].send(None)
                for rank in range(2):
                    self._recv(rank, 60, "to shut down")
        finally:
            self.kill()
            shutil.rmtree(self._dir, ignore_errors=True)

    def kill(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
            proc.join(10)


@pytest.fixture(scope="module", params=BACKENDS)
def soak_world(request: pytest.FixtureRequest) -> Iterator[SoakWorld]:
    world = SoakWorld(request.param)
    try:
        yield world
    finally:
        world.close()


def _once(benchmark: Any, fn: Any) -> Any:
    """Run ``fn`` once as the benchmark's only round; return what it returned."""
    box: list[Any] = []
    benchmark.pedantic(lambda: box.append(fn()), rounds=1, iterations=1, warmup_rounds=0)
    return box[0]


def _info(title: str, backend: str) -> dict[str, Any]:
    # row/pin/stack: what bench/report.py reads of every benchmark (it skips unknown rows)
    return {"row": title, "pin": "unpinned", "stack": backend, "kind": "soak", "quick": QUICK}


@pytest.mark.timeout(SOAK_TIMEOUT + 300)
def test_soak_rpc_sync(benchmark, soak_world):
    backend = soak_world.backend
    result = _once(benchmark, lambda: soak_world.run("calls", CALLS))
    samples = result["samples"]
    warm, last = samples[1], samples[-1]
    rates = [
        (b["calls"] - a["calls"]) / (b["seconds"] - a["seconds"])
        for a, b in itertools.pairwise(samples[1:])
    ]
    info = _info(f"soak: {CALLS} rpc_sync", backend)
    info.update(
        calls=CALLS,
        warmup_calls=result["warmup_calls"],
        seconds=last["seconds"],
        calls_per_s=CALLS / last["seconds"],
        calls_per_s_per_tenth=[round(r) for r in rates],
        rss_kib=[(s["calls"], s["caller_rss_kib"], s["callee_rss_kib"]) for s in samples],
        caller_rss_growth=last["caller_rss_kib"] / warm["caller_rss_kib"] - 1,
        callee_rss_growth=last["callee_rss_kib"] / warm["callee_rss_kib"] - 1,
        caller_debug=result["caller_debug"],
        callee_debug=result["callee_debug"],
    )
    benchmark.group = "soak"
    benchmark.extra_info.update(info)
    print(
        f"\nsoak {backend}: {CALLS} rpc_sync in {last['seconds']:.1f} s "
        f"({info['calls_per_s']:.0f}/s; per tenth {info['calls_per_s_per_tenth']}); RSS KiB "
        f"caller {warm['caller_rss_kib']} -> {last['caller_rss_kib']} "
        f"({info['caller_rss_growth']:+.1%}), callee {warm['callee_rss_kib']} -> "
        f"{last['callee_rss_kib']} ({info['callee_rss_growth']:+.1%}); samples "
        f"(calls, caller, callee) {info['rss_kib']}"
    )
    for who in ("caller", "callee"):
        growth = info[f"{who}_rss_growth"]
        assert growth <= RSS_TOLERANCE, (
            f"{backend}: the {who}'s RSS grew {growth:.1%} after the warm-up "
            f"({warm[f'{who}_rss_kib']} -> {last[f'{who}_rss_kib']} KiB): {info['rss_kib']}"
        )
    assert result["caller_debug"]["agent.client_active_calls"] == "0", result["caller_debug"]


@pytest.mark.timeout(SOAK_TIMEOUT + 300)
def test_soak_remote_drop(benchmark, soak_world):
    backend = soak_world.backend
    result = _once(benchmark, lambda: soak_world.run("remote", REMOTES))
    info = _info(f"soak: {REMOTES} remote + drop", backend)
    info.update(remotes=REMOTES, **result)
    benchmark.group = "soak"
    benchmark.extra_info.update(info)
    print(
        f"\nsoak {backend}: {REMOTES} remote() + drop issued in {result['issued_s']:.2f} s, "
        f"owner released all in {result['drained_s']:.2f} s more: {result['drained']}; owner "
        f"RSS KiB {result['owner_rss_before_kib']} -> {result['owner_rss_after_kib']}; "
        f"owner {result['owner_counts']}; caller {result['caller_counts']}"
    )
    left = {k: v for k, v in result["owner_counts"].items() if v}
    assert not left, f"{backend}: after {DRAIN_TIMEOUT} s the owner still counts {left}"
    left = {k: v for k, v in result["caller_counts"].items() if v}
    assert not left, f"{backend}: after {DRAIN_TIMEOUT} s the caller still counts {left}"
