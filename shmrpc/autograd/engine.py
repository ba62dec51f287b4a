"""The distributed backward pass: gradients flow back along the messages that carried tensors.

A pass starts where ``backward`` is called. Each worker runs its part with torch's local
engine (``torch.autograd.grad``): from the tensors it got gradients for, back to

* its leaves: their gradients go into the context's map (``get_gradients``), never ``.grad``;
* the stand-ins of the recv records it reaches: their gradients go back, in one
  AUTOGRAD_BACKWARD request per record, to the worker that sent those tensors, which runs its
  part from the matching send record in turn.

A request is answered when its part and every request that part made are done, so
``backward`` returns when all the work it caused on every worker is done, and an error
anywhere comes back along the same chain ("Error on Node N: ..."). Nothing ever waits for a
gradient that may not come: a worker runs once per gradient that arrives, instead of waiting,
as torch's FAST mode does, for every send function it recorded. An RPC whose output does not
reach the loss is simply never visited. (A tensor sent several times has the graph behind it
traversed once per arrival; the sums are the same.)

Graphs are always retained until the context ends: a later arrival may need the same nodes.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..agent import Inbound, Later, Messenger, failed_future
from ..envelope import Flag, Kind
from ..errors import DescribedError, RemoteError
from ..profiling import BACKWARD_PIECE_KEY, Span, torch_profiler
from ..worker_info import WorkerInfo
from .context import ContextContainer, DistAutogradContext, RecvRecord
from .recording import AutogradGate

__all__ = ["DistAutograd"]

logger = logging.getLogger(__name__)


class DistAutograd:
    """One per process while RPC is up: contexts, recording, and backward passes."""

    def __init__(self, agent: Messenger, default_timeout: Callable[[], float]) -> None:
        self._agent = agent
        self._default_timeout = default_timeout
        self.worker_id = agent.worker_info.id
        self.contexts = ContextContainer(self.worker_id)
        self._passes = 0
        self._passes_lock = threading.Lock()
        agent.register_handler(Kind.AUTOGRAD_BACKWARD, self._serve_backward, internal=True)
        agent.register_handler(Kind.AUTOGRAD_CLEANUP, self._serve_cleanup, internal=True)
        agent.set_gate(AutogradGate(self.contexts))

    # -------------------------------------------------------------------------- contexts
    def release(self, context_id: int) -> None:
        """Leave a context: release it here and on every worker it reached."""
        context = self.contexts.release(context_id)
        if context is None:
            raise RuntimeError(f"Could not find autograd context with id: {context_id}")
        self._cascade(context, exclude=-1)

    def _serve_cleanup(self, inbound: Inbound, context_id: int) -> None:
        context = self.contexts.release(context_id)
        if context is not None:
            self._cascade(context, exclude=inbound.peer)

    def _cascade(self, context: DistAutogradContext, exclude: int) -> None:
        for worker in context._known_worker_ids() - {self.worker_id, exclude}:
            try:
                to = self._agent.get_worker_info(worker)
                self._agent.notify(to, Kind.AUTOGRAD_CLEANUP, context._context_id())
            except Exception as error:  # best effort, as torch: the peer may be gone
                logger.debug("shmrpc: autograd cleanup to rank %s failed: %s", worker, error)

    def close(self) -> None:
        self.contexts.release_all()

    def debug_info(self) -> dict[str, str]:
        return {
            "num_current_backward_passes": str(self._passes),
            "num_autograd_contexts": str(len(self.contexts)),
        }

    def call(self, to: WorkerInfo, func: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """Run ``func(*args)`` on ``to`` within this thread's context (for RRef.backward)."""
        return self._agent.call_sync(to, func, args, {}, self._default_timeout())

    # ---------------------------------------------------------------------------- backward
    def backward(
        self, context_id: int, roots: Sequence[torch.Tensor], retain_graph: bool = False
    ) -> torch.futures.Future[None]:
        """Start a backward pass from scalar ``roots``; the future completes when it is done.

        ``retain_graph`` is accepted for torch's signature: graphs are kept until the context
        ends in any case (see the module docstring).
        """
        context = self.contexts.retrieve(context_id)
        _check_roots(roots)
        seeds = [torch.ones_like(root) for root in roots]
        return self._propagate(context, list(roots), seeds)

    def _serve_backward(self, inbound: Inbound, payload: tuple[int, int, list[Any]]) -> Any:
        context_id, message_id, grads = payload
        try:
            context = self.contexts.retrieve(context_id)
            record = context.send_record(message_id)
        except Exception as error:
            raise self._on_this_node(error) from None
        return Later(self._propagate(context, record.tensors, grads))

    def _propagate(
        self,
        context: DistAutogradContext,
        outputs: list[torch.Tensor],
        grads: Sequence[torch.Tensor | None],
    ) -> torch.futures.Future[None]:
        """Run this worker's part from ``outputs``, then pass gradients on to the senders.

        While a profiler runs, the part (the local pass and sending its gradients on) is a
        span named ``dist_autograd_backward``.
        """
        with self._passes_lock:
            self._passes += 1
        span = Span(BACKWARD_PIECE_KEY) if torch_profiler._is_profiler_enabled else None
        futures: list[torch.futures.Future[Any]] = []
        try:
            for record, record_grads in _local_pass(context, outputs, grads):
                futures.append(
                    self._agent.request_async(
                        self._agent.get_worker_info(record.sender),
                        Kind.AUTOGRAD_BACKWARD,
                        (context._context_id(), record.message_id, record_grads),
                        self._default_timeout(),
                        Flag.INTERNAL,
                        backward=not record.in_reply,
                    )
                )
        except Exception as error:  # what was sent already still completes: wait for it too
            futures.append(failed_future(self._on_this_node(error)))
        finally:
            if span is not None:
                span.end()
        done = _when_all(futures)
        done.add_done_callback(self._pass_ended)
        return done

    def _pass_ended(self, _: torch.futures.Future[None]) -> None:
        with self._passes_lock:
            self._passes -= 1

    def _on_this_node(self, error: BaseException) -> DescribedError:
        """An error of this worker's part, described as torch words it: "Error on Node N"."""
        original = getattr(type(error), "_shmrpc_original", type(error))
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        message = f"Error on Node {self.worker_id}: {error}\n{text}"
        return DescribedError((original.__module__, original.__qualname__, message))


def _check_roots(roots: Sequence[torch.Tensor]) -> None:
    """torch's checks and texts for the roots of a distributed backward pass."""
    if not isinstance(roots, (list, tuple)) or not all(isinstance(r, torch.Tensor) for r in roots):
        raise TypeError(
            "backward(): incompatible function arguments. roots must be a list of Tensors"
        )
    if not roots:
        raise RuntimeError("No tensors provided for gradient computation.")
    for i, root in enumerate(roots):
        name = f"element {i}"
        if not root.requires_grad:
            raise RuntimeError(f"requires_grad not set on {name}")
        if root.numel() != 1:
            raise RuntimeError(f"{name} is not a scalar, all roots need to be scalar")
        if root.grad_fn is None:
            raise RuntimeError(f"{name} does not have a valid gradient function.")


def _local_pass(
    context: DistAutogradContext,
    outputs: list[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
) -> list[tuple[RecvRecord, list[torch.Tensor]]]:
    """Backward from ``outputs`` on this worker: accumulate leaf gradients into the context
    and return, for each recv record reached, the gradients to send back for it."""
    leaves, records = _reachable(context, outputs)
    standins = [s for record in records for s in record.standins]
    inputs = leaves + standins
    if not inputs:
        return []
    found = torch.autograd.grad(
        outputs, inputs, grad_outputs=list(grads), allow_unused=True, retain_graph=True
    )
    context.accumulate(
        (leaf, grad)
        for leaf, grad in zip(leaves, found[: len(leaves)], strict=True)
        if grad is not None
    )
    sends: list[tuple[RecvRecord, list[torch.Tensor]]] = []
    at = len(leaves)
    for record in records:
        got = found[at : at + len(record.standins)]
        at += len(record.standins)
        if all(g is None for g in got):
            continue
        sends.append(
            (
                record,
                [
                    torch.zeros(s.shape, dtype=s.dtype, device=s.device) if g is None else g
                    for s, g in zip(record.standins, got, strict=True)
                ],
            )
        )
    return sends


def _reachable(
    context: DistAutogradContext, outputs: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[RecvRecord]]:
    """The leaves and recv records the graph behind ``outputs`` reaches on this worker."""
    leaves: dict[int, torch.Tensor] = {}
    records: dict[int, RecvRecord] = {}
    seen: dict[int, Any] = {}  # keeps the nodes alive, so their ids stay theirs
    todo: list[Any] = []

    def leaf(variable: torch.Tensor) -> None:
        record = context.recv_of(variable)
        if record is not None:
            records[id(record)] = record
        else:
            leaves[id(variable)] = variable

    for t in outputs:
        if t.grad_fn is None:
            if t.requires_grad:
                leaf(t)
        else:
            todo.append(t.grad_fn)
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        variable = getattr(node, "variable", None)
        if variable is not None:  # AccumulateGrad: a leaf
            leaf(variable)
            continue
        for successor, _ in node.next_functions:
            if successor is not None:
                todo.append(successor)
    return list(leaves.values()), list(records.values())


def _when_all(futures: list[torch.futures.Future[Any]]) -> torch.futures.Future[None]:
    """Completes when every future has; fails with the first error (as a DescribedError,
    so that each hop passes it on as it was described where it happened)."""
    done: torch.futures.Future[None] = torch.futures.Future()
    if not futures:
        done.set_result(None)
        return done
    lock = threading.Lock()
    state: dict[str, Any] = {"left": len(futures), "error": None}

    def settled(future: torch.futures.Future[Any]) -> None:
        try:
            future.value()
            error = None
        except BaseException as e:
            error = _as_described(e.with_traceback(None))
        with lock:
            if error is not None and state["error"] is None:
                state["error"] = error
            state["left"] -= 1
            last = state["left"] == 0
        if last:
            if state["error"] is None:
                done.set_result(None)
            else:
                done.set_exception(state["error"])

    for future in futures:
        future.add_done_callback(settled)
    return done


def _as_described(error: BaseException) -> DescribedError:
    if isinstance(error, DescribedError):
        return error
    original = getattr(type(error), "_shmrpc_original", type(error))
    description: RemoteError = (original.__module__, original.__qualname__, str(error))
    return DescribedError(description)
