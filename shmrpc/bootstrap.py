"""Bringing one worker into its world: rendezvous, transports, routes, agent.

For each peer the first transport of the backend's preference list that reaches it carries
its traffic (``auto``: shm on the same host, tcp elsewhere); both ends decide alike from the
addresses they exchanged. A transport that cannot work in this process (shm without a usable
/dev/shm) publishes an address with ``"unavailable": reason``, which reaches nobody: with a
fallback in the list (``auto``) the worker warns once and its peers take the next transport;
without one, init fails on every rank with that reason. Anything that fails on the way
releases what was already set up.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

from .agent import RpcAgent
from .autograd.engine import DistAutograd
from .devices import DeviceMaps, local_device_record, parse_records, validate_device_maps
from .options import RpcBackendOptions
from .rendezvous import Rendezvous
from .rref_context import RRefContext
from .transport import Message, Transport, TransportConfig, resolve_backend
from .worker_info import WorkerInfo

__all__ = ["World", "start_agent"]

logger = logging.getLogger(__name__)

#: Rendezvous and connect deadline when rpc_timeout is 0 ("no timeout"): still finite.
_NO_TIMEOUT_INIT = 1800.0


class _ForwardingHost:
    """The transports' host until the agent exists; remembers peers lost meanwhile."""

    def __init__(self) -> None:
        self.target: RpcAgent | None = None
        self._lost: list[tuple[int, BaseException]] = []

    def deliver(self, peer: int, message: Message) -> None:
        if self.target is not None:
            self.target.deliver(peer, message)

    def peer_lost(self, peer: int, error: BaseException) -> None:
        if self.target is None:
            self._lost.append((peer, error))
        else:
            self.target.peer_lost(peer, error)

    def attach(self, agent: RpcAgent) -> None:
        self.target = agent
        for peer, error in self._lost:
            agent.peer_lost(peer, error)


@dataclasses.dataclass
class World:
    """What init_rpc leaves running in this process."""

    agent: RpcAgent
    rrefs: RRefContext
    autograd: DistAutograd
    rendezvous: Rendezvous  # keeps rank 0's TCPStore server alive


def start_agent(
    name: str,
    rank: int,
    world_size: int | None,
    backend: str,
    options: RpcBackendOptions,
    default_timeout: Callable[[], float],
    publish: Callable[[World | None], None],
) -> World:
    """Start the agent of this worker and wait until every worker has started.

    ``publish`` gets the world before the final barrier (peers may call as soon as they pass
    it, and the functions they run must find the API initialized) and ``None`` if starting
    fails after that.
    """
    timeout = options.rpc_timeout or _NO_TIMEOUT_INIT
    classes = resolve_backend(backend)
    rendezvous = Rendezvous(
        options.init_method, rank, -1 if world_size is None else world_size, timeout
    )
    rank, world_size = rendezvous.rank, rendezvous.world_size
    token, auth_key = rendezvous.world_secrets(options.auth_key)
    config = TransportConfig(
        rank=rank,
        world_size=world_size,
        world_token=token,
        auth_key=auth_key,
        connect_timeout=timeout,
        options=options.transport_config_options(),
    )
    host = _ForwardingHost()
    transports: list[Transport] = []
    agent: RpcAgent | None = None
    rrefs: RRefContext | None = None
    autograd: DistAutograd | None = None
    published = False
    try:
        for cls in classes:
            transports.append(cls(config, host))
        addresses = {t.name: t.listen() for t in transports}
        _warn_unavailable(backend, transports, addresses)
        devices = local_device_record(options.device_maps, options.devices)
        records = rendezvous.exchange(
            {"name": name, "pid": os.getpid(), "transports": addresses, "devices": devices}
        )
        rendezvous.forget_key_file()  # everyone joined, so everyone has read the key
        infos = _worker_infos(records)
        names, counts, maps, listed = parse_records(records)
        validate_device_maps(names, counts, maps, listed)  # every rank raises alike
        routes = _choose_routes(rank, backend, transports, addresses, records)
        used = [t for t in transports if t in routes.values()]
        for t in transports:
            if t not in used:
                t.close()
        agent = RpcAgent(
            infos[rank],
            infos,
            routes,
            used,
            num_worker_threads=options.num_worker_threads,
            spin_seconds=options.spin_us * 1e-6,
            max_message_size=options.max_message_size,
            device_maps=DeviceMaps(name, names, maps),
        )
        # Their handlers and the autograd gate exist before peers can call.
        rrefs = RRefContext(agent, default_timeout)
        autograd = DistAutograd(agent, default_timeout)
        host.attach(agent)
        for t in used:
            t.connect(
                {
                    peer: records[peer]["transports"][t.name]
                    for peer, route in routes.items()
                    if route is t
                }
            )
        agent.start()
        world = World(agent, rrefs, autograd, rendezvous)
        publish(world)
        published = True
        rendezvous.barrier("ready")
    except BaseException:
        rendezvous.forget_key_file()
        if published:
            publish(None)
        if rrefs is not None:
            rrefs.close()
        if autograd is not None:
            autograd.close()
        if agent is not None:
            agent.stop()
        for t in transports:
            try:
                t.close()
            except Exception:
                logger.exception("shmrpc: cleanup of transport %s failed", t.name)
        raise
    return world


def _worker_infos(records: list[dict[str, Any]]) -> list[WorkerInfo]:
    seen: dict[str, int] = {}
    for rank, record in enumerate(records):
        worker = record["name"]
        if worker in seen:
            raise RuntimeError(
                f"RPC worker name {worker} is not unique. Workers {seen[worker]} and {rank} "
                "share the same name."
            )
        seen[worker] = rank
    return [WorkerInfo(record["name"], rank) for rank, record in enumerate(records)]


def _choose_routes(
    rank: int,
    backend: str,
    transports: list[Transport],
    addresses: dict[str, dict[str, Any]],
    records: list[dict[str, Any]],
) -> dict[int, Transport]:
    routes: dict[int, Transport] = {}
    for peer, record in enumerate(records):
        if peer == rank:
            continue
        theirs = record["transports"]
        for t in transports:
            if t.name in theirs and type(t).reaches(addresses[t.name], theirs[t.name]):
                routes[peer] = t
                break
        else:
            # (transport, why it cannot work) -> the workers it cannot work on
            reasons: dict[tuple[str, str], list[str]] = {}
            for t in transports:
                for who, address in (
                    ("this worker", addresses[t.name]),
                    (record["name"], theirs.get(t.name) or {}),
                ):
                    if "unavailable" in address:
                        reasons.setdefault((t.name, address["unavailable"]), []).append(who)
            raise RuntimeError(
                f"backend {backend!r} cannot reach worker {record['name']} (rank {peer}): none "
                f"of its transports {[t.name for t in transports]} connects these two workers; "
                + (
                    "; ".join(
                        f"{name} is unavailable on {' and '.join(who)}: {why}"
                        for (name, why), who in reasons.items()
                    )
                    or "workers on different hosts need 'tcp' or 'auto'"
                )
            )
    return routes


def _warn_unavailable(
    backend: str, transports: list[Transport], addresses: dict[str, dict[str, Any]]
) -> None:
    """Warn once per transport that cannot work here while others can (``auto`` without a
    usable /dev/shm): its peers on this host are reached by the next one, more slowly."""
    unavailable = {
        t.name: addresses[t.name]["unavailable"]
        for t in transports
        if "unavailable" in addresses[t.name]
    }
    others = [t.name for t in transports if t.name not in unavailable]
    if not others:
        return  # nothing to fall back on: route choice fails with the reason
    for name, reason in unavailable.items():
        warnings.warn(
            f"shmrpc: transport {name!r} is unavailable on this worker, so backend {backend!r} "
            f"reaches the peers it would have carried with {others[0]!r}: {reason}",
            RuntimeWarning,
            stacklevel=4,  # the caller of init_rpc
        )
