"""The examples as whole programs: torch's model-parallel RNN (shmrpc/examples/rnn.py) trains
end to end on every backend, in fresh processes, with only its imports changed from torch's."""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

from shmrpc.examples import rnn
from tests.conftest import SELECTED
from tests.harness import new_init_method, run_world

STEPS = 30
#: The only imports of shmrpc the example may have: the lines that replace torch's.
SHMRPC_IMPORTS = {
    "import shmrpc as rpc",
    "import shmrpc.autograd as dist_autograd",
    "from shmrpc import RRef",
    "from shmrpc.optim import DistributedOptimizer",
}


def _run_rnn(rank, backend, init_method):
    # The example passes no backend to init_rpc, as a torch program would: shmrpc reads it here.
    os.environ["SHMRPC_BACKEND"] = backend
    return rnn.run_worker(rank, 2, init_method, STEPS)


def test_rnn_example_trains(backend):
    ps, losses = run_world(_run_rnn, args=(backend, new_init_method()), timeout=90)
    assert ps is None
    assert len(losses) == STEPS
    # The task is learnable: from ln(64) ~ 4.16 to well under half of it in 30 steps.
    assert losses[-1] < 0.5 * losses[0], losses
    assert sum(losses[-5:]) < sum(losses[:5]) * 0.5, losses


def test_rnn_example_runs_as_a_module():
    env = dict(os.environ, SHMRPC_BACKEND=SELECTED[0])
    done = subprocess.run(
        [sys.executable, "-m", "shmrpc.examples.rnn", "--steps", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step   2  loss" in done.stdout, done.stdout
    assert "steps/s" in done.stdout, done.stdout


def _imports(tree: ast.AST) -> list[tuple[str, str]]:
    """(module, source line) of every import statement."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, ast.unparse(node)) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", ast.unparse(node)))
    return found


def test_rnn_example_imports_only_shmrpc_for_rpc():
    """Nothing from torch.distributed: it stays torch's program with the imports changed."""
    tree = ast.parse(inspect.getsource(rnn))
    imports = _imports(tree)
    distributed = [line for module, line in imports if module.startswith("torch.distributed")]
    assert not distributed, distributed
    used = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr == "distributed"
        and isinstance(node.value, ast.Name)
        and node.value.id == "torch"
    ]
    assert not used, [ast.unparse(node) for node in used]
    shmrpc_lines = {line for module, line in imports if module.split(".")[0] == "shmrpc"}
    assert shmrpc_lines == SHMRPC_IMPORTS
