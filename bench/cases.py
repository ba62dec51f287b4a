"""The parameters of the benchmark tests: one :class:`Case` per (row, pin mode, stack)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from bench.rows import PINS, STACKS, row


@dataclass(frozen=True)
class Case:
    title: str  # the row (bench/rows.py)
    pin: str  # "pinned" or "unpinned"
    stack: str  # "shm", "tcp" or "tensorpipe"


def cases(*titles: str) -> list[Any]:
    """One parameter per (row, pin mode, stack); ids ``<row key>-<pin>-<stack>``, without the
    row key where there is one row."""
    return [
        pytest.param(
            Case(title, pin, stack),
            id="-".join(([row(title).key] if len(titles) > 1 else []) + [pin, stack]),
        )
        for title in titles
        for pin in PINS
        for stack in STACKS
    ]
