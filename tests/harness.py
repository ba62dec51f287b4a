"""Worlds of worker processes for the tests.

* :class:`World` keeps a world running across many tests: rank 0 ("the driver") executes test
  bodies sent to it over a pipe, with RPC initialized; the other ranks serve until shutdown.
  Starting processes and importing torch costs seconds, so most tests share one world per
  backend.
* :func:`run_world` starts a fresh world for one test (lifecycle, crashes, bad init) and
  returns what each rank's function returned.

Every wait is bounded: a world that does not answer in time is killed, and the test fails
with the workers' tracebacks instead of hanging.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch

import shmrpc

BACKENDS = ("shm", "tcp", "auto")

_ctx = mp.get_context("spawn")


def worker_options(
    backend: str, rank: int, world_size: int, init_method: str, **overrides: Any
) -> shmrpc.RpcBackendOptions:
    """Options for one worker. Under ``auto`` the last rank pretends to live on another host,
    so a world mixes shm pairs and tcp pairs."""
    options: dict[str, Any] = {"init_method": init_method, "rpc_timeout": 30}
    if backend == "auto" and world_size > 2:
        options["host_id"] = "other-host" if rank == world_size - 1 else "this-host"
    options.update(overrides)
    return shmrpc.RpcBackendOptions(**options)


def _init(
    backend: str, rank: int, world_size: int, init_method: str, options: dict[str, Any]
) -> None:
    opts = worker_options(backend, rank, world_size, init_method, **options)
    shmrpc.init_rpc(
        f"worker{rank}", backend=backend, rank=rank, world_size=world_size, rpc_backend_options=opts
    )


def _serve_world(
    rank: int, backend: str, world_size: int, init_method: str, options: dict[str, Any], conn: Any
) -> None:
    try:
        _init(backend, rank, world_size, init_method, options)
    except BaseException:
        conn.send(("init-failed", traceback.format_exc()))
        return
    conn.send(("ready", None))
    if rank == 0:
        while True:
            job = conn.recv()
            if job is None:
                break
            fn, args = job
            try:
                result = fn(*args)
            except BaseException:
                conn.send(("error", traceback.format_exc()))
            else:
                try:
                    conn.send(("ok", result))
                except Exception:
                    conn.send(("ok", repr(result)))
    shmrpc.shutdown()
    conn.send(("done", None))


class WorldError(AssertionError):
    pass


class World:
    """A long-lived world; :meth:`run` executes a test body on rank 0."""

    def __init__(self, backend: str, world_size: int = 3, **options: Any) -> None:
        self.backend = backend
        self.world_size = world_size
        self._dir = tempfile.mkdtemp(prefix="shmrpc-test-")
        init_method = f"file://{self._dir}/store"
        self._conns = []
        self._procs = []
        for rank in range(world_size):
            parent, child = _ctx.Pipe()
            proc = _ctx.Process(
                target=_serve_world,
                args=(rank, backend, world_size, init_method, options, child),
                name=f"{backend}-worker{rank}",
            )
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)
        for rank, conn in enumerate(self._conns):
            status, detail = self._recv(conn, 120, f"rank {rank} to start")
            if status != "ready":
                self.kill()
                raise WorldError(f"rank {rank} failed to start:\n{detail}")

    def _recv(self, conn: Any, timeout: float, what: str) -> tuple[str, Any]:
        if not conn.poll(timeout):
            self.kill()
            raise WorldError(
                f"{self.backend} world: timed out after {timeout} s waiting for {what}"
            )
        try:
            return conn.recv()
        except EOFError:
            self.kill()
            raise WorldError(
                f"{self.backend} world: a worker died while waiting for {what}"
            ) from None

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 120) -> Any:
        """Run ``fn(*args)`` on rank 0 and return its result (re-raising its failure)."""
        self._conns[0].send((fn, args))
        status, detail = self._recv(self._conns[0], timeout, fn.__qualname__)
        if status == "error":
            raise WorldError(f"{fn.__qualname__} failed on rank 0:\n{detail}")
        return detail

    def close(self, timeout: float = 60) -> None:
        """Shut the world down gracefully; kill it if that does not finish in time."""
        if not self._procs:
            return
        try:
            self._conns[0].send(None)
            for rank, conn in enumerate(self._conns):
                status, detail = self._recv(conn, timeout, f"rank {rank} to shut down")
                if status != "done":
                    raise WorldError(f"rank {rank} did not shut down cleanly: {detail}")
            for proc in self._procs:
                proc.join(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join(10)
        self._procs = []


# ------------------------------------------------------------------------------ one-shot


def _run_rank(rank: int, fn: Callable[..., Any], args: tuple[Any, ...], results: Any) -> None:
    try:
        value = fn(rank, *args)
        try:
            pickle.dumps(value)
        except Exception:
            value = repr(value)
        results.put((rank, "ok", value))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_world(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: Sequence[Any] = (),
    timeout: float = 120,
    expect_exit: Sequence[int] = (),
) -> list[Any]:
    """Run ``fn(rank, *args)`` in ``world_size`` fresh processes; return their results by rank.

    ``fn`` does its own init_rpc/shutdown. Ranks in ``expect_exit`` may die without a result
    (tests that kill a worker).
    """
    results = _ctx.Queue()
    procs = [
        _ctx.Process(target=_run_rank, args=(rank, fn, tuple(args), results))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    collected: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(collected) < world_size - len(expect_exit):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorldError(
                    f"world timed out after {timeout} s; got ranks {sorted(collected)}"
                )
            try:
                rank, status, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [
                    r
                    for r, p in enumerate(procs)
                    if not p.is_alive() and r not in collected and r not in expect_exit
                ]
                if dead and results.empty():
                    time.sleep(0.5)
                    if results.empty():
                        raise WorldError(f"ranks {dead} died without reporting") from None
                continue
            collected[rank] = (status, value)
        errors = {r: v for r, (s, v) in collected.items() if s == "error"}
        if errors:
            raise WorldError("\n".join(f"rank {r} failed:\n{tb}" for r, tb in errors.items()))
        return [collected.get(r, (None, None))[1] for r in range(world_size)]
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def new_init_method() -> str:
    return f"file://{tempfile.mkdtemp(prefix='shmrpc-test-')}/store"


def shmrpc_names_in_dev_shm() -> list[str]:
    try:
        return sorted(n for n in os.listdir("/dev/shm") if "shmrpc" in n)
    except FileNotFoundError:
        return []


def expect_raises(
    exc_type: Any, fn: Callable[..., Any], *args: Any, match: str | None = None, **kwargs: Any
) -> Any:
    """Call ``fn``; assert it raises ``exc_type`` whose text contains ``match``; return it."""
    try:
        fn(*args, **kwargs)
    except exc_type as e:
        # A failed torch Future keeps its exception in C++, out of the GC's sight: drop the
        # traceback (which references this frame, and so fn) or the cycle would never be freed.
        e.__traceback__ = None
        if match is not None:
            assert match in str(e), f"{match!r} not in {str(e)[:500]!r}"
        return e
    raise AssertionError(f"{fn} did not raise {exc_type}")


# Functions the tests of several modules call remotely.


def add(a: Any, b: Any) -> Any:
    return a + b


def sleep_then(x: Any, delay: float) -> Any:
    time.sleep(delay)
    return x


def make_linear(seed: int, n_in: int, n_out: int) -> Any:
    """A Linear layer whose parameters depend only on ``seed`` (the same on every worker)."""
    generator = torch.Generator().manual_seed(seed)
    module = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return module


def kill_self() -> None:
    """Die at once, like a crashed worker (no cleanup runs)."""
    os.kill(os.getpid(), signal.SIGKILL)
