"""Calls and what travels with them: builtins, Python functions, tensors, containers.

Test bodies (``_body_*``) run on worker0 of a live 3-worker world; functions they call
remotely live at module level so every worker can import them.
"""

from __future__ import annotations

import collections
import os

import numpy as np
import torch

import shmrpc as rpc
from shmrpc import WorkerInfo

# --------------------------------------------------------------------- remote functions


def echo(x):
    return x


def add_kw(a, b=0, *, c=0):
    return a + b + c


def no_result(*args, **kwargs):
    return None


def my_pid():
    return os.getpid()


def my_name():
    return rpc.get_worker_info().name


def mutate(t):
    t.add_(100)
    return t


def describe(t):
    return {
        "shape": tuple(t.shape),
        "stride": t.stride(),
        "offset": t.storage_offset(),
        "contiguous": t.is_contiguous(),
        "dtype": t.dtype,
        "requires_grad": t.requires_grad,
        "is_leaf": t.is_leaf,
    }


def storages_shared(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def nested_call(dst, x):
    return rpc.rpc_sync(dst, torch.add, (x, 1))


Point = collections.namedtuple("Point", ["x", "y"])


class Counter:
    count = 0

    def __init__(self, start):
        self.start = start

    def bump(self, n):
        return self.start + n

    @classmethod
    def make(cls, start):
        return cls(start).start

    @staticmethod
    def twice(x):
        return 2 * x


def set_global(value):
    global _GLOBAL
    _GLOBAL = value


def get_global():
    return globals().get("_GLOBAL")


# ---------------------------------------------------------------------------- bodies


def _body_builtins():
    got = rpc.rpc_sync("worker1", torch.add, (torch.ones(2, 2), 3))
    assert torch.equal(got, torch.full((2, 2), 4.0))
    got = rpc.rpc_async("worker2", torch.mul, (torch.ones(3), torch.arange(3.0))).wait()
    assert torch.equal(got, torch.arange(3.0))
    assert torch.equal(
        rpc.rpc_sync("worker1", torch.nonzero, (torch.tensor([0, 1, 0, 2]),)),
        torch.tensor([[1], [3]]),
    )
    assert rpc.rpc_sync("worker1", min, (3, 1, 2)) == 1


def test_builtins(world):
    world.run(_body_builtins)


def _body_python_functions():
    assert rpc.rpc_sync("worker1", add_kw, (1,), {"b": 2, "c": 3}) == 6
    assert rpc.rpc_sync("worker1", add_kw, kwargs={"a": 5}) == 5
    assert rpc.rpc_sync("worker1", add_kw, [1, 2]) == 3  # args as a list
    assert rpc.rpc_sync("worker1", no_result) is None
    assert rpc.rpc_sync("worker2", Counter, (5,)).start == 5
    assert rpc.rpc_sync("worker2", Counter(10).bump, (1,)) == 11
    assert rpc.rpc_sync("worker2", Counter.make, (7,)) == 7
    assert rpc.rpc_sync("worker2", Counter.twice, (21,)) == 42
    assert rpc.rpc_sync("worker1", my_pid) != os.getpid()


def test_python_functions(world):
    world.run(_body_python_functions)


def _body_destinations():
    info = rpc.get_worker_info("worker1")
    assert info == WorkerInfo("worker1", 1) and hash(info) == hash(WorkerInfo("worker1", 1))
    assert rpc.get_worker_info(2).name == "worker2"
    assert rpc.get_worker_info().name == "worker0"
    for to in ("worker1", info, 1):
        assert rpc.rpc_sync(to, my_name) == "worker1"
        assert rpc.rpc_async(to, my_name).wait() == "worker1"
    assert rpc.rpc_sync("worker1", echo, (info,)) == info  # WorkerInfo round-trips


def test_destinations(world):
    world.run(_body_destinations)


def _body_self_calls():
    me = rpc.get_worker_info()
    assert rpc.rpc_sync(me, torch.add, (torch.ones(2), 1)).sum().item() == 4
    assert rpc.rpc_sync("worker0", my_pid) == os.getpid()
    t = torch.zeros(3)
    back = rpc.rpc_sync("worker0", mutate, (t,))
    assert torch.equal(t, torch.zeros(3)), "a call to self must not mutate the caller's tensor"
    assert torch.equal(back, torch.full((3,), 100.0))
    assert back.data_ptr() != t.data_ptr()


def test_self_calls(world):
    world.run(_body_self_calls)


def _body_value_semantics():
    t = torch.zeros(4)
    back = rpc.rpc_sync("worker1", mutate, (t,))
    assert torch.equal(t, torch.zeros(4))
    assert torch.equal(back, torch.full((4,), 100.0))


def test_value_semantics(world):
    world.run(_body_value_semantics)


DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
    torch.complex128,
]


def _body_dtypes_and_sizes():
    gen = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        for n in (0, 1, 3, 1000, 65537):
            if dtype.is_floating_point or dtype.is_complex:
                t = torch.randn(n, generator=gen).to(dtype)
            else:
                t = (
                    torch.randint(0, 100, (n,), generator=gen) % 2
                    if dtype is torch.bool
                    else torch.randint(0, 100, (n,), generator=gen)
                ).to(dtype)
            back = rpc.rpc_sync("worker1", echo, (t,))
            assert back.dtype == dtype and torch.equal(back, t), (dtype, n)
    # sizes beyond any ring
    for mib in (1, 5, 17):
        t = torch.randn(mib << 18, generator=gen)
        assert torch.equal(rpc.rpc_sync("worker2", echo, (t,)), t), mib


def test_dtypes_and_sizes(world):
    world.run(_body_dtypes_and_sizes)


def _body_huge_tensor():
    t = torch.arange(64 << 20, dtype=torch.int32)  # 256 MiB
    back = rpc.rpc_sync("worker1", echo, (t,), timeout=120)
    assert back.shape == t.shape and torch.equal(back[-8:], t[-8:]) and torch.equal(back, t)


def test_256_mib_tensor(world):
    world.run(_body_huge_tensor, timeout=240)


def _body_views_and_sharing():
    base = torch.arange(100.0)
    view = base[10:20]
    strided = base[5:60:7]
    nc = torch.arange(12.0).reshape(3, 4).t()
    d = rpc.rpc_sync("worker1", describe, (strided,))
    assert d["shape"] == (8,) and d["stride"] == (7,)
    d = rpc.rpc_sync("worker1", describe, (nc,))
    assert d["shape"] == (4, 3) and d["stride"] == (1, 4) and not d["contiguous"]
    assert torch.equal(rpc.rpc_sync("worker1", echo, (nc,)), nc)
    assert rpc.rpc_sync("worker1", storages_shared, (view, strided))
    assert not rpc.rpc_sync("worker1", storages_shared, (view, torch.arange(3.0)))
    a, b = rpc.rpc_sync("worker2", echo, ((view, strided),))
    assert torch.equal(a, view) and torch.equal(b, strided)
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    a[2] = -1  # base[12] is both view[2] and strided[1]
    assert b[1].item() == -1
    # the same tensor twice arrives as one object
    x, y = rpc.rpc_sync("worker2", echo, ((view, view),))
    assert x is y
    # a small view of a big tensor arrives as the view, not the whole storage
    big = torch.zeros(1 << 22)
    small = rpc.rpc_sync("worker1", echo, (big[1000:1010],))
    assert small.untyped_storage().nbytes() < 1 << 10


def test_views_and_sharing(world):
    world.run(_body_views_and_sharing)


def _body_grad_and_parameters():
    leaf = torch.ones(3, requires_grad=True)
    d = rpc.rpc_sync("worker1", describe, (leaf * 2,))  # non-leaf: arrives as a leaf
    assert d["requires_grad"] and d["is_leaf"]
    assert not rpc.rpc_sync("worker1", describe, (leaf.detach(),))["requires_grad"]
    p = torch.nn.Parameter(torch.randn(2, 2))
    back = rpc.rpc_sync("worker1", echo, (p,))
    assert isinstance(back, torch.nn.Parameter) and back.requires_grad and torch.equal(back, p)


def test_grad_and_parameters(world):
    world.run(_body_grad_and_parameters)


def _body_containers():
    t1, t2 = torch.ones(2), torch.zeros(3, dtype=torch.int64)
    obj = {
        "list": [t1, [t2, {"deep": t1}]],
        "tuple": (1, "two", 3.0, None, b"bytes"),
        "point": Point(t1, t2),
        t2.sum().item(): "int key",
        "numpy": np.arange(5000, dtype=np.float64),
        "set": {1, 2, 3},
    }
    back = rpc.rpc_sync("worker1", echo, (obj,))
    assert torch.equal(back["list"][0], t1) and torch.equal(back["list"][1][0], t2)
    assert back["list"][1][1]["deep"] is back["list"][0]
    assert back["tuple"] == obj["tuple"]
    assert isinstance(back["point"], Point) and torch.equal(back["point"].y, t2)
    assert np.array_equal(back["numpy"], obj["numpy"])
    assert back["set"] == {1, 2, 3} and back[0] == "int key"
    sparse = torch.sparse_coo_tensor([[0, 2]], [1.0, 5.0], (4,))
    assert torch.equal(rpc.rpc_sync("worker2", echo, (sparse,)).to_dense(), sparse.to_dense())


def test_containers(world):
    world.run(_body_containers)


def _body_nested_and_side_effects():
    assert torch.equal(
        rpc.rpc_sync("worker1", nested_call, ("worker2", torch.ones(2))), torch.full((2,), 2.0)
    )
    assert torch.equal(
        rpc.rpc_sync("worker1", nested_call, ("worker0", torch.ones(2))), torch.full((2,), 2.0)
    )
    rpc.rpc_sync("worker2", set_global, (42,))
    assert rpc.rpc_sync("worker2", get_global) == 42
    assert get_global() is None


def test_nested_calls_and_side_effects(world):
    world.run(_body_nested_and_side_effects)
