"""WorkerInfo: the name and rank that identify a worker, as in torch.distributed.rpc."""

from __future__ import annotations

import re

_NAME = re.compile(r"^[A-Za-z0-9\-_:]*$")
_MAX_NAME = 128


def check_worker_name(name: object) -> str:
    """Validate ``name`` with torch's rules and message."""
    if not isinstance(name, str) or not _NAME.match(name) or not name or len(name) >= _MAX_NAME:
        raise RuntimeError(
            "Worker name must match ^[A-Za-z0-9-_:]*$, and must be non-empty and shorter "
            f"than {_MAX_NAME} chars, but got {name}"
        )
    return name


class WorkerInfo:
    """A worker's ``name`` and ``id`` (its rank). Hashable, comparable, picklable."""

    __slots__ = ("_id", "_name")

    def __init__(self, name: str, id: int) -> None:
        self._name = check_worker_name(name)
        self._id = int(id)

    @property
    def name(self) -> str:
        return self._name

    @property
    def id(self) -> int:
        return self._id

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WorkerInfo):
            return NotImplemented
        return self._id == other._id and self._name == other._name

    def __hash__(self) -> int:
        return hash((self._name, self._id))

    def __repr__(self) -> str:
        return f"WorkerInfo(id={self._id}, name={self._name})"

    __str__ = __repr__

    def __getstate__(self) -> tuple[str, int]:
        return (self._name, self._id)

    def __setstate__(self, state: tuple[str, int]) -> None:
        self._name, self._id = state
