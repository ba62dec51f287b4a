"""The RRef protocol: ids, owners, forks, and the messages that keep references counted.

Every RRef has one owner, holding the value, and any number of users elsewhere, each a *fork*
with its own ForkId. The owner keeps the value while it knows of a live fork, so two
guarantees keep the count right (torch's design, rref.rst):

* **G1** the owner is told of every deletion: a user RRef that Python frees sends
  RREF_USER_DELETE (from a finalizer, through a queue, never from inside the GC);
* **G2** a parent user stays alive until its child is confirmed by the owner: pickling a user
  RRef parks it in ``pending_children`` until the child's RREF_CHILD_ACCEPT arrives.

Sharing, message by message (A, B, C workers; B owns):

* ``remote(B, f)`` from A: A makes the UserRRef (ids from A's counter, RRefId first), sends
  REMOTE_CALL; B creates or finds the owner, registers the fork, runs ``f`` and answers
  after the value (or the exception, kept as the value) is set: that answer confirms A's fork.
* user → owner (A passes its RRef to B): B finds its owner state and sends RREF_CHILD_ACCEPT
  to A; B registers no fork.
* owner → user (B passes to C): B registers the fork as it pickles (early registration); C's
  RRef is confirmed on arrival.
* user → user (A passes to C): C sends RREF_FORK_REQUEST to B; once B answers, C's RRef is
  confirmed and C sends RREF_CHILD_ACCEPT to A. A function receiving such an RRef runs only
  once all its RRefs are confirmed (the agent waits on ``Inbound.waits``).

Control messages are idempotent and retried on timeouts; user functions never are. A deletion
that overtakes the fork it deletes leaves a tombstone, so a late ``remote()`` cannot leak.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .agent import Inbound, Later, Messenger, failed_future
from .envelope import Flag, Kind
from .errors import DescribedError, PeerLostError, RemoteError, RpcTimeoutError, describe_exception
from .rref import GloballyUniqueId, RRef, _local_invoke, _local_invoke_async
from .worker_info import WorkerInfo

__all__ = ["RRefContext"]

logger = logging.getLogger(__name__)

CREATION_TIMED_OUT = (
    "RRef creation via rpc.remote() timed out, and it is possible that the RRef on the owner "
    "node does not exist."
)
_RETRIES = 5  # control messages: attempts after a timeout (torch's RpcRetryOptions)
#: The deleter waits this long after the first freed RRef, so one message carries many.
_DELETION_BATCH_PAUSE = 0.01
#: At most this many deletions per message (~25 bytes each pickled).
_DELETIONS_PER_MESSAGE = 1000


class _OwnerState:
    """What the owner keeps for one RRef: its value once set, or the exception instead.

    Plain Python on purpose (no torch Future): a torch Future keeps its exception where
    Python's GC cannot see it, and exceptions pin frames through their tracebacks. And few
    objects: an owner keeps one per ``remote()`` until the user's deletion arrives, and every
    object that lives that long brings the garbage collector's full collection (70 ms in a
    process with torch loaded) nearer; so no Event unless a thread waits.
    """

    __slots__ = ("_lock", "_waiters", "description", "error", "rref_id", "settled", "value")

    def __init__(self, rref_id: GloballyUniqueId) -> None:
        self.rref_id = rref_id
        self.settled = False  # the value or the error is there
        self.value: Any = None
        self.error: BaseException | None = None
        self.description: RemoteError | None = None
        self._waiters: list[Callable[[], None]] | None = None
        self._lock = threading.Lock()

    def set_value(self, value: Any) -> None:
        self.value = value
        self._settle()

    def set_error(self, error: BaseException, description: RemoteError) -> None:
        self.error = error.with_traceback(None)
        self.description = description
        self._settle()

    def _settle(self) -> None:
        with self._lock:
            self.settled = True
            waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            waiter()

    def wait(self, timeout: float | None) -> bool:
        """Block until the state is settled (True) or ``timeout`` seconds pass (False)."""
        if self.settled:
            return True
        event = threading.Event()
        self.when_ready(event.set)
        return event.wait(timeout)

    def abandon(self, owner: WorkerInfo) -> None:
        """The owner drops this state: fetches still waiting for a value get an error."""
        if not self.settled:
            error = RuntimeError(f"RRef {self.rref_id} was dropped before it had a value")
            self.set_error(error, describe_exception(error, owner))

    def when_ready(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self.settled:
                if self._waiters is None:
                    self._waiters = []
                self._waiters.append(callback)
                return
        callback()

    def reply(self, convert: Callable[[Any], Any] = lambda value: value) -> Any:
        """What a fetch answers: the value (converted), or a Later until there is one."""
        if self.settled:
            if self.description is not None:
                raise DescribedError(self.description)
            return convert(self.value)
        future: torch.futures.Future[Any] = torch.futures.Future()

        def complete() -> None:
            if self.description is not None:
                future.set_exception(DescribedError(self.description))
            else:
                future.set_result(convert(self.value))

        self.when_ready(complete)
        return Later(future)


class RRefContext:
    """One per process while RPC is up: every RRef of this worker goes through it."""

    def __init__(self, agent: Messenger, default_timeout: Callable[[], float]) -> None:
        self._agent = agent
        self._default_timeout = default_timeout
        self.worker_id = agent.worker_info.id
        self._ids = itertools.count()  # RRefIds and ForkIds alike, as torch does
        self._lock = threading.Lock()
        self._owners: dict[GloballyUniqueId, _OwnerState] = {}
        self._forks: dict[GloballyUniqueId, set[GloballyUniqueId]] = {}
        self._pending_users: dict[GloballyUniqueId, RRef[Any]] = {}
        self._pending_children: dict[GloballyUniqueId, RRef[Any]] = {}
        self._confirmed: dict[GloballyUniqueId, weakref.ref[RRef[Any]]] = {}
        self._finalizers: dict[GloballyUniqueId, weakref.finalize[Any, Any]] = {}
        self._tombstones: set[tuple[GloballyUniqueId, GloballyUniqueId]] = set()
        self._pending_control = 0
        self._closed = False
        # GC may free a user RRef on any thread, inside any lock: SimpleQueue.put is safe there.
        self._deletions: queue.SimpleQueue[tuple[int, GloballyUniqueId, GloballyUniqueId] | None]
        self._deletions = queue.SimpleQueue()
        self._deleter = threading.Thread(
            target=self._send_deletions, name=f"shmrpc-{self.worker_id}-rref-deleter", daemon=True
        )
        self._deleter.start()

        agent.register_handler(Kind.REMOTE_CALL, self._serve_remote_call)
        agent.register_handler(Kind.RREF_FETCH, self._serve_fetch)
        agent.register_handler(Kind.RREF_TYPE, self._serve_type)
        agent.register_handler(Kind.RREF_FORK_REQUEST, self._serve_fork_request, internal=True)
        agent.register_handler(Kind.RREF_CHILD_ACCEPT, self._serve_child_accept, internal=True)
        agent.register_handler(Kind.RREF_USER_DELETE, self._serve_user_delete, internal=True)
        agent.serializer.register(RRef, "rref", self._reduce, self._rebuild, self._unfork)

    # -------------------------------------------------------------------------- helpers
    def _new_id(self) -> GloballyUniqueId:
        return GloballyUniqueId(self.worker_id, next(self._ids))

    def worker_info(self, rank: int) -> WorkerInfo:
        return self._agent.get_worker_info(rank)

    def _timeout(self, timeout: float) -> float:
        return self._default_timeout() if timeout < 0 else timeout

    def _check_usable(self, rref: RRef[Any], action: str) -> None:
        if rref._deleted:  # graceful shutdown deleted it: torch's messages
            what = "fork an UserRRef" if action == "fork" else f"{action} on it"
            raise RuntimeError(
                f"UserRRef(rref_id={rref._rref_id}, fork_id={rref._fork_id}) has been deleted. "
                f"Cannot call {what} after deletion."
            )
        if rref._context is not self or self._closed:
            raise RuntimeError(f"{rref!r} belongs to an RPC session that has shut down")
        if rref._timed_out:
            raise RuntimeError(CREATION_TIMED_OUT)

    def _check_created(self, rref: RRef[Any]) -> None:
        """A user RRef whose remote() failed (not timed out) has no value to ask for: the
        owner never ran the call. Asking would wait for nothing, so raise that failure."""
        creation = rref._creation
        if creation is not None and creation.done():
            error = _error_of(creation)
            if error is not None:
                raise _fresh(error)

    # --------------------------------------------------------------------------- creation
    def new_local_owner(self, value: Any) -> _OwnerState:
        """``RRef(value)``: a local owner, registered only once it is shared."""
        if self._closed:
            raise RuntimeError(
                "RPC has not been initialized. Call torch.distributed.rpc.init_rpc first."
            )
        state = _OwnerState(self._new_id())
        state.set_value(value)
        return state

    def remote(
        self,
        to: WorkerInfo,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float,
    ) -> RRef[Any]:
        """Run ``func`` on ``to`` and return an RRef to its result, without waiting for it."""
        rref_id = self._new_id()
        if to.id == self.worker_id:
            # The caller owns it. The RRefId itself stands in as a fork until the call is done,
            # so the value stays registered while the call runs.
            state = _OwnerState(rref_id)
            with self._lock:
                self._owners[rref_id] = state
                self._forks.setdefault(rref_id, set()).add(rref_id)
            rref = RRef._make(self, to.id, rref_id, None, state)
            fork_id = rref_id
        else:
            fork_id = self._new_id()
            rref = RRef._make(self, to.id, rref_id, fork_id, None)
            with self._lock:
                self._pending_users[fork_id] = rref
            self._watch_user(rref)
        try:
            future = self._agent.request_async(
                to, Kind.REMOTE_CALL, (func, args, kwargs, rref_id, fork_id), timeout, quick=True
            )
        except BaseException:  # nothing was sent: forget the RRef, nobody else knows of it
            with self._lock:
                if rref.is_owner():
                    self._forks.pop(rref_id, None)
                    self._owners.pop(rref_id, None)
                else:
                    self._pending_users.pop(fork_id, None)
                    finalizer = self._finalizers.pop(fork_id, None)
                    if finalizer is not None:
                        finalizer.detach()
            raise
        rref._creation = torch.futures.Future()
        future.add_done_callback(functools.partial(self._created, rref, fork_id))
        return rref

    def _created(
        self, rref: RRef[Any], fork_id: GloballyUniqueId, future: torch.futures.Future[Any]
    ) -> None:
        """The owner answered the creating REMOTE_CALL (or the call failed)."""
        creation = rref._creation
        assert creation is not None
        error = _error_of(future)
        if rref.is_owner():
            state = rref._state
            if error is not None and not isinstance(error, RpcTimeoutError):
                assert state is not None  # the call never ran (it could not be decoded)
                if not state.settled:
                    self._store_error(state, error)
            self._del_fork(rref._rref_id, fork_id)
        elif error is None:
            self._confirm(rref)
        else:
            # As torch does: no longer pending, but a user all the same, whose deletion the
            # owner hears of (it may have run the call; if not, a tombstone takes the news).
            with self._lock:
                self._pending_users.pop(fork_id, None)
                if not rref._deleted:
                    self._confirmed[fork_id] = weakref.ref(rref)
        if error is None:
            creation.set_result(None)
        else:
            rref._timed_out = isinstance(error, RpcTimeoutError)
            creation.set_exception(error)

    def _watch_user(self, rref: RRef[Any]) -> None:
        """Tell the owner when Python frees this user RRef (G1)."""
        fork_id = rref._fork_id
        assert fork_id is not None
        finalizer = weakref.finalize(
            rref, self._deletions.put, (rref._owner, rref._rref_id, fork_id)
        )
        finalizer.atexit = False
        with self._lock:
            self._finalizers[fork_id] = finalizer

    def _confirm(self, rref: RRef[Any]) -> None:
        assert rref._fork_id is not None
        with self._lock:
            self._pending_users.pop(rref._fork_id, None)
            if not rref._deleted:
                self._confirmed[rref._fork_id] = weakref.ref(rref)
        rref._confirmed = True

    # ----------------------------------------------------------------------- fork counting
    def _owner_state(self, rref_id: GloballyUniqueId) -> _OwnerState:
        """The owner's state for ``rref_id``, created empty if its value is still on the way."""
        with self._lock:
            state = self._owners.get(rref_id)
            if state is None:
                state = self._owners[rref_id] = _OwnerState(rref_id)
            return state

    def _add_fork(self, rref_id: GloballyUniqueId, fork_id: GloballyUniqueId) -> None:
        with self._lock:
            if (rref_id, fork_id) in self._tombstones:  # deleted before it arrived
                self._tombstones.discard((rref_id, fork_id))
                if rref_id not in self._forks:  # no other user: the state goes too
                    self._owners.pop(rref_id, None)
                return
            self._forks.setdefault(rref_id, set()).add(fork_id)

    def _del_fork(self, rref_id: GloballyUniqueId, fork_id: GloballyUniqueId) -> None:
        with self._lock:
            forks = self._forks.get(rref_id)
            if forks is None or fork_id not in forks:
                if fork_id != rref_id:
                    self._tombstones.add((rref_id, fork_id))
                return
            forks.discard(fork_id)
            if not forks:
                del self._forks[rref_id]
                self._owners.pop(rref_id, None)  # the value goes when Python drops it

    # ------------------------------------------------------------------------ pickling
    def _reduce(self, rref: RRef[Any]) -> tuple[Any, ...]:
        """Pickling an RRef forks it: a new ForkId, registered (owner) or parked (user, G2)."""
        self._check_usable(rref, "fork")
        fork_id = self._new_id()
        with self._lock:
            if rref.is_owner():
                assert rref._state is not None
                self._owners[rref._rref_id] = rref._state
                self._forks.setdefault(rref._rref_id, set()).add(fork_id)
            else:
                self._pending_children[fork_id] = rref
        return (rref._owner, tuple(rref._rref_id), tuple(fork_id), self.worker_id)

    def _unfork(self, reduced: tuple[Any, ...]) -> None:
        """The message that carried a fork was not sent: forget the fork."""
        owner, rref_id, fork_id, _ = reduced
        rid, fid = GloballyUniqueId(*rref_id), GloballyUniqueId(*fork_id)
        if owner == self.worker_id:
            self._del_fork(rid, fid)
        else:
            with self._lock:
                self._pending_children.pop(fid, None)

    def _rebuild(
        self,
        inbound: Inbound | None,
        owner: int,
        rref_id: tuple[int, int],
        fork_id: tuple[int, int],
        parent: int,
    ) -> RRef[Any]:
        rid, fid = GloballyUniqueId(*rref_id), GloballyUniqueId(*fork_id)
        if owner == self.worker_id:
            state = self._owner_state(rid)
            if parent == self.worker_id:
                self._del_fork(rid, fid)  # the owner passed its RRef to itself
            else:
                self._notify(parent, Kind.RREF_CHILD_ACCEPT, fid)
            return RRef._make(self, owner, rid, None, state)
        rref = RRef._make(self, owner, rid, fid, None)
        if parent == owner:  # the owner registered this fork when it pickled it
            self._confirm(rref)
        else:
            with self._lock:
                self._pending_users[fid] = rref
            answered = self._control(owner, Kind.RREF_FORK_REQUEST, (rid, fid))
            confirmed: torch.futures.Future[Any] = torch.futures.Future()
            answered.add_done_callback(
                functools.partial(self._fork_confirmed, rref, parent, confirmed)
            )
            if inbound is not None:
                inbound.waits.append(confirmed)  # the function runs once the owner knows
        self._watch_user(rref)
        return rref

    def _fork_confirmed(
        self,
        rref: RRef[Any],
        parent: int,
        confirmed: torch.futures.Future[Any],
        answered: torch.futures.Future[Any],
    ) -> None:
        error = _error_of(answered)
        if error is not None:
            with self._lock:
                self._pending_users.pop(rref._fork_id, None)  # type: ignore[arg-type]
            confirmed.set_exception(error)
            return
        self._confirm(rref)
        self._notify(parent, Kind.RREF_CHILD_ACCEPT, rref._fork_id)
        confirmed.set_result(None)

    # -------------------------------------------------------------------- control messages
    def _notify(self, to: int, kind: int, payload: Any) -> None:
        """Send a one-way control message (child accepts, deletions: nobody waits for them)."""
        try:
            self._agent.notify(self.worker_info(to), kind, payload)
        except PeerLostError:
            pass  # the peer is gone: nothing left to tell it
        except Exception as error:
            logger.warning("shmrpc: RRef message %s to rank %s failed: %s", kind, to, error)

    def _control(self, to: int, kind: int, payload: Any) -> torch.futures.Future[Any]:
        """Send an idempotent control message and expect an answer; retry on timeouts."""
        done: torch.futures.Future[Any] = torch.futures.Future()
        with self._lock:
            self._pending_control += 1
        self._send_control(self.worker_info(to), kind, payload, _RETRIES, done)
        return done

    def _send_control(
        self, to: WorkerInfo, kind: int, payload: Any, retries: int, done: torch.futures.Future[Any]
    ) -> None:
        def answered(future: torch.futures.Future[Any]) -> None:
            error = _error_of(future)
            if isinstance(error, RpcTimeoutError) and retries > 0 and not self._closed:
                self._send_control(to, kind, payload, retries - 1, done)
                return
            if error is not None and not isinstance(error, PeerLostError):
                logger.warning("shmrpc: RRef message %s to %s failed: %s", kind, to, error)
            self._control_done(done, error)

        future = self._agent.request_async(
            to, kind, payload, self._default_timeout(), Flag.INTERNAL, quick=True
        )
        future.add_done_callback(answered)

    def _control_done(self, done: torch.futures.Future[Any], error: BaseException | None) -> None:
        """Complete ``done`` (errors arrive without tracebacks: see ``_error_of``)."""
        with self._lock:
            self._pending_control -= 1
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def _send_deletions(self) -> None:
        """Tell owners about freed user RRefs, in batches: one message per owner per round."""
        while True:
            items = [self._deletions.get()]
            time.sleep(_DELETION_BATCH_PAUSE)  # let the round fill: RRefs often die in bulk
            while not self._deletions.empty():
                items.append(self._deletions.get())
            by_owner: dict[int, list[tuple[GloballyUniqueId, GloballyUniqueId]]] = {}
            for item in items:
                if item is not None:
                    owner, rref_id, fork_id = item
                    by_owner.setdefault(owner, []).append((rref_id, fork_id))
            if not self._closed:
                self._notify_deletions(by_owner)
            with self._lock:  # only now: a dead finalizer still listed is a pending deletion
                for forks in by_owner.values():
                    for _, fork_id in forks:
                        self._confirmed.pop(fork_id, None)
                        self._finalizers.pop(fork_id, None)
            if None in items:
                return

    # ---------------------------------------------------------------------- owner handlers
    def _serve_remote_call(self, inbound: Inbound, payload: tuple[Any, ...]) -> Any:
        func, args, kwargs, rref_id, fork_id = payload
        state = self._owner_state(rref_id)
        if fork_id != rref_id:  # the RRefId as fork: a remote() to self, registered already
            self._add_fork(rref_id, fork_id)
        wrapped = getattr(func, "_wrapped_async_rpc_function", None)
        try:
            result = (wrapped or func)(*args, **kwargs)
            if wrapped is not None and not isinstance(result, torch._C.Future):
                raise RuntimeError(
                    "Functions decorated with @rpc.async_function must return a "
                    f"torch.futures.Future object, but got {type(result).__qualname__}"
                )
        except BaseException as error:  # kept as the value: every to_here() raises it
            self._store_error(state, error)
            return None
        if wrapped is None:
            state.set_value(result)
            return None
        stored: torch.futures.Future[None] = torch.futures.Future()

        def store(future: torch.futures.Future[Any]) -> None:
            error = _error_of(future)
            if error is None:
                state.set_value(future.value())
            else:
                self._store_error(state, error)
            stored.set_result(None)

        result.add_done_callback(store)
        return Later(stored)

    def _store_error(self, state: _OwnerState, error: BaseException) -> None:
        if not isinstance(error, Exception):  # SystemExit and friends: reported as RuntimeError
            error = RuntimeError(f"{type(error).__name__}: {error}")
        description = describe_exception(error, self._agent.worker_info)
        # as for any failing remote function (agent._describe): torch printed it on the owner
        logger.error(
            "shmrpc: %s: a remote() call failed: %s", self._agent.worker_info.name, description[2]
        )
        state.set_error(error, description)

    def _serve_fetch(self, inbound: Inbound, rref_id: GloballyUniqueId) -> Any:
        return self._owner_state(rref_id).reply()

    def _serve_type(self, inbound: Inbound, rref_id: GloballyUniqueId) -> Any:
        return self._owner_state(rref_id).reply(type)

    def _serve_fork_request(self, inbound: Inbound, ids: tuple[Any, Any]) -> None:
        rref_id, fork_id = ids
        self._owner_state(rref_id)
        self._add_fork(rref_id, fork_id)

    def _serve_child_accept(self, inbound: Inbound, fork_id: GloballyUniqueId) -> None:
        with self._lock:
            self._pending_children.pop(fork_id, None)

    def _serve_user_delete(self, inbound: Inbound, forks: list[tuple[Any, Any]]) -> None:
        for rref_id, fork_id in forks:
            self._del_fork(rref_id, fork_id)

    # ------------------------------------------------------------------------ RRef methods
    def local_value(self, rref: RRef[Any]) -> Any:
        state = rref._state
        if state is None:
            raise RuntimeError(
                f"For UserRRef(rref_id={rref._rref_id}, fork_id={rref._fork_id}), can't call "
                f"localValue() on user {self._agent.worker_info}. Call it on owner {rref.owner()}"
            )
        if rref._timed_out:
            raise RuntimeError(CREATION_TIMED_OUT)
        timeout = self._default_timeout()
        if not state.wait(timeout if timeout > 0 else None):
            raise RpcTimeoutError.after(timeout, f"waiting for the value of {rref!r}")
        if state.error is not None:
            raise _fresh(state.error)
        return state.value

    def to_here(self, rref: RRef[Any], timeout: float) -> Any:
        self._check_usable(rref, "to_here()")
        if rref.is_owner():
            return self.local_value(rref)
        self._check_created(rref)
        value = self._agent.request_sync(
            rref.owner(), Kind.RREF_FETCH, rref._rref_id, self._timeout(timeout)
        )
        if not rref._confirmed and rref._creation is not None:
            self._confirm(rref)  # the owner had the value, so it had run remote(): registered
        return value

    def creation_future(self, rref: RRef[Any]) -> torch.futures.Future[Any]:
        if rref._creation is not None:
            return rref._creation
        done: torch.futures.Future[Any] = torch.futures.Future()
        done.set_result(None)
        return done

    def value_type(self, rref: RRef[Any], timeout: float, blocking: bool) -> Any:
        if rref._type_future is None:
            if rref.is_owner():
                try:
                    future: torch.futures.Future[Any] = torch.futures.Future()
                    future.set_result(type(self.local_value(rref)))
                except BaseException as error:
                    future = failed_future(error)
            else:
                self._check_usable(rref, "_get_type()")
                self._check_created(rref)
                future = self._agent.request_async(
                    rref.owner(), Kind.RREF_TYPE, rref._rref_id, self._timeout(timeout)
                )
            rref._type_future = future
        return rref._type_future.wait() if blocking else rref._type_future

    def invoke(
        self,
        rref: RRef[Any],
        mode: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float,
    ) -> Any:
        """A proxy call: ``method`` of the value, run on the owner.

        The value's type says how to call the method (``@async_execution`` or not), so it is
        fetched first (once per RRef). ``rpc_async`` must not block for it: its call goes out
        when the type arrives.
        """
        timeout = self._timeout(timeout)
        if mode != "async":
            value_type = self.value_type(rref, timeout, blocking=True)
            return self._invoke_with(value_type, rref, mode, method, args, kwargs, timeout)
        try:
            type_future = self.value_type(rref, timeout, blocking=False)
        except BaseException as error:
            return failed_future(error)
        if type_future.done():  # the usual case: known type, no extra future in the way
            try:
                value_type = type_future.value()
                getattr(value_type, method)  # a missing method fails the future, as torch's
            except BaseException as error:
                return failed_future(error)
            return self._invoke_with(value_type, rref, mode, method, args, kwargs, timeout)
        result: torch.futures.Future[Any] = torch.futures.Future()

        def pass_on(future: torch.futures.Future[Any]) -> None:
            error = _error_of(future)
            if error is None:
                result.set_result(future.value())
            else:
                result.set_exception(error)

        def call(arrived: torch.futures.Future[Any]) -> None:
            try:
                value_type = arrived.value()
                future = self._invoke_with(value_type, rref, mode, method, args, kwargs, timeout)
            except BaseException as error:
                result.set_exception(error.with_traceback(None))
                return
            future.add_done_callback(pass_on)

        type_future.add_done_callback(call)
        return result

    def _invoke_with(
        self,
        value_type: type,
        rref: RRef[Any],
        mode: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float,
    ) -> Any:
        is_async = hasattr(getattr(value_type, method), "_wrapped_async_rpc_function")
        func = _local_invoke_async if is_async else _local_invoke
        call = (rref, method, args, kwargs)
        owner = rref.owner()
        if mode == "remote":
            return self.remote(owner, func, call, {}, timeout)
        request = self._agent.request_sync if mode == "sync" else self._agent.request_async
        return request(owner, Kind.CALL, (func, call, {}), timeout)

    # ---------------------------------------------------------------------------- shutdown
    def delete_all_users(self, timeout: float | None) -> None:
        """Graceful shutdown: let every owner know this worker's user RRefs are gone.

        Waits for pending users and children to settle, deletes every live user RRef (they
        raise if used afterwards), drops owners nobody forked, then waits until every owner
        here is released by its users elsewhere.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self._wait_until(lambda: not self._pending_users and not self._pending_children, deadline)
        with self._lock:
            users = [ref() for ref in self._confirmed.values()]
            self._confirmed.clear()
            finalizers, self._finalizers = self._finalizers, {}
        for finalizer in finalizers.values():
            finalizer.detach()
        by_owner: dict[int, list[tuple[GloballyUniqueId, GloballyUniqueId | None]]] = {}
        for rref in users:
            if rref is not None and not rref._deleted:
                rref._deleted = True
                by_owner.setdefault(rref._owner, []).append((rref._rref_id, rref._fork_id))
        self._notify_deletions(by_owner)
        with self._lock:
            unforked = [self._owners.pop(r) for r in list(self._owners) if r not in self._forks]
        for state in unforked:  # never forked: nobody else can ask for it; fail who still waits
            state.abandon(self._agent.worker_info)
        self._wait_until(lambda: not self._owners, deadline)

    def _notify_deletions(self, by_owner: dict[int, list[Any]]) -> None:
        """Send USER_DELETE messages, each small enough for any ``max_message_size``."""
        for owner, forks in by_owner.items():
            for start in range(0, len(forks), _DELETIONS_PER_MESSAGE):
                self._notify(
                    owner, Kind.RREF_USER_DELETE, forks[start : start + _DELETIONS_PER_MESSAGE]
                )

    def _wait_until(self, condition: Callable[[], bool], deadline: float | None) -> None:
        while not condition():
            if deadline is not None and time.monotonic() >= deadline:
                return
            time.sleep(0.005)

    def leaks(self) -> list[str]:
        """References still counted (none should be left after delete_all_users)."""
        with self._lock:
            leaked = [
                f"Leaking RRef {rref_id} with fork Id {fork_id}"
                for rref_id, forks in self._forks.items()
                for fork_id in forks
            ]
            leaked += [f"Leaking RRef pending user {fork_id}" for fork_id in self._pending_users]
            leaked += [
                f"Leaking RRef pending child {fork_id}" for fork_id in self._pending_children
            ]
        return leaked

    def close(self) -> None:
        self._closed = True
        self._deletions.put(None)
        self._deleter.join(timeout=5)
        with self._lock:
            for finalizer in self._finalizers.values():
                finalizer.detach()
            self._finalizers.clear()

    def debug_info(self) -> dict[str, str]:
        with self._lock:
            return {
                "num_owner_rrefs": str(len(self._owners)),
                "num_pending_futures": str(self._pending_control),
                "num_pending_users": str(len(self._pending_users)),
                "num_forks": str(sum(len(forks) for forks in self._forks.values())),
                # not in torch: confirmed user RRefs here that Python has not freed
                "num_user_rrefs": str(sum(ref() is not None for ref in self._confirmed.values())),
                # not in torch: user RRefs forked from here whose children are not confirmed
                "num_pending_children": str(len(self._pending_children)),
                # not in torch: user RRefs freed here whose owners have not been told yet
                "num_pending_deletions": str(
                    sum(not finalizer.alive for finalizer in self._finalizers.values())
                ),
            }


def _fresh(error: BaseException) -> BaseException:
    """A copy of a stored exception to raise: raising the stored one would attach this
    caller's frames to it for as long as the owner keeps it."""
    try:
        return copy.copy(error).with_traceback(None)
    except Exception:
        return error


def _error_of(future: torch.futures.Future[Any]) -> BaseException | None:
    """The exception a completed future holds, without a traceback; None if it succeeded.

    torch Futures keep exceptions in C++, out of the GC's sight, and raising one attaches the
    current frame to it: an exception passed on with its traceback can pin the frames (and
    the RRefs in them) that led here forever.
    """
    try:
        future.value()
    except BaseException as error:
        return error.with_traceback(None)
    return None
