"""Round-trip latency and pipelined throughput: shmrpc (shm, tcp) beside torch's TensorPipe.

Latency: one ``rpc_sync`` of a no-op function that takes one tensor of 0 B .. 64 MiB.
Throughput: 1000 pipelined ``rpc_async`` calls of the no-op, waited for together.
"""

from __future__ import annotations

import pytest
import torch

from bench.workload import noop

SIZES = {"0B": 0, "1KiB": 1 << 10, "1MiB": 1 << 20, "16MiB": 16 << 20, "64MiB": 64 << 20}
# (rounds, warm-up rounds): enough samples for a stable median, bounded run time.
ROUNDS = {
    "0B": (3000, 300),
    "1KiB": (3000, 300),
    "1MiB": (300, 30),
    "16MiB": (40, 5),
    "64MiB": (15, 3),
}
PIPELINED = 1000


@pytest.mark.parametrize("size", list(SIZES))
def test_rpc_sync_latency(benchmark, rpc_world, size):
    stack, rpc = rpc_world
    benchmark.group = f"rpc_sync {size}"
    benchmark.extra_info.update(stack=stack, bytes=SIZES[size])
    tensor = torch.ones(SIZES[size] // 4)
    rounds, warmup = ROUNDS[size]
    benchmark.pedantic(
        rpc.rpc_sync,
        args=("worker1", noop, (tensor,)),
        rounds=rounds,
        warmup_rounds=warmup,
        iterations=1,
    )


def test_rpc_async_throughput(benchmark, rpc_world):
    stack, rpc = rpc_world
    benchmark.group = f"rpc_async x{PIPELINED} pipelined"
    benchmark.extra_info.update(stack=stack, calls=PIPELINED)
    arg = torch.ones(1)

    def burst():
        torch.futures.wait_all([rpc.rpc_async("worker1", noop, (arg,)) for _ in range(PIPELINED)])

    benchmark.pedantic(burst, rounds=15, warmup_rounds=2, iterations=1)
