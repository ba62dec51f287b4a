"""Benchmark worlds: this pytest process is worker0 (the client), a spawned process worker1.

One world per RPC stack under test, one at a time: shmrpc over shm, shmrpc over tcp, and
torch.distributed.rpc with its TensorPipe agent as the reference. Each benchmark names the
stack it measures, so one run puts them side by side.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

STACKS = ("shm", "tcp", "tensorpipe")


def _rpc_module(stack: str) -> ModuleType:
    if stack == "tensorpipe":
        import torch.distributed.rpc as torch_rpc

        return torch_rpc
    import shmrpc

    return shmrpc


def _init(stack: str, rank: int, init_method: str) -> ModuleType:
    rpc = _rpc_module(stack)
    if stack == "tensorpipe":
        options: Any = rpc.TensorPipeRpcBackendOptions(init_method=init_method, rpc_timeout=120)
        rpc.init_rpc(f"worker{rank}", rank=rank, world_size=2, rpc_backend_options=options)
    else:
        options = rpc.RpcBackendOptions(init_method=init_method, rpc_timeout=120)
        rpc.init_rpc(
            f"worker{rank}", backend=stack, rank=rank, world_size=2, rpc_backend_options=options
        )
    return rpc


def _serve(stack: str, init_method: str) -> None:
    rpc = _init(stack, 1, init_method)
    rpc.shutdown()  # serves until worker0 shuts down too


@pytest.fixture(scope="session", params=STACKS)
def rpc_world(request: pytest.FixtureRequest) -> Iterator[tuple[str, ModuleType]]:
    """(stack name, its rpc module) with worker1 running; this process is worker0."""
    stack = request.param
    init_method = f"file://{tempfile.mkdtemp(prefix='shmrpc-bench-')}/store"
    server = mp.get_context("spawn").Process(target=_serve, args=(stack, init_method))
    server.start()
    rpc = _init(stack, 0, init_method)
    try:
        yield stack, rpc
    finally:
        rpc.shutdown()
        server.join(60)
        if server.is_alive():
            server.kill()
