"""DistributedOptimizer: steps over parameters on several workers equal a local optimizer."""

from __future__ import annotations

import itertools

import torch

import shmrpc as rpc
import shmrpc.autograd as dist_autograd
from shmrpc.optim import DistributedOptimizer
from tests.harness import expect_raises, make_linear

# --------------------------------------------------------------------- remote functions


def param_rrefs(module_rref):
    """On the owner: an RRef to each parameter of the module."""
    return [rpc.RRef(p) for p in module_rref.local_value().parameters()]


def run_module(module_rref, x):
    return module_rref.local_value()(x)


def params_of(module_rref):
    return [p.detach().clone() for p in module_rref.local_value().parameters()]


class FailingConstructor(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {})
        raise ValueError("Error creating optimizer.")

    def step(self, closure=None):
        raise NotImplementedError


class FailingStep(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        raise ValueError("Error running optimizer.")


# ----------------------------------------------------------------------------- the model


def data(step, n=6):
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 4, generator=generator), torch.randn(n, 1, generator=generator)


class Model:
    """x -> Linear(4, 3) on worker1 -> tanh -> Linear(3, 2) on worker2 -> @ w on worker0.

    ``unused`` parameters (a Linear on worker1, a tensor here) never reach the loss.
    """

    def __init__(self, remote):
        self.remote = remote
        generator = torch.Generator().manual_seed(7)
        self.w = torch.randn(2, 1, generator=generator).requires_grad_()
        self.spare = torch.randn(3, generator=generator).requires_grad_()
        if remote:
            self.first = rpc.remote("worker1", make_linear, (1, 4, 3))
            self.second = rpc.remote("worker2", make_linear, (2, 3, 2))
            self.unused = rpc.remote("worker1", make_linear, (3, 2, 2))
        else:
            self.first, self.second, self.unused = (
                make_linear(1, 4, 3),
                make_linear(2, 3, 2),
                make_linear(3, 2, 2),
            )

    def forward(self, x):
        if self.remote:
            h = torch.tanh(rpc.rpc_sync("worker1", run_module, (self.first, x)))
            out = self.second.rpc_sync().forward(h)
        else:
            out = self.second(torch.tanh(self.first(x)))
        return out @ self.w

    def loss(self, step):
        x, y = data(step)
        return ((self.forward(x) - y) ** 2).mean()

    def param_rrefs(self):
        assert self.remote
        return [
            *rpc.rpc_sync("worker1", param_rrefs, (self.first,)),
            *rpc.rpc_sync("worker2", param_rrefs, (self.second,)),
            *rpc.rpc_sync("worker1", param_rrefs, (self.unused,)),
            rpc.RRef(self.w),
            rpc.RRef(self.spare),
        ]

    def params(self):
        if self.remote:
            modules = [
                rpc.rpc_sync(m.owner(), params_of, (m,))
                for m in (self.first, self.second, self.unused)
            ]
        else:
            modules = [
                [p.detach().clone() for p in m.parameters()]
                for m in (self.first, self.second, self.unused)
            ]
        return [p for ps in modules for p in ps] + [self.w.detach().clone(), self.spare.detach()]


def dist_steps(model, optimizer, steps):
    losses = []
    for step in range(steps):
        with dist_autograd.context() as context_id:
            loss = model.loss(step)
            dist_autograd.backward(context_id, [loss])
            optimizer.step(context_id)
        losses.append(loss.item())
    return losses


# ------------------------------------------------------------------------------- tests


def _body_matches_local(optim_cls, kwargs):
    local = Model(remote=False)
    params = [*local.first.parameters(), *local.second.parameters()]
    params += [*local.unused.parameters(), local.w, local.spare]
    local_opt = optim_cls(params, **kwargs)
    for step in range(3):
        local_opt.zero_grad()
        local.loss(step).backward()
        local_opt.step()

    model = Model(remote=True)
    initial = model.params()
    optimizer = DistributedOptimizer(optim_cls, model.param_rrefs(), **kwargs)
    dist_steps(model, optimizer, 3)
    got, want = model.params(), local.params()
    assert len(got) == len(want) == 8
    for i, (g, w, before) in enumerate(zip(got, want, initial, strict=True)):
        assert torch.allclose(g, w, atol=1e-6), (i, g, w)
        if i < 4 or i == 6:  # first, second and w reach the loss
            assert not torch.equal(g, before), f"parameter {i} did not move"
    # parameters without a gradient keep their values (unused on worker1, spare here)
    for i in (4, 5, 7):
        assert torch.equal(got[i], initial[i]), f"parameter {i} moved without a gradient"
    # the local parameters are the very tensors the optimizer updated
    assert torch.equal(model.w.detach(), got[6])


def test_sgd_matches_local(world):
    world.run(_body_matches_local, torch.optim.SGD, {"lr": 0.05})


def test_sgd_momentum_matches_local(world):
    world.run(_body_matches_local, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9})


def test_adam_matches_local(world):
    world.run(_body_matches_local, torch.optim.Adam, {"lr": 0.05})


def _body_converges():
    model = Model(remote=True)
    optimizer = DistributedOptimizer(torch.optim.SGD, model.param_rrefs(), lr=0.05)
    losses = []
    for _ in range(30):
        with dist_autograd.context() as context_id:
            loss = model.loss(0)  # the same batch every time: the loss must fall
            dist_autograd.backward(context_id, [loss])
            optimizer.step(context_id)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(b < a for a, b in itertools.pairwise(losses)), losses


def test_small_model_converges(world):
    world.run(_body_converges)


def _body_errors():
    model = Model(remote=True)
    rrefs = model.param_rrefs()
    error = expect_raises(
        ValueError,
        DistributedOptimizer,
        FailingConstructor,
        rrefs,
        match="Error creating optimizer.",
    )
    assert isinstance(error, RuntimeError)
    optimizer = DistributedOptimizer(FailingStep, rrefs)
    with dist_autograd.context() as context_id:
        dist_autograd.backward(context_id, [model.loss(0)])
        error = expect_raises(
            ValueError, optimizer.step, context_id, match="Error running optimizer."
        )
        assert isinstance(error, RuntimeError)
    # a step in an unknown context fails at once
    good = DistributedOptimizer(torch.optim.SGD, rrefs, lr=0.1)
    expect_raises(
        RuntimeError, good.step, 12345, match="Could not find autograd context with id: 12345"
    )
    # and the optimizer still works afterwards
    before = model.params()
    dist_steps(model, good, 1)
    assert not torch.equal(model.params()[0], before[0])


def test_errors_of_constructor_and_step(world):
    world.run(_body_errors)
