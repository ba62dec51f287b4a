"""One RPC worker of a benchmark world, driven by the orchestrator over a multiprocessing Pipe.

The orchestrator (the pytest process, bench/campaign.py) is not an RPC worker: it spawns every
worker with :func:`main`, which joins its world (shmrpc over shm or tcp, or
torch.distributed.rpc with its TensorPipe agent) and then answers commands:

* ``("warm", title)``: make the row's warm-up calls, unrecorded.
* ``("run", title)``: make the row's measured calls; answers ``{"samples"|"stamps", "cpu",
  "calls", ...}``, where ``cpu`` is this process's CPU time (all threads, user + system) over
  the calls and ``calls`` how many it made.
* ``("cpu",)``: this process's CPU time so far; servers answer it before and after a block.
* ``("shutdown",)``: a graceful ``rpc.shutdown()`` (every worker of the world gets it), then exit.

Clocks: ``time.perf_counter`` (CLOCK_MONOTONIC, one clock for every process of the host) and
``time.process_time``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
import traceback
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from types import ModuleType
from typing import Any

from bench.rows import Row, row

PR_SET_PDEATHSIG = 1
RPC_TIMEOUT = 120.0
#: A worker that hears nothing for this long assumes the orchestrator is gone.
IDLE_LIMIT = 3600.0


def _die_with_parent() -> None:
    """SIGKILL this process when the orchestrator dies, even while it is stopped (SIGSTOP)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _rpc_module(stack: str) -> ModuleType:
    if stack == "tensorpipe":
        import torch.distributed.rpc as torch_rpc

        return torch_rpc
    import shmrpc

    return shmrpc


def _init(stack: str, rank: int, world_size: int, init_method: str) -> ModuleType:
    rpc = _rpc_module(stack)
    name = f"worker{rank}"
    if stack == "tensorpipe":
        options: Any = rpc.TensorPipeRpcBackendOptions(
            init_method=init_method, rpc_timeout=RPC_TIMEOUT
        )
        rpc.init_rpc(name, rank=rank, world_size=world_size, rpc_backend_options=options)
    else:
        options = rpc.RpcBackendOptions(init_method=init_method, rpc_timeout=RPC_TIMEOUT)
        rpc.init_rpc(
            name, backend=stack, rank=rank, world_size=world_size, rpc_backend_options=options
        )
    return rpc


class Worker:
    def __init__(self, stack: str, rank: int, world_size: int, rpc: ModuleType) -> None:
        import torch

        self.torch = torch
        self.stack, self.rank, self.world_size, self.rpc = stack, rank, world_size, rpc
        self.peers = [f"worker{r}" for r in range(world_size) if r != rank]
        self._tensors: dict[int, Any] = {}
        self._train: Any = None
        self.losses: list[float] = []

    def tensor(self, size: int) -> Any:
        if size not in self._tensors:
            self._tensors[size] = self.torch.ones(size // 4)
        return self._tensors[size]

    # ------------------------------------------------------------------------ one call
    def op(self, r: Row) -> Callable[[int], Any]:
        """The call a row makes, as a function of the call's index."""
        from bench.workload import noop, one

        rpc, peer = self.rpc, self.peers[0]
        if r.op == "sync":
            args = (self.tensor(r.size),)
            return lambda i: rpc.rpc_sync(peer, noop, args)
        if r.op == "remote":
            return lambda i: rpc.remote(peer, one).to_here()
        if r.op == "async":
            args = (self.tensor(r.size),)
            return lambda i: rpc.rpc_async(peer, noop, args)
        if r.op == "all_to_all":
            args, peers = (self.tensor(r.size),), self.peers
            return lambda i: rpc.rpc_async(peers[i % len(peers)], noop, args)
        if r.op == "train":
            return self._train_step()
        raise ValueError(f"unknown op {r.op!r}")

    def _train_step(self) -> Callable[[int], Any]:
        if self._train is None:
            if self.stack == "tensorpipe":
                from bench import rnn_torch as example
            else:
                from shmrpc.examples import rnn as example
            model, opt, criterion = example.build(ps=self.peers[0])
            data, target = next(iter(example.get_batches(1)))
            self._train = (example.train_step, (model, opt, criterion, data, target))
        step, args = self._train

        def call(i: int) -> None:
            self.losses.append(step(*args))

        return call

    # ------------------------------------------------------------------------ a block
    def warm(self, r: Row) -> dict[str, Any]:
        call = self.op(r)
        if r.kind == "latency":
            for i in range(r.block_warmup):
                call(i)
        else:
            _window(call, r.inflight, r.block_warmup)
        return {}

    def run(self, r: Row) -> dict[str, Any]:
        call = self.op(r)
        cpu0 = time.process_time()
        if r.kind == "latency":
            samples = []
            clock = time.perf_counter
            for i in range(r.block_calls):
                t0 = clock()
                call(i)
                samples.append(clock() - t0)
            answer: dict[str, Any] = {"samples": samples, "calls": r.block_calls}
        else:
            stamps, calls = _window(call, r.inflight, r.block_calls)
            answer = {"stamps": stamps, "calls": calls}
        answer["cpu"] = time.process_time() - cpu0
        if r.op == "train":
            answer["losses"] = (self.losses[0], self.losses[-1])
        return answer


def _window(call: Callable[[int], Any], inflight: int, completions: int) -> tuple[list[float], int]:
    """Keep ``inflight`` calls outstanding until ``completions`` have completed.

    Returns the clock when the window was first full, then at each completion (the oldest
    call is the one waited for), and the number of calls issued: the window is refilled after
    each completion, so the measured completions all happen with ``inflight`` outstanding, and
    the last ``inflight`` calls are drained unrecorded.
    """
    clock = time.perf_counter
    window = deque(call(i) for i in range(inflight))
    issued = inflight
    stamps = [clock()]
    for _ in range(completions):
        window.popleft().wait()
        stamps.append(clock())
        window.append(call(issued))
        issued += 1
    while window:
        window.popleft().wait()
    return stamps, issued


def main(conn: Connection, stack: str, rank: int, world_size: int, init_method: str) -> None:
    _die_with_parent()
    try:
        rpc = _init(stack, rank, world_size, init_method)
        worker = Worker(stack, rank, world_size, rpc)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    while True:
        if not conn.poll(IDLE_LIMIT):
            os._exit(3)
        try:
            command, *args = conn.recv()
        except EOFError:
            os._exit(2)  # the orchestrator is gone: nobody will shut this world down
        try:
            if command == "cpu":
                reply: Any = time.process_time()
            elif command == "warm":
                reply = worker.warm(row(args[0]))
            elif command == "run":
                reply = worker.run(row(args[0]))
            elif command == "shutdown":
                rpc.shutdown()
                conn.send(("ok", None))
                return
            else:
                raise ValueError(f"unknown command {command!r}")
        except BaseException:
            conn.send(("error", traceback.format_exc()))
            continue
        conn.send(("ok", reply))
