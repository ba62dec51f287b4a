"""The orchestrator: worlds of every stack alive at once, measured in alternating frozen blocks.

The pytest process drives every worker (bench/worker.py) over a Pipe and is no RPC worker
itself. For each generation there is one 2-worker world per stack (and, for the all-to-all
row, a 4-worker world per stack); all of them are alive at once, and every world but the one
being measured is frozen with SIGSTOP, so that a world that polls while idle (TensorPipe's
reactors do; shmrpc's waiting threads spin for up to ``spin_us``) cannot steal a core from the
measured one.

A row is measured in blocks, per pin mode: A B C C B A over the stacks (rotated by one stack
per generation), in each generation; a stack's samples are pooled over its blocks and
generations. Before each block the measured world is continued (SIGCONT), the others stopped,
and every thread of every process of the world is given its CPU affinity: pinned, worker
``rank`` on core ``rank % ncores`` (on 2 cores, each worker of a pair alone on its own);
unpinned, all cores. Affinity is set again after the
block's warm-up calls, because TensorPipe starts threads lazily.

CUDA rows run in worlds of their own (both workers on ``cuda:0``, worker0 with a device map to
worker1), started only when a CUDA row is measured, kept for the CUDA rows that follow (after
each block every worker hands its cached GPU memory back) and shut down as soon as a CPU row is
measured: the CPU rows' worlds are made and measured as without them.

Every wait has a timeout, and whatever happens every world is continued before it is shut
down or killed.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from bench import worker
from bench.rows import GENERATIONS, REPEATS, STACKS, Row

START_TIMEOUT = 180.0
BLOCK_TIMEOUT = 300.0
SHUTDOWN_TIMEOUT = 60.0
CPU_TIMEOUT = 30.0

CORES = sorted(os.sched_getaffinity(0))


class BenchError(RuntimeError):
    pass


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return "X"


def _threads(pid: int) -> list[int]:
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def set_affinity(pid: int, cores: set[int]) -> None:
    """Every thread of ``pid``: new threads inherit it from the thread that starts them."""
    for _ in range(2):  # a thread started while the first pass ran
        for tid in _threads(pid):
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                os.sched_setaffinity(tid, cores)


class World:
    """``size`` worker processes of one stack, and the pipes that drive them; ``cuda``: made
    with the device maps of the CUDA rows."""

    def __init__(self, stack: str, size: int, generation: int, cuda: bool = False) -> None:
        self.stack, self.size, self.generation, self.cuda = stack, size, generation, cuda
        self.store_dir = tempfile.mkdtemp(prefix=f"shmrpc-bench-{stack}-")
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        self.pids: list[int] = []
        self.running = True

    def __repr__(self) -> str:
        kind = "CUDA world" if self.cuda else "world"
        return f"<{self.stack} {kind} of {self.size}, generation {self.generation}>"

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        init_method = f"file://{self.store_dir}/store"
        for rank in range(self.size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=worker.main,
                args=(theirs, self.stack, rank, self.size, init_method, self.cuda),
                name=f"bench-{self.stack}{self.size}{'-cuda' if self.cuda else ''}"
                f"-g{self.generation}-r{rank}",
                daemon=True,
            )
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.conns.append(ours)
        self.pids = [proc.pid for proc in self.procs]
        self.gather(range(self.size), START_TIMEOUT, "start")

    # ------------------------------------------------------------------ commands
    def send(self, ranks: Any, *command: Any) -> None:
        for rank in ranks:
            self.conns[rank].send(command)

    def gather(self, ranks: Any, timeout: float, what: str) -> dict[int, Any]:
        deadline = time.monotonic() + timeout
        replies: dict[int, Any] = {}
        for rank in ranks:
            conn = self.conns[rank]
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise BenchError(f"{self} rank {rank}: no answer to {what} in {timeout:.0f} s")
            try:
                status, value = conn.recv()
            except EOFError:
                raise BenchError(f"{self} rank {rank} died during {what}") from None
            if status == "error":
                raise BenchError(f"{self} rank {rank} failed in {what}:\n{value}")
            replies[rank] = value
        return replies

    def command(self, ranks: Any, timeout: float, *command: Any) -> dict[int, Any]:
        ranks = list(ranks)
        self.send(ranks, *command)
        return self.gather(ranks, timeout, command[0])

    # ------------------------------------------------------------------ signals
    def signal(self, sig: int) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def freeze(self) -> None:
        self.signal(signal.SIGSTOP)
        self.running = False

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)
        self.running = True

    def wait_states(self, stopped: bool, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for pid in self.pids:
            while (_state(pid) == "T") != stopped and _state(pid) not in ("X", "Z"):
                if time.monotonic() > deadline:
                    raise BenchError(f"{self}: pid {pid} did not {'stop' if stopped else 'run'}")
                time.sleep(0.001)

    def pin(self, pin: str) -> None:
        for rank, pid in enumerate(self.pids):
            cores = {CORES[rank % len(CORES)]} if pin == "pinned" else set(CORES)
            set_affinity(pid, cores)

    # ------------------------------------------------------------------ end
    def close(self) -> None:
        """Continue, shut down gracefully (every rank at once), kill whatever does not exit."""
        self.thaw()
        try:
            alive = [r for r in range(self.size) if self.procs[r].is_alive()]
            if len(alive) == self.size:
                self.send(alive, "shutdown")
                self.gather(alive, SHUTDOWN_TIMEOUT, "shutdown")
        except (BenchError, OSError):
            pass
        finally:
            self.kill()

    def kill(self, grace: float = SHUTDOWN_TIMEOUT) -> None:
        self.thaw()
        deadline = time.monotonic() + grace
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(10)
        for conn in self.conns:
            conn.close()
        shutil.rmtree(self.store_dir, ignore_errors=True)


@dataclass
class Pool:
    """One stack's measurements of one row and pin mode, pooled over blocks and generations."""

    samples: list[float] = field(default_factory=list)
    cpu_client: list[float] = field(default_factory=list)  # seconds per call, one per block
    cpu_server: list[float] = field(default_factory=list)
    blocks: int = 0
    block_medians: list[float] = field(default_factory=list)  # seconds, to judge the spread
    losses: tuple[float, float] | None = None

    @property
    def cpu_us_client(self) -> float | None:
        return statistics.median(self.cpu_client) * 1e6 if self.cpu_client else None

    @property
    def cpu_us_server(self) -> float | None:
        return statistics.median(self.cpu_server) * 1e6 if self.cpu_server else None


def windows(stamp_lists: list[list[float]], chunk: int) -> list[float]:
    """Seconds per call over consecutive windows of ``chunk`` completions.

    Each list is one worker's clock when its window was first full, then at every completion.
    Only completions while every worker was calling count: from the latest start to the
    earliest end.
    """
    lo = max(stamps[0] for stamps in stamp_lists)
    hi = min(stamps[-1] for stamps in stamp_lists)
    merged = sorted(t for stamps in stamp_lists for t in stamps[1:] if lo <= t <= hi)
    if len(stamp_lists) == 1:
        merged.insert(0, lo)
    return [(merged[i + chunk] - merged[i]) / chunk for i in range(0, len(merged) - chunk, chunk)]


def block_order(stacks: list[str], generation: int, repeat: int) -> list[str]:
    """A B C C B A, starting one stack later in each generation and repeat."""
    shift = (generation * REPEATS + repeat) % len(stacks)
    forward = stacks[shift:] + stacks[:shift]
    return forward + forward[::-1]


class Campaign:
    """Worlds of every stack, started on first use, and the pooled results of every row."""

    def __init__(self, log: list[str] | None = None) -> None:
        #: (stack, size, cuda, generation) -> world
        self.worlds: dict[tuple[str, int, bool, int], World] = {}
        self.results: dict[tuple[str, str], dict[str, Pool]] = {}
        self.log: list[str] = [] if log is None else log
        #: CPU time per second of an idle worker, per stack: what freezing keeps off the cores
        self.idle: dict[str, float] = {}
        atexit.register(self.close)

    # ------------------------------------------------------------------ worlds
    def world(self, stack: str, size: int, generation: int, cuda: bool = False) -> World:
        key = (stack, size, cuda, generation)
        if key not in self.worlds:
            for other in self.worlds.values():
                if other.running:
                    other.freeze()
            world = World(stack, size, generation, cuda)
            self.worlds[key] = world
            started = time.monotonic()
            world.start()
            self.log.append(f"start {world}: {time.monotonic() - started:.1f} s")
        return self.worlds[key]

    def measure_idle(self, seconds: float = 1.0) -> None:
        """Per stack, CPU seconds per second of the busiest worker of a 2-worker world that has
        made calls and makes none now: the polling that freezing keeps off the cores. CPU
        worlds are asked first; a CUDA world only where its stack has no other."""
        for (stack, size, _, _), world in sorted(self.worlds.items(), key=lambda kv: kv[0][2]):
            if size != 2 or stack in self.idle:
                continue
            self.activate(world)
            time.sleep(0.2)
            before = world.command(range(world.size), CPU_TIMEOUT, "cpu")
            time.sleep(seconds)
            after = world.command(range(world.size), CPU_TIMEOUT, "cpu")
            self.idle[stack] = max(after[r] - before[r] for r in before) / seconds

    def activate(self, world: World) -> None:
        """``world`` alone runs: every other world is stopped."""
        for other in self.worlds.values():
            if other is not world and other.running:
                other.freeze()
        for other in self.worlds.values():
            if other is not world:
                other.wait_states(stopped=True)
        if not world.running:
            world.thaw()
        world.wait_states(stopped=False)

    def close(self) -> None:
        """Continue every world (none is left stopped), then shut each down."""
        worlds = list(self.worlds.values())
        self.worlds.clear()
        for world in worlds:
            world.thaw()
        for world in worlds:
            world.close()

    def retire(self, which: Callable[[World], bool]) -> None:
        """Shut down the worlds ``which`` selects (the all-to-all worlds, once measured; the
        CUDA worlds, once a CPU row comes)."""
        for key in [key for key, world in self.worlds.items() if which(world)]:
            self.worlds.pop(key).close()

    # ------------------------------------------------------------------ measuring
    def measure(self, r: Row, pins: list[str], stacks: list[str]) -> None:
        """Measure ``r`` in each of ``pins`` on ``stacks``; results go to ``self.results``.

        Per generation, per pin mode: A B C C B A. Worlds of more than 2 workers (only the
        all-to-all row uses them) are shut down after their generation; CUDA worlds when a CPU
        row is measured.
        """
        stacks = [s for s in STACKS if s in stacks]
        pools = {(pin, stack): Pool() for pin in pins for stack in stacks}
        try:
            if not r.cuda:
                self.retire(lambda w: w.cuda)
            for generation in range(GENERATIONS):
                for pin in pins:
                    started = time.monotonic()
                    for repeat in range(REPEATS):
                        for stack in block_order(stacks, generation, repeat):
                            world = self.world(stack, r.workers, generation, r.cuda)
                            self.block(world, r, pin, pools[pin, stack])
                    self.log.append(
                        f"{r.title} ({pin}), generation {generation}: "
                        f"{time.monotonic() - started:.1f} s"
                    )
                if r.workers != 2:
                    self.retire(lambda w: w.size == r.workers and w.cuda == r.cuda)
        except BaseException:
            self.close()  # a world in an unknown state: the next row starts fresh ones
            raise
        for pin in pins:
            self.results[r.title, pin] = {stack: pools[pin, stack] for stack in stacks}

    def block(self, world: World, r: Row, pin: str, pool: Pool) -> None:
        self.activate(world)
        world.pin(pin)
        everyone = range(world.size)
        clients = list(everyone) if r.op == "all_to_all" else [0]
        servers = [rank for rank in everyone if rank not in clients]
        world.command(clients, BLOCK_TIMEOUT, "warm", r.title)
        world.pin(pin)  # threads started during the warm-up
        before = world.command(everyone, CPU_TIMEOUT, "cpu")
        answers = world.command(clients, BLOCK_TIMEOUT, "run", r.title)
        after = world.command(everyone, CPU_TIMEOUT, "cpu")
        if r.cuda:  # outside the CPU time: every worker hands its cached GPU memory back
            world.command(everyone, BLOCK_TIMEOUT, "release")
        calls = sum(answer["calls"] for answer in answers.values())
        if r.kind == "latency":
            samples = answers[0]["samples"]
        else:
            samples = windows([a["stamps"] for a in answers.values()], r.chunk)
        pool.samples.extend(samples)
        if samples:
            pool.block_medians.append(statistics.median(samples))
        if servers:
            pool.cpu_client.append(answers[0]["cpu"] / calls)
            server_cpu = sum(after[rank] - before[rank] for rank in servers)
            pool.cpu_server.append(server_cpu / calls)
        else:  # every worker calls and serves: the world's CPU time per call
            pool.cpu_client.append(sum(after[rank] - before[rank] for rank in everyone) / calls)
        if "losses" in answers[0]:
            pool.losses = answers[0]["losses"]
        pool.blocks += 1
