"""CUDA tensor round trips: shmrpc over shm (CUDA IPC handles) and tcp (staged through pinned
host memory) beside TensorPipe (its cuda_ipc channel), with device maps cuda:0 -> cuda:0.

* ``cuda_echo <size>``: ``rpc_sync("worker1", echo, (tensor,))`` of a float32 tensor of that
  many bytes on worker0's ``cuda:0``; it lands on worker1's ``cuda:0`` (worker0's
  ``device_maps={"worker1": {0: 0}}``) and ``echo`` returns it, so the reply carries it back
  (through the inverse of the map). A call ends with ``torch.cuda.synchronize``; latency.

These rows run in CUDA worlds of their own (bench/campaign.py) and are skipped, before any world
is started, where torch sees no CUDA device.
"""

from __future__ import annotations

import pytest
import torch

from bench.cases import cases
from bench.rows import CUDA_SIZES

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (the CUDA rows skip without one)"
    ),
]


@pytest.mark.parametrize("case", cases(*(f"cuda_echo {size}" for size in CUDA_SIZES)))
def test_cuda_echo(measured, case):
    assert measured.samples
