"""``python -m shmrpc.demo``: a model-parallel training run, then shm vs tcp latency side by side.

Spawns two workers. First they train the model-parallel RNN of ``shmrpc.examples.rnn`` (torch's
RPC example with its imports pointed at shmrpc) on the default backend (``$SHMRPC_BACKEND`` or
``auto``): the embedding and decoder on a parameter server behind RRefs, the LSTM on the
trainer, with distributed autograd and ``DistributedOptimizer``; the trainer prints the loss of
each step (it falls) and the steps per second. Then worker 0 measures the median ``rpc_sync``
round trip of a no-op function for several tensor sizes, and of ``remote()`` + ``to_here()``, on
shm and on tcp, and prints one table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp

import shmrpc as rpc
from shmrpc.examples import rnn

SIZES = [0, 1 << 10, 1 << 20, 16 << 20]
TRAIN_STEPS = 30


def noop(*args: object) -> None:
    return None


def square(x: torch.Tensor) -> torch.Tensor:
    return x * x


def _options(store_dir: str, tag: str) -> rpc.RpcBackendOptions:
    return rpc.RpcBackendOptions(init_method=f"file://{store_dir}/{tag}", rpc_timeout=60)


def _median_round_trip(size: int, repeats: int) -> float:
    t = torch.ones(size // 4)
    for _ in range(min(repeats, 20)):
        rpc.rpc_sync("worker1", noop, (t,))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        rpc.rpc_sync("worker1", noop, (t,))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _median_remote_to_here(repeats: int) -> float:
    times = []
    for i in range(repeats + 20):
        start = time.perf_counter()
        rpc.remote("worker1", square, (torch.tensor(1.0),)).to_here()
        if i >= 20:  # the first ones warm up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(rank: int, store_dir: str, default_backend: str, quick: bool, results: dict) -> None:
    if rank == 1:
        print(f"model-parallel training on the default backend ({default_backend}):", flush=True)
    # the example passes no backend, as a torch program would: shmrpc reads $SHMRPC_BACKEND
    rnn.run_worker(rank, 2, f"file://{store_dir}/train", TRAIN_STEPS, verbose=True)
    for backend in ("shm", "tcp"):
        rpc.init_rpc(
            f"worker{rank}",
            backend=backend,
            rank=rank,
            world_size=2,
            rpc_backend_options=_options(store_dir, backend),
        )
        if rank == 0:
            for size in SIZES:
                repeats = (
                    (200 if size <= 1 << 10 else 30)
                    if quick
                    else (3000 if size <= 1 << 10 else 100)
                )
                results[(backend, size)] = _median_round_trip(size, repeats)
            results[(backend, "rref")] = _median_remote_to_here(200 if quick else 2000)
        rpc.shutdown()


def _fmt_size(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else (f"{size >> 10} KiB" if size else "0 B")


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1e6:8.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:8.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    default_backend = os.environ.get("SHMRPC_BACKEND", "auto")
    with tempfile.TemporaryDirectory() as store_dir, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(store_dir, default_backend, args.quick, results), nprocs=2)
        print("\nround trip, median")
        print(f"{'call':>26} | {'shm':>11} | {'tcp':>11}")
        print(f"{'-' * 26}-+-{'-' * 11}-+-{'-' * 11}")
        rows: list[tuple[str, object]] = [
            (f"rpc_sync, {_fmt_size(size)} tensor", size) for size in SIZES
        ]
        rows.append(("remote() + to_here()", "rref"))
        for label, key in rows:
            shm, tcp = results[("shm", key)], results[("tcp", key)]
            print(f"{label:>26} | {_fmt_time(shm)} | {_fmt_time(tcp)}")


if __name__ == "__main__":
    main()
