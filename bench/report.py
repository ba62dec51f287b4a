"""Turn a pytest-benchmark JSON file into the table of docs/benchmarks.md.

``python -m bench.report .benchmarks/latest.json docs/benchmarks.md`` rewrites the table
between the ``<!-- results -->`` markers: medians of one run, each stack beside TensorPipe.
"""

from __future__ import annotations

import json
import platform
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

STACKS = ("shm", "tcp", "tensorpipe")
ORDER = [
    "rpc_sync 0B",
    "rpc_sync 1KiB",
    "rpc_sync 1MiB",
    "rpc_sync 16MiB",
    "rpc_sync 64MiB",
    "rpc_async x1000 pipelined",
    "remote + to_here",
    "train step, model-parallel RNN",
]
NONE, TIMES = "-", "x"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _fmt(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.2f} ms"


def table(results: dict) -> str:
    rows: dict[str, dict[str, float]] = defaultdict(dict)
    order: list[str] = []
    for bench in results["benchmarks"]:
        group, stack = bench["group"], bench["extra_info"]["stack"]
        if group not in order:
            order.append(group)
        rows[group][stack] = bench["stats"]["median"]
    order.sort(key=lambda group: ORDER.index(group) if group in ORDER else len(ORDER))
    lines = [
        "| benchmark (median) | shm | tcp | TensorPipe | shm speed-up | tcp speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for group in order:
        row = rows[group]
        tp = row.get("tensorpipe")
        cells = [_fmt(row[s]) if s in row else NONE for s in STACKS]
        ratios = [f"{tp / row[s]:.1f}{TIMES}" if tp and s in row else NONE for s in ("shm", "tcp")]
        lines.append(f"| {group} | " + " | ".join(cells + ratios) + " |")
    machine = results.get("machine_info", {})
    cpu = machine.get("cpu", {})
    python = machine.get("python_version", platform.python_version())
    lines.append("")
    lines.append(
        f"One run, {results.get('datetime', '')[:19]}: {cpu.get('count', '?')} cores "
        f"({cpu.get('brand_raw', platform.processor())}), Python {python}, "
        f"torch {torch.__version__}."
    )
    return "\n".join(lines)


def main() -> None:
    results = json.loads(Path(sys.argv[1]).read_text())
    rendered = table(results)
    if len(sys.argv) > 2:
        doc = Path(sys.argv[2])
        text = doc.read_text()
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
        doc.write_text(pattern.sub(f"{BEGIN}\n{rendered}\n{END}", text))
    print(rendered)


if __name__ == "__main__":
    main()
