"""Recording the forward pass: the agent's message gate for distributed autograd.

Every message passes `AutogradGate` with all of its tensors (see ``agent.MessageGate``).

* **Sending**, inside a context: the tensors that require grad are kept in a
  `SendRecord` under a new message id, which travels in the envelope. The destination
  becomes a *known worker* of the context (it gets the cleanup when the context ends).
* **Receiving** a message of a context: the context is created here if it is new. Tensors sent
  with ``requires_grad`` come out of one `_RecvRpc` node, whose backward turns their
  gradients into gradients of stand-in leaves; the backward pass sends those to the sender.
  Outside a context, tensors simply arrive with ``requires_grad`` set, as in torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager as ContextManager
from typing import Any

import torch

from ..agent import restore_requires_grad
from ..envelope import REPLIES, Envelope
from ..serialization import Received
from .context import ContextContainer, RecvRecord, SendRecord

__all__ = ["AutogradGate"]


class _RecvRpc(torch.autograd.Function):
    """The received tensors, as outputs of a node whose backward passes their gradients on to
    one stand-in leaf each (torch's RecvRpcBackward)."""

    @staticmethod
    def forward(ctx: Any, received: tuple[torch.Tensor, ...], *standins: torch.Tensor) -> Any:
        # New tensors on the same memory, not views: a view made inside a custom Function
        # could not be modified in place, and received tensors can be.
        return tuple(_alias(t) for t in received)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        return (None, *grads)


def _alias(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def _standin(t: torch.Tensor) -> torch.Tensor:
    """A leaf shaped like ``t`` that holds one element (every stride 0)."""
    one = torch.zeros((), dtype=t.dtype, device=t.device)
    return one.expand(t.shape).detach().requires_grad_(True)


class AutogradGate:
    """Records send and recv functions for every message of a context (agent.MessageGate)."""

    def __init__(self, contexts: ContextContainer) -> None:
        self._contexts = contexts

    def current_context(self) -> int:
        return self._contexts.current_id()

    def outgoing(self, to: int, context_id: int, tensors: Sequence[torch.Tensor]) -> int:
        context = self._contexts.lookup(context_id)
        if context is None:  # released meanwhile (an async reply after the caller's exit)
            return -1
        grads = [t for t in tensors if t.requires_grad]
        if not grads:
            context.add_known(to)
            return -1
        message_id = self._contexts.new_message_id()
        context.add_send(message_id, SendRecord(grads, to))
        return message_id

    def incoming(self, peer: int, envelope: Envelope, received: Received) -> None:
        context_id = envelope.autograd_context
        if context_id == -1:
            restore_requires_grad(received)
            return
        # A request brings its context here; a reply only finds the caller's (if still there).
        context = self._contexts.lookup(context_id, create=envelope.kind not in REPLIES)
        if context is None or envelope.autograd_message == -1:
            restore_requires_grad(received)
            return
        tensors = received.tensors
        wanted = [i for i, flag in enumerate(received.requires_grad) if flag]
        if not wanted:
            return
        plain = tuple(tensors[i] for i in wanted)
        standins = [_standin(t) for t in plain]
        with torch.enable_grad():  # record even if this thread runs under no_grad()
            outputs = _RecvRpc.apply(plain, *standins)
        for i, out in zip(wanted, outputs, strict=True):
            tensors[i] = out
        node = outputs[0].grad_fn
        in_reply = envelope.kind in REPLIES
        context.add_recv(RecvRecord(peer, envelope.autograd_message, standins, node, in_reply))

    def serving(self, context_id: int) -> ContextManager[None]:
        return self._contexts.serving(context_id)
