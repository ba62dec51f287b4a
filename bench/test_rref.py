"""``remote()`` then ``to_here()`` of a one-element tensor: creating a remote value and
fetching it, per stack and pin mode."""

from __future__ import annotations

import pytest

from bench.cases import cases


@pytest.mark.parametrize("case", cases("remote + to_here"))
def test_remote_to_here(measured, case):
    assert measured.samples
