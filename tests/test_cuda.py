"""CUDA tensors over RPC: device maps, CUDA IPC (shm), staging (tcp), streams, lifetimes.

Everything here needs a GPU and is skipped without one (``make test-gpu`` runs it where CUDA
is present). Each test starts a fresh world (:func:`tests.harness.run_world`) whose workers
get their own ``device_maps``/``devices``; rank 0 runs the body while the others serve, and
returns something the test checks, so a body that silently did nothing fails.

Devices: "one GPU" puts every worker on ``cuda:0``; "spread" (two GPUs or more) puts rank r on
``cuda:(r % device_count)``, so maps cross GPUs and IPC copies go peer to peer. The device
checks follow torch: a request lands where the sender's map says, a reply comes back through
the inverse of the *caller's* map.

What docs/gpu.md says and these tests check has never run on a GPU as written: a failure
here may be a bug of the implementation (see the report that came with this file) as much
as of the test.
"""

from __future__ import annotations

import functools
import gc
import os
import threading
import time

import pytest
import torch

import shmrpc as rpc
import shmrpc.autograd as dist_autograd
from shmrpc.functions import async_execution
from shmrpc.optim import DistributedOptimizer
from tests.harness import (
    expect_raises,
    make_linear,
    new_init_method,
    run_world,
    worker_options,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_two = pytest.mark.skipif(GPUS < 2, reason="needs two CUDA devices")
SPREAD = [pytest.param(False, id="one-gpu"), pytest.param(True, id="spread", marks=needs_two)]

CPU = torch.device("cpu")
#: GPU cycles a stream is kept busy for (torch.cuda._sleep); ~50 ms, far longer than the
#: RPC path, so a transport that does not wait for the stream reads unfinished data.
BUSY = 100_000_000
THREADS = 4
REQUEST_TEXT = "TensorPipe RPC backend only supports CPU tensors by default"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.complex64)
#: Bytes per tensor; 1 means a single element.
SIZES = (0, 1, 1 << 10, 1 << 20, 64 << 20)


def cuda(index):
    return torch.device("cuda", index)


def gpu_of(rank, spread):
    return rank % GPUS if spread else 0


def mesh(rank, world_size, spread):
    """Maps from ``rank``'s GPU to every peer's GPU (each worker maps to every other one)."""
    mine = cuda(gpu_of(rank, spread))
    return {f"worker{q}": {mine: cuda(gpu_of(q, spread))} for q in range(world_size) if q != rank}


# ------------------------------------------------------------------------------- worlds


def _rank_main(rank, backend, init_method, per_rank, body, args):
    """One worker: init with its own options, run ``body`` (every rank), shut down."""
    world_size = len(per_rank)
    options = worker_options(backend, rank, world_size, init_method, **per_rank[rank])
    rpc.init_rpc(
        f"worker{rank}",
        backend=backend,
        rank=rank,
        world_size=world_size,
        rpc_backend_options=options,
    )
    try:
        return body(rank, world_size, *args)
    finally:
        rpc.shutdown()


def run(backend, body, per_rank, *args, timeout=300):
    """Run ``body(rank, world_size, *args)`` on a fresh world; ``per_rank[r]``: r's options."""
    return run_world(
        _rank_main, len(per_rank), (backend, new_init_method(), per_rank, body, args), timeout
    )


def settled_memory():
    """This process's allocated CUDA bytes per device once nothing is pending: freed tensors
    collected, streams drained, blocks that CUDA IPC kept for peers released."""
    gc.collect()
    for index in range(torch.cuda.device_count()):
        if torch.cuda.memory_reserved(index):  # touched by this process: has a context
            torch.cuda.synchronize(index)
    torch.cuda.ipc_collect()
    return [torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())]


def wait_for(what, predicate, timeout=30.0):
    """Poll ``predicate`` until it returns a true value (bounded); return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            assert value, f"{what}: still not true after {timeout} s"
            return value
        time.sleep(0.05)


def sample(dtype, nbytes, device, seed):
    """A tensor of ``nbytes`` (1: one element) of random values made on ``device``."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    n = 0 if nbytes == 0 else max(1, nbytes // itemsize)
    generator = torch.Generator(device=device).manual_seed(seed)
    if dtype is torch.bool:
        return torch.rand(n, generator=generator, device=device) > 0.5
    if dtype is torch.int64:
        return torch.randint(-(2**40), 2**40, (n,), generator=generator, device=device)
    return torch.randn(n, generator=generator, device=device, dtype=dtype)


# --------------------------------------------------------------------- remote functions


def echo(x):
    return x


def echo_where(*xs):
    """The arguments as received, and the device each landed on."""
    return xs, [str(x.device) for x in xs]


def echo_layout(x):
    return x, (str(x.device), tuple(x.shape), x.stride())


def share_then_write(a, b):
    """Whether ``a`` and ``b`` arrived on one storage, and whether a write to one shows in
    the other (it must: they overlap), then both back."""
    same = a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    a[2].fill_(-5)  # a[2] is b[0]
    return same, bool((b[0] == -5).all()), a, b


def add_in_place(x):
    x.add_(1)
    return x


def make_on_gpu(n, index):
    return torch.ones(n, device=cuda(index))


def add_to_gpu(x, index):
    """torch's _add_to_gpu: a result on a device the caller's map may not cover."""
    return (x + 1).to(cuda(index))


def all_equal(x, value):
    """On this thread's current stream: whether every element of ``x`` is ``value``."""
    return bool((x == value).all())


def busy_then_fill(n, value, index):
    """Produce on a busy current stream of ``cuda:index`` and return a view of the result
    (torch's _return_tensor_view)."""
    with torch.cuda.device(index):
        x = torch.empty(4 * n, device=cuda(index))
        torch.cuda._sleep(BUSY)
        x.fill_(value)
    return x[n : 2 * n]


def slow_add_on_user_stream(x, y):
    """torch's pattern: the work runs on a side stream, synchronized back before returning."""
    s0 = torch.cuda.current_stream(x.device)
    s1 = torch.cuda.Stream(device=x.device)
    s1.wait_stream(s0)
    x.record_stream(s1)
    y.record_stream(s1)
    with torch.cuda.stream(s1):
        torch.cuda._sleep(BUSY)
        z = x + y
    s0.wait_stream(s1)
    z.record_stream(s0)
    return z


_kept: dict[str, torch.Tensor] = {}


def keep(x):
    _kept["x"] = x
    return str(x.device)


def kept_sum():
    return _kept.pop("x").double().sum().item()


class _Watched(torch.futures.Future):
    """A future that signals when someone registers a callback (the agent's reply)."""

    def __init__(self):
        super().__init__()
        self.watched = threading.Event()

    def add_done_callback(self, callback):
        super().add_done_callback(callback)
        self.watched.set()


@async_execution
def reply_then_overwrite(n, index):
    """Reply with a tensor of this worker, then at once overwrite it on the same stream.

    The reply is sent on the completing thread (the agent's callback runs inside
    ``set_result``), so the write is queued after the send: the caller must not see it.
    """
    state = torch.arange(n, dtype=torch.float32, device=cuda(index))
    future = _Watched()

    def complete():
        if not future.watched.wait(30):
            future.set_exception(RuntimeError("the agent never registered its reply callback"))
            return
        future.set_result(state)
        state.fill_(-1.0)

    threading.Thread(target=complete, daemon=True).start()
    return future


def rref_where(rref):
    return str(rref.local_value().device)


def fetch_where_and_sum(rref):
    """to_here() an RRef owned elsewhere: where its value landed here, and its sum."""
    value = rref.to_here()
    return str(value.device), value.double().sum().item()


def gpu_linear(seed, n_in, n_out, index):
    return make_linear(seed, n_in, n_out).to(cuda(index))


def run_module(module_rref, x):
    return module_rref.local_value()(x)


def param_rrefs(module_rref):
    return [rpc.RRef(p) for p in module_rref.local_value().parameters()]


def params_cpu(module_rref):
    return [p.detach().cpu() for p in module_rref.local_value().parameters()]


_leaves: dict[int, torch.Tensor] = {}


def leaf_values(seed, shape, device):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device)


def scale_by_leaf(x, seed):
    """``tanh(x * w) + w.sum()`` with ``w`` a leaf of this worker, on ``x``'s device."""
    w = leaf_values(seed, x.shape, x.device).requires_grad_()
    _leaves[seed] = w
    return torch.tanh(x * w) + w.sum()


def scale_then_call(dst, x, seed, dst_seed):
    """Some work here, a call to ``dst`` (another worker, another GPU), more work here."""
    h = scale_by_leaf(x, seed)
    return rpc.rpc_sync(dst, scale_by_leaf, (h * 2, dst_seed)) * h


def leaf_grad(context_id, seed):
    return dist_autograd.get_gradients(context_id)[_leaves.pop(seed)].cpu()


def uuid_of(index):
    return str(torch.cuda.get_device_properties(index).uuid)


def echo_uuid(x):
    return x, str(x.device), uuid_of(x.device.index)


# ------------------------------------------------------------------- worlds and pairs


def _body_all_pairs(rank, world_size, spread):
    """Every worker calls every other one, small and large tensors, sync and async."""
    mine = cuda(gpu_of(rank, spread))
    checked = []
    for q in range(world_size):
        if q == rank:
            continue
        theirs = str(cuda(gpu_of(q, spread)))
        small = torch.arange(100, device=mine, dtype=torch.float32) + 1000 * rank + q
        large = sample(torch.float32, 4 << 20, mine, seed=rank * 100 + q)
        (got_small, got_large), where = rpc.rpc_sync(f"worker{q}", echo_where, (small, large))
        assert where == [theirs, theirs], (rank, q, where)
        assert got_small.device == mine and got_large.device == mine
        assert torch.equal(got_small, small) and torch.equal(got_large, large)
        future = rpc.rpc_async(f"worker{q}", echo_where, (large * 2,))
        (doubled,), where = future.wait()
        assert where == [theirs] and doubled.device == mine
        assert torch.equal(doubled, large * 2)
        checked.append(q)
    return checked


@pytest.mark.parametrize("spread", SPREAD)
@pytest.mark.parametrize("world_size", [2, 4])
def test_every_pair_lands_on_the_mapped_device(backend, world_size, spread):
    per_rank = [
        {
            "device_maps": mesh(r, world_size, spread),
            "devices": [cuda(gpu_of(r, spread))],
        }
        for r in range(world_size)
    ]
    results = run(backend, _body_all_pairs, per_rank, spread)
    assert results == [[q for q in range(world_size) if q != r] for r in range(world_size)]


def _body_dtypes_and_sizes(rank, world_size, spread):
    if rank:
        return None
    mine, theirs = cuda(gpu_of(0, spread)), str(cuda(gpu_of(1, spread)))
    done = []
    for i, dtype in enumerate(DTYPES):
        for nbytes in SIZES:
            x = sample(dtype, nbytes, mine, seed=i)
            (back,), where = rpc.rpc_sync("worker1", echo_where, (x,))
            what = (str(dtype), nbytes)
            assert where == [theirs], (what, where)
            assert back.device == mine and back.dtype == dtype and back.shape == x.shape, what
            assert torch.equal(back, x), what
            done.append(what)
            del x, back
    return len(done)


@pytest.mark.parametrize("spread", SPREAD)
def test_round_trips_of_dtypes_and_sizes(backend, spread):
    per_rank = [{"device_maps": mesh(r, 2, spread)} for r in range(2)]
    assert run(backend, _body_dtypes_and_sizes, per_rank, spread)[0] == len(DTYPES) * len(SIZES)


def _body_views(rank, world_size, spread):
    if rank:
        return None
    mine, theirs = cuda(gpu_of(0, spread)), str(cuda(gpu_of(1, spread)))
    base = torch.arange(64 * 33, dtype=torch.float32, device=mine).reshape(64, 33)
    views = {
        "rows": base[5:9],
        "strided": base[::3, 1::2],
        "transpose": base.t(),
        "column": base[:, 7],
        "expanded": base[0].expand(4, 33),
        "unaligned tail": base.flatten()[101:],
        "small view of a large storage": base.flatten()[1000:1003],
    }
    for name, view in views.items():
        back, (where, shape, stride) = rpc.rpc_sync("worker1", echo_layout, (view,))
        assert where == theirs and shape == tuple(view.shape) and stride == view.stride(), name
        assert back.device == mine and back.stride() == view.stride(), name
        assert torch.equal(back, view), name
    # Two arguments that share a storage still share it on arrival and on return.
    a, b = base.flatten()[10:20], base.flatten()[12:30]
    before = base.clone()
    same, seen, a_back, b_back = rpc.rpc_sync("worker1", share_then_write, (a, b))
    assert same and seen, "arguments sharing a storage must share it on the callee"
    assert a_back.untyped_storage().data_ptr() == b_back.untyped_storage().data_ptr()
    assert bool((b_back[0] == -5).all()) and a_back.device == mine
    assert torch.equal(base, before), "the callee's write reached the caller's tensor"
    return sorted(views)


@pytest.mark.parametrize("spread", SPREAD)
def test_views_strides_and_shared_storages(backend, spread):
    per_rank = [{"device_maps": mesh(r, 2, spread)} for r in range(2)]
    assert len(run(backend, _body_views, per_rank, spread)[0]) == 7


def _body_value_semantics(rank, world_size, spread):
    if rank:
        return None
    mine, g1 = cuda(gpu_of(0, spread)), gpu_of(1, spread)
    checks = 0
    for n in (16, 1 << 18):  # a small tensor and 1 MiB
        for _ in range(10):
            # A write right after sending, on the same stream, must not reach the receiver.
            x = torch.arange(n, dtype=torch.float32, device=mine)
            expected = x.clone()
            future = rpc.rpc_async("worker1", echo, (x,))
            x.fill_(-1.0)
            assert torch.equal(future.wait(), expected), "the receiver saw a later write"
            # The same for a reply: the callee overwrites its tensor right after replying.
            got = rpc.rpc_sync("worker1", reply_then_overwrite, (n, g1))
            assert torch.equal(got, expected), "the caller saw the callee's later write"
            checks += 2
        # The callee's in-place change stays on the callee.
        x = torch.arange(n, dtype=torch.float32, device=mine)
        expected = x.clone()
        back = rpc.rpc_sync("worker1", add_in_place, (x,))
        assert torch.equal(x, expected) and torch.equal(back, expected + 1)
        back = rpc.rpc_async("worker1", add_in_place, (x,)).wait()
        assert torch.equal(x, expected) and torch.equal(back, expected + 1)
        # What the callee keeps is its own: the caller's later writes do not reach it.
        assert rpc.rpc_sync("worker1", keep, (x,)) == str(cuda(g1))
        x.fill_(7.0)
        assert rpc.rpc_sync("worker1", kept_sum) == expected.double().sum().item()
        checks += 3
    return checks


@pytest.mark.parametrize("spread", SPREAD)
def test_value_semantics(backend, spread):
    per_rank = [{"device_maps": mesh(r, 2, spread)} for r in range(2)]
    assert run(backend, _body_value_semantics, per_rank, spread)[0] == 46


# ---------------------------------------------------------------------------- maps


def _body_cpu_and_cuda_maps(rank, world_size, g0, g1):
    if rank:
        return None
    small, large = torch.arange(10.0), torch.randn(1 << 18)  # inline-sized and 1 MiB
    gpu = torch.randn(1000, device=cuda(g0))
    (a, b, c), where = rpc.rpc_sync("worker1", echo_where, (small, large, gpu))
    assert where == [str(cuda(g1)), str(cuda(g1)), "cpu"], where
    # Back through the inverse map: cuda:g1 -> cpu, cpu -> cuda:g0.
    assert (a.device, b.device, c.device) == (CPU, CPU, cuda(g0))
    assert torch.equal(a, small) and torch.equal(b, large) and torch.equal(c, gpu)
    # Results the callee makes: its cpu tensor lands on cuda:g0, its cuda:g1 tensor on cpu.
    on_gpu = rpc.rpc_sync("worker1", make_on_gpu, (3, g1))
    assert on_gpu.device == CPU and torch.equal(on_gpu, torch.ones(3))
    on_cpu = rpc.rpc_sync("worker1", torch.ones, (3,))
    assert on_cpu.device == cuda(g0) and torch.equal(on_cpu, torch.ones(3, device=cuda(g0)))
    # A call to itself follows its map to itself.
    (s,), where = rpc.rpc_sync("worker0", echo_where, (gpu,))
    assert where == [str(cuda(g1))] and s.device == cuda(g0) and torch.equal(s, gpu)
    before = gpu.clone()
    back = rpc.rpc_sync("worker0", add_in_place, (gpu,))
    assert torch.equal(back, before + 1) and back.device == cuda(g0)
    assert torch.equal(gpu, before), "the self-call's in-place change reached the caller"
    return "checked"


@pytest.mark.parametrize("spread", SPREAD)
def test_cpu_to_cuda_and_cuda_to_cpu_maps(backend, spread):
    g0, g1 = gpu_of(0, spread), gpu_of(1, spread)
    maps = {
        "worker1": {CPU: cuda(g1), cuda(g0): CPU},
        "worker0": {cuda(g0): cuda(g1)},
    }
    per_rank = [{"device_maps": maps}, {}]
    assert run(backend, _body_cpu_and_cuda_maps, per_rank, g0, g1)[0] == "checked"


def _body_missing_maps(rank, world_size):
    if rank:
        return None
    x = torch.ones(2, device=cuda(0))
    calls = [
        functools.partial(rpc.rpc_sync, "worker1", torch.add, (x, 1)),
        functools.partial(rpc.rpc_async, "worker1", torch.add, (x, 1)),
        functools.partial(rpc.remote, "worker1", torch.add, (x, 1)),
    ]
    for call in calls * (THREADS + 2):
        error = expect_raises(RuntimeError, call, match=REQUEST_TEXT)
        assert "Request device mapping is not available for destination worker1" in str(error)
    response = "Response device mapping is not available for destination worker0"
    # Many more than the pool has threads: a reply that cannot go must free its thread. The
    # per-call timeout tells an error reply from a caller left waiting for nothing.
    for _ in range(2 * THREADS + 3):
        expect_raises(
            RuntimeError, rpc.rpc_sync, "worker1", add_to_gpu, (torch.zeros(2), 0), match=response
        )
    future = rpc.rpc_async("worker1", make_on_gpu, (2, 0), timeout=20)
    expect_raises(RuntimeError, future.wait, match=response)
    rref = rpc.remote("worker1", add_to_gpu, (torch.zeros(2), 0))
    expect_raises(RuntimeError, rref.to_here, 20, match=response)
    del rref
    # RPC still works, CPU tensors need no map.
    assert torch.equal(rpc.rpc_sync("worker1", torch.add, (torch.ones(2), 1)), torch.ones(2) * 2)
    return "usable"


def test_missing_maps_fail_with_torchs_errors_at_once(backend):
    per_rank = [{"num_worker_threads": THREADS, "rpc_timeout": 20}] * 2
    assert run(backend, _body_missing_maps, per_rank)[0] == "usable"


def _init_fails(rank, backend, init_method, maps, devices, text):
    options = worker_options(
        backend, rank, 2, init_method, device_maps=maps[rank], devices=devices[rank]
    )
    error = expect_raises(
        ValueError,
        rpc.init_rpc,
        f"worker{rank}",
        backend=backend,
        rank=rank,
        world_size=2,
        rpc_backend_options=options,
        match=text,
    )
    del error
    expect_raises(RuntimeError, rpc.get_worker_info, match="RPC has not been initialized")


def _bad_maps_then_good(rank, backend, init_method, count):
    """Each bad configuration fails init on every worker with torch's text; then a good one
    initializes and carries a CUDA tensor."""
    none = ({}, {})
    cases = [
        (
            ({"worker1": {cuda(0): cuda(count)}}, {}),
            none,
            "Node worker0 has target devices with invalid indices in its device map for worker1",
        ),
        (
            ({"worker1": {cuda(count): cuda(0)}}, {}),
            none,
            "Node worker0 has source devices with invalid indices in its device map for worker1",
        ),
        (
            ({"worker7": {cuda(0): cuda(0)}}, {}),
            none,
            "Node worker0 has invalid target node names in its device maps",
        ),
        (none, ([cuda(0), cuda(0)], []), "Node worker0 has duplicated devices"),
    ]
    if count >= 2:
        cases += [
            (
                ({"worker1": {cuda(0): cuda(0)}}, {}),
                ([cuda(1)], []),
                "Node worker0 has unexpected source devices in its device map for worker1",
            ),
            (
                ({"worker1": {cuda(0): cuda(1)}}, {}),
                ([], [cuda(0)]),
                "Node worker0 has unexpected target devices in its device map for worker1",
            ),
        ]
    for i, (maps, devices, text) in enumerate(cases):
        _init_fails(rank, backend, f"{init_method}-{i}", maps, devices, text)
    good = {"worker1": {cuda(0): cuda(0)}} if rank == 0 else {}
    options = worker_options(backend, rank, 2, f"{init_method}-good", device_maps=good)
    rpc.init_rpc(
        f"worker{rank}", backend=backend, rank=rank, world_size=2, rpc_backend_options=options
    )
    try:
        if rank == 0:
            x = torch.arange(5.0, device=cuda(0))
            return torch.equal(rpc.rpc_sync("worker1", echo, (x,)), x), len(cases)
        return None
    finally:
        rpc.shutdown()


def test_bad_maps_fail_init_everywhere_then_a_good_init_works(backend):
    results = run_world(_bad_maps_then_good, 2, (backend, new_init_method(), GPUS), timeout=300)
    assert results[0] == (True, 6 if GPUS >= 2 else 4)


# ----------------------------------------------------------------------------- streams


def _body_stream_order(rank, world_size, g0, g1):
    """Sends are ordered after the work the sending thread's current stream has queued, and
    what arrives is ready on the receiver's current stream. Calls to worker1 and to self.

    Each destination gets its own values: memory the allocator hands out again may still
    hold an earlier round's, which would hide a read that came too early.
    """
    if rank:
        return None
    mine = cuda(g0)
    side = torch.cuda.Stream(device=mine)
    checked = []
    for k, (to, index) in enumerate((("worker1", g1), ("worker0", g0))):
        value = 3.0 + 10 * k
        with torch.cuda.stream(side):
            x = torch.empty(1 << 20, device=mine)
            torch.cuda._sleep(BUSY)  # the fill below runs ~50 ms from now
            x.fill_(value)
            assert rpc.rpc_sync(to, all_equal, (x, value)), f"{to} read x before it was written"
            y = rpc.rpc_sync(to, busy_then_fill, (1 << 18, value + 1, index))
            assert bool((y == value + 1).all()), f"the reply of {to} was read too early"
            z = rpc.rpc_sync(to, slow_add_on_user_stream, (x, x))
            assert bool((z == 2 * value).all()), f"{to}: side-stream result read too early"
        futures = [
            rpc.rpc_async(to, busy_then_fill, (1000, value + 2 + i, index)) for i in range(5)
        ]
        for i, future in enumerate(futures):
            want = torch.full((1000,), value + 2 + i, device=mine)
            assert torch.equal(future.wait(), want), (to, i)
        checked.append(to)
    return checked


@pytest.mark.parametrize("spread", SPREAD)
def test_sends_follow_the_current_stream(backend, spread):
    g0, g1 = gpu_of(0, spread), gpu_of(1, spread)
    maps = {"worker1": {cuda(g0): cuda(g1)}, "worker0": {cuda(g0): cuda(g0)}}
    per_rank = [{"device_maps": maps}, {"device_maps": {"worker0": {cuda(g1): cuda(g0)}}}]
    assert run(backend, _body_stream_order, per_rank, g0, g1)[0] == ["worker1", "worker0"]


# ------------------------------------------------------------------------------ RRefs


def _body_rrefs(rank, world_size, g0, g1):
    if rank:
        return None
    mine = cuda(g0)
    x = torch.randn(100, device=mine)
    rref = rpc.remote("worker1", torch.add, (x, 1))
    assert rpc.rpc_sync("worker1", rref_where, (rref,)) == str(cuda(g1))
    value = rref.to_here()
    assert value.device == mine and torch.allclose(value, x + 1)
    doubled = rref.rpc_sync().mul(2)
    assert doubled.device == mine and torch.allclose(doubled, (x + 1) * 2)
    tripled = rref.remote().mul(3).to_here()
    assert tripled.device == mine and torch.allclose(tripled, (x + 1) * 3)
    made = rpc.remote("worker1", make_on_gpu, (7, g1)).to_here()
    assert made.device == mine and torch.equal(made, torch.ones(7, device=mine))
    # An RRef owned here, fetched by worker1: the reply uses the inverse of worker1's map.
    local = rpc.RRef(x)
    where, total = rpc.rpc_sync("worker1", fetch_where_and_sum, (local,))
    assert where == str(cuda(g1)) and abs(total - x.double().sum().item()) < 1e-3
    # A module on worker1's GPU, driven through its RRef.
    module = rpc.remote("worker1", gpu_linear, (3, 4, 2, g1))
    inputs = torch.randn(5, 4, device=mine)
    out = module.rpc_sync().forward(inputs)
    expected = make_linear(3, 4, 2).to(mine)(inputs)
    assert out.device == mine and torch.allclose(out, expected, atol=1e-5)
    return "checked"


@pytest.mark.parametrize("spread", SPREAD)
def test_rrefs_hold_cuda_tensors(backend, spread):
    g0, g1 = gpu_of(0, spread), gpu_of(1, spread)
    per_rank = [{"device_maps": mesh(r, 2, spread)} for r in range(2)]
    assert run(backend, _body_rrefs, per_rank, g0, g1)[0] == "checked"


# --------------------------------------------------------------- autograd and optimizer


def _local_reference(x, seeds):
    """The model of ``_body_autograd`` with local autograd, on one device."""
    device = x.device
    x = x.detach().clone().requires_grad_()
    ws = [leaf_values(seed, x.shape, device).requires_grad_() for seed in seeds]

    def scale(t, w):
        return torch.tanh(t * w) + w.sum()

    h = scale(x, ws[0])
    y = scale(h * 2, ws[1]) * h
    z = scale(y, ws[2])
    loss = (z * x).sum()
    grads = torch.autograd.grad(loss, [x, *ws])
    return loss.detach(), [g.cpu() for g in grads]


def _body_autograd(rank, world_size, spread):
    """worker0 -> worker1 -> worker2 (nested), then worker0 -> worker1 again; gradients of
    leaves on every worker, each on its own GPU, against local autograd."""
    if rank:
        return None
    mine = cuda(gpu_of(0, spread))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 8, generator=generator).to(mine).requires_grad_()
    with dist_autograd.context() as context_id:
        y = rpc.rpc_sync("worker1", scale_then_call, ("worker2", x, 1, 2))
        z = rpc.rpc_sync("worker1", scale_by_leaf, (y, 3))
        assert y.device == mine and z.device == mine
        loss = (z * x).sum()
        dist_autograd.backward(context_id, [loss])
        got = [
            dist_autograd.get_gradients(context_id)[x].cpu(),
            rpc.rpc_sync("worker1", leaf_grad, (context_id, 1)),
            rpc.rpc_sync("worker2", leaf_grad, (context_id, 2)),
            rpc.rpc_sync("worker1", leaf_grad, (context_id, 3)),
        ]
    want_loss, want = _local_reference(x, (1, 2, 3))
    assert torch.allclose(loss.detach(), want_loss, rtol=1e-4, atol=1e-4)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-5), (i, g, w)
    return len(got)


@pytest.mark.parametrize("spread", SPREAD)
def test_distributed_autograd_across_gpus_and_workers(backend, spread):
    """Every worker maps its GPU to every other worker's (both directions configured)."""
    per_rank = [{"device_maps": mesh(r, 3, spread)} for r in range(3)]
    assert run(backend, _body_autograd, per_rank, spread)[0] == 4


def _body_autograd_caller_map_only(rank, world_size, spread):
    if rank:
        return None
    mine = cuda(gpu_of(0, spread))
    x = torch.randn(6, 6).to(mine).requires_grad_()
    with dist_autograd.context() as context_id:
        y = rpc.rpc_sync("worker1", scale_by_leaf, (x, 11))
        loss = (y * x).sum()
        dist_autograd.backward(context_id, [loss])
        got_x = dist_autograd.get_gradients(context_id)[x].cpu()
        got_w = rpc.rpc_sync("worker1", leaf_grad, (context_id, 11))
    xl = x.detach().clone().requires_grad_()
    wl = leaf_values(11, xl.shape, mine).requires_grad_()
    want = torch.autograd.grad(((torch.tanh(xl * wl) + wl.sum()) * xl).sum(), [xl, wl])
    assert torch.allclose(got_x, want[0].cpu(), rtol=1e-4, atol=1e-5)
    assert torch.allclose(got_w, want[1].cpu(), rtol=1e-4, atol=1e-5)
    return "checked"


@pytest.mark.parametrize("spread", SPREAD)
def test_gradients_go_back_through_the_inverse_of_the_callers_map(backend, spread):
    """As in torch, only the caller has a map: the gradient of a tensor it sent returns to
    its device through the inverse of that map (torch's RecvRpcBackward keeps it)."""
    per_rank = [{"device_maps": mesh(0, 2, spread)}, {}]
    assert run(backend, _body_autograd_caller_map_only, per_rank, spread)[0] == "checked"


def _data(step, device):
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(6, 4, generator=generator)
    y = torch.randn(6, 1, generator=generator)
    return x.to(device), y.to(device)


def _body_optimizer(rank, world_size, g0, g1):
    if rank:
        return None
    mine = cuda(g0)
    module = rpc.remote("worker1", gpu_linear, (5, 4, 3, g1))
    w = torch.randn(3, 1, generator=torch.Generator().manual_seed(9)).to(mine).requires_grad_()
    params = [*rpc.rpc_sync("worker1", param_rrefs, (module,)), rpc.RRef(w)]
    optimizer = DistributedOptimizer(torch.optim.SGD, params, lr=0.05, momentum=0.9)
    local = make_linear(5, 4, 3).to(mine)
    local_w = w.detach().clone().requires_grad_()
    local_optimizer = torch.optim.SGD([*local.parameters(), local_w], lr=0.05, momentum=0.9)
    for step in range(4):
        x, y = _data(step, mine)
        with dist_autograd.context() as context_id:
            out = rpc.rpc_sync("worker1", run_module, (module, x))
            loss = ((out @ w - y) ** 2).mean()
            dist_autograd.backward(context_id, [loss])
            optimizer.step(context_id)
        local_optimizer.zero_grad()
        local_loss = ((local(x) @ local_w - y) ** 2).mean()
        local_loss.backward()
        local_optimizer.step()
        assert torch.allclose(loss.detach(), local_loss.detach(), rtol=1e-4, atol=1e-5), step
    remote_params = rpc.rpc_sync("worker1", params_cpu, (module,))
    for got, want in zip(remote_params, local.parameters(), strict=True):
        assert torch.allclose(got, want.detach().cpu(), rtol=1e-4, atol=1e-5)
    assert torch.allclose(w.detach(), local_w.detach(), rtol=1e-4, atol=1e-5)
    assert w.device == mine
    return len(remote_params) + 1


@pytest.mark.parametrize("spread", SPREAD)
def test_distributed_optimizer_over_cuda_parameters(backend, spread):
    g0, g1 = gpu_of(0, spread), gpu_of(1, spread)
    per_rank = [{"device_maps": mesh(0, 2, spread)}, {}]
    assert run(backend, _body_optimizer, per_rank, g0, g1)[0] == 3


# ----------------------------------------------------------------------------- lifetime


def _body_no_leak(rank, world_size, spread, rounds):
    if rank:
        return None
    mine = cuda(gpu_of(0, spread))
    sizes = (64, 16 << 10, 1 << 18)  # 256 B, 64 KiB, 1 MiB of float32

    def round_trip(i):
        x = torch.randn(sizes[i % len(sizes)], device=mine)
        if i % 2:
            back = rpc.rpc_sync("worker1", echo, (x,))
        else:
            back = rpc.rpc_async("worker1", echo, (x,)).wait()
        if i % 50 == 49:
            rref = rpc.remote("worker1", torch.add, (x, 1))
            assert torch.equal(rref.to_here(), x + 1)
        return torch.equal(back, x)

    def measure():
        """After one identical call, so whatever a call leaves behind is the same both times."""
        assert torch.equal(rpc.rpc_sync("worker1", echo, (torch.ones(64, device=mine),)), ones)
        return settled_memory(), rpc.rpc_sync("worker1", settled_memory)

    ones = torch.ones(64, device=mine)
    assert all(round_trip(i) for i in range(20))  # warm-up: one-time allocations, no RRefs
    start = measure()
    wrong = [i for i in range(rounds) if not round_trip(i)]
    assert not wrong, f"round trips {wrong[:10]} came back changed"
    # RRef deletions reach the owner asynchronously: wait (bounded) for memory to settle.
    wait_for(f"memory back to {start}", lambda: measure() == start)
    return rounds


@pytest.mark.parametrize("spread", SPREAD)
def test_no_device_memory_leaks_after_many_round_trips(backend, spread):
    per_rank = [{"device_maps": mesh(r, 2, spread)} for r in range(2)]
    assert run(backend, _body_no_leak, per_rank, spread, 1000)[0] == 1000


# ----------------------------------------------------------------- devices by UUID


def _permuted_world(rank, backend, init_method, permuted):
    """worker1 sees the GPUs in another order, so the same index names another GPU."""
    if rank == 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = permuted  # before this process touches CUDA
    maps = {"worker1": {cuda(0): cuda(0)}} if rank == 0 else {}
    options = worker_options(backend, rank, 2, init_method, device_maps=maps)
    rpc.init_rpc(
        f"worker{rank}", backend=backend, rank=rank, world_size=2, rpc_backend_options=options
    )
    try:
        if rank:
            return None
        assert rpc.rpc_sync("worker1", uuid_of, (0,)) == uuid_of(1), (
            "CUDA_VISIBLE_DEVICES did not take effect on worker1; the test cannot run"
        )
        x = torch.randn(1 << 20, device=cuda(0))  # 4 MiB on this worker's GPU 0
        back, where, uuid = rpc.rpc_sync("worker1", echo_uuid, (x,))
        # worker1's cuda:0 is this worker's cuda:1: the bytes crossed GPUs.
        assert where == "cuda:0" and uuid == uuid_of(1), (where, uuid)
        assert back.device == cuda(0) and torch.equal(back, x)
        return "crossed"
    finally:
        rpc.shutdown()


@needs_two
def test_devices_are_matched_by_uuid_not_index(backend, monkeypatch):
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(GPUS)))
    order = visible.split(",")
    permuted = ",".join([order[1], order[0], *order[2:]])
    # The children import this module (and ask whether CUDA is available) before worker1
    # can set CUDA_VISIBLE_DEVICES: NVML answers that without initializing CUDA.
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    results = run_world(_permuted_world, 2, (backend, new_init_method(), permuted), timeout=300)
    assert results[0] == "crossed"
