"""The rows of the benchmark table: what each measures, how many calls a block makes.

Shared by the orchestrator (bench/campaign.py), the worker processes (bench/worker.py) and
the report (bench/report.py), so that one definition says what a row is everywhere.

Kinds of row:

* ``latency``: one call at a time, every call timed; a sample is one call's seconds.
* ``rate``: a sliding window keeps ``inflight`` calls outstanding (the oldest is waited for,
  then a new one issued); a sample is the seconds between ``chunk`` consecutive completions
  divided by ``chunk``, so its inverse is calls per second. The all-to-all row merges the
  completions of every worker (one clock, CLOCK_MONOTONIC) while all of them are calling.
* ``bandwidth``: a rate row whose calls each carry ``size`` bytes; reported in GB/s.

CUDA rows (``cuda=True``, op ``cuda_echo``) are latency rows whose tensor lives on ``cuda:0``
of both workers: worker0 sends it with ``device_maps={"worker1": {0: 0}}`` and worker1 returns
it (the reply comes back through the inverse of that map). They run in worlds of their own,
started only when a CUDA row is measured, and are skipped where torch sees no CUDA device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

STACKS = ("shm", "tcp", "tensorpipe")
PINS = ("pinned", "unpinned")
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

#: BENCH_QUICK=1 divides the calls of every block and runs one generation: a smoke test of the
#: machinery, not figures to publish.
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
#: Fresh worlds per stack; each row runs its A B C C B A blocks once in each generation.
GENERATIONS = 1 if QUICK else 3
#: How often A B C C B A repeats per generation, row and pin mode.
REPEATS = 1


@dataclass(frozen=True)
class Row:
    key: str  # the test id part, e.g. "0B"
    title: str  # the table's row name (and pytest-benchmark group, with the pin mode)
    kind: str  # "latency", "rate" or "bandwidth"
    op: str  # what a call does: "sync", "remote", "async", "all_to_all", "train", "cuda_echo"
    calls: int  # measured calls per block (per worker for all-to-all)
    warmup: int  # calls before the measured ones in every block, not recorded
    size: int = 0  # bytes of the float32 tensor each call carries
    inflight: int = 1  # calls kept outstanding (rate and bandwidth rows)
    chunk: int = 1  # completions per sample (rate and bandwidth rows)
    workers: int = 2  # world size: 2, or 4 for all-to-all
    cuda: bool = False  # the tensor is on cuda:0, in a world made with device maps

    @property
    def block_calls(self) -> int:
        return max(self.chunk * 3, self.calls // 10) if QUICK else self.calls

    @property
    def block_warmup(self) -> int:
        return max(1, self.warmup // 10) if QUICK else self.warmup


SYNC_SIZES = {"0B": 0, "1KiB": KiB, "1MiB": MiB, "16MiB": 16 * MiB, "64MiB": 64 * MiB}
SYNC_CALLS = {"0B": (1500, 150), "1KiB": (1500, 150), "1MiB": (300, 30), "16MiB": (40, 4)}
#: CUDA round trips (``cuda_echo``): size -> (calls, warm-up) per block. Over tcp a 1 GiB call
#: stages 1 GiB through host memory and loopback each way (seconds), hence the few calls.
CUDA_DEVICE = 0  # both workers' tensors are on cuda:0; worker0 maps it to worker1's cuda:0
CUDA_SIZES = {"1KiB": KiB, "1MiB": MiB, "64MiB": 64 * MiB, "1GiB": GiB}
CUDA_CALLS = {"1KiB": (1000, 100), "1MiB": (300, 30), "64MiB": (40, 4), "1GiB": (8, 2)}
#: From this size on, the report also gives a CUDA row's GB/s (2 x size / median: the tensor
#: crosses twice per round trip).
CUDA_GBPS_FROM = 64 * MiB

ROWS: dict[str, Row] = {}


def _add(row: Row) -> Row:
    ROWS[row.title] = row
    return row


for _key, _size in SYNC_SIZES.items():
    _calls, _warmup = SYNC_CALLS.get(_key, (15, 2))
    _add(Row(_key, f"rpc_sync {_key}", "latency", "sync", _calls, _warmup, size=_size))
_add(Row("remote", "remote + to_here", "latency", "remote", 1000, 100))
for _n, _calls, _chunk in ((1, 1500, 50), (16, 3000, 64), (256, 5120, 256)):
    _add(
        Row(
            str(_n),
            f"rpc_async, {_n} in flight",
            "rate",
            "async",
            _calls,
            _calls // 10,
            size=4,
            inflight=_n,
            chunk=_chunk,
        )
    )
_add(
    Row(
        "a2a",
        "all-to-all, 4 workers x 16 in flight",
        "rate",
        "all_to_all",
        600,
        60,
        size=4,
        inflight=16,
        chunk=64,
        workers=4,
    )
)
_add(
    Row(
        "stream",
        "stream 64MiB, 4 in flight",
        "bandwidth",
        "async",
        24,
        4,
        size=64 * MiB,
        inflight=4,
        chunk=4,
    )
)
_add(Row("train", "train step, model-parallel RNN", "latency", "train", 100, 5))
for _key, _size in CUDA_SIZES.items():
    _calls, _warmup = CUDA_CALLS[_key]
    _add(Row(_key, f"cuda_echo {_key}", "latency", "cuda_echo", _calls, _warmup, _size, cuda=True))


def row(title: str) -> Row:
    return ROWS[title]
