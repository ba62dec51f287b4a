"""Names in /dev/shm (issue 10 item 6): shm's rings have none (memfd objects passed over the
pair's socket), its doorbell's name lives only while the world connects, and a worker killed
at any point of init_rpc, or later, leaves no name behind once its peers have noticed. The
sweep of names left by dead workers judges only names from its own PID namespace.

Other tests may run at the same time and create names of their own, so each test compares
the names of its own processes (their PIDs are in the names) before and after.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time

import posix_ipc
import pytest
import torch

import shmrpc as rpc
from shmrpc.backends import shm as shm_module
from shmrpc.backends.shm import ShmTransport, sweep_dead_names
from shmrpc.rendezvous import Rendezvous
from tests.harness import add, kill_self, new_init_method, run_world, worker_options

_SHM = "/dev/shm"


def _names() -> set[str]:
    try:
        entries = os.listdir(_SHM)
    except FileNotFoundError:
        return set()
    return {e for e in entries if e.startswith(("shmrpc.", "sem.shmrpc."))}


def _pid_of(name: str) -> str | None:
    fields = name.removeprefix("sem.").split(".")
    return fields[2] if len(fields) == 5 else None


def _ours(names: set[str], pids: set[str]) -> set[str]:
    return {n for n in names if _pid_of(n) in pids or _pid_of(n) is None}


def _pids(directory) -> set[str]:
    return {p.read_text() for p in directory.glob("pid*")}


def _settled(before: set[str], pids: set[str], seconds: float = 10.0) -> set[str]:
    """Our new names, once they are gone or ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while (left := _ours(_names() - before, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# ----------------------------------------------------------------- killed at each phase

#: phase -> (rank killed, whether its doorbell name exists when it dies)
PHASES = {
    "before-rendezvous": (1, False),
    "in-rendezvous": (1, False),  # published its record, waits for the other
    "dialing-before-hello": (0, True),  # its doorbell exists, the peer does not know it yet
    "dialing-after-hello": (0, True),  # the peer opened its doorbell and answers
    "answering-after-welcome": (1, True),  # the dialer gets its welcome, then EOF
    "connected-before-unlink": (0, True),  # every channel up, the name not yet dropped
    "mid-traffic": (1, False),  # after init, while large and small calls are in flight
}


def _bell_exists(name: str) -> bool:
    return os.path.exists(f"{_SHM}/sem.{name.lstrip('/')}")


def _arm(phase: str, marks) -> None:
    """In the victim's process: SIGKILL it at ``phase`` of init_rpc, noting in ``marks``
    whether its doorbell's name existed at that moment."""

    def die(bell: str) -> None:
        (marks / "had-name").write_text(str(_bell_exists(bell)))
        kill_self()

    if phase == "in-rendezvous":
        wait = Rendezvous._wait

        def _wait(self, keys, what):
            if what == "to join":
                kill_self()
            return wait(self, keys, what)

        Rendezvous._wait = _wait
    elif phase in ("dialing-before-hello", "dialing-after-hello", "answering-after-welcome"):
        send = shm_module._send_json

        def _send_json(sock, obj, fds=()):
            if "token" in obj and phase == "dialing-before-hello":
                die(obj["bell"])
            send(sock, obj, fds)
            if "token" in obj:
                die(obj["bell"])

        shm_module._send_json = _send_json
    elif phase == "connected-before-unlink":
        unlink = ShmTransport._unlink_bell

        def _unlink_bell(self):
            if not self._closed:
                die(self._bell_name)
            unlink(self)

        ShmTransport._unlink_bell = _unlink_bell


def _killed_at(rank, backend, init_method, phase, marks):
    (marks / f"pid{rank}").write_text(str(os.getpid()))
    victim, _ = PHASES[phase]
    if rank == victim:
        if phase == "before-rendezvous":
            kill_self()
        _arm(phase, marks)
    opts = worker_options(
        backend, rank, 2, init_method, rpc_timeout=3 if phase != "mid-traffic" else 30
    )
    try:
        rpc.init_rpc(
            f"worker{rank}", backend=backend, rank=rank, world_size=2, rpc_backend_options=opts
        )
    except RuntimeError:
        return "init failed"
    if phase != "mid-traffic":
        rpc.shutdown(graceful=False)
        return "init succeeded"
    if rank == victim:
        time.sleep(60)  # killed by its own call below before this ends
        return "not killed"
    futures = [rpc.rpc_async("worker1", add, (torch.ones(1 << 20), i)) for i in range(20)]
    futures.append(rpc.rpc_async("worker1", kill_self))
    futures += [rpc.rpc_async("worker1", add, (torch.ones(4), i)) for i in range(20)]
    failed = 0
    for future in futures:
        try:
            future.wait()
        except RuntimeError:
            failed += 1
    # Not graceful: the engine's graceful shutdown waits for a peer lost before it began.
    rpc.shutdown(graceful=False)
    return f"{failed} calls failed"


@pytest.mark.parametrize(
    ("phase", "backend"),
    [(phase, "shm") for phase in PHASES]
    # auto takes the same shm path: two phases suffice
    + [("dialing-before-hello", "auto"), ("connected-before-unlink", "auto")],
)
def test_a_worker_killed_at_any_phase_leaves_no_name(phase, backend, tmp_path):
    victim, named = PHASES[phase]
    before = _names()
    results = run_world(
        _killed_at,
        2,
        (backend, new_init_method(), phase, tmp_path),
        expect_exit=[victim],
        timeout=90,
    )
    survivor = results[1 - victim]
    if phase == "mid-traffic":
        assert survivor.endswith("calls failed") and survivor != "0 calls failed", survivor
    else:
        assert survivor == "init failed", survivor
    pids = _pids(tmp_path)
    assert len(pids) == 2
    if named:  # the victim did die holding a name: someone else had to remove it
        assert (tmp_path / "had-name").read_text() == "True"
    left = _settled(before, pids)
    assert left == set(), f"{phase}: left in /dev/shm: {sorted(left)}"


# ------------------------------------------------------------------ a running world


def _look_at_own_names(rank, init_method):
    opts = worker_options("shm", rank, 3, init_method, ring_size=64 << 10)
    rpc.init_rpc(f"worker{rank}", backend="shm", rank=rank, world_size=3, rpc_backend_options=opts)
    peer = f"worker{(rank + 1) % 3}"
    for size in (4, 1 << 20):  # small, and larger than the ring
        assert torch.equal(rpc.rpc_sync(peer, add, (torch.ones(size), 1)), torch.full((size,), 2.0))
    pid = str(os.getpid())
    names = sorted(n for n in _names() if _pid_of(n) == pid)
    with open("/proc/self/maps") as f:
        maps = [line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6]
    rings = sorted({m.split(".")[-1].split(" ")[0] for m in maps if m.startswith("/memfd:shmrpc.")})
    in_dev_shm = sorted(m for m in maps if m.startswith(f"{_SHM}/") and "shmrpc" in m)
    rpc.shutdown()
    return names, rings, in_dev_shm


def test_a_running_world_has_no_names_and_its_rings_none_at_all():
    results = run_world(_look_at_own_names, 3, (new_init_method(),), timeout=90)
    for rank, (names, rings, in_dev_shm) in enumerate(results):
        assert names == [], f"rank {rank} keeps {names} in /dev/shm"
        # Both rings with each peer are mapped, as memfd objects: nameless.
        expected = sorted(
            f"{a}to{b}" for p in range(3) if p != rank for a, b in ((p, rank), (rank, p))
        )
        assert rings == expected, (rank, rings)
        # What it maps from /dev/shm are the doorbells (its own and its peers'), all unlinked.
        assert in_dev_shm and all(m.startswith(f"{_SHM}/sem.shmrpc.") for m in in_dev_shm)
        assert all(m.endswith("(deleted)") for m in in_dev_shm), in_dev_shm


def test_a_transport_has_no_name_until_a_peer_connects():
    """Listening creates no name (the rendezvous may take long): the doorbell is made by the
    first handshake and unlinked once every peer has connected."""
    from tests.test_backends import _connect, _pair

    pid = str(os.getpid())
    before = {n for n in _names() if _pid_of(n) == pid}
    transports, _, addresses = _pair(ShmTransport)
    try:
        assert {n for n in _names() if _pid_of(n) == pid} == before
        assert all(t._bell is None for t in transports)
        assert not _connect(transports, addresses)
        assert all(t._bell is not None and not t._bell_named for t in transports)
        assert {n for n in _names() if _pid_of(n) == pid} == before
    finally:
        for t in transports:
            t.close()


# ------------------------------------------------------------------------ the sweep


def _zombie() -> subprocess.Popen:
    """A child that has exited and is not reaped yet."""
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{child.pid}/stat", "rb") as f:
            if f.read().rpartition(b")")[2].split()[0] == b"Z":
                return child
        time.sleep(0.01)
    raise AssertionError("the child did not exit")


def test_the_sweep_judges_only_names_of_its_own_pid_namespace():
    namespace = os.stat("/proc/self/ns/pid").st_ino
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its PID names no process now
    zombie = _zombie()
    token = f"sweeptest{os.getpid()}x{time.monotonic_ns()}"
    names = {
        # another PID namespace (a container sharing /dev/shm): its PIDs mean nothing here
        "other namespace": f"/shmrpc.{token}.{gone.pid}.0.bell-{namespace + 1}",
        "no namespace": f"/shmrpc.{token}.{gone.pid}.1.bell",  # not judged either
        "dead": f"/shmrpc.{token}.{gone.pid}.2.bell-{namespace}",
        "zombie": f"/shmrpc.{token}.{zombie.pid}.3.bell-{namespace}",
        "alive": f"/shmrpc.{token}.{os.getpid()}.4.bell-{namespace}",
    }
    try:
        for name in names.values():
            posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o600).close()
        removed = {n for n in sweep_dead_names() if token in n}
        assert removed == {names["dead"], names["zombie"]}
        left = {"/" + n.removeprefix("sem.") for n in _names() if token in n}
        assert left == {names["other namespace"], names["no namespace"], names["alive"]}
    finally:
        zombie.wait()
        for name in names.values():
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_semaphore(name)
