"""Benchmark session: one campaign of worlds (bench/campaign.py), tests that replay its samples.

Every test is one (row, pin mode, stack), e.g. ``test_rpc_sync[0B-pinned-shm]``; its
pytest-benchmark group is the row and pin mode, so the stacks of a row sit side by side. A row
is measured when its first test runs, for the stacks and pin modes the session selected (so
``-k`` selects cheaply), all of them in one interleaved campaign; each test then replays its
stack's pooled samples into pytest-benchmark (bench/replay.py).

A CUDA row (bench/test_cuda.py) is skipped where torch sees no CUDA device, before any world
is started: by its test module's mark, and again here before it would be measured.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from typing import Any

import pytest

from bench.campaign import CORES, Campaign, Pool
from bench.cases import Case
from bench.replay import replay
from bench.rows import GENERATIONS, PINS, QUICK, REPEATS, ROWS, STACKS, Row, row


def pytest_report_header() -> str:
    mode = "QUICK (BENCH_QUICK=1: smoke test, not figures)" if QUICK else "full"
    return (
        f"bench: {mode}; {GENERATIONS} generation(s) of worlds x {REPEATS} A B C C B A per row "
        f"and pin mode; cores {CORES}"
    )


_log: list[str] = []
_idle: dict[str, float] = {}
_failed: dict[str, str] = {}  # row -> why measuring it failed (its other tests fail at once)


def cuda_available() -> bool:
    """Whether torch sees a CUDA device here (torch is imported only when asked)."""
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="session")
def campaign() -> Iterator[Campaign]:
    campaign = Campaign(_log)
    campaign.idle = _idle
    try:
        yield campaign
        campaign.measure_idle()
    finally:
        campaign.close()


def pytest_benchmark_update_machine_info(config: Any, machine_info: dict[str, Any]) -> None:
    from importlib.metadata import version

    machine_info["torch"] = version("torch")


def pytest_benchmark_update_json(config: Any, benchmarks: Any, output_json: dict) -> None:
    """How the samples were taken, for bench/report.py's description of the method."""
    output_json["bench"] = {
        "quick": QUICK,
        "generations": GENERATIONS,
        "repeats": REPEATS,
        "cores": CORES,
        "idle_cpu_per_s": _idle,
        "rows": {
            r.title: {
                "calls": r.block_calls,
                "warmup": r.block_warmup,
                "chunk": r.chunk,
                "cuda": r.cuda,
            }
            for r in ROWS.values()
        },
    }


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _log:
        terminalreporter.write_sep("-", "bench campaign (wall time per row and pin mode)")
        for line in _log:
            terminalreporter.write_line(line)


def _selected(session: pytest.Session, title: str) -> tuple[list[str], list[str]]:
    """The pin modes and stacks the session runs for the row ``title``."""
    pins, stacks = set(), set()
    for item in session.items:
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        if isinstance(case, Case) and case.title == title:
            pins.add(case.pin)
            stacks.add(case.stack)
    return [p for p in PINS if p in pins], [s for s in STACKS if s in stacks]


@pytest.fixture
def measured(request: pytest.FixtureRequest, benchmark: Any, campaign: Campaign) -> Pool:
    """Measure (if not yet) this test's row, replay this stack's and pin mode's samples."""
    case: Case = request.node.callspec.params["case"]
    r = row(case.title)
    if r.cuda and not cuda_available():
        pytest.skip("needs a CUDA device (the CUDA rows skip without one)")
    if r.title in _failed:
        pytest.fail(f"measuring this row failed in an earlier test: {_failed[r.title]}")
    if (r.title, case.pin) not in campaign.results:
        pins, stacks = _selected(request.session, r.title)
        try:
            campaign.measure(r, pins or [case.pin], stacks or [case.stack])
        except Exception as e:
            _failed[r.title] = f"{type(e).__name__}: {str(e)[:200]}"
            raise
    pool = campaign.results[r.title, case.pin][case.stack]
    benchmark.group = f"{r.title} ({case.pin})"
    benchmark.extra_info.update(_extra_info(r, case, pool))
    replay(benchmark, pool.samples)
    return pool


def _extra_info(r: Row, case: Case, pool: Pool) -> dict[str, Any]:
    median = statistics.median(pool.samples)
    info: dict[str, Any] = {
        "stack": case.stack,
        "pin": case.pin,
        "row": r.title,
        "kind": r.kind,
        "bytes": r.size,
        "inflight": r.inflight,
        "workers": r.workers,
        "cuda": r.cuda,
        "blocks": pool.blocks,
        "block_medians_s": pool.block_medians,
        "median_s": median,
        "quick": QUICK,
    }
    if r.workers == 2:
        info["cpu_us_per_call_client"] = pool.cpu_us_client
        info["cpu_us_per_call_server"] = pool.cpu_us_server
    else:  # every worker both calls and serves
        info["cpu_us_per_call_world"] = pool.cpu_us_client
    if r.kind == "rate":
        info["calls_per_s"] = 1 / median
    if r.kind == "bandwidth":
        info["gb_per_s"] = r.size / median / 1e9
    return info
