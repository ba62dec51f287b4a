"""The serializer on its own: what survives a round trip, and what is refused."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest
import torch

from shmrpc.serialization import Serializer


def round_trip(obj, serializer=None):
    serializer = serializer or Serializer()
    pickled = serializer.dumps(obj)
    received = [b.clone() for b in pickled.buffers]  # what a transport hands the receiver
    return serializer.loads(pickled.data, pickled.table, received), pickled


def test_large_tensors_travel_out_of_band():
    t = torch.randn(100_000)
    back, pickled = round_trip(t)
    assert torch.equal(back, t)
    assert len(pickled.data) < 200, "tensor bytes must not be inside the pickle"
    assert [b.numel() for b in pickled.buffers] == [400_000]


def test_small_tensors_travel_inline():
    t = torch.randn(100)
    back, pickled = round_trip(t)
    assert torch.equal(back, t) and not pickled.buffers
    assert back.data_ptr() != t.data_ptr(), "the receiver gets its own copy"
    back.add_(1)
    assert not torch.equal(back, t)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.tensor(3.5),  # 0-d
        lambda: torch.arange(6, dtype=torch.int16),
        lambda: torch.randn(2, 3, 4),
        lambda: torch.randn(3, 4).t(),  # not contiguous: the general path
        lambda: torch.arange(10.0)[2:5],  # not at the start of its storage
        lambda: torch.ones(4, dtype=torch.bool),
    ],
)
def test_small_tensors_alone_on_their_storage_keep_everything(make):
    """The one-step path for a tensor that is all of its inline storage, and the general
    path next to it, agree: values, dtype, shape, strides, requires_grad, a private copy."""
    t = make()
    if t.is_floating_point():
        t.requires_grad_(True)
    back, _ = round_trip([t, 1])
    back = back[0]
    assert back.dtype == t.dtype and back.shape == t.shape and back.stride() == t.stride()
    assert torch.equal(back.detach(), t.detach())
    assert back.requires_grad == t.requires_grad
    assert back.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()


def test_two_tensors_on_one_small_storage_still_share_it():
    base = torch.arange(8.0)
    a, b = base.view(2, 4), base.view(8)  # both all of the storage, contiguous, offset 0
    ra, rb = round_trip((a, b))[0]
    assert ra.untyped_storage().data_ptr() == rb.untyped_storage().data_ptr()
    ra[0, 0] = 42.0
    assert rb[0] == 42.0


@pytest.mark.parametrize("n", [64, 100_000])  # inline and out of band
def test_views_strides_offsets_and_sharing(n):
    base = torch.arange(float(n))
    a, b, c = base[3:20], base[10:50:4], torch.arange(n * 1.0).reshape(-1, 4).t()
    (ra, rb, rc), pickled = round_trip((a, b, c))
    assert len(pickled.buffers) == (0 if n == 64 else 2), "one buffer per large storage"
    assert torch.equal(ra, a) and torch.equal(rb, b) and torch.equal(rc, c)
    assert rb.stride() == (4,) and rc.stride() == (1, 4)
    assert ra.untyped_storage().data_ptr() == rb.untyped_storage().data_ptr()
    ra[7] = -5  # base[10] is also b[0]
    assert rb[0].item() == -5


@pytest.mark.parametrize("n", [16, 100_000])
def test_mixed_dtype_views_of_one_storage(n):
    base = torch.arange(n, dtype=torch.int64)
    as_bytes = base.view(torch.uint8)[8:40]
    (x, y), _ = round_trip((base[1:], as_bytes))
    assert torch.equal(x, base[1:]) and torch.equal(y, as_bytes)
    assert x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        torch.bfloat16,
        torch.complex64,
        torch.bool,
        torch.int8,
        torch.uint8,
        torch.int16,
        torch.float64,
    ],
)
def test_dtypes(dtype):
    t = (torch.randn(37) * 10).to(dtype)
    back, _ = round_trip(t)
    assert back.dtype == dtype and torch.equal(back, t)


def test_special_tensors():
    t = torch.ones(3, requires_grad=True)
    (leaf, non_leaf, empty, param, conj, sparse), _ = round_trip(
        (
            t,
            t * 2,
            torch.empty(0, 4),
            torch.nn.Parameter(torch.ones(2)),
            torch.tensor([1 + 2j]).conj(),
            torch.sparse_coo_tensor([[1]], [3.0], (2,)),
        )
    )
    assert leaf.requires_grad and leaf.is_leaf and non_leaf.requires_grad and non_leaf.is_leaf
    assert empty.shape == (0, 4)
    assert isinstance(param, torch.nn.Parameter)
    assert conj.item() == 1 - 2j
    assert torch.equal(sparse.to_dense(), torch.tensor([0.0, 3.0]))


def test_numpy_arrays_out_of_band():
    array = np.arange(10_000, dtype=np.float32)
    back, pickled = round_trip({"a": array})
    assert np.array_equal(back["a"], array) and len(pickled.buffers) == 1


def test_refusals():
    with pytest.raises(RuntimeError, match=r"Can not pickle torch\.futures\.Future"):
        Serializer().dumps([torch.futures.Future()])
    with pytest.raises(TypeError, match="pickle"):
        Serializer().dumps({"lock": threading.Lock()})
    pickled = Serializer().dumps(torch.ones(100_000))  # out of band: needs its buffers
    with pytest.raises(pickle.UnpicklingError, match="only be unpickled by shmrpc"):
        pickle.loads(pickled.data)


class Reentrant:
    """Pickles its tensor with a nested dumps() call, as torch's tests do."""

    serializer = Serializer()

    def __init__(self, t):
        self.t = t

    def __getstate__(self):
        inner = self.serializer.dumps(self.t)
        return (inner.data, inner.table, [b.clone() for b in inner.buffers])

    def __setstate__(self, state):
        self.t = self.serializer.loads(*state)


def test_reentrant_pickling():
    obj = (torch.ones(3), Reentrant(torch.arange(4.0)), torch.zeros(2))
    (a, r, b), _ = round_trip(obj, Reentrant.serializer)
    assert torch.equal(a, obj[0]) and torch.equal(r.t, obj[1].t) and torch.equal(b, obj[2])


class Token:
    def __init__(self, value):
        self.value = value


def test_registered_types_get_the_receiver_context():
    serializer = Serializer()
    serializer.register(Token, "token", lambda tok: (tok.value,), lambda ctx, v: (ctx, v))
    pickled = serializer.dumps([Token(5)])
    assert serializer.loads(pickled.data, pickled.table, pickled.buffers, context="ctx") == [
        ("ctx", 5)
    ]
    with pytest.raises(ValueError, match="already registered"):
        serializer.register(Token, "token", lambda tok: (), lambda ctx: None)
