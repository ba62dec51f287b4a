"""The world's key: where it comes from, and how it reaches every worker without the store.

The key authenticates tcp connections (an HMAC handshake, ``backends/auth.py``): whoever knows
it can make a worker unpickle their bytes, which runs their code. The rendezvous store has no
authentication, so the key never goes through it:

* ``RpcBackendOptions(auth_key=...)`` or ``$SHMRPC_AUTH_KEY``, the same on every worker: the
  way for worlds that span hosts (torchrun users export it on every node);
* otherwise rank 0 draws one and writes it to a file only its user can read (mode 0600); the
  store carries the file's *path*, workers of the same user on the same host read it, and rank
  0 deletes it once every worker has joined. A worker that cannot read it (another host,
  another user) fails at ``init_rpc`` with an error that says how to set a key;
* ``$SHMRPC_AUTH_KEY_VIA_STORE=1`` (an explicit opt-out) sends the key through the store, as
  shmrpc did before: anyone who can reach the store can then run code in the workers.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile

__all__ = [
    "ENV_KEY",
    "ENV_VIA_STORE",
    "configured_key",
    "new_key",
    "read_key_file",
    "write_key_file",
]

ENV_KEY = "SHMRPC_AUTH_KEY"
ENV_VIA_STORE = "SHMRPC_AUTH_KEY_VIA_STORE"

HOW_TO_SET = (
    "For a world that spans hosts, give every worker the same secret: export "
    f'{ENV_KEY}=<secret> on every node (e.g. from `python -c "import secrets; '
    f'print(secrets.token_hex(32))"`) or pass RpcBackendOptions(auth_key=...). {ENV_VIA_STORE}=1 '
    "sends the key through the rendezvous store instead: anyone who can reach the store can "
    "then run code in your workers."
)


def configured_key(option: bytes | str | None) -> bytes | None:
    """The key the user set (options first, then the environment), if any."""
    if option is not None:
        return option.encode() if isinstance(option, str) else bytes(option)
    value = os.environ.get(ENV_KEY)
    return value.encode() if value else None


def via_store() -> bool:
    return os.environ.get(ENV_VIA_STORE, "") not in ("", "0")


def new_key() -> bytes:
    return secrets.token_bytes(32)


def write_key_file(key: bytes) -> str:
    """Write ``key`` to a new file that only this user can read; return its path."""
    fd, path = tempfile.mkstemp(prefix="shmrpc-key-")  # created with mode 0600
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key.hex().encode())
    finally:
        os.close(fd)
    return path


def read_key_file(path: str, rank: int) -> bytes:
    try:
        with open(path, encoding="ascii") as file:
            return bytes.fromhex(file.read())
    except (OSError, ValueError) as e:
        raise RuntimeError(
            f"worker {rank} cannot read the world's key file {path}, which rank 0 wrote for "
            f"workers of its user on its host ({e}). {HOW_TO_SET}"
        ) from e


def remove_key_file(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
