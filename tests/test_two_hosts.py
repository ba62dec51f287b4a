"""Two hosts for real: a world of 4 workers in two network namespaces joined by a veth pair.

Namespace A holds worker0 and worker1 (10.77.0.1), namespace B worker2 and worker3
(10.77.0.2). Every worker uses ``auto`` with ``listen_addr`` set to its namespace's veth
address, ``SHMRPC_AUTH_KEY`` set (a multi-host world needs it) and the rendezvous on a
``TCPStore`` that rank 0 serves in namespace A (``tcp://10.77.0.1:<port>``). shm's host domain
includes the network namespace, so the two namespaces look like two hosts: ``auto`` must
carry the pairs inside a namespace over shm and the pairs across over tcp. Then every worker
runs ``rpc_sync``, ``remote`` + ``to_here``, an RRef passed to a third worker and a distributed
backward pass that crosses two hops, with every other worker.

Each namespace gets one ``ip netns exec <ns> <python> <this file> launch ...``, which starts
that namespace's two workers as its children: they share the mount namespace that
``ip netns exec`` made, as processes of one host do. (Two separate ``ip netns exec`` processes
get two mount namespaces, and shm's host domain, which includes the mount namespace, tells
them apart: ``auto`` then uses tcp between them. See docs/reliability.md.)

Needs root and a working ``ip netns`` (skipped otherwise, e.g. in a container without
CAP_SYS_ADMIN). Nothing listens outside the two namespaces, and both are deleted, with every
process in them killed, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve()
ADDRESSES = ("10.77.0.1", "10.77.0.2")  # namespace A, namespace B (a /24 on the veth pair)
STORE_PORT = 29517  # in a fresh namespace: free
RANKS = ((0, 1), (2, 3))  # the workers of namespace A, of namespace B
WORLD_SIZE = 4
TIMEOUT = 240.0  # whole world: start (4 torch imports on few cores), checks, shutdown
IP_TIMEOUT = 15.0

# --------------------------------------------------------------------------- the workers
# These run in the workers, as ``__main__`` of this file: every worker runs the same file, so
# functions pickled by reference (``__main__.name``) resolve on every side.


def whoami() -> dict[str, Any]:
    import shmrpc as rpc

    return {"name": rpc.get_worker_info().name, "netns": os.stat("/proc/self/ns/net").st_ino}


def make_tensor(creator: int, owner: int) -> Any:
    import torch

    return torch.arange(6.0) * (creator + 1) + 10 * owner


def fetch_sum(rref: Any) -> float:
    return float(rref.to_here().sum())


def mul(a: Any, b: Any) -> Any:
    return a * b


def mul_then(dst: str, a: Any, b: Any) -> Any:
    """Nested: a call on to ``dst``, so the backward pass crosses two hops."""
    import shmrpc as rpc

    return rpc.rpc_sync(dst, mul, (a * 2, b)) + a


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(what)


def _work(rank: int) -> dict[str, Any]:
    """Everything one worker checks against every other; returns what the test verifies."""
    import torch

    import shmrpc as rpc
    import shmrpc.autograd as dist_autograd

    names = [f"worker{r}" for r in range(WORLD_SIZE)]
    peers = [r for r in range(WORLD_SIZE) if r != rank]
    done: list[str] = []
    for peer in peers:
        to = names[peer]
        # rpc_sync, to a builtin and to a function of this file
        got = rpc.rpc_sync(to, torch.add, (torch.arange(4.0), rank))
        _check(torch.equal(got, torch.arange(4.0) + rank), f"rpc_sync to {to}: {got}")
        _check(rpc.rpc_sync(to, whoami)["name"] == to, f"whoami at {to}")
        done.append(f"rpc_sync {to}")
        # remote() + to_here()
        rref = rpc.remote(to, make_tensor, (rank, peer))
        expected = make_tensor(rank, peer)
        _check(rref.owner_name() == to, f"owner of the RRef on {to}: {rref.owner_name()}")
        _check(torch.equal(rref.to_here(), expected), f"to_here from {to}")
        done.append(f"remote+to_here {to}")
        # the RRef passed to each third worker, which fetches it from its owner
        for third in peers:
            if third == peer:
                continue
            got_sum = rpc.rpc_sync(names[third], fetch_sum, (rref,))
            _check(got_sum == float(expected.sum()), f"{names[third]} fetched {got_sum}")
            done.append(f"rref of {to} via {names[third]}")
        del rref
        # distributed autograd: here -> peer -> third -> peer -> here, and back
        for third in range(WORLD_SIZE):
            if third == peer:
                continue
            x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
            b = torch.full((3,), float(rank + 1))
            with dist_autograd.context() as context_id:
                y = rpc.rpc_sync(to, mul_then, (names[third], x, b))
                _check(torch.equal(y, x.detach() * 2 * b + x.detach()), f"forward via {to}")
                dist_autograd.backward(context_id, [y.sum()])
                grad = dist_autograd.get_gradients(context_id)[x]
            _check(torch.equal(grad, 2 * b + 1), f"gradient via {to} and {names[third]}: {grad}")
            done.append(f"backward via {to} and {names[third]}")
    return {"done": done}


def _worker(config: dict[str, Any]) -> None:
    """One worker: init, checks, graceful shutdown; its report goes to a file."""
    rank = config["rank"]
    report: dict[str, Any] = {"rank": rank, "status": "started"}
    out = Path(config["dir"]) / f"worker{rank}.json"
    try:
        import shmrpc as rpc
        from shmrpc.backends.shm import _host_domain

        options = rpc.RpcBackendOptions(
            init_method=config["init_method"],
            rpc_timeout=60,
            listen_addr=config["addr"],
            host_id=config.get("host_id"),  # unset in the test
        )
        rpc.init_rpc(
            f"worker{rank}",
            backend="auto",
            rank=rank,
            world_size=WORLD_SIZE,
            rpc_backend_options=options,
        )
        report["domain"] = _host_domain(None)
        report["netns"] = os.stat("/proc/self/ns/net").st_ino
        report["mntns"] = os.stat("/proc/self/ns/mnt").st_ino
        # internal accessor: which transport carries each peer (agent.route_names)
        report["routes"] = rpc._get_current_rpc_agent().route_names()
        report.update(_work(rank))
        rpc.shutdown()  # graceful: waits until every worker is done
        report["status"] = "ok"
    except BaseException:
        import traceback

        report["status"] = "error"
        report["traceback"] = traceback.format_exc()
    out.write_text(json.dumps(report))
    print(json.dumps(report), flush=True)


def _launch(config: dict[str, Any]) -> int:
    """In a namespace: start its workers as children (one mount namespace), wait for them."""
    procs = []
    for rank in config["ranks"]:
        log = open(Path(config["dir"]) / f"worker{rank}.log", "w")  # noqa: SIM115 - child's
        worker = dict(config, rank=rank)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE), "worker", json.dumps(worker)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        log.close()
    deadline = time.monotonic() + config["timeout"]
    codes = []
    try:
        for proc in procs:
            codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    return max(codes, default=1)


# ------------------------------------------------------------------------------ the test


def _selected_backends() -> list[str]:
    return [b for b in os.environ.get("SHMRPC_BACKEND", "shm,tcp,auto").split(",") if b]


pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="network namespaces: Linux"),
    pytest.mark.skipif(
        hasattr(os, "geteuid") and os.geteuid() != 0,
        reason="needs root to create network namespaces",
    ),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs the `ip` command (iproute2)"),
    pytest.mark.skipif(
        "auto" not in _selected_backends(), reason="tests the auto backend; not selected"
    ),
]


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
    )


class Namespaces:
    """Two network namespaces joined by a veth pair; processes started in them."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}{secrets.token_hex(3)}"
        self.names = (f"shmrpc-{tag}-a", f"shmrpc-{tag}-b")
        self.links = (f"vsa{tag}"[:15], f"vsb{tag}"[:15])
        self.created: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def create(self) -> str | None:
        """Set up; return why not (the test skips), or None."""
        for name in self.names:
            result = _ip("netns", "add", name)
            if result.returncode != 0:
                return f"cannot create a network namespace: {result.stderr.strip()}"
            self.created.append(name)
        (a, b), (la, lb) = self.names, self.links
        result = _ip("link", "add", la, "netns", a, "type", "veth", "peer", "name", lb, "netns", b)
        if result.returncode != 0:
            return f"cannot create a veth pair: {result.stderr.strip()}"
        for name, link, address in zip(self.names, self.links, ADDRESSES, strict=True):
            for args in (
                ("addr", "add", f"{address}/24", "dev", link),
                ("link", "set", link, "up"),
                ("link", "set", "lo", "up"),
            ):
                result = _ip("-n", name, *args)
                if result.returncode != 0:
                    raise RuntimeError(f"ip -n {name} {' '.join(args)}: {result.stderr.strip()}")
        # `ip netns exec` also makes a mount namespace and remounts /sys, which some
        # containers refuse even where `ip netns add` works
        result = _ip("netns", "exec", a, sys.executable, "-c", "pass")
        if result.returncode != 0:
            return f"cannot run a process in a network namespace: {result.stderr.strip()}"
        return None

    def start(
        self, namespace: str, argv: list[str], env: dict[str, str], log: Path
    ) -> subprocess.Popen[bytes]:
        """``ip netns exec namespace argv`` in a process group of its own (killed as one)."""
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", namespace, *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def kill(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)

    def delete(self) -> None:
        self.kill()
        for name in self.created:  # deleting a namespace deletes its end of the veth pair
            _ip("netns", "delete", name)
        self.created = []


@pytest.fixture
def namespaces():
    ns = Namespaces()
    try:
        why_not = ns.create()
    except BaseException:
        ns.delete()
        raise
    if why_not is not None:
        ns.delete()
        pytest.skip(why_not)
    yield ns
    ns.delete()


def _logs(folder: Path) -> str:
    return "\n".join(
        f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}"
        for path in sorted(folder.glob("*.log"))
    )


def test_two_namespaces_auto_world(namespaces, tmp_path):
    env = dict(os.environ)
    env["SHMRPC_AUTH_KEY"] = secrets.token_hex(32)
    env.pop("SHMRPC_AUTH_KEY_VIA_STORE", None)
    env.pop("SHMRPC_BACKEND", None)
    launchers = []
    for namespace, address, ranks in zip(namespaces.names, ADDRESSES, RANKS, strict=True):
        config = {
            "dir": str(tmp_path),
            "addr": address,
            "ranks": list(ranks),
            "init_method": f"tcp://{ADDRESSES[0]}:{STORE_PORT}",
            "timeout": TIMEOUT,
        }
        argv = [sys.executable, str(HERE), "launch", json.dumps(config)]
        log = tmp_path / f"launcher-{address}.log"
        launchers.append(namespaces.start(namespace, argv, env, log))
    deadline = time.monotonic() + TIMEOUT + 30
    for launcher in launchers:
        try:
            launcher.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            namespaces.kill()
            pytest.fail(f"the world did not finish in {TIMEOUT} s\n{_logs(tmp_path)}")

    reports = {}
    for rank in range(WORLD_SIZE):
        path = tmp_path / f"worker{rank}.json"
        assert path.exists(), f"worker{rank} reported nothing\n{_logs(tmp_path)}"
        reports[rank] = json.loads(path.read_text())
    failed = {r: rep.get("traceback") for r, rep in reports.items() if rep["status"] != "ok"}
    assert not failed, "\n".join(f"worker{r} failed:\n{tb}" for r, tb in failed.items())

    # shm's host domain: equal inside a namespace, different across
    for ranks in RANKS:
        netns = {reports[r]["netns"] for r in ranks}
        assert len(netns) == 1, f"workers {ranks} are not in one network namespace"
        assert len({reports[r]["domain"] for r in ranks}) == 1, [reports[r] for r in ranks]
    assert reports[0]["netns"] != reports[2]["netns"]
    assert reports[0]["domain"] != reports[2]["domain"]

    # auto: shm inside a namespace, tcp across
    for rank, report in reports.items():
        mine = next(ranks for ranks in RANKS if rank in ranks)
        expected = {
            f"worker{peer}": "shm" if peer in mine else "tcp"
            for peer in range(WORLD_SIZE)
            if peer != rank
        }
        routes = {name: t for name, t in report["routes"].items() if name != f"worker{rank}"}
        assert routes == expected, f"worker{rank}: {report['routes']}"

    # every worker did every check with every other
    per_peer = 1 + 1 + (WORLD_SIZE - 2) + (WORLD_SIZE - 1)
    for rank, report in reports.items():
        assert len(report["done"]) == (WORLD_SIZE - 1) * per_peer, (rank, report["done"])


if __name__ == "__main__":
    command, payload = sys.argv[1], json.loads(sys.argv[2])
    if command == "launch":
        sys.exit(_launch(payload))
    _worker(payload)
