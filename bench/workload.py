"""What the benchmarks call remotely (importable by every worker process)."""

from __future__ import annotations

import torch


def noop(*args: object) -> None:
    return None


def echo(x: torch.Tensor) -> torch.Tensor:
    """The argument itself: the reply carries the tensor back (CUDA rows)."""
    return x


def one() -> torch.Tensor:
    return torch.ones(1)
