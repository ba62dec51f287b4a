"""Distributed autograd contexts: what one forward and backward round records on a worker.

A context is born on the worker that enters ``autograd.context()`` and, lazily, on every
worker a message of that context reaches. Each copy holds the send and recv records of the
messages that crossed this worker with tensors requiring grad, the workers it sent to (for
cleanup), and the gradients accumulated here. Ids are ``worker_id << 48`` plus a counter, so
they are unique in the world without asking anyone.

The *current* context is per thread, as in torch: ``context()`` sets it for the user's
thread, and the agent sets it (`ContextContainer.serving`) while a request of that
context runs, so nested calls carry it on.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["ContextContainer", "DistAutogradContext", "RecvRecord", "SendRecord"]

_ID_BITS = 48
NOT_INITIALIZED = "Need to initialize distributed autograd using torch.distributed.autograd.init()"
NO_CURRENT_CONTEXT = (
    "Current thread doesn't have a valid autograd context. Please wrap your code using: "
    "`with torch.distributed.autograd.context() as context_id` to generate a valid context"
)


def not_found(context_id: int) -> RuntimeError:
    return RuntimeError(f"Could not find autograd context with id: {context_id}")


class SendRecord:
    """A message that left this worker with tensors requiring grad (torch's SendRpcBackward).

    Gradients for ``tensors`` come back from ``to`` under the message's id.
    """

    __slots__ = ("tensors", "to")

    def __init__(self, tensors: list[torch.Tensor], to: int) -> None:
        self.tensors = tensors
        self.to = to


class RecvRecord:
    """A message that arrived with tensors requiring grad (torch's RecvRpcBackward).

    The received tensors are outputs of one autograd node whose inputs are ``standins``:
    leaves shaped like them (one element of memory each). The gradient a local backward pass
    computes for a stand-in is what goes back to ``sender`` for that tensor.
    """

    __slots__ = ("in_reply", "message_id", "node", "sender", "standins")

    def __init__(
        self,
        sender: int,
        message_id: int,
        standins: list[torch.Tensor],
        node: Any,
        in_reply: bool = False,
    ) -> None:
        self.sender = sender
        self.message_id = message_id
        self.standins = standins
        self.node = node
        #: The tensors came in a reply (to our request), not in a request of the sender's:
        #: their gradients go back the way our requests go (our device map), else the way
        #: replies to the sender go (the inverse of its map).
        self.in_reply = in_reply


class DistAutogradContext:
    """One worker's copy of a distributed autograd context."""

    def __init__(self, context_id: int) -> None:
        self._id = context_id
        self._lock = threading.Lock()
        self._sends: dict[int, SendRecord] = {}
        self._recvs: dict[int, RecvRecord] = {}
        self._standins: dict[int, RecvRecord] = {}  # id(stand-in) -> its record
        self._known: set[int] = set()
        self._grads: dict[torch.Tensor, torch.Tensor] = {}
        self.released = False

    # ---------------------------------------------------------------------- torch's names
    def _context_id(self) -> int:
        return self._id

    def _send_functions(self) -> dict[int, SendRecord]:
        with self._lock:
            return dict(self._sends)

    def _recv_functions(self) -> dict[int, Any]:
        """Message id -> the autograd node the received tensors hang from."""
        with self._lock:
            return {message_id: record.node for message_id, record in self._recvs.items()}

    def _known_worker_ids(self) -> set[int]:
        with self._lock:
            return set(self._known)

    # ------------------------------------------------------------------------- recording
    def add_known(self, worker: int) -> None:
        with self._lock:
            self._known.add(worker)

    def add_send(self, message_id: int, record: SendRecord) -> None:
        with self._lock:
            self._sends[message_id] = record
            self._known.add(record.to)

    def add_recv(self, record: RecvRecord) -> None:
        with self._lock:
            self._recvs[record.message_id] = record
            for standin in record.standins:
                self._standins[id(standin)] = record

    def send_record(self, message_id: int) -> SendRecord:
        with self._lock:
            record = self._sends.get(message_id)
        if record is None:
            raise RuntimeError(
                f"autograd context {self._id} has no send function for message {message_id}"
            )
        return record

    def recv_of(self, standin: torch.Tensor) -> RecvRecord | None:
        return self._standins.get(id(standin))

    # ------------------------------------------------------------------------- gradients
    def accumulate(self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add gradients to the context's map (sums across paths and backward passes)."""
        with self._lock:
            grads = self._grads
            for tensor, grad in pairs:
                held = grads.get(tensor)
                grads[tensor] = grad if held is None else held + grad

    def gradients(self) -> dict[torch.Tensor, torch.Tensor]:
        with self._lock:
            return dict(self._grads)

    def drop(self) -> None:
        """Forget everything recorded: the graphs the records pin can go."""
        with self._lock:
            self.released = True
            self._sends.clear()
            self._recvs.clear()
            self._standins.clear()
            self._grads.clear()


class ContextContainer:
    """This process's contexts by id, the id counters, and each thread's current context."""

    def __init__(self, worker_id: int) -> None:
        if not 0 <= worker_id < 2**16:
            raise ValueError(f"worker id {worker_id} does not fit distributed autograd's 16 bits")
        self.worker_id = worker_id
        first = worker_id << _ID_BITS
        self.max_id = first + (1 << _ID_BITS) - 1
        self._context_ids = itertools.count(first)  # next() on a count is atomic under the GIL
        self._message_ids = itertools.count(first)
        self._contexts: dict[int, DistAutogradContext] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    # -------------------------------------------------------------------------- contexts
    def new_context(self) -> DistAutogradContext:
        """A new context, made current for this thread."""
        if self.current_id() != -1:
            raise RuntimeError("Already have an autograd context id for this thread.")
        context = DistAutogradContext(next(self._context_ids))
        with self._lock:
            self._contexts[context._context_id()] = context
        self._local.current = context._context_id()
        return context

    def new_message_id(self) -> int:
        return next(self._message_ids)

    def retrieve(self, context_id: int) -> DistAutogradContext:
        with self._lock:
            context = self._contexts.get(context_id)
        if context is None:
            raise not_found(context_id)
        return context

    def lookup(self, context_id: int, create: bool = False) -> DistAutogradContext | None:
        """The context, created if ``create`` and missing (a peer's message brought it)."""
        with self._lock:
            context = self._contexts.get(context_id)
            if context is None and create:
                context = self._contexts[context_id] = DistAutogradContext(context_id)
            return context

    def release(self, context_id: int) -> DistAutogradContext | None:
        """Remove the context (None if it is not here) and clear it as this thread's current."""
        if getattr(self._local, "current", -1) == context_id:
            self._local.current = -1
        with self._lock:
            context = self._contexts.pop(context_id, None)
        if context is not None:
            context.drop()
        return context

    def release_all(self) -> None:
        with self._lock:
            contexts, self._contexts = list(self._contexts.values()), {}
        for context in contexts:
            context.drop()

    def __len__(self) -> int:
        return len(self._contexts)

    # ------------------------------------------------------------------ current context
    def current_id(self) -> int:
        return getattr(self._local, "current", -1)

    def current(self) -> DistAutogradContext:
        context_id = self.current_id()
        context = None if context_id == -1 else self.lookup(context_id)
        if context is None:
            raise RuntimeError(NO_CURRENT_CONTEXT)
        return context

    @contextlib.contextmanager
    def serving(self, context_id: int) -> Iterator[None]:
        """Make ``context_id`` this thread's current context while a request of it runs."""
        local = self._local
        outer = getattr(local, "current", -1)
        local.current = context_id
        try:
            yield
        finally:
            local.current = outer
