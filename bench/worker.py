"""One RPC worker of a benchmark world, driven by the orchestrator over a multiprocessing Pipe.

The orchestrator (the pytest process, bench/campaign.py) is not an RPC worker: it spawns every
worker with :func:`main`, which joins its world (shmrpc over shm or tcp, or
torch.distributed.rpc with its TensorPipe agent) and then answers commands:

* ``("warm", title)``: make the row's warm-up calls, unrecorded.
* ``("run", title)``: make the row's measured calls; answers ``{"samples"|"stamps", "cpu",
  "calls", ...}``, where ``cpu`` is this process's CPU time (all threads, user + system) over
  the calls and ``calls`` how many it made.
* ``("cpu",)``: this process's CPU time so far; servers answer it before and after a block.
* ``("release",)``: after a block of a CUDA row, on every worker: drop the row's tensors and
  hand the GPU memory they and the transport's copies left cached back (a frozen world keeps
  no GiBs on the GPU).
* ``("shutdown",)``: a graceful ``rpc.shutdown()`` (every worker of the world gets it), then exit.

Clocks: ``time.perf_counter`` (CLOCK_MONOTONIC, one clock for every process of the host) and
``time.process_time``. A CUDA call ends with ``torch.cuda.synchronize`` of ``cuda:0`` before
the clock is read: the reply's copies (IPC, staging, TensorPipe's channels) may still be queued
on a stream when ``rpc_sync`` returns.

Worlds of CUDA rows (``cuda=True``) put both workers on ``cuda:0``; worker0's options carry
``device_maps={"worker1": {0: 0}}`` (``RpcBackendOptions`` for shmrpc,
``TensorPipeRpcBackendOptions`` for TensorPipe). Worker1 needs no map: a reply goes back
through the inverse of the caller's map (TensorPipe derives worker1's devices from it).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import time
import traceback
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from types import ModuleType
from typing import Any

from bench.rows import CUDA_DEVICE, Row, row

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


def device_maps(rank: int, world_size: int) -> dict[str, dict[int, int]] | None:
    """A CUDA world's maps: worker0 sends ``cuda:0`` to every peer's ``cuda:0``; the others
    only reply, through the inverse of worker0's map, and need none."""
    if rank != 0:
        return None
    return {f"worker{r}": {CUDA_DEVICE: CUDA_DEVICE} for r in range(1, world_size)}


def _init(
    stack: str, rank: int, world_size: int, init_method: str, cuda: bool = False
) -> ModuleType:
    rpc = _rpc_module(stack)
    name = f"worker{rank}"
    maps = None
    if cuda:
        import torch

        torch.cuda.set_device(CUDA_DEVICE)
        maps = device_maps(rank, world_size)
    if stack == "tensorpipe":
        options: Any = rpc.TensorPipeRpcBackendOptions(
            init_method=init_method, rpc_timeout=RPC_TIMEOUT, device_maps=maps
        )
        rpc.init_rpc(name, rank=rank, world_size=world_size, rpc_backend_options=options)
    else:
        options = rpc.RpcBackendOptions(
            init_method=init_method, rpc_timeout=RPC_TIMEOUT, device_maps=maps
        )
        rpc.init_rpc(
            name, backend=stack, rank=rank, world_size=world_size, rpc_backend_options=options
        )
    return rpc


class Worker:
    def __init__(
        self, stack: str, rank: int, world_size: int, rpc: ModuleType, cuda: bool = False
    ) -> None:
        import torch

        self.torch = torch
        self.stack, self.rank, self.world_size, self.rpc = stack, rank, world_size, rpc
        self.cuda = cuda
        self.peers = [f"worker{r}" for r in range(world_size) if r != rank]
        self._tensors: dict[int, Any] = {}
        self._cuda_tensors: dict[int, Any] = {}
        self._train: Any = None
        self.losses: list[float] = []

    def tensor(self, size: int) -> Any:
        if size not in self._tensors:
            self._tensors[size] = self.torch.ones(size // 4)
        return self._tensors[size]

    def cuda_tensor(self, size: int) -> Any:
        """``size`` bytes of float32 on ``cuda:0``, distinct values (checked after the echo)."""
        if not self.cuda:
            raise RuntimeError("a CUDA row in a world made without device maps")
        if size not in self._cuda_tensors:
            torch = self.torch
            device = torch.device("cuda", CUDA_DEVICE)
            self._cuda_tensors[size] = torch.arange(size // 4, dtype=torch.float32, device=device)
            torch.cuda.synchronize(device)
        return self._cuda_tensors[size]

    # ------------------------------------------------------------------------ one call
    def op(self, r: Row) -> Callable[[int], Any]:
        """The call a row makes, as a function of the call's index."""
        from bench.workload import echo, noop, one

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
        if r.op == "cuda_echo":
            args = (self.cuda_tensor(r.size),)
            synchronize, device = self.torch.cuda.synchronize, args[0].device

            def echo_call(i: int) -> None:
                rpc.rpc_sync(peer, echo, args)
                synchronize(device)  # the reply's copies are done before the clock is read

            return echo_call
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
        if r.op == "cuda_echo":
            self._check_echo(r)
        return {}

    def _check_echo(self, r: Row) -> None:
        """One more call, unrecorded: the reply is the tensor sent, on ``cuda:0``."""
        torch, sent = self.torch, self.cuda_tensor(r.size)
        from bench.workload import echo

        got = self.rpc.rpc_sync(self.peers[0], echo, (sent,))
        torch.cuda.synchronize(sent.device)
        if not isinstance(got, torch.Tensor) or got.device != sent.device:
            where = got.device if isinstance(got, torch.Tensor) else type(got).__name__
            raise RuntimeError(f"{r.title}: the reply is on {where}, not {sent.device}")
        if got.shape != sent.shape or not torch.equal(got, sent):
            raise RuntimeError(f"{r.title}: the reply differs from the tensor sent")

    def release(self) -> None:
        """Drop this row's CUDA tensors; empty torch's caches (and IPC limbo) on ``cuda:0``."""
        if not self.cuda:
            return
        torch = self.torch
        self._cuda_tensors.clear()
        gc.collect()
        torch.cuda.synchronize(CUDA_DEVICE)
        torch.cuda.ipc_collect()
        torch.cuda.empty_cache()

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


def main(
    conn: Connection, stack: str, rank: int, world_size: int, init_method: str, cuda: bool = False
) -> None:
    _die_with_parent()
    try:
        rpc = _init(stack, rank, world_size, init_method, cuda)
        worker = Worker(stack, rank, world_size, rpc, cuda)
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
            elif command == "release":
                reply = worker.release()
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
