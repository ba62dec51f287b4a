"""Receive buffers (shmrpc.buffers): large ones are reused only once nothing references them."""

from __future__ import annotations

import gc

import pytest
import torch

from shmrpc import buffers

pytestmark = pytest.mark.skipif(buffers._pool is None, reason="this torch has no use counts")

BIG = 2 << 20


def test_a_released_buffer_is_reused():
    first = buffers.allocate_buffer(BIG)
    address = first.data_ptr()
    del first
    gc.collect()
    assert buffers.allocate_buffer(BIG).data_ptr() == address


def test_a_buffer_is_not_reused_while_a_tensor_on_it_lives():
    first = buffers.allocate_buffer(BIG)
    address = first.data_ptr()
    view = torch.empty(0, dtype=torch.float32)
    view.set_(first.untyped_storage(), 16, (4,), (1,))  # as the serializer builds tensors
    del first
    gc.collect()
    second = buffers.allocate_buffer(BIG)
    assert second.data_ptr() != address
    second.fill_(7)  # must not show through the tensor still alive
    view.fill_(1.0)
    assert bool((second == 7).all())
    del view, second
    gc.collect()
    again = [buffers.allocate_buffer(BIG) for _ in range(2)]
    assert address in {b.data_ptr() for b in again}, "free once the tensor is gone"


def test_each_taker_gets_its_own_buffer():
    held = [buffers.allocate_buffer(BIG) for _ in range(4)]
    assert len({b.data_ptr() for b in held}) == 4


def test_sizes_round_up_to_the_grain_and_the_tensor_has_the_size_asked():
    buf = buffers.allocate_buffer(BIG + 1)
    assert buf.numel() == BIG + 1
    assert buf.untyped_storage().nbytes() % buffers._POOL_GRAIN == 0
    assert buf.data_ptr() % 64 == 0


def test_small_buffers_are_plain_allocations():
    buf = buffers.allocate_buffer(4096)
    assert buf.untyped_storage().nbytes() == 4096


def test_the_pool_keeps_at_most_its_limit(monkeypatch):
    pool = buffers._Pool(limit=3 * BIG)
    held = [pool.take(BIG) for _ in range(5)]  # two of them beyond the limit: not kept
    assert pool._kept == 3 * BIG
    del held
    gc.collect()
    other = pool.take(2 * BIG)  # a new size: free ones are dropped to make room
    assert pool._kept <= 3 * BIG
    assert other.numel() == 2 * BIG
