"""Feed samples measured in the worker processes into pytest-benchmark, unchanged.

The calls are timed where they are made, in the worker processes (``time.perf_counter``). A
test then replays its pooled samples: ``benchmark.pedantic`` runs one round per sample with
:func:`clock` as the benchmark's timer, and the replayed target sets the clock so that the
round lasts exactly that sample (the clock reads 0.0 when a round starts and the sample when
it ends; ``sample - 0.0 == sample``), so pytest-benchmark's statistics are those of the raw
samples, bit for bit. :func:`replay` checks that the median agrees.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

_now = 0.0


def clock() -> float:
    """The replay timer: the end of the round being replayed, then 0.0 for the next start."""
    global _now
    value, _now = _now, 0.0
    return value


class _Replay:
    def __init__(self, samples: Sequence[float]) -> None:
        self._samples = iter(samples)

    def __call__(self) -> None:
        global _now
        _now = next(self._samples, 0.0)


def replay(benchmark: Any, samples: Sequence[float]) -> None:
    """Record ``samples`` (seconds) as ``benchmark``'s rounds, one round each."""
    if not samples:
        raise ValueError("no samples to replay")
    if not hasattr(benchmark, "_timer"):
        raise RuntimeError("this pytest-benchmark has no Benchmark._timer to replay through")
    benchmark._timer = clock
    benchmark.pedantic(_Replay(samples), rounds=len(samples), iterations=1, warmup_rounds=0)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        assert median == statistics.median(samples), (median, statistics.median(samples))
