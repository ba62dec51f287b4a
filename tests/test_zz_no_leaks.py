"""Runs last: after every world has shut down, nothing of shmrpc is left in /dev/shm."""

from __future__ import annotations

import time

from shmrpc.backends.shm import sweep_dead_names
from tests.conftest import close_worlds
from tests.harness import shmrpc_names_in_dev_shm


def test_nothing_left_in_dev_shm():
    close_worlds()
    deadline = time.monotonic() + 5
    while shmrpc_names_in_dev_shm() and time.monotonic() < deadline:
        time.sleep(0.1)
    leftovers = shmrpc_names_in_dev_shm()
    assert leftovers == [], f"shmrpc left {leftovers} in /dev/shm"
    assert sweep_dead_names() == []
