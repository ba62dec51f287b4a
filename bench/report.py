"""Turn a pytest-benchmark JSON file of bench/ into docs/benchmarks.md's tables and plot.

``python -m bench.report .benchmarks/latest.json [docs/benchmarks.md]`` prints the tables; with
the document it also rewrites the text between its ``<!-- method:begin/end -->`` markers (how
the figures are measured, with the calls per block of bench/rows.py) and between its
``<!-- results:begin/end -->`` markers (one table per pin mode, medians of one run, each stack
beside TensorPipe; then the CUDA rows' tables, one per pin mode, or one line saying that the
run had none), and draws ``latency_vs_size.png`` next to it (log-log, shm, tcp and TensorPipe,
pinned and unpinned).
"""

from __future__ import annotations

import json
import platform
import re
import sys
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.rows import CUDA_CALLS, CUDA_GBPS_FROM, CUDA_SIZES, PINS, ROWS, STACKS, SYNC_SIZES, row

NONE, TIMES = "-", "x"
NAMES = {"shm": "shm", "tcp": "tcp", "tensorpipe": "TensorPipe"}
PLOT = "latency_vs_size.png"
METHOD = ("<!-- method:begin -->", "<!-- method:end -->")
RESULTS = ("<!-- results:begin -->", "<!-- results:end -->")
CUDA_TITLE = "CUDA tensors (device maps cuda:0 -> cuda:0)"
NO_CUDA = (
    f"{CUDA_TITLE}: no figures yet. The CUDA rows (`cuda_echo`, bench/test_cuda.py) skip "
    "where torch sees no CUDA device, as in this run, and have not run on a GPU yet."
)

Results = dict[tuple[str, str], dict[str, dict[str, Any]]]  # (row, pin) -> stack -> benchmark


def collect(results: dict[str, Any]) -> Results:
    table: Results = defaultdict(dict)
    for bench in results["benchmarks"]:
        info = bench["extra_info"]
        table[info["row"], info["pin"]][info["stack"]] = bench
    return table


def _median(bench: dict[str, Any]) -> float:
    return bench["stats"]["median"]


def _time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _value(title: str, bench: dict[str, Any]) -> str:
    r, median = row(title), _median(bench)
    if r.kind == "rate":
        rate = 1 / median
        return f"{rate / 1e3:.1f} k/s" if rate >= 1e3 else f"{rate:.0f} /s"
    if r.kind == "bandwidth":
        return f"{r.size / median / 1e9:.2f} GB/s"
    if r.cuda and r.size >= CUDA_GBPS_FROM:  # the tensor crosses twice per round trip
        return f"{_time(median)} ({2 * r.size / median / 1e9:.1f} GB/s)"
    return _time(median)


def _cpu(bench: dict[str, Any] | None) -> str:
    if bench is None:
        return NONE
    info = bench["extra_info"]
    if "cpu_us_per_call_world" in info:
        return f"{info['cpu_us_per_call_world']:.0f} (all)"
    client, server = info.get("cpu_us_per_call_client"), info.get("cpu_us_per_call_server")
    if client is None or server is None:
        return NONE
    return f"{client:.0f} / {server:.0f}"


def _has(results: Results, pin: str, cuda: bool) -> bool:
    """Whether ``results`` has rows of this pin mode among the CPU rows or (``cuda``) the CUDA
    rows (rows that bench/rows.py no longer defines are left out, as in :func:`table`)."""
    return any(p == pin and t in ROWS and ROWS[t].cuda == cuda for t, p in results)


def table(results: Results, pin: str, cuda: bool = False) -> str:
    """The rows of one pin mode: the CPU rows, or (``cuda``) the CUDA rows."""
    cpu_heads = " | ".join(f"CPU {NAMES[s]}" for s in STACKS)
    head = f"CUDA, {pin}" if cuda else pin
    lines = [
        f"| {head} (median) | shm | tcp | TensorPipe | shm {TIMES} | tcp {TIMES} | {cpu_heads} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for title in ROWS:
        if row(title).cuda != cuda:
            continue
        benches = results.get((title, pin))
        if not benches:
            continue
        tp = benches.get("tensorpipe")
        cells = [_value(title, benches[s]) if s in benches else NONE for s in STACKS]
        ratios = [
            f"{_median(tp) / _median(benches[s]):.1f}{TIMES}" if tp and s in benches else NONE
            for s in ("shm", "tcp")
        ]
        cpus = [_cpu(benches.get(s)) for s in STACKS]
        lines.append(f"| {title} | " + " | ".join(cells + ratios + cpus) + " |")
    return "\n".join(lines)


def rendered(data: dict[str, Any], results: Results, plot: str | None) -> str:
    parts = []
    for pin in PINS:
        if _has(results, pin, cuda=False):
            parts.append(table(results, pin))
    if any(_has(results, pin, cuda=True) for pin in PINS):
        parts.append(
            f"**{CUDA_TITLE}**: `cuda_echo <size>` round trips; latency per call, and for "
            f"{CUDA_GBPS_FROM >> 20} MiB and more the GB/s it makes (2 x size / median: the "
            "tensor crosses twice)."
        )
        parts.extend(table(results, pin, cuda=True) for pin in PINS if _has(results, pin, True))
    else:
        parts.append(NO_CUDA)
    quick = data.get("bench", {}).get("quick") or any(
        b["extra_info"].get("quick") for group in results.values() for b in group.values()
    )
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {})
    python = machine.get("python_version", platform.python_version())
    torch_version = machine.get("torch") or _torch_version()
    parts.append(
        f"One run, {data.get('datetime', '')[:19]}: {cpu.get('count', '?')} cores "
        f"({cpu.get('brand_raw', platform.processor())}), Python {python}, torch {torch_version}"
        + (". QUICK MODE (BENCH_QUICK=1): a smoke test, not figures to quote." if quick else ".")
    )
    if plot:
        parts.append(f"![median rpc_sync latency against tensor size, log-log]({plot})")
    return "\n\n".join(parts)


def _torch_version() -> str:
    try:
        from importlib.metadata import version

        return version("torch")
    except Exception:
        return "?"


def _wrap(paragraph: str, bullet: bool = True) -> str:
    return textwrap.fill(
        " ".join(paragraph.split()),
        width=96,
        initial_indent="* " if bullet else "",
        subsequent_indent="  " if bullet else "",
        break_long_words=False,
        break_on_hyphens=False,
    )


def method(config: dict[str, Any]) -> str:
    """How the figures are measured, with the numbers of the run (the JSON's ``bench``)."""
    rows = config.get("rows", {})

    def calls(title: str) -> str:
        return str(rows.get(title, {}).get("calls", "?"))

    sync = ", ".join(f"{key} {calls(f'rpc_sync {key}')}" for key in SYNC_SIZES)
    cuda_calls = ", ".join(
        f"{key} {calls(f'cuda_echo {key}') if f'cuda_echo {key}' in rows else CUDA_CALLS[key][0]}"
        for key in CUDA_SIZES
    )
    pipelined = ", ".join(
        f"{r.inflight} in flight {calls(r.title)}"
        for r in ROWS.values()
        if r.op == "async" and r.kind == "rate"
    )
    generations = config.get("generations", "?")
    repeats = config.get("repeats", "?")
    blocks = "?" if "?" in (generations, repeats) else 2 * generations * repeats
    idle = config.get("idle_cpu_per_s", {})
    polling = ""
    if idle:
        used = [f"{idle[s]:.2f} of a core on {NAMES[s]}" for s in STACKS if s in idle]
        polling = f" (in this run an idle worker used {', '.join(used)})"
    intro = """`make bench` runs `bench/` with pytest-benchmark and rewrites the tables and the plot
        below (`python -m bench.report`). Three stacks run the same workloads: shmrpc over shm,
        shmrpc over tcp, and torch.distributed.rpc with its TensorPipe agent (its default
        transports and channels)."""
    how = [
        f"""Every worker is a spawned process of its own, driven over a pipe by the pytest
        process, which is no RPC worker. The worlds of all three stacks are alive at once (per
        stack a 2-worker world and, for the all-to-all row, a 4-worker world), in {generations}
        generation{"s" if generations != 1 else ""} of fresh worlds. The CUDA rows have 2-worker
        worlds of their own, made with device maps and started only when a CUDA row runs;
        they are shut down before any CPU row is measured, whose worlds never have device
        maps.""",
        f"""A row is measured in blocks of calls, in the order A B C C B A over the stacks
        ({repeats}x per generation, starting one stack later in each generation), pinned and
        unpinned: {blocks} blocks per stack, row and pin mode, interleaved in time with the
        other stacks' blocks. During a block every other world is frozen (SIGSTOP), so that no
        idle world takes a core from the measured one{polling}. Pinned: every thread of worker
        `rank` is bound to core `rank % ncores` (set again after the block's warm-up calls, as
        TensorPipe starts threads lazily); unpinned: all cores.""",
        f"""A block starts with unrecorded warm-up calls; then the worker times its calls with
        `time.perf_counter` and sends the samples back. A stack's samples of all its blocks are
        pooled and replayed into pytest-benchmark unchanged (one round per sample), so the
        figures are pytest-benchmark's medians of the raw samples. Measured calls per block:
        `rpc_sync` {sync}; `remote` + `to_here` {calls("remote + to_here")}; `rpc_async`
        {pipelined}; all-to-all {calls("all-to-all, 4 workers x 16 in flight")} per worker;
        stream {calls("stream 64MiB, 4 in flight")}; training step
        {calls("train step, model-parallel RNN")}; CUDA echo {cuda_calls}.""",
        """CPU µs per call, `caller / callee`: CPU time (user + system, all threads) of the
        calling worker over its measured calls, and of the serving worker over the same block,
        divided by the calls made; median over the blocks. It counts polling: a thread that
        spins for a reply costs CPU even when that makes the call faster. For all-to-all, where
        every worker calls and serves, it is the CPU time of all four workers per call.""",
        """`shm x`, `tcp x`: TensorPipe's median divided by ours for latencies, ours divided by
        TensorPipe's for throughputs: above 1 means faster than TensorPipe.""",
    ]
    rows_text = [
        """`rpc_sync <size>`: round trip of `rpc_sync("worker1", noop, (tensor,))` with a
        float32 tensor of that many bytes (the no-op returns None); latency.""",
        """`remote + to_here`: `rpc.remote("worker1", one).to_here()` of a one-element tensor;
        latency.""",
        """`rpc_async, N in flight`: a sliding window of N `rpc_async` calls of the no-op with a
        one-element tensor (wait for the oldest, issue the next); calls per second, from the
        time between consecutive completions, over windows of up to 256 of them.""",
        """all-to-all: 4 workers, each keeping 16 calls in flight to the three others in turn;
        calls per second over the world, counted while all four are calling.""",
        """`stream 64MiB`: `rpc_async` of the no-op with a 64 MiB tensor, 4 in flight; GB/s.""",
        """`train step`: one step of the model-parallel RNN example (`shmrpc/examples/rnn.py`:
        forward through two `rpc_sync`, distributed backward, `DistributedOptimizer` step); for
        TensorPipe the same source with torch's imports (bench/rnn_torch.py).""",
        """`cuda_echo <size>` (CUDA tensors, skipped without a CUDA device): round trip of
        `rpc_sync("worker1", echo, (tensor,))` with a float32 tensor of that many bytes on
        `cuda:0`; worker0's `device_maps={"worker1": {0: 0}}` puts it on worker1's `cuda:0`, and
        `echo` returns it, back through the inverse of the map. shm passes CUDA IPC handles,
        tcp stages through pinned host memory, TensorPipe uses its default channels (cuda_ipc
        between processes on one host). Each call ends with `torch.cuda.synchronize()` before
        the clock is read; after each block every worker frees its cached GPU memory
        (`ipc_collect`, `empty_cache`), outside the timed and CPU-counted calls; latency.""",
    ]
    return "\n\n".join(
        [
            _wrap(intro, bullet=False),
            "How a run measures:",
            "\n".join(_wrap(p) for p in how),
            "Rows:",
            "\n".join(_wrap(p) for p in rows_text),
        ]
    )


def _replace(text: str, markers: tuple[str, str], body: str, anchor: str | None = None) -> str:
    begin, end = markers
    block = f"{begin}\n{body}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    if anchor is None:
        raise ValueError(f"no {begin} in the document")
    # first run: the block replaces what lies between the title and ``anchor``
    title, rest = text.split("\n", 1)
    return f"{title}\n\n{block}\n\n{anchor}{rest.split(anchor, 1)[1]}"


def plot(results: Results, path: Path) -> None:
    """Median rpc_sync latency against tensor size, log-log: a panel per pin mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"shm": "tab:blue", "tcp": "tab:orange", "tensorpipe": "tab:green"}
    markers = {"shm": "o", "tcp": "s", "tensorpipe": "^"}
    sizes = [max(size, 1) for size in SYNC_SIZES.values()]
    fig, axes = plt.subplots(1, len(PINS), figsize=(10, 4.5), dpi=100, sharey=True)
    for ax, pin in zip(axes, PINS, strict=True):
        for stack in STACKS:
            xs, ys = [], []
            for key, size in SYNC_SIZES.items():
                bench = results.get((f"rpc_sync {key}", pin), {}).get(stack)
                if bench is not None:
                    xs.append(max(size, 1))
                    ys.append(_median(bench) * 1e6)
            if xs:
                ax.plot(xs, ys, marker=markers[stack], color=colors[stack], label=NAMES[stack])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sizes, list(SYNC_SIZES), rotation=45, ha="right")
        ax.minorticks_off()
        ax.set_title(pin)
        ax.set_xlabel("tensor size (0 B drawn at 1 B)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("median rpc_sync round trip (µs)")
    fig.suptitle("rpc_sync latency against tensor size (lower is better)")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def main() -> None:
    data = json.loads(Path(sys.argv[1]).read_text())
    results = collect(data)
    doc = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    if doc is not None and any(t.startswith("rpc_sync") for t, _ in results):
        plot(results, doc.parent / PLOT)
        text = rendered(data, results, PLOT)
    else:
        text = rendered(data, results, None)
    if doc is not None:
        content = doc.read_text()
        content = _replace(content, METHOD, method(data.get("bench", {})), anchor=RESULTS[0])
        content = _replace(content, RESULTS, text)
        doc.write_text(content)
    print(text)


if __name__ == "__main__":
    main()
