"""What the benchmarks call remotely (importable by the server process)."""

from __future__ import annotations

import torch


def noop(*args: object) -> None:
    return None


def echo(x: torch.Tensor) -> torch.Tensor:
    return x


def one() -> torch.Tensor:
    return torch.ones(1)
