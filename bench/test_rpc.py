"""RPC rows: shmrpc over shm and tcp beside torch's TensorPipe agent (bench/rows.py has the
calls per block; bench/campaign.py how blocks alternate).

* ``rpc_sync <size>``: round trip of ``rpc_sync("worker1", noop, (tensor,))``, a float32
  tensor of that many bytes (the no-op returns None).
* ``rpc_async, N in flight``: a sliding window of N ``rpc_async`` calls of the no-op with a
  one-element tensor; calls per second.
* all-to-all: 4 workers, each keeping 16 calls in flight to the other three in turn; calls
  per second over the world.
* stream: ``rpc_async`` of the no-op with a 64 MiB tensor, 4 in flight; GB/s.
"""

from __future__ import annotations

import pytest

from bench.cases import cases
from bench.rows import SYNC_SIZES


@pytest.mark.parametrize("case", cases(*(f"rpc_sync {size}" for size in SYNC_SIZES)))
def test_rpc_sync(measured, case):
    assert measured.samples


@pytest.mark.parametrize("case", cases(*(f"rpc_async, {n} in flight" for n in (1, 16, 256))))
def test_rpc_async_pipelined(measured, case):
    assert measured.samples


@pytest.mark.parametrize("case", cases("all-to-all, 4 workers x 16 in flight"))
def test_all_to_all(measured, case):
    assert measured.samples


@pytest.mark.parametrize("case", cases("stream 64MiB, 4 in flight"))
def test_stream(measured, case):
    assert measured.samples
