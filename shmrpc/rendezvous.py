"""Finding the other workers: the rendezvous store and what workers publish there.

The store is torch's own (``TCPStore`` for ``env://`` and ``tcp://``, ``FileStore`` for
``file://``) through ``torch.distributed.rendezvous``. Anyone who can reach the store can read
and write it, so everything exchanged here is JSON, never pickle.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

__all__ = ["Rendezvous"]


class Rendezvous:
    """A store shared by the workers of one world, with the few exchanges init needs."""

    def __init__(self, init_method: str, rank: int, world_size: int, timeout: float) -> None:
        self.timeout = timeout
        try:
            store, self.rank, self.world_size = next(
                dist.rendezvous(
                    init_method,
                    rank=rank,
                    world_size=world_size,
                    timeout=timedelta(seconds=timeout),
                )
            )
        except (ValueError, RuntimeError) as e:
            raise RuntimeError(f"rendezvous through {init_method!r} failed: {e}") from e
        store.set_timeout(timedelta(seconds=timeout))
        # Every join through this store gets fresh keys, so init → shutdown → init can reuse a
        # store: the n-th join of each rank meets the n-th join of the others. Counting in the
        # store (not in the process, as torch does) keeps fresh stores working for processes
        # that joined other worlds before.
        generation = store.add(f"shmrpc/joins/{self.rank}", 1)
        self._store = dist.PrefixStore(f"shmrpc/{generation}/", store)
        self._base_store = store  # the TCPStore server lives as long as this object on rank 0

    # -------------------------------------------------------------------------------- world
    def world_secrets(self, auth_key: bytes | None) -> tuple[str, bytes]:
        """A random token naming this world's shared objects, and the key for tcp handshakes.

        Rank 0 draws both; with ``auth_key`` given (the same on every worker) the key never
        goes through the store.
        """
        if self.rank == 0:
            record = {"token": secrets.token_hex(8)}
            if auth_key is None:
                record["auth_key"] = secrets.token_hex(32)
            self._store.set("world", json.dumps(record))
        record = json.loads(self._get("world", "rank 0"))
        key = auth_key if auth_key is not None else bytes.fromhex(record["auth_key"])
        return record["token"], key

    def exchange(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        """Publish this worker's record; return every worker's, indexed by rank."""
        self._store.set(f"worker/{self.rank}", json.dumps(record))
        keys = [f"worker/{r}" for r in range(self.world_size)]
        self._wait(keys, "to join")
        return [json.loads(self._store.get(key)) for key in keys]

    def barrier(self, name: str) -> None:
        self._store.set(f"{name}/{self.rank}", "1")
        self._wait([f"{name}/{r}" for r in range(self.world_size)], f"to reach {name!r}")

    # ------------------------------------------------------------------------------ helpers
    def _get(self, key: str, who: str) -> bytes:
        self._wait([key], who)
        return self._store.get(key)

    def _wait(self, keys: list[str], what: str) -> None:
        deadline = time.monotonic() + self.timeout
        try:
            self._store.wait(keys, timedelta(seconds=self.timeout))
        except Exception as e:
            missing = [k for k in keys if not self._store.check([k])]
            waited = self.timeout - max(0.0, deadline - time.monotonic())
            raise RuntimeError(
                f"rendezvous timed out after {waited:.1f} s waiting for {missing} {what} "
                f"(world_size={self.world_size}): {e}"
            ) from e
