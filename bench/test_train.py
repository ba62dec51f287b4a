"""One training step of the model-parallel RNN, per stack: shmrpc (shm, tcp) beside TensorPipe.

The model is ``shmrpc/examples/rnn.py`` (embedding and decoder on worker1 behind RRefs, the LSTM
on worker0), and a step is its ``train_step``: forward through two ``rpc_sync`` calls, a
distributed backward pass, and a ``DistributedOptimizer`` step on both workers. For TensorPipe
the same source runs with its four shmrpc imports pointed at ``torch.distributed``
(bench/rnn_torch.py): nothing else changes, so the rows compare the stacks on one program.
"""

from __future__ import annotations

import pytest

from bench.cases import cases


@pytest.mark.parametrize("case", cases("train step, model-parallel RNN"))
def test_train_step(measured, case):
    assert measured.losses is not None
    first, last = measured.losses
    assert last < first  # the same batch, trained on: the steps did train
