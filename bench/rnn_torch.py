"""The model-parallel RNN example (``shmrpc/examples/rnn.py``) with torch's imports.

The TensorPipe row of the training-step benchmark runs the same example source as the shmrpc
rows, with its four shmrpc imports pointed at ``torch.distributed``: nothing else changes, so
the rows compare the stacks on one program. Importing this module builds it; its classes and
functions are published here under their own names, because RPC pickles them by reference:
the parameter server imports this module to run them and gets the same definitions.
"""

from __future__ import annotations

import inspect
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


def _on_torch() -> dict[str, Any]:
    """The example's source with torch's imports, executed as this module's namespace."""
    source = inspect.getsource(rnn)
    for ours, torchs in TORCH_IMPORTS.items():
        assert source.count(ours) == 1, f"the example no longer has {ours!r}"
        source = source.replace(ours, torchs)
    namespace: dict[str, Any] = {"__name__": __name__}
    exec(compile(source, f"{rnn.__file__} (torch imports)", "exec"), namespace)
    return {
        name: value
        for name, value in namespace.items()
        if getattr(value, "__module__", None) == __name__ and not name.startswith("__")
    }


globals().update(_on_torch())
