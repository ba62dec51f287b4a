"""Distributed autograd: gradients across workers equal local autograd, contexts, errors."""

from __future__ import annotations

import threading
import time

import torch

import shmrpc as rpc
import shmrpc.autograd as dist_autograd
from shmrpc.functions import async_execution
from tests.harness import expect_raises, make_linear

WORKERS = ("worker0", "worker1", "worker2")


def run_here(to, fn, args):
    """``rpc_sync``'s signature, run locally: the same model without RPC, for the reference."""
    return fn(*args)


# --------------------------------------------------------------------- remote functions


def mul(a, b):
    return a * b


def mul_then(dst, a, b):
    """Nested: some work here, a call to ``dst`` (another worker, or the caller), more here."""
    return rpc.rpc_sync(dst, mul, (a * 2, b)) + a


def fetch_mul(rref, c):
    return rref.to_here() * c


def fetch_sum(rref):
    return rref.to_here().sum()


def slow_add(a, b):
    time.sleep(0.3)
    return a + b


@async_execution
def async_mul_then(dst, a, b):
    """The reply comes from a continuation on another thread."""
    return rpc.rpc_async(dst, mul, (a, b)).then(lambda fut: fut.wait() * a)


def forward_fresh(dst):
    """A call that brings no tensor here, and one from here that carries tensors."""
    return rpc.rpc_sync(dst, torch.add, (torch.ones(2), 1))


def leaf_times_two():
    """A leaf that requires grad, created on a worker reached without any tensor."""
    w = torch.ones(3, requires_grad=True)
    _callee_leaves.append(w)
    return w * 2


def call_on(dst, fn, *args):
    return rpc.rpc_sync(dst, fn, args)


def sum_of_squares(x):
    return (x * x).sum()


def make_text():
    return "not a tensor"


def nothing():
    return None


def valid(context_id):
    return dist_autograd._is_valid_context(context_id)


def ask_valid(dst, context_id):
    """Whether this worker and ``dst`` (asked from here) both know the context."""
    return valid(context_id) and rpc.rpc_sync(dst, valid, (context_id,))


def new_context_id():
    with dist_autograd.context() as context_id:
        return context_id, dist_autograd._get_max_id()


def debug_info():
    return dist_autograd._get_debug_info()


def created_on_callee(x):
    """A tensor that requires grad, created here: a leaf of this worker's context."""
    w = torch.full((3,), 2.0, requires_grad=True)
    _callee_leaves.append(w)
    return x * w


_callee_leaves: list[torch.Tensor] = []


def callee_leaf_grads(context_id):
    grads = dist_autograd.get_gradients(context_id)
    found = [grads[w] for w in _callee_leaves if w in grads]
    _callee_leaves.clear()
    return len(grads), found


def run_module(rref, x):
    return rref.local_value()(x)


def module_grads(context_id, rref):
    """On the owner: the context's gradients of the module's parameters."""
    grads = dist_autograd.get_gradients(context_id)
    return [grads.get(p) for p in rref.local_value().parameters()]


class FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise ValueError("Simulate error on backward pass")


def fail_in_backward(x):
    return FailingBackward.apply(x) * 3


# ---------------------------------------------------------------------------- helpers


def leaves(*shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=generator).requires_grad_() for s in shapes]


def local_grads(fn, tensors):
    """Gradients of ``fn(*copies)`` computed by local autograd on fresh copies."""
    copies = [t.detach().clone().requires_grad_() for t in tensors]
    return torch.autograd.grad(fn(*copies), copies)


def assert_grads(context_id, tensors, expected, times=1):
    grads = dist_autograd.get_gradients(context_id)
    for i, (t, want) in enumerate(zip(tensors, expected, strict=True)):
        assert t in grads, f"no gradient for tensor {i}"
        assert torch.allclose(grads[t], want * times, atol=1e-6), (i, grads[t], want * times)


def outside(fn, *args):
    """``fn(*args)`` on a fresh thread, which has no autograd context."""
    box = []
    thread = threading.Thread(target=lambda: box.append(fn(*args)))
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), f"{fn} did not return"
    assert box, f"{fn} failed"
    return box[0]


def wait_released(context_id, workers=WORKERS, timeout=30.0):
    """Wait (bounded) until no worker knows the context: cleanup is one-way messages."""
    deadline = time.monotonic() + timeout
    while True:
        left = [w for w in workers if rpc.rpc_sync(w, valid, (context_id,))]
        if not left:
            return
        assert time.monotonic() < deadline, f"context {context_id} still on {left}"
        time.sleep(0.01)


def wait_debug(key, value, workers=WORKERS, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        infos = {w: rpc.rpc_sync(w, debug_info) for w in workers}
        if all(info[key] == value for info in infos.values()):
            return
        assert time.monotonic() < deadline, f"{key} != {value}: {infos}"
        time.sleep(0.01)


def run_backward_bounded(context_id, roots, timeout=30.0):
    """``backward`` on a thread: a hang fails the test instead of the world."""
    box = []

    def run():
        try:
            dist_autograd.backward(context_id, roots)
            box.append(None)
        except BaseException as e:
            e.__traceback__ = None
            box.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "distributed backward hangs"
    assert box == [None], box


# ------------------------------------------------------------------ gradients vs local


def _body_chains():
    a, b, c = leaves(3, 3, 3, seed=1)

    def two_workers(a, b, c, call):
        t = call("worker1", mul, (a, b))
        u = call("worker1", torch.add, (t, c))
        return (t * u).sum()

    def three_workers(a, b, c, call):
        t1 = call("worker1", mul, (a, b))
        t2 = call("worker2", torch.add, (t1, c))
        t3 = call("worker1", torch.mul, (t2, a))
        t4 = call("worker0", mul, (t3, b))  # and to itself
        return (t4 * t3).sum()

    def rpc_call(to, fn, args):
        return rpc.rpc_sync(to, fn, args)

    def async_call(to, fn, args):
        return rpc.rpc_async(to, fn, args).wait()

    def local_call(to, fn, args):
        return fn(*args)

    for model in (two_workers, three_workers):
        expected = local_grads(lambda a, b, c, m=model: m(a, b, c, local_call), [a, b, c])
        for call in (rpc_call, async_call):
            with dist_autograd.context() as context_id:
                loss = model(a, b, c, call)
                dist_autograd.backward(context_id, [loss])
                assert_grads(context_id, [a, b, c], expected)


def test_chains_over_two_and_three_workers(world):
    world.run(_body_chains)


def _body_nested_calls():
    a, b = leaves(4, 4, seed=2)
    expected = local_grads(lambda a, b: ((a * 2 * b + a) ** 2).sum(), [a, b])
    for via, dst in (("worker1", "worker2"), ("worker1", "worker0"), ("worker2", "worker0")):
        with dist_autograd.context() as context_id:
            t = rpc.rpc_sync(via, mul_then, (dst, a, b))  # A->B->C and A->B->A
            dist_autograd.backward(context_id, [(t**2).sum()])
            assert_grads(context_id, [a, b], expected)
    # an async_execution function: its reply is sent by a continuation
    expected = local_grads(lambda a, b: (a * b * a).sum(), [a, b])
    with dist_autograd.context() as context_id:
        t = rpc.rpc_sync("worker1", async_mul_then, ("worker2", a, b))
        dist_autograd.backward(context_id, [t.sum()])
        assert_grads(context_id, [a, b], expected)
    # three hops: worker0 -> worker1 -> worker2 -> worker0
    expected = local_grads(lambda a, b: (a * b).sum() * 5, [a, b])
    with dist_autograd.context() as context_id:
        t = rpc.rpc_sync("worker1", call_on, ("worker2", call_on, "worker0", mul, a, b))
        dist_autograd.backward(context_id, [t.sum() * 5])
        assert_grads(context_id, [a, b], expected)


def test_nested_calls(world):
    world.run(_body_nested_calls)


def _body_tensor_sent_twice():
    a, b = leaves(5, 5, seed=3)
    plain = torch.arange(5.0)

    def model(a, b, remote):
        call = rpc.rpc_sync if remote else run_here
        t1 = call("worker1", mul, (a, a))  # twice in one message
        t2 = call("worker1", mul, (a, b))  # and again, in another
        t3 = call("worker2", mul, (a, b))  # and to another worker
        t4 = call("worker1", mul, (a[:3], a[1:4]))  # two views of it in one message
        t5 = call("worker2", torch.addcmul, (a, b, plain))  # beside a tensor without grad
        return (t1 * t2 + t3).sum() + (t4 * 3).sum() + (t5 * t5).sum()

    expected = local_grads(lambda a, b: model(a, b, False), [a, b])
    with dist_autograd.context() as context_id:
        dist_autograd.backward(context_id, [model(a, b, True)])
        assert_grads(context_id, [a, b], expected)


def test_tensor_sent_twice(world):
    world.run(_body_tensor_sent_twice)


def _body_dtypes_and_several_roots():
    a, b = (t.double().detach().requires_grad_() for t in leaves(3, 3, seed=22))
    c = leaves(3, seed=23)[0]

    def roots(a, b, c, remote):
        call = rpc.rpc_sync if remote else run_here
        t = call("worker1", mul, (a, b))
        u = call("worker2", mul, (c, c))
        return [t.sum(), (t * t).sum(), u.sum(), (u.double() * t).sum()]

    expected = local_grads(lambda a, b, c: sum(roots(a, b, c, False)), [a, b, c])
    assert expected[0].dtype == torch.float64 and expected[2].dtype == torch.float32
    with dist_autograd.context() as context_id:
        dist_autograd.backward(context_id, roots(a, b, c, True))
        assert_grads(context_id, [a, b, c], expected)
        grads = dist_autograd.get_gradients(context_id)
        assert grads[a].dtype == torch.float64 and grads[c].dtype == torch.float32


def test_dtypes_and_several_roots(world):
    world.run(_body_dtypes_and_several_roots)


def _body_branches_meet():
    a, b = leaves(4, 4, seed=4)

    def model(a, b, remote):
        call = rpc.rpc_sync if remote else run_here
        y = call("worker1", mul, (a, b))
        left = call("worker2", torch.sin, (y,))  # y goes two ways ...
        right = call("worker1", mul, (y, a))
        both = call("worker2", torch.add, (left, right))  # ... and they meet again
        return (both * y).sum()

    expected = local_grads(lambda a, b: model(a, b, False), [a, b])
    with dist_autograd.context() as context_id:
        dist_autograd.backward(context_id, [model(a, b, True)])
        assert_grads(context_id, [a, b], expected)


def test_branches_that_meet_again(world):
    world.run(_body_branches_meet)


def _body_remote_modules():
    x = leaves((5, 4), seed=5)[0]
    first = rpc.remote("worker1", make_linear, (10, 4, 3))
    second = rpc.remote("worker2", make_linear, (11, 3, 2))
    local_first, local_second = make_linear(10, 4, 3), make_linear(11, 3, 2)
    x_local = x.detach().clone().requires_grad_()
    loss = local_second(torch.tanh(local_first(x_local))).pow(2).sum()
    params = [*local_first.parameters(), *local_second.parameters()]
    expected = torch.autograd.grad(loss, [x_local, *params])

    forwards = {
        "through a function": lambda m, x: rpc.rpc_sync(m.owner(), run_module, (m, x)),
        "through the proxy": lambda m, x: m.rpc_sync().forward(x),
        "through remote()": lambda m, x: m.remote().forward(x).to_here(),
    }
    for how, forward in forwards.items():
        with dist_autograd.context() as context_id:
            h = torch.tanh(forward(first, x))
            loss = forward(second, h).pow(2).sum()
            dist_autograd.backward(context_id, [loss])
            assert_grads(context_id, [x], expected[:1])
            got = [
                *rpc.rpc_sync("worker1", module_grads, (context_id, first)),
                *rpc.rpc_sync("worker2", module_grads, (context_id, second)),
            ]
            for g, want in zip(got, expected[1:], strict=True):
                assert g is not None and torch.allclose(g, want, atol=1e-6), (how, g, want)
            # the owners' .grad stays untouched
            assert rpc.rpc_sync("worker1", grads_are_none, (first,)), how


def grads_are_none(rref):
    return all(p.grad is None for p in rref.local_value().parameters())


def test_remote_modules(world):
    world.run(_body_remote_modules)


def _body_remote_and_to_here_chain():
    a, b, c = leaves(3, 3, 3, seed=6)
    expected = local_grads(lambda a, b, c: ((a * b * c) ** 2).sum(), [a, b, c])
    with dist_autograd.context() as context_id:
        first = rpc.remote("worker1", mul, (a, b))
        second = rpc.remote("worker2", fetch_mul, (first, c))
        t = second.to_here()
        dist_autograd.backward(context_id, [(t * t).sum()])
        assert_grads(context_id, [a, b, c], expected)
    # the owner fetches back what it sent through another worker
    with dist_autograd.context() as context_id:
        mine = rpc.remote("worker0", mul, (a, b))
        t = rpc.rpc_sync("worker1", fetch_mul, (mine, c))
        dist_autograd.backward(context_id, [(t * t).sum()])
        assert_grads(context_id, [a, b, c], expected)


def test_remote_and_to_here_chains(world):
    world.run(_body_remote_and_to_here_chain)


def owner_grads(context_id):
    grads = dist_autograd.get_gradients(context_id)
    return list(grads.values())


def _body_to_here_of_remote_made_outside_context():
    a, b = leaves(3, 3, seed=24)
    slow = rpc.remote("worker1", slow_add, (a, b))  # outside: a and b are leaves there
    with dist_autograd.context() as context_id:
        # the value is not ready yet: the owner answers the fetch from a continuation
        loss = (slow.to_here() * 3).sum()
        dist_autograd.backward(context_id, [loss])
        assert dist_autograd.get_gradients(context_id) == {}, "nothing on this worker"
        grads = rpc.rpc_sync("worker1", owner_grads, (context_id,))
        assert len(grads) == 2 and all(torch.equal(g, torch.full((3,), 3.0)) for g in grads)


def test_to_here_of_remote_made_outside_context(world):
    world.run(_body_to_here_of_remote_made_outside_context)


def _body_retain_graph_twice():
    a, b = leaves(4, 4, seed=7)
    expected = local_grads(lambda a, b: ((a * 2 * b + a) ** 2).sum(), [a, b])
    with dist_autograd.context() as context_id:
        t = rpc.rpc_sync("worker1", mul_then, ("worker2", a, b))
        loss = (t**2).sum()
        dist_autograd.backward(context_id, [loss], retain_graph=True)
        assert_grads(context_id, [a, b], expected)
        dist_autograd.backward(context_id, [loss], retain_graph=True)
        assert_grads(context_id, [a, b], expected, times=2)


def test_retain_graph_backward_twice(world):
    world.run(_body_retain_graph_twice)


def _body_rounds_accumulate():
    a, b = leaves(4, 4, seed=8)
    total = [torch.zeros(4), torch.zeros(4)]
    with dist_autograd.context() as context_id:
        for k in range(3):
            to = WORKERS[1 + k % 2]
            loss = (rpc.rpc_sync(to, mul, (a, b)) * (k + 1)).sum() + (a * a).sum()
            dist_autograd.backward(context_id, [loss])
            round_grads = local_grads(
                lambda a, b, k=k: (a * b * (k + 1)).sum() + (a * a).sum(), [a, b]
            )
            total = [t + g for t, g in zip(total, round_grads, strict=True)]
            assert_grads(context_id, [a, b], total)


def test_rounds_in_one_context_accumulate(world):
    world.run(_body_rounds_accumulate)


def _body_threads():
    errors = []

    def work(k):
        try:
            for r in range(5):
                a, b = leaves(6, 6, seed=100 * k + r)
                expected = local_grads(lambda a, b: ((a * b) ** 2 + a).sum(), [a, b])
                with dist_autograd.context() as context_id:
                    t = rpc.rpc_sync(WORKERS[1 + k % 2], mul, (a, b))
                    u = rpc.rpc_sync(WORKERS[2 - k % 2], torch.add, (t * t, a))
                    dist_autograd.backward(context_id, [u.sum()])
                    assert_grads(context_id, [a, b], expected)
        except BaseException as e:
            e.__traceback__ = None
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    assert not errors, errors


def test_four_threads_with_their_own_contexts(world):
    world.run(_body_threads)


def _body_large_gradient():
    n = 2 * 1024 * 1024  # 8 MiB of float32
    a = torch.randn(n, requires_grad=True)
    w = torch.randn(n)
    with dist_autograd.context() as context_id:
        t = rpc.rpc_sync("worker1", mul, (a, 3.0))
        u = rpc.rpc_sync("worker2", torch.add, (t, 1.0))
        dist_autograd.backward(context_id, [(u * w).sum()])
        grad = dist_autograd.get_gradients(context_id)[a]
        assert grad.shape == (n,) and torch.allclose(grad, 3.0 * w)


def test_eight_mib_gradient(world):
    world.run(_body_large_gradient)


def _body_callee_leaves_and_local_graph():
    x = leaves(3, seed=9)[0]
    with dist_autograd.context() as context_id:
        t = rpc.rpc_sync("worker1", created_on_callee, (x,))
        dist_autograd.backward(context_id, [t.sum()])
        assert_grads(context_id, [x], [torch.full((3,), 2.0)])
        count, found = rpc.rpc_sync("worker1", callee_leaf_grads, (context_id,))
        assert count == 1 and len(found) == 1 and torch.equal(found[0], x.detach())
    # a purely local graph in a context
    p, q = leaves(2, 2, seed=10)
    with dist_autograd.context() as context_id:
        dist_autograd.backward(context_id, [(p + q).sum()])
        grads = dist_autograd.get_gradients(context_id)
        assert len(grads) == 2
        assert torch.equal(grads[p], torch.ones(2)) and torch.equal(grads[q], torch.ones(2))


def test_callee_leaves_and_local_graphs(world):
    world.run(_body_callee_leaves_and_local_graph)


def _body_grad_untouched():
    a = leaves(3, seed=11)[0]
    with dist_autograd.context() as context_id:
        dist_autograd.backward(context_id, [rpc.rpc_sync("worker1", mul, (a, a)).sum()])
        assert a.grad is None
    (a * a).sum().backward()
    local = a.grad.clone()
    assert torch.allclose(local, 2 * a.detach())
    with dist_autograd.context() as context_id:
        dist_autograd.backward(context_id, [rpc.rpc_sync("worker2", mul, (a, 5.0)).sum()])
        assert torch.allclose(dist_autograd.get_gradients(context_id)[a], torch.full((3,), 5.0))
    assert torch.equal(a.grad, local)


def test_dist_backward_leaves_dot_grad_alone(world):
    world.run(_body_grad_untouched)


# ------------------------------------------------------------------------------ contexts


def _body_context_ids():
    with dist_autograd.context() as first:
        assert first >> 48 == 0
        assert dist_autograd._current_context()._context_id() == first
        assert dist_autograd._retrieve_context(first)._context_id() == first
    with dist_autograd.context() as second:
        assert second >> 48 == 0 and second > first
    assert dist_autograd._get_max_id() == 2**48 - 1
    for rank in (1, 2):
        ids = [rpc.rpc_sync(f"worker{rank}", new_context_id) for _ in range(2)]
        for context_id, max_id in ids:
            assert context_id >> 48 == rank, hex(context_id)
            assert max_id == (rank << 48) + 2**48 - 1, hex(max_id)
        assert ids[0][0] < ids[1][0]


def test_context_ids(world):
    world.run(_body_context_ids)


def recorded(context_id):
    context = dist_autograd._retrieve_context(context_id)
    sends, recvs = context._send_functions(), context._recv_functions()
    return len(sends), len(recvs), sorted(context._known_worker_ids())


def _body_recorded_functions():
    a, b = leaves(3, 3, seed=25)
    with dist_autograd.context() as context_id:
        rpc.rpc_sync("worker1", mul, (a, b))  # grads both ways: one send and one recv each
        rpc.rpc_sync("worker2", torch.add, (torch.ones(2), 1))  # no grads: nothing recorded
        assert recorded(context_id) == (1, 1, [1, 2])
        assert rpc.rpc_sync("worker1", recorded, (context_id,)) == (1, 1, [0])
        assert rpc.rpc_sync("worker2", recorded, (context_id,)) == (0, 0, [0])
        rpc.rpc_sync("worker1", mul, (a, 2.0))
        assert recorded(context_id) == (2, 2, [1, 2])
        # an error inside a context is an ordinary RPC error
        expect_raises(RuntimeError, rpc.rpc_sync, "worker1", torch.matmul, (a, torch.ones(7, 7)))
        dist_autograd.backward(context_id, [rpc.rpc_sync("worker1", mul, (a, b)).sum()])
        assert_grads(context_id, [a, b], [b.detach(), a.detach()])


def test_recorded_send_and_recv_functions(world):
    world.run(_body_recorded_functions)


def release_backward():
    _release_backward.set()


def _body_release_mid_backward():
    a = leaves(3, seed=26)[0]
    rpc.rpc_sync("worker1", clear_backward_gate)
    outcome = []
    with dist_autograd.context() as context_id:
        loss = rpc.rpc_sync("worker1", blocking_forward, (a,)).sum()

        def run():
            try:
                dist_autograd.backward(context_id, [loss])
                outcome.append("returned")
            except RuntimeError as e:
                outcome.append(str(e))

        thread = threading.Thread(target=run)
        thread.start()
        wait_debug("num_current_backward_passes", "1", ("worker1",))  # blocked there
    # the context is gone here, and on its way out on worker1, while that pass runs
    rpc.rpc_sync("worker1", release_backward)
    thread.join(30)
    assert not thread.is_alive(), "backward hangs after its context was released"
    assert len(outcome) == 1 and "Could not find autograd context with id" in outcome[0], outcome
    wait_released(context_id)
    wait_debug("num_current_backward_passes", "0")
    b = leaves(3, seed=27)[0]
    with dist_autograd.context() as context_id:
        dist_autograd.backward(context_id, [rpc.rpc_sync("worker1", mul, (a, b)).sum()])
        assert_grads(context_id, [a, b], [b.detach(), a.detach()])


def test_release_during_backward(world):
    world.run(_body_release_mid_backward)


def _body_context_errors():
    loss = (leaves(2, seed=12)[0] * 2).sum()
    for unknown in (100, 12345):
        text = f"Could not find autograd context with id: {unknown}"
        expect_raises(RuntimeError, dist_autograd.backward, unknown, [loss], match=text)
        expect_raises(RuntimeError, dist_autograd.get_gradients, unknown, match=text)
        expect_raises(RuntimeError, dist_autograd._retrieve_context, unknown, match=text)
    with dist_autograd.context() as context_id:
        pass
    text = f"Could not find autograd context with id: {context_id}"
    expect_raises(RuntimeError, dist_autograd.backward, context_id, [loss], match=text)
    expect_raises(RuntimeError, dist_autograd.get_gradients, context_id, match=text)
    expect_raises(RuntimeError, dist_autograd._retrieve_context, context_id, match=text)
    assert not dist_autograd._is_valid_context(context_id)
    expect_raises(
        RuntimeError,
        dist_autograd._current_context,
        match="Current thread doesn't have a valid autograd context",
    )
    with dist_autograd.context() as context_id:
        expect_raises(
            RuntimeError,
            dist_autograd.context().__enter__,
            match="Already have an autograd context id for this thread",
        )
        # the outer context is still this thread's, and still works
        assert dist_autograd._current_context()._context_id() == context_id
        a = leaves(2, seed=13)[0]
        dist_autograd.backward(context_id, [rpc.rpc_sync("worker1", mul, (a, a)).sum()])
        assert torch.allclose(dist_autograd.get_gradients(context_id)[a], 2 * a.detach())


def test_unknown_released_and_nested_contexts(world):
    world.run(_body_context_errors)


def _body_roots_validation():
    vector = leaves(3, seed=14)[0]
    with dist_autograd.context() as context_id:
        backward = dist_autograd.backward
        expect_raises(
            RuntimeError,
            backward,
            context_id,
            [],
            match="No tensors provided for gradient computation",
        )
        expect_raises(
            RuntimeError,
            backward,
            context_id,
            [torch.tensor(1.0)],
            match="requires_grad not set on",
        )
        expect_raises(
            RuntimeError,
            backward,
            context_id,
            [vector * 2],
            match="is not a scalar, all roots need to be scalar",
        )
        leaf = torch.tensor(1.0, requires_grad=True)
        expect_raises(
            RuntimeError,
            backward,
            context_id,
            [leaf],
            match="does not have a valid gradient function",
        )
        expect_raises(
            TypeError, backward, context_id, None, match="incompatible function arguments"
        )
        expect_raises(
            TypeError, backward, None, [leaf * 2], match="incompatible function arguments"
        )
        # nothing was computed by the refused calls
        assert dist_autograd.get_gradients(context_id) == {}


def test_roots_validation(world):
    world.run(_body_roots_validation)


def _body_cleanup():
    a, b = leaves(3, 3, seed=15)
    scenarios = {
        "grad tensors": lambda: rpc.rpc_sync("worker1", mul, (a, b)),
        "no-grad tensors": lambda: rpc.rpc_sync("worker2", torch.add, (torch.ones(2), 1)),
        "no tensors": lambda: rpc.rpc_sync("worker1", nothing),
        "nested, grad tensors": lambda: rpc.rpc_sync("worker1", mul_then, ("worker2", a, b)),
        "nested, no tensors": lambda: rpc.rpc_sync("worker1", call_on, ("worker2", nothing)),
        "remote and to_here": lambda: rpc.remote("worker2", mul, (a, b)).to_here(),
        "async": lambda: rpc.rpc_async("worker1", mul, (a, b)).wait(),
        "after backward": lambda: dist_autograd.backward(
            dist_autograd._current_context()._context_id(),
            [rpc.rpc_sync("worker1", mul_then, ("worker2", a, b)).sum()],
        ),
    }
    for what, forward in scenarios.items():
        with dist_autograd.context() as context_id:
            forward()
        assert not dist_autograd._is_valid_context(context_id), what
        wait_released(context_id)


def test_contexts_released_on_every_worker(world):
    world.run(_body_cleanup)


def _body_context_propagated():
    with dist_autograd.context() as context_id:
        for w in ("worker1", "worker2"):
            assert not outside(rpc.rpc_sync, w, valid, (context_id,)), "not sent there yet"
        # no grad tensors at all: the context goes with the call anyway
        assert rpc.rpc_sync("worker1", valid, (context_id,))
        assert rpc.rpc_async("worker1", valid, (context_id,)).wait()
        assert rpc.remote("worker1", valid, (context_id,)).to_here()
        assert rpc.rpc_sync("worker1", ask_valid, ("worker2", context_id))  # nested
        assert rpc.rpc_sync("worker2", ask_valid, ("worker0", context_id))  # and back
        # they keep it while the context lasts here
        for w in WORKERS:
            assert outside(rpc.rpc_sync, w, valid, (context_id,)), w
    wait_released(context_id)


def test_context_propagated_without_grad_tensors(world):
    world.run(_body_context_propagated)


def _body_callee_leaf_without_tensor_arguments():
    with dist_autograd.context() as context_id:
        t = rpc.rpc_sync("worker1", leaf_times_two)  # no tensor goes there
        assert t.grad_fn is not None, "the result is not connected to worker1's graph"
        dist_autograd.backward(context_id, [t.sum()])
        count, found = rpc.rpc_sync("worker1", callee_leaf_grads, (context_id,))
        assert count == 1 and len(found) == 1 and torch.equal(found[0], torch.full((3,), 2.0))


def test_callee_leaf_reached_without_tensor_arguments(world):
    world.run(_body_callee_leaf_without_tensor_arguments)


def _body_released_when_only_a_nested_call_carries_tensors():
    with dist_autograd.context() as context_id:
        rpc.rpc_sync("worker1", forward_fresh, ("worker2",))
    wait_released(context_id)


def test_released_when_only_a_nested_call_carries_tensors(world):
    world.run(_body_released_when_only_a_nested_call_carries_tensors)


def _body_debug_info():
    wait_debug("num_current_backward_passes", "0")
    info = dist_autograd._get_debug_info()
    assert set(info) >= {"num_current_backward_passes", "num_autograd_contexts"}
    before = int(info["num_autograd_contexts"])
    with dist_autograd.context() as context_id:
        assert int(dist_autograd._get_debug_info()["num_autograd_contexts"]) == before + 1
        # a backward pass in progress is counted while it runs
        x = leaves(2, seed=16)[0]
        loss = BlockingBackward.apply(x).sum()
        _release_backward.clear()
        thread = threading.Thread(target=dist_autograd.backward, args=(context_id, [loss]))
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while dist_autograd._get_debug_info()["num_current_backward_passes"] != "1":
                assert time.monotonic() < deadline, dist_autograd._get_debug_info()
                time.sleep(0.005)
        finally:
            _release_backward.set()
            thread.join(30)
        assert not thread.is_alive()
        assert torch.equal(dist_autograd.get_gradients(context_id)[x], torch.ones(2))
    assert int(dist_autograd._get_debug_info()["num_autograd_contexts"]) == before
    wait_debug("num_current_backward_passes", "0", ("worker0",))


_release_backward = threading.Event()


class BlockingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        assert _release_backward.wait(30)
        return grad


def blocking_forward(x):
    return BlockingBackward.apply(x) * 2


def clear_backward_gate():
    _release_backward.clear()


def test_debug_info(world):
    world.run(_body_debug_info)


# -------------------------------------------------------------------------- RRef.backward


def _body_rref_backward_owner():
    a = leaves(3, seed=17)[0]
    rpc.RRef(sum_of_squares(a)).backward()  # no context: local autograd, into .grad
    assert torch.allclose(a.grad, 2 * a.detach())
    a.grad = None
    with dist_autograd.context() as context_id:
        rpc.RRef(sum_of_squares(a)).backward(context_id)
        assert_grads(context_id, [a], [2 * a.detach()])
        twice = rpc.RRef(sum_of_squares(a))
        twice.backward(context_id, retain_graph=True)
        twice.backward(context_id, retain_graph=True)
        assert_grads(context_id, [a], [2 * a.detach()], times=3)
        # a value that came through other workers
        remote_sum = rpc.RRef(rpc.rpc_sync("worker1", sum_of_squares, (a,)))
        remote_sum.backward(context_id)
        assert_grads(context_id, [a], [2 * a.detach()], times=4)
        expect_raises(
            RuntimeError,
            rpc.RRef("text").backward,
            context_id,
            match="RRef should contain a tensor for .backward()",
        )
    assert a.grad is None
    expect_raises(
        RuntimeError,
        rpc.RRef("text").backward,
        match="RRef should contain a tensor for .backward()",
    )
    expect_raises(
        RuntimeError,
        rpc.RRef(sum_of_squares(a)).backward,
        100,
        match="Could not find autograd context with id: 100",
    )


def test_rref_backward_on_owner(world):
    world.run(_body_rref_backward_owner)


def _body_rref_backward_user():
    a = leaves(3, seed=18)[0]
    with dist_autograd.context() as context_id:
        r = rpc.remote("worker1", sum_of_squares, (a,))
        r.backward(context_id, retain_graph=True)
        assert_grads(context_id, [a], [2 * a.detach()])
        r.backward(context_id, retain_graph=True)
        assert_grads(context_id, [a], [2 * a.detach()], times=2)
        expect_raises(
            RuntimeError,
            r.backward,
            match="User RRefs require 'dist_autograd_ctx_id' to be specified",
        )
        text = rpc.remote("worker2", make_text)
        expect_raises(
            RuntimeError,
            text.backward,
            context_id,
            match="RRef should contain a tensor for .backward()",
        )
        # through two workers: worker2 holds a value computed from worker1's
        first = rpc.remote("worker1", mul, (a, a))
        second = rpc.remote("worker2", fetch_mul, (first, 2.0))
        total = rpc.remote("worker2", fetch_sum, (second,))
        total.backward(context_id)
        assert_grads(context_id, [a], [2 * a.detach()], times=4)  # 2 rounds, then 4 a
    assert a.grad is None


def test_rref_backward_on_user(world):
    world.run(_body_rref_backward_user)


# ------------------------------------------------------------------ better than torch


def _body_unused_output():
    a, b, c = leaves(3, 3, 3, seed=19)
    with dist_autograd.context() as context_id:
        rpc.rpc_sync("worker1", mul, (a, b))  # its output never reaches the loss
        rpc.remote("worker2", mul, (a, b))  # nor does this one, never fetched
        unused_later = rpc.rpc_sync("worker2", mul, (b, c))
        used = rpc.rpc_sync("worker2", mul_then, ("worker1", a, c))
        run_backward_bounded(context_id, [used.sum()])
        grads = dist_autograd.get_gradients(context_id)
        assert b not in grads, "b does not reach the loss"
        expected = local_grads(lambda a, c: (a * 2 * c + a).sum(), [a, c])
        assert_grads(context_id, [a, c], expected)
        # now the other output counts too
        run_backward_bounded(context_id, [unused_later.sum()])
        assert_grads(context_id, [b], [c.detach()])
        assert_grads(context_id, [c], [expected[1] + b.detach()])


def test_unused_rpc_output_does_not_hang_backward(world):
    world.run(_body_unused_output)


def _body_backward_errors():
    good_a, good_b = leaves(3, 3, seed=20)
    expected = local_grads(lambda a, b: (a * b).sum(), [good_a, good_b])
    for _ in range(3):
        for node, forward in (
            (1, lambda x: rpc.rpc_sync("worker1", fail_in_backward, (x,))),
            (2, lambda x: rpc.rpc_sync("worker1", call_on, ("worker2", fail_in_backward, x))),
            (2, lambda x: rpc.remote("worker2", fail_in_backward, (x,)).to_here()),
        ):
            x = leaves(3, seed=21)[0]
            with dist_autograd.context() as context_id:
                loss = (forward(x) + rpc.rpc_sync("worker1", mul, (x, 2.0))).sum()
                error = expect_raises(
                    ValueError,
                    dist_autograd.backward,
                    context_id,
                    [loss],
                    match=f"Error on Node {node}: Simulate error on backward pass",
                )
                assert isinstance(error, RuntimeError), type(error).__mro__
            # the world still works: a good backward afterwards
            with dist_autograd.context() as context_id:
                t = rpc.rpc_sync("worker1", call_on, ("worker2", mul, good_a, good_b))
                run_backward_bounded(context_id, [t.sum()])
                assert_grads(context_id, [good_a, good_b], expected)
    wait_debug("num_current_backward_passes", "0")


def test_error_in_remote_backward(world):
    world.run(_body_backward_errors)


# ---------------------------------------------------------------------------- last


def _body_no_contexts_left():
    wait_debug("num_autograd_contexts", "0")
    wait_debug("num_current_backward_passes", "0")


def test_no_contexts_left_behind(world):
    world.run(_body_no_contexts_left)
