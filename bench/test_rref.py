"""``remote()`` then ``to_here()``: creating a remote value and fetching it, per stack."""

from __future__ import annotations

from bench.workload import one


def test_remote_to_here(benchmark, rpc_world):
    stack, rpc = rpc_world
    benchmark.group = "remote + to_here"
    benchmark.extra_info.update(stack=stack)

    def round_trip():
        return rpc.remote("worker1", one).to_here()

    benchmark.pedantic(round_trip, rounds=2000, warmup_rounds=200, iterations=1)
