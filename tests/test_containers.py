"""shm in containers (issue 11).

Docker gives a container a 64 MiB /dev/shm unless told otherwise. shm's rings are memfd
objects that take none of it, so a small /dev/shm is no obstacle; only the doorbell
semaphores (a few KiB) need it. Without a usable /dev/shm (missing, read-only, full),
backend "shm" fails at init with an error that names the fix, and "auto" falls back to tcp
with exactly one warning (a ``RuntimeWarning``).

Each case runs in a child started with ``unshare --mount --propagation private``: it mounts a
tmpfs on /dev/shm in that private mount namespace only (it checks that it is in a namespace of
its own first), and starts the two workers, which see that /dev/shm; the rest of the machine
never does. Needs root and a working ``unshare`` (skipped otherwise).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
WORKERS = 2


def _echo(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


# -------------------------------------------------------------- in the workers' processes


def _worker() -> None:
    """One worker: init, a small and a large call both ways, a report on stdout (JSON)."""
    import shmrpc as rpc

    args = json.loads(sys.argv[1])
    rank = args["rank"]
    report: dict = {"rank": rank, "error": None, "warnings": [], "logged": []}

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            report["logged"].append(record.getMessage())

    logging.getLogger("shmrpc").addHandler(Recorder(logging.WARNING))
    options = rpc.RpcBackendOptions(
        init_method=args["init_method"], rpc_timeout=60, ring_size=args["ring_size"]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rpc.init_rpc(
                f"worker{rank}",
                backend=args["backend"],
                rank=rank,
                world_size=WORKERS,
                rpc_backend_options=options,
            )
        except Exception as e:
            report["error"] = f"{type(e).__name__}: {e}"
        report["warnings"] = [str(w.message) for w in caught if "shmrpc" in str(w.message)]
    if report["error"] is None:
        peer = f"worker{1 - rank}"
        report["route"] = rpc.api._get_current_rpc_agent().route_names()[peer]
        report["small"] = rpc.rpc_sync(peer, _echo, (torch.arange(4),)).tolist()
        large = torch.randint(0, 255, (args["message_size"],), dtype=torch.uint8)
        report["large_ok"] = bool(torch.equal(rpc.rpc_sync(peer, _echo, (large,)), large))
        stat = os.statvfs("/dev/shm")
        report["dev_shm_used"] = (stat.f_blocks - stat.f_bfree) * stat.f_frsize
        rpc.shutdown()
    print(json.dumps(report), flush=True)


def _in_namespace() -> None:
    """The child under ``unshare``: a tmpfs on /dev/shm here only, then a 2-worker world."""
    args = json.loads(sys.argv[1])
    if os.stat("/proc/self/ns/mnt").st_ino == args["parent_mnt_ns"]:
        print(json.dumps({"refused": "not in a mount namespace of its own"}), flush=True)
        sys.exit(3)  # never mount over the machine's /dev/shm
    options = "ro,size=1m" if args["dev_shm"] == "read-only" else f"size={args['size']}"
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"{options},mode=1777", "shmrpc-test", "/dev/shm"],
        check=True,
        timeout=30,
    )
    if args["dev_shm"] == "full":
        filler = os.open("/dev/shm/filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(filler, b"\0" * 4096):
                pass
        except OSError:  # ENOSPC: full
            pass
        finally:
            os.close(filler)
    procs = []
    for rank in range(WORKERS):
        worker_args = {**args, "rank": rank}
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from tests.test_containers import _worker; _worker()",
                    json.dumps(worker_args),
                ],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    reports = []
    deadline = time.monotonic() + args["timeout"]
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, err = proc.communicate()
        lines = out.strip().splitlines()
        try:
            reports.append(json.loads(lines[-1]))
        except (IndexError, ValueError):
            reports.append(
                {"crashed": proc.returncode, "stdout": out[-2000:], "stderr": err[-4000:]}
            )
    print(json.dumps({"workers": reports}), flush=True)


# --------------------------------------------------------------------------- the tests


def _can_unshare() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mounts a tmpfs in a private mount namespace)"
    if not shutil.which("unshare") or not shutil.which("mount"):
        return "needs unshare(1) and mount(8)"
    try:
        probe = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "true"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare failed: {e}"
    if probe.returncode != 0:
        return f"unshare failed: {probe.stderr.decode(errors='replace').strip()}"
    return None


_SKIP = _can_unshare()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))


def _world(tmp_path, backend, dev_shm, size="1m", ring_size=4 << 20, message_size=1 << 20):
    args = {
        "backend": backend,
        "dev_shm": dev_shm,
        "size": size,
        "ring_size": ring_size,
        "message_size": message_size,
        "init_method": f"file://{tmp_path}/store",
        "timeout": 180,
        "parent_mnt_ns": os.stat("/proc/self/ns/mnt").st_ino,
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHMRPC_")}
    done = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            "-c",
            "from tests.test_containers import _in_namespace; _in_namespace()",
            json.dumps(args),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    workers = json.loads(done.stdout.strip().splitlines()[-1])["workers"]
    assert [w.get("rank") for w in workers] == list(range(WORKERS)), workers
    return workers


@pytest.mark.parametrize(
    ("size", "ring_size", "message_size"),
    [("1m", 4 << 20, 8 << 20), ("64m", 8 << 20, 32 << 20)],
    ids=["1MiB-dev-shm", "64MiB-dev-shm"],
)
def test_shm_works_with_a_small_dev_shm(tmp_path, size, ring_size, message_size):
    """Rings larger than /dev/shm itself (4 MiB rings in 1 MiB), and messages larger than
    both: the rings are memfd objects, so /dev/shm stays (nearly) empty."""
    for worker in _world(tmp_path, "shm", "small", size, ring_size, message_size):
        assert worker["error"] is None, worker
        assert worker["route"] == "shm", worker
        assert worker["small"] == [0, 1, 2, 3] and worker["large_ok"], worker
        assert worker["dev_shm_used"] < ring_size, worker  # two rings would not fit
        assert worker["warnings"] == [] and worker["logged"] == [], worker


@pytest.mark.parametrize("dev_shm", ["read-only", "full"])
def test_shm_without_a_usable_dev_shm_names_the_fix(tmp_path, dev_shm):
    for worker in _world(tmp_path, "shm", dev_shm):
        error = worker["error"]
        assert error is not None, worker
        assert "/dev/shm" in error and "--shm-size" in error and "--ipc=host" in error, error
        assert "cannot reach worker" in error, error  # every rank fails alike, at route choice


@pytest.mark.parametrize("dev_shm", ["read-only", "full"])
def test_auto_without_a_usable_dev_shm_falls_back_to_tcp_with_one_warning(tmp_path, dev_shm):
    for worker in _world(tmp_path, "auto", dev_shm):
        assert worker["error"] is None, worker
        assert worker["route"] == "tcp", worker
        assert worker["small"] == [0, 1, 2, 3] and worker["large_ok"], worker
        assert len(worker["warnings"]) == 1, worker["warnings"]
        (warning,) = worker["warnings"]
        assert "'shm' is unavailable" in warning and "'tcp'" in warning, warning
        assert "--shm-size" in warning and "--ipc=host" in warning, warning
        assert worker["logged"] == [], worker  # and nothing through the logger besides
