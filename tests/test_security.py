"""Who can talk to a worker: the world's key never passes through the unauthenticated store.

A stranger here is a process of another user (a forked child that drops to ``nobody``): it can
read the store, but not the key file rank 0 writes for its own user's workers.
"""

from __future__ import annotations

import json
import os
import pathlib
import pwd
import select
import shutil
import stat
import tempfile

import pytest
import torch

import shmrpc as rpc
from shmrpc import world_key
from shmrpc.rendezvous import Rendezvous
from tests.harness import add, run_world, worker_options

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


@pytest.fixture(autouse=True)
def _no_configured_key(monkeypatch):
    monkeypatch.delenv(world_key.ENV_KEY, raising=False)
    monkeypatch.delenv(world_key.ENV_VIA_STORE, raising=False)


@pytest.fixture
def open_dir():
    """A folder anyone on this host can use (pytest's own tmp_path is root's alone)."""
    path = tempfile.mkdtemp(prefix="shmrpc-test-open-")
    os.chmod(path, 0o777)
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


def _open_store(folder):
    """A store anyone on this host can read and write, as a TCPStore on loopback would be."""
    path = folder / "store"
    return path, f"file://{path}"


def _as_stranger(action):
    """Run ``action()`` in a forked child that has become ``nobody``; return what it returns."""
    nobody = pwd.getpwnam("nobody")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            result = action()
        except BaseException as e:
            result = {"crashed": repr(e)}
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    chunks = []
    try:
        while select.select([read], [], [], 60)[0]:
            chunk = os.read(read, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    return json.loads(b"".join(chunks))


def _try_to_read(path):
    def action():
        try:
            with open(path) as file:
                return {"read": file.read()}
        except OSError as e:
            return {"refused": type(e).__name__}

    return action


@needs_root
def test_the_key_never_enters_the_store_and_a_stranger_cannot_read_it(open_dir):
    path, init_method = _open_store(open_dir)
    first = Rendezvous(init_method, 0, 2, 30)
    os.chmod(path, 0o666)
    token, key = first.world_secrets(None)
    try:
        _check_the_key_stays_private(path, first, init_method, token, key)
    finally:
        first.forget_key_file()
    assert not os.path.exists(json.loads(first._store.get("world"))["key_file"])


def _check_the_key_stays_private(path, first, init_method, token, key):
    stored = path.read_bytes()
    assert key.hex().encode() not in stored and b"auth_key" not in stored
    record = json.loads(first._store.get("world"))
    key_file = record["key_file"]
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    # the stranger reads the store (it can) and finds only the path, which it cannot open
    assert _as_stranger(_try_to_read(path))["read"], "the store should be readable by anyone"
    assert _as_stranger(_try_to_read(key_file)) == {"refused": "PermissionError"}
    # a worker of the same user reads the key; once all have joined, the file is gone
    second = Rendezvous(init_method, 1, 2, 30)
    assert second.world_secrets(None) == (token, key)


@needs_root
def test_a_worker_of_another_user_is_told_how_to_set_a_key(open_dir):
    path, init_method = _open_store(open_dir)
    first = Rendezvous(init_method, 0, 2, 30)
    os.chmod(path, 0o666)
    first.world_secrets(None)

    def join_as_stranger():
        try:
            Rendezvous(init_method, 1, 2, 30).world_secrets(None)
        except RuntimeError as e:
            return {"error": str(e)}
        return {"joined": True}

    try:
        outcome = _as_stranger(join_as_stranger)
    finally:
        first.forget_key_file()
    assert "cannot read the world's key file" in outcome.get("error", ""), outcome
    assert "SHMRPC_AUTH_KEY" in outcome["error"]


def _world_with_key_from_env(rank, init_method, backend):
    os.environ[world_key.ENV_KEY] = "a secret the workers share"
    options = worker_options(backend, rank, 2, init_method)
    rpc.init_rpc(
        f"worker{rank}", backend=backend, rank=rank, world_size=2, rpc_backend_options=options
    )
    result = rpc.rpc_sync(f"worker{1 - rank}", add, (torch.ones(2), rank))
    rpc.shutdown()
    return result.tolist()


def test_a_key_from_the_environment_never_touches_store_or_disk(backend, tmp_path):
    path = tmp_path / "store"
    results = run_world(_world_with_key_from_env, 2, (f"file://{path}", backend))
    assert results == [[1.0, 1.0], [2.0, 2.0]]
    stored = path.read_bytes() if path.exists() else b""
    assert b"a secret" not in stored and b"key_file" not in stored and b"auth_key" not in stored


def test_the_store_carries_the_key_only_when_asked_to(open_dir, monkeypatch):
    monkeypatch.setenv(world_key.ENV_VIA_STORE, "1")
    _, init_method = _open_store(open_dir)
    rendezvous = Rendezvous(init_method, 0, 1, 30)
    token, key = rendezvous.world_secrets(None)
    assert json.loads(rendezvous._store.get("world")) == {"token": token, "auth_key": key.hex()}
