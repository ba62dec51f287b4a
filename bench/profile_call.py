"""Where the time of one call goes: ``python -m bench.profile_call [options]``.

Two workers (spawned, like bench/worker.py) make ``rpc_sync("worker1", noop, (tensor,))``
calls and report one of two profiles of the caller and the callee:

* ``--stages``: timestamps at the layer boundaries of every call (API entry, transport
  send, delivery on the other side, the handler's start, the reply's send, delivery back,
  return), one clock for both processes (CLOCK_MONOTONIC), and the median of each stage.
  The boundaries are found by wrapping ``Transport.send``, ``RpcAgent.deliver`` and
  ``RpcAgent._serve`` in each worker: a few hundred nanoseconds per boundary.
* ``--cprofile``: cProfile of the calling thread and of the callee's listener threads,
  the top functions by own time (cProfile slows Python code down 2-3x; read shares, not µs).

It imports whatever ``shmrpc`` is first on the path, so the same script profiles another
tree: ``PYTHONPATH=/path/to/old/tree python -m bench.profile_call`` (docs/performance.md).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import multiprocessing as mp
import os
import pstats
import socket
import statistics
import time
from typing import Any

import torch

STAGES = [
    ("caller: API to send", "start", "send0"),
    ("caller: send", "send0", "send1"),
    ("crossing to the callee", "send1", "s:deliver"),
    ("callee: delivery to handler", "s:deliver", "s:serve"),
    ("callee: handler to reply", "s:serve", "s:send0"),
    ("callee: send", "s:send0", "s:send1"),
    ("crossing back", "s:send1", "deliver"),
    ("caller: delivery to return", "deliver", "end"),
    ("total", "start", "end"),
]

_events: list[tuple[str, float]] = []
_profiles: list[cProfile.Profile] = []


def noop(*args: Any) -> None:
    return None


def _server_events() -> list[tuple[str, float]]:
    return list(_events)


def _server_profile(top: int) -> str:
    return _report(_profiles, top)


def _clear() -> None:
    _events.clear()
    for profile in _profiles:
        profile.disable()
        profile.enable()


def _report(profiles: list[cProfile.Profile], top: int) -> str:
    out = io.StringIO()
    stats: pstats.Stats | None = None
    for profile in profiles:
        profile.disable()
        if stats is None:
            stats = pstats.Stats(profile, stream=out)
        else:
            stats.add(profile)
    assert stats is not None
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def _instrument(server: bool, cprofile: bool) -> None:
    """Wrap the layer boundaries (stages) or the listener threads (cprofile)."""
    from shmrpc import agent, dispatcher, transport

    prefix = "s:" if server else ""
    clock = time.perf_counter
    if cprofile:
        if server:
            listen = dispatcher.Dispatcher._listen

            def profiled_listen(self: Any, t: Any) -> None:
                profile = cProfile.Profile()
                _profiles.append(profile)
                profile.enable()
                try:
                    listen(self, t)
                finally:
                    profile.disable()

            dispatcher.Dispatcher._listen = profiled_listen  # type: ignore[method-assign]
        return
    for cls in transport.Transport.__subclasses__():
        send = cls.send

        def timed_send(
            self: Any, peer: int, m: Any, timeout: Any = None, _send: Any = send
        ) -> None:
            _events.append((prefix + "send0", clock()))
            _send(self, peer, m, timeout)
            _events.append((prefix + "send1", clock()))

        cls.send = timed_send  # type: ignore[method-assign]
    deliver = agent.RpcAgent.deliver

    def timed_deliver(self: Any, peer: int, m: Any) -> None:
        _events.append((prefix + "deliver", clock()))
        deliver(self, peer, m)

    agent.RpcAgent.deliver = timed_deliver  # type: ignore[method-assign]
    serve = agent.RpcAgent._serve

    def timed_serve(self: Any, peer: int, m: Any) -> None:
        _events.append((prefix + "serve", clock()))
        serve(self, peer, m)

    agent.RpcAgent._serve = timed_serve  # type: ignore[method-assign]


def _worker(rank: int, args: argparse.Namespace, port: int, results: Any) -> None:
    if args.pin:
        os.sched_setaffinity(0, {rank % os.cpu_count()})  # type: ignore[arg-type]
    import shmrpc
    from shmrpc.backends import shm, tcp  # noqa: F401 - the transports to instrument

    _instrument(server=rank == 1, cprofile=args.cprofile)
    options = shmrpc.RpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}")
    shmrpc.init_rpc(
        f"worker{rank}", backend=args.backend, rank=rank, world_size=2, rpc_backend_options=options
    )
    if rank == 0:
        tensor = torch.zeros(args.size // 4)
        for _ in range(args.warmup):
            shmrpc.rpc_sync("worker1", noop, (tensor,))
        shmrpc.rpc_sync("worker1", _clear)
        _events.clear()
        profile = cProfile.Profile() if args.cprofile else None
        calls = []
        if profile is not None:
            profile.enable()
        for _ in range(args.calls):
            start = time.perf_counter()
            shmrpc.rpc_sync("worker1", noop, (tensor,))
            calls.append((start, time.perf_counter()))
        if profile is not None:
            profile.disable()
            results.put(("caller", _report([profile], args.top)))
            results.put(("callee", shmrpc.rpc_sync("worker1", _server_profile, (args.top,))))
        else:
            results.put(
                ("stages", (calls, list(_events), shmrpc.rpc_sync("worker1", _server_events)))
            )
    shmrpc.shutdown()


def _stage_table(calls: list[tuple[float, float]], mine: list[Any], theirs: list[Any]) -> str:
    # The callee's record starts with the tail of the _clear call: skip to its first request.
    first = next(
        i
        for i in range(len(theirs) - 1)
        if theirs[i][0] == "s:deliver" and theirs[i + 1][0] == "s:serve"
    )
    theirs = theirs[first:]
    durations: dict[str, list[float]] = {name: [] for name, _, _ in STAGES}
    for i, (start, end) in enumerate(calls):
        stamps = dict(mine[3 * i : 3 * i + 3])
        stamps.update(theirs[4 * i : 4 * i + 4])
        stamps.update(start=start, end=end)
        for name, a, b in STAGES:
            durations[name].append(stamps[b] - stamps[a])
    lines = ["| stage | median µs |", "|---|---:|"]
    lines += [f"| {name} | {statistics.median(d) * 1e6:.1f} |" for name, d in durations.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="shm")
    parser.add_argument("--size", type=int, default=0, help="bytes of the tensor argument")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--pin", action="store_true", help="one core per worker")
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(r, args, port, results)) for r in range(2)]
    for w in workers:
        w.start()
    try:
        if args.cprofile:
            for _ in range(2):
                who, text = results.get(timeout=600)
                print(f"== {who}\n{text}")
        else:
            _, (calls, mine, theirs) = results.get(timeout=600)
            print(_stage_table(calls, mine, theirs))
    finally:
        for w in workers:
            w.join(60)
            if w.is_alive():
                w.kill()


if __name__ == "__main__":
    main()
