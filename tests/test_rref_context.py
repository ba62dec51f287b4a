"""The owner's bookkeeping when control messages arrive out of order.

These drive the RRef context directly through a stand-in for the agent, because the orders
they need (a deletion that overtakes the call creating the value) depend on thread timing in a
real world. They need no transport, so they run once rather than per backend.
"""

from __future__ import annotations

from typing import Any

import torch

from shmrpc.agent import Inbound
from shmrpc.rref import GloballyUniqueId
from shmrpc.rref_context import RRefContext
from shmrpc.serialization import Serializer
from shmrpc.worker_info import WorkerInfo


class _Messenger:
    """The agent as the context sees it; nothing leaves the process."""

    def __init__(self) -> None:
        self.worker_info = WorkerInfo("owner", 0)
        self.serializer = Serializer()
        self.handlers: dict[int, Any] = {}

    def get_worker_info(self, worker: str | int | None = None) -> WorkerInfo:
        return self.worker_info

    def register_handler(self, kind: int, handler: Any, *, internal: bool = False) -> None:
        self.handlers[kind] = handler

    def request_async(self, *args: Any, **kwargs: Any) -> torch.futures.Future[Any]:
        raise AssertionError("the owner sends nothing here")

    def request_sync(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the owner sends nothing here")

    def notify(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("the owner sends nothing here")


def _owner() -> RRefContext:
    return RRefContext(_Messenger(), lambda: 5.0)


def _inbound() -> Inbound:
    return Inbound(peer=1, envelope=None)  # type: ignore[arg-type]


RREF_ID = GloballyUniqueId(1, 7)
FORK_ID = GloballyUniqueId(1, 8)


def _call(context: RRefContext, rref_id: Any = RREF_ID, fork_id: Any = FORK_ID) -> None:
    context._serve_remote_call(_inbound(), (torch.ones, (3,), {}, rref_id, fork_id))


def _counts(context: RRefContext) -> tuple[str, str]:
    info = context.debug_info()
    return info["num_owner_rrefs"], info["num_forks"]


def test_remote_call_then_delete_frees_the_value() -> None:
    context = _owner()
    _call(context)
    assert _counts(context) == ("1", "1")
    context._serve_user_delete(_inbound(), [(RREF_ID, FORK_ID)])
    assert _counts(context) == ("0", "0")


def test_delete_that_overtakes_the_remote_call_leaves_nothing() -> None:
    context = _owner()
    context._serve_user_delete(_inbound(), [(RREF_ID, FORK_ID)])
    _call(context)
    assert _counts(context) == ("0", "0")
    assert not context._tombstones


def test_delete_that_overtakes_a_fork_request_keeps_the_other_users() -> None:
    context = _owner()
    _call(context)
    other = GloballyUniqueId(2, 3)
    context._serve_user_delete(_inbound(), [(RREF_ID, other)])
    context._serve_fork_request(_inbound(), (RREF_ID, other))
    assert _counts(context) == ("1", "1")  # the first user still holds the value
    context._serve_user_delete(_inbound(), [(RREF_ID, FORK_ID)])
    assert _counts(context) == ("0", "0")


def test_repeated_deletes_are_idempotent() -> None:
    context = _owner()
    _call(context)
    context._serve_user_delete(_inbound(), [(RREF_ID, FORK_ID)])
    context._serve_user_delete(_inbound(), [(RREF_ID, FORK_ID)])
    assert _counts(context) == ("0", "0")
