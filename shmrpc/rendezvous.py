"""Finding the other workers: the rendezvous store and what workers publish there.

The store is torch's own (``TCPStore`` for ``env://`` and ``tcp://``, ``FileStore`` for
``file://``) through ``torch.distributed.rendezvous``. Anyone who can reach the store can read
and write it, so everything exchanged here is JSON, never pickle.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from . import world_key

__all__ = ["Rendezvous"]


def _torchrun_attempt(world_size: int) -> str:
    """A key prefix naming this attempt of a torchrun world, where torchrun names one.

    torchrun's store (``TORCHELASTIC_USE_AGENT_STORE``) outlives the workers it restarts
    (``--max-restarts``), keys of the failed attempt included; a worker that died before it
    joined has left the ranks' join counts unequal, and the restarted workers would never meet.
    ``TORCHELASTIC_RESTART_COUNT`` is counted by each node's agent, so it names an attempt of
    the whole world only when one agent runs every worker: one node. Across nodes the counts
    can differ (an agent whose workers did not fail restarts them without counting), and the
    join counts alone must do.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "")
    if restart and os.environ.get("LOCAL_WORLD_SIZE") == str(world_size):
        return f"torchelastic-restart-{restart}/"
    return ""


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
        attempt = _torchrun_attempt(self.world_size)
        generation = store.add(f"shmrpc/{attempt}joins/{self.rank}", 1)
        self._store = dist.PrefixStore(f"shmrpc/{attempt}{generation}/", store)
        self._base_store = store  # the TCPStore server lives as long as this object on rank 0
        self._key_file: str | None = None

    # -------------------------------------------------------------------------------- world
    def world_secrets(self, auth_key: bytes | str | None) -> tuple[str, bytes]:
        """A random token naming this world's shared objects, and the key for tcp handshakes.

        Rank 0 draws the token. The key is the one configured (options or $SHMRPC_AUTH_KEY),
        else rank 0's, passed in a file only its user can read (see ``world_key``).
        """
        configured = world_key.configured_key(auth_key)
        if self.rank == 0:
            record = {"token": secrets.token_hex(8)}
            if configured is None:
                key = world_key.new_key()
                if world_key.via_store():
                    record["auth_key"] = key.hex()  # the user's explicit choice
                else:
                    self._key_file = world_key.write_key_file(key)
                    record["key_file"] = self._key_file
            self._store.set("world", json.dumps(record))
        record = json.loads(self._get("world", "rank 0"))
        if configured is not None:
            return record["token"], configured
        if "auth_key" in record:
            return record["token"], bytes.fromhex(record["auth_key"])
        if "key_file" in record:
            return record["token"], world_key.read_key_file(record["key_file"], self.rank)
        raise RuntimeError(
            f"worker {self.rank} has a key for this world but rank 0 has none. "
            f"{world_key.HOW_TO_SET}"
        )

    def forget_key_file(self) -> None:
        """Every worker has joined (and read the key): delete rank 0's key file."""
        if self._key_file is not None:
            world_key.remove_key_file(self._key_file)
            self._key_file = None

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
