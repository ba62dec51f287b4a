"""Fixtures: one long-lived world per backend, and the backends under test.

``SHMRPC_BACKEND`` (as tox sets it) limits the run to one backend; unset, every test runs
on shm, tcp and auto.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.harness import BACKENDS, World

SELECTED = tuple(b for b in os.environ.get("SHMRPC_BACKEND", ",".join(BACKENDS)).split(",") if b)


def pytest_report_header() -> str:
    return f"shmrpc backends under test: {', '.join(SELECTED)}"


class Worlds:
    """Keeps at most one world alive; starts another when a test killed the last one."""

    def __init__(self) -> None:
        self._world: World | None = None

    def get(self, backend: str) -> World:
        if self._world is not None and (self._world.backend != backend or not self._world.alive):
            self.close()
        if self._world is None:
            self._world = World(backend)
        return self._world

    def close(self) -> None:
        world, self._world = self._world, None
        if world is not None:
            world.close()


_worlds = Worlds()


def close_worlds() -> None:
    _worlds.close()


@pytest.fixture(scope="session", params=SELECTED)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def world(backend: str) -> Iterator[World]:
    """A running 3-worker world (worker0..worker2) on ``backend``; tests run on worker0."""
    yield _worlds.get(backend)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    try:
        _worlds.close()
    except Exception as error:  # the world is killed; report it without hiding test results
        print(f"\nshmrpc tests: closing the last world failed: {error}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
