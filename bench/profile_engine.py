"""The engine's own cost of a call: ``python -m bench.profile_engine [--cprofile]``.

Two agents live in one process, joined by routes that hand a message straight to the other
agent's ``deliver`` and run what it queued on the same thread. One ``rpc_sync`` then runs the
caller's and the callee's engine code (API, agent, serializer, gate, RRef context and
autograd installed as in a real world) back to back, with no transport, no thread switch and
warm caches: the floor that Python sets for a round trip (docs/performance.md).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import timeit
from typing import Any

import torch

import shmrpc
import shmrpc.api as api
from shmrpc.agent import RpcAgent
from shmrpc.autograd.engine import DistAutograd
from shmrpc.rref_context import RRefContext
from shmrpc.transport import Message
from shmrpc.worker_info import WorkerInfo


def noop(*args: Any) -> None:
    return None


class _DirectRoute:
    """A route to an agent of this process: its deliver() runs here, then what it queued."""

    name = "direct"
    devices = frozenset({"cpu"})

    def __init__(self, me: int) -> None:
        self.me = me
        self.peer: RpcAgent | None = None

    def send(self, peer: int, message: Message, timeout: float | None = None) -> None:
        target = self.peer
        assert target is not None
        local = target._dispatcher._local
        batch: list[Any] = []
        local.batch = batch  # as on a listener thread: submitted work collects here
        try:
            copy = Message(bytes(message.header), bytes(message.payload), list(message.buffers))
            target.deliver(self.me, copy)
        finally:
            local.batch = None
        for fn, args, _ in batch:
            fn(*args)


def _world() -> RpcAgent:
    infos = [WorkerInfo("worker0", 0), WorkerInfo("worker1", 1)]
    agents = []
    for rank in range(2):
        route = _DirectRoute(rank)
        agent = RpcAgent(
            infos[rank], infos, {1 - rank: route}, [], num_worker_threads=4, spin_seconds=0
        )
        RRefContext(agent, lambda: 60.0)
        DistAutograd(agent, lambda: 60.0)
        agents.append(agent)
    for rank, agent in enumerate(agents):
        agent._routes[1 - rank].peer = agents[1 - rank]  # type: ignore[attr-defined]
    return agents[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=0, help="bytes of the tensor argument")
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--cprofile", action="store_true")
    args = parser.parse_args()
    api._agent = _world()  # what init_rpc would publish
    tensor = torch.zeros(args.size // 4)

    def call() -> None:
        shmrpc.rpc_sync("worker1", noop, (tensor,))

    best = min(timeit.repeat(call, number=args.calls, repeat=5)) / args.calls
    print(f"rpc_sync round trip, engine only: {best * 1e6:.1f} µs")
    if args.cprofile:
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.calls):
            call()
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
