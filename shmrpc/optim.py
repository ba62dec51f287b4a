"""``DistributedOptimizer``, a drop-in for ``torch.distributed.optim.DistributedOptimizer``.

One local optimizer lives on each worker that owns parameters (behind an RRef there); a step
applies the gradients that a distributed autograd context accumulated on that worker::

    opt = DistributedOptimizer(torch.optim.SGD, param_rrefs, lr=0.05)
    with dist_autograd.context() as context_id:
        dist_autograd.backward(context_id, [loss])
        opt.step(context_id)
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Any

import torch

from . import autograd as dist_autograd
from .api import rpc_async
from .rref import RRef

__all__ = ["DistributedOptimizer"]

logger = logging.getLogger(__name__)


class _LocalOptimizer:
    """The optimizer of one worker's parameters; lives on their owner."""

    #: Steps of every local optimizer of this process run one at a time, as in torch: they
    #: set ``.grad`` of shared parameters before stepping.
    _lock = threading.Lock()

    def __init__(
        self,
        optim_cls: type[torch.optim.Optimizer],
        param_rrefs: list[RRef[Any]],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self._params = [rref.local_value() for rref in param_rrefs]
        self.optim = optim_cls(self._params, *args, **kwargs)

    def step(self, context_id: int) -> None:
        grads = dist_autograd.get_gradients(context_id)
        with _LocalOptimizer._lock:
            for param, grad in grads.items():
                param.grad = grad
            self.optim.step()


def _new_local_optimizer(
    optim_cls: type[torch.optim.Optimizer],
    param_rrefs: list[RRef[Any]],
    *args: Any,
    **kwargs: Any,
) -> RRef[_LocalOptimizer]:
    return RRef(_LocalOptimizer(optim_cls, param_rrefs, *args, **kwargs))


def _local_optimizer_step(optimizer: RRef[_LocalOptimizer], context_id: int) -> None:
    optimizer.local_value().step(context_id)


def _wait_all(futures: list[torch.futures.Future[Any]]) -> list[Any]:
    """Wait for every future; then raise the last failure, if any (torch's behaviour)."""
    results, error = [], None
    for future in futures:
        try:
            results.append(future.wait())
        except Exception as e:
            error = e
    if error is not None:
        raise error
    return results


class DistributedOptimizer:
    """Optimize parameters that live on several workers, with their distributed gradients.

    ``params_rref`` lists RRefs to the parameters (owned anywhere, this worker included);
    ``optimizer_class(params, *args, **kwargs)`` is built once per owner, on the owner.
    Errors of the constructor or of a step are raised here.
    """

    def __init__(
        self,
        optimizer_class: type[torch.optim.Optimizer],
        params_rref: list[RRef[Any]],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        by_owner: dict[Any, list[RRef[Any]]] = defaultdict(list)
        for param in params_rref:
            by_owner[param.owner()].append(param)
        self.is_functional_optim = False  # torch's attribute; the Python path is always used
        futures = [
            rpc_async(
                owner, _new_local_optimizer, args=(optimizer_class, params, *args), kwargs=kwargs
            )
            for owner, params in by_owner.items()
        ]
        self.remote_optimizers: list[RRef[_LocalOptimizer]] = _wait_all(futures)

    def step(self, context_id: int) -> None:
        """Apply the gradients of ``context_id`` on every owner (concurrently)."""
        dist_autograd._retrieve_context(context_id)  # unknown here: torch's error, at once
        futures = [
            rpc_async(optimizer.owner(), _local_optimizer_step, args=(optimizer, context_id))
            for optimizer in self.remote_optimizers
        ]
        _wait_all(futures)
