"""torchrun (``python -m torch.distributed.run``) starts shmrpc worlds from unchanged scripts.

Each test writes a script to its tmp_path and launches it with torchrun on loopback. Every
worker records its pid next to the script: torchrun starts workers in sessions of their own,
so a test that times out kills torchrun's process group and then each worker's.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import shmrpc as rpc
from tests.harness import shmrpc_names_in_dev_shm

#: torchrun's own variables, and the launcher's (PET_*), that must not leak into a launch.
_LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SHMRPC_AUTH_KEY",
)

_PREAMBLE = """\
import os
import signal
import sys
import time

import torch

import shmrpc as rpc

_here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(_here, f"rank{os.environ['RANK']}.pid"), "w") as _f:
    _f.write(str(os.getpid()))
rank = int(os.environ["RANK"])
world_size = int(os.environ["WORLD_SIZE"])
peer = f"worker{(rank + 1) % world_size}"


def say(line):  # in one write: the workers share torchrun's stdout
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\\n").encode())


def whoami():
    info = rpc.get_worker_info()
    return f"{info.name}/{info.id}"


def die(code):
    time.sleep(0.5)  # lets the caller block in its call first
    os._exit(code)


def exchange():
    result = rpc.rpc_sync(peer, torch.add, (torch.ones(2), rank))
    assert torch.equal(result, torch.ones(2) + rank), result
    route = rpc.api._get_current_rpc_agent().route_names()[peer]
    say(
        f"MARKER rank={rank} local_rank={os.environ['LOCAL_RANK']} "
        f"group_rank={os.environ['GROUP_RANK']} me={whoami()} "
        f"peer={rpc.rpc_sync(peer, whoami)} route={route} "
        f"restart={os.environ['TORCHELASTIC_RESTART_COUNT']}"
    )
"""

#: (a): rank and world_size passed, read from the environment by the script.
EXPLICIT = """
rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size)
exchange()
rpc.shutdown()
"""

#: (b): plain init_rpc(name); shmrpc reads RANK and WORLD_SIZE (torch would fail here).
PLAIN = """
rpc.init_rpc(f"worker{os.environ['RANK']}")
assert rpc.get_worker_info().id == rank
exchange()
rpc.shutdown()
"""

#: Rank 1 exits with code 3 inside a call from rank 0; rank 0 sees its call fail, then stays
#: (as a worker that does not notice would): torchrun must end it.
CRASH_IN_CALL = """
rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size)
if rank == 1:
    time.sleep(600)  # the call from rank 0 ends this process
try:
    rpc.rpc_sync("worker1", die, (3,))
except RuntimeError as e:
    say(f"MARKER rank 0 call failed: {type(e).__name__}")
time.sleep(600)
"""

#: Rank 1 SIGKILLs itself while rank 0 waits for it in a graceful shutdown.
CRASH_IN_SHUTDOWN = """
rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size)
exchange()
if rank == 1:
    time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)
try:
    rpc.shutdown()
except RuntimeError as e:
    say(f"MARKER rank 0 shutdown failed: {type(e).__name__}")
time.sleep(600)
"""

#: First attempt: rank 1 dies after rank 0 joined the rendezvous; torchrun restarts both.
RESTART = """
if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    if rank == 1:
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(_here, "rank0.joining")):
            assert time.monotonic() < deadline, "rank 0 never started"
            time.sleep(0.05)
        time.sleep(2.0)  # rank 0 is in the rendezvous now
        os._exit(5)
    open(os.path.join(_here, "rank0.joining"), "w").close()
rpc.init_rpc(
    f"worker{rank}",
    rank=rank,
    world_size=world_size,
    rpc_backend_options=rpc.RpcBackendOptions(rpc_timeout=20),
)
exchange()
rpc.shutdown()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Launch:
    """The end of one torchrun: its exit status, merged output and workers' pids."""

    def __init__(self, returncode: int, output: str, pids: dict[int, int]) -> None:
        self.returncode = returncode
        self.output = output
        self.pids = pids

    def markers(self) -> list[str]:
        return sorted(line for line in self.output.splitlines() if line.startswith("MARKER"))


def _launch_env(backend: str, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCH_VARS and not k.startswith(("PET_", "TORCHELASTIC_"))
    }
    env.update(SHMRPC_BACKEND=backend, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


def _torchrun_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--master-addr", "127.0.0.1", *args]


def _worker_pids(directory: Path) -> dict[int, int]:
    return {
        int(path.stem.removeprefix("rank")): int(path.read_text() or 0)
        for path in directory.glob("rank*.pid")
    }


def _alive(pid: int, script: Path) -> bool:
    """Whether ``pid`` is still a worker running ``script`` (not a reused pid, not a zombie)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return str(script).encode() in cmdline and state != "Z"


def _kill_all(procs: list[subprocess.Popen[bytes]], directory: Path) -> None:
    """Kill the torchrun processes' groups and every worker's (each has a session)."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    script = directory / "script.py"
    for pid in _worker_pids(directory).values():
        if pid and _alive(pid, script):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def torchrun(
    directory: Path,
    body: str,
    backend: str,
    *,
    nodes: int = 1,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    timeout: float = 150,
) -> list[Launch]:
    """Write ``body`` as a script and run it under torchrun, one launcher per node.

    Two processes per node (one with several nodes). Every launcher must end within
    ``timeout`` seconds, else all of them and their workers are killed and the test fails.
    """
    script = directory / "script.py"
    script.write_text(_PREAMBLE + textwrap.dedent(body))
    port = str(free_port())
    common = ("--master-port", port, "--nproc-per-node", "2" if nodes == 1 else "1", *args)
    logs = [directory / f"torchrun{node}.log" for node in range(nodes)]
    procs = []
    for node, log in enumerate(logs):
        node_args = ("--nnodes", str(nodes), "--node-rank", str(node)) if nodes > 1 else ()
        with log.open("w") as out:  # a file, not a pipe: no launcher blocks on a full pipe
            procs.append(
                subprocess.Popen(
                    _torchrun_args(*common, *node_args, str(script)),
                    env=_launch_env(backend, **(env or {})),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own group, killed on a timeout
                    cwd=directory,
                )
            )
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_all(procs, directory)
                for other in procs:
                    other.wait(timeout=10)
                output = "\n".join(log.read_text() for log in logs)
                pytest.fail(f"torchrun did not end within {timeout} s; its output:\n{output}")
    finally:
        _kill_all(procs, directory)
    outputs = [log.read_text() for log in logs]
    pids = _worker_pids(directory)
    return [Launch(proc.returncode, out, pids) for proc, out in zip(procs, outputs, strict=True)]


def _creator(name: str) -> str | None:
    """The pid in a /dev/shm name (``[sem.]shmrpc.<token>.<pid>.<rank>.<what>``, shm.py)."""
    fields = name.removeprefix("sem.").split(".")
    return fields[2] if len(fields) == 5 else None


def _expected_route(backend: str) -> str:
    return "shm" if backend == "auto" else backend


def _assert_exchanged(launches: list[Launch], backend: str, restart: int = 0) -> None:
    for launch in launches:
        assert launch.returncode == 0, launch.output
    markers = sorted(m for launch in launches for m in launch.markers())
    route = _expected_route(backend)
    one_node = len(launches) == 1
    expected = [
        f"MARKER rank={r} local_rank={r if one_node else 0} group_rank={0 if one_node else r} "
        f"me=worker{r}/{r} peer=worker{1 - r}/{1 - r} route={route} restart={restart}"
        for r in range(2)
    ]
    assert markers == expected, "\n".join(launch.output for launch in launches)


# ------------------------------------------------------------------------------- worlds


def test_explicit_rank_and_world_size(backend, tmp_path):
    """init_rpc(name, rank=..., world_size=...) with the values torchrun sets: env:// works."""
    _assert_exchanged(torchrun(tmp_path, EXPLICIT, backend), backend)


def test_plain_init_rpc_reads_rank_and_world_size(backend, tmp_path):
    """init_rpc(name) alone takes RANK and WORLD_SIZE from the environment torchrun sets."""
    _assert_exchanged(torchrun(tmp_path, PLAIN, backend), backend)


def test_multi_node_form(backend, tmp_path):
    """Two launchers (--nnodes 2 --node-rank 0/1) with the same SHMRPC_AUTH_KEY, as on two
    hosts (here both on loopback)."""
    key = secrets.token_hex(32)
    launches = torchrun(tmp_path, PLAIN, backend, nodes=2, env={"SHMRPC_AUTH_KEY": key})
    _assert_exchanged(launches, backend)


def test_restart_rejoins(tmp_path):
    """--max-restarts: a worker that dies during the first rendezvous does not keep the
    restarted workers from meeting (the agent's store outlives the first attempt)."""
    launches = torchrun(tmp_path, RESTART, "auto", args=("--max-restarts", "1"))
    _assert_exchanged(launches, "auto", restart=1)


# ------------------------------------------------------------------------------ crashes


@pytest.mark.parametrize(
    ("body", "exitcode", "marker"),
    [
        (CRASH_IN_CALL, 3, "MARKER rank 0 call failed: PeerLostError"),
        (CRASH_IN_SHUTDOWN, -9, "MARKER rank 0 shutdown failed: "),
    ],
    ids=["exit-in-call", "sigkill-in-shutdown"],
)
def test_crashed_worker_ends_the_run(backend, tmp_path, body, exitcode, marker):
    """One worker dies after init: the other's call or shutdown fails at once, torchrun ends
    the other worker and exits non-zero naming the failed rank, and /dev/shm is left clean."""
    before = set(shmrpc_names_in_dev_shm())
    start = time.monotonic()
    # torchrun looks at its workers every 0.1 s by default and ends the run as soon as it
    # sees one dead: rank 0 would race it to print its marker. Every 2 s gives rank 0 the time.
    (launch,) = torchrun(tmp_path, body, backend, args=("--monitor-interval", "2"))
    elapsed = time.monotonic() - start
    assert launch.returncode != 0, launch.output
    assert elapsed < 120, f"torchrun took {elapsed:.0f} s to end the run"  # rank 0 sleeps 600 s
    assert marker in launch.output, launch.output
    # torchrun's failure report names the failed worker and its exit code.
    assert "ChildFailedError" in launch.output, launch.output
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", launch.output), launch.output
    assert re.search(rf"exitcode\s*:\s*{exitcode} \(pid: {launch.pids[1]}\)", launch.output), (
        launch.output
    )
    script = tmp_path / "script.py"
    deadline = time.monotonic() + 10
    while _alive(launch.pids[0], script) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(launch.pids[0], script), "torchrun left rank 0 running"
    ours = {str(pid) for pid in launch.pids.values()}
    new_names = set(shmrpc_names_in_dev_shm()) - before  # other tests may be running
    leaked = [name for name in new_names if _creator(name) in (*ours, None)]
    assert leaked == [], leaked


# ------------------------------------------------------------------- values from the env


@pytest.fixture
def clean_env(monkeypatch):
    for var in _LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("variables", "match"),
    [
        ({"RANK": "one", "WORLD_SIZE": "2"}, "environment variable RANK must be an integer"),
        ({"RANK": "0", "WORLD_SIZE": "2.0"}, "environment variable WORLD_SIZE must be an int"),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, "environment variable RANK must be >= 0, got -1"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "environment variable WORLD_SIZE must be >= 1"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "environment variable RANK must be below the world"),
    ],
)
def test_bad_environment_values(clean_env, variables, match):
    for var, value in variables.items():
        clean_env.setenv(var, value)
    with pytest.raises(ValueError, match=match):
        rpc.init_rpc("worker0")


def test_world_size_passed_rank_from_env_out_of_range(clean_env):
    clean_env.setenv("RANK", "3")
    with pytest.raises(ValueError, match=r"RANK must be below the world size 2, got 3"):
        rpc.init_rpc("worker0", world_size=2)


def test_no_world_size_anywhere_keeps_the_error(clean_env):
    clean_env.setenv("RANK", "0")
    with pytest.raises(NotImplementedError, match="shmrpc needs a static world"):
        rpc.init_rpc("worker0")


def test_values_passed_or_in_the_url_win(clean_env):
    clean_env.setenv("RANK", "1")
    clean_env.setenv("WORLD_SIZE", "4")
    resolve = rpc.api._rank_and_world_size_from_env
    assert resolve(-1, None, "env://") == (1, 4)
    assert resolve(0, 2, "env://") == (0, 2)
    assert resolve(-1, None, "file:///tmp/x?rank=0&world_size=2") == (-1, None)
    clean_env.setenv("RANK", "")
    assert resolve(-1, None, "env://") == (-1, 4)


def test_listen_and_advertise_addresses_come_from_the_environment(monkeypatch):
    """A multi-node torchrun script needs no listen_addr in its code: the env says it."""
    from shmrpc.options import RpcBackendOptions

    monkeypatch.delenv("SHMRPC_LISTEN_ADDR", raising=False)
    monkeypatch.delenv("SHMRPC_ADVERTISE_ADDR", raising=False)
    plain = RpcBackendOptions()
    assert (plain.listen_addr, plain.advertise_addr) == ("127.0.0.1", None)
    monkeypatch.setenv("SHMRPC_LISTEN_ADDR", "0.0.0.0")
    monkeypatch.setenv("SHMRPC_ADVERTISE_ADDR", "10.1.2.3")
    from_env = RpcBackendOptions()
    assert (from_env.listen_addr, from_env.advertise_addr) == ("0.0.0.0", "10.1.2.3")
    given = RpcBackendOptions(listen_addr="127.0.0.2", advertise_addr="127.0.0.2")
    assert (given.listen_addr, given.advertise_addr) == ("127.0.0.2", "127.0.0.2")
