"""One training step of the model-parallel RNN, per stack: shmrpc (shm, tcp) beside TensorPipe.

The model is ``shmrpc/examples/rnn.py`` (embedding and decoder on worker1 behind RRefs, the LSTM
here), and a step is its ``train_step``: forward through two ``rpc_sync`` calls, a distributed
backward pass, and a ``DistributedOptimizer`` step on both workers. For TensorPipe the same
source runs with its four shmrpc imports pointed at ``torch.distributed``: nothing else changes,
so the rows compare the stacks on one program.
"""

from __future__ import annotations

import inspect
from types import ModuleType, SimpleNamespace
from typing import Any

from shmrpc.examples import rnn

#: shmrpc's import lines in the example and torch's, which the example was written from.
TORCH_IMPORTS = {
    "import shmrpc as rpc\n": "import torch.distributed.rpc as rpc\n",
    "import shmrpc.autograd as dist_autograd\n": (
        "import torch.distributed.autograd as dist_autograd\n"
    ),
    "from shmrpc import RRef\n": "from torch.distributed.rpc import RRef\n",
    "from shmrpc.optim import DistributedOptimizer\n": (
        "from torch.distributed.optim import DistributedOptimizer\n"
    ),
}


def _on_torch() -> SimpleNamespace:
    """The example's source with torch's imports, defined in this module.

    Its classes and functions are published here under their own names, because RPC pickles
    them by reference: worker1 imports this module to run them and gets the same definitions.
    """
    source = inspect.getsource(rnn)
    for ours, torchs in TORCH_IMPORTS.items():
        assert source.count(ours) == 1, f"the example no longer has {ours!r}"
        source = source.replace(ours, torchs)
    namespace: dict[str, Any] = {"__name__": __name__}
    exec(compile(source, f"{rnn.__file__} (torch imports)", "exec"), namespace)
    for name, value in namespace.items():
        if getattr(value, "__module__", None) == __name__ and not name.startswith("__"):
            globals()[name] = value
    return SimpleNamespace(**namespace)


rnn_on_torch = _on_torch()


def _example(stack: str) -> ModuleType | SimpleNamespace:
    return rnn_on_torch if stack == "tensorpipe" else rnn


def test_train_step(benchmark, rpc_world):
    stack, _ = rpc_world
    benchmark.group = "train step, model-parallel RNN"
    benchmark.extra_info.update(stack=stack)
    example = _example(stack)
    model, opt, criterion = example.build(ps="worker1")
    data, target = next(iter(example.get_batches(1)))

    def step() -> float:
        return example.train_step(model, opt, criterion, data, target)

    first = step()
    benchmark.pedantic(step, rounds=200, warmup_rounds=20, iterations=1)
    assert step() < first  # the same batch, trained on: the steps did train
