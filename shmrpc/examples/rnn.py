"""Model-parallel RNN: torch's ``distributed/rpc/rnn`` example with its imports pointed at shmrpc.

The embedding table and the decoder live on a parameter server ("ps") behind RRefs, the LSTM
on the trainer; the trainer drives forward passes through RPC and trains all three with
distributed autograd and ``DistributedOptimizer``. Apart from the four shmrpc imports below,
this is the program a torch user writes (replace them with ``torch.distributed.rpc``,
``torch.distributed.autograd``, ``torch.distributed.optim.DistributedOptimizer`` and
``torch.distributed.rpc.RRef`` and it runs on torch; bench/test_train.py does exactly that).

The task is small and learnable so that the loss visibly falls in a few dozen steps on a CPU:
predict the next token of a fixed (seeded) cyclic sequence.

    python -m shmrpc.examples.rnn [--steps 30]     # backend: $SHMRPC_BACKEND or auto
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.optim as optim

import shmrpc as rpc
import shmrpc.autograd as dist_autograd
from shmrpc import RRef
from shmrpc.optim import DistributedOptimizer

NTOKEN = 64
NINP = 32
NHID = 32
NLAYERS = 1
SEQ_LEN = 16
BATCH = 16
LR = 0.03


def _call_method(method: Callable[..., Any], rref: RRef[Any], *args: Any, **kwargs: Any) -> Any:
    """Call a method on the value an RRef holds; runs on the RRef's owner."""
    return method(rref.local_value(), *args, **kwargs)


def _remote_method(method: Callable[..., Any], rref: RRef[Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``method`` on the owner of ``rref`` and fetch the result back through RPC."""
    return rpc.rpc_sync(rref.owner(), _call_method, args=[method, rref, *args], kwargs=kwargs)


def _parameter_rrefs(module: nn.Module) -> list[RRef[Any]]:
    """One RRef per parameter of a local module (what DistributedOptimizer takes)."""
    return [RRef(param) for param in module.parameters()]


def _generator(seed: int) -> torch.Generator:
    """A generator per layer: the server builds both layers at once on two threads, so drawing
    from the global one would make the initial weights (and the losses) differ run to run."""
    return torch.Generator().manual_seed(seed)


class EmbeddingTable(nn.Module):
    """Encoding layer of the RNNModel; lives on the parameter server."""

    def __init__(self, ntoken: int, ninp: int, dropout: float, seed: int = 0) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        with torch.no_grad():
            self.encoder.weight.uniform_(-0.1, 0.1, generator=_generator(seed))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.drop(self.encoder(input))


class Decoder(nn.Module):
    """Decoding layer of the RNNModel; lives on the parameter server."""

    def __init__(self, ntoken: int, nhid: int, dropout: float, seed: int = 1) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        nn.init.zeros_(self.decoder.bias)
        with torch.no_grad():
            self.decoder.weight.uniform_(-0.1, 0.1, generator=_generator(seed))

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.drop(output))


class RNNModel(nn.Module):
    """Embedding and decoder on ``ps`` (behind RRefs), the LSTM here on the trainer."""

    def __init__(
        self, ps: str, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.nlayers, self.nhid = nlayers, nhid
        # set up the embedding table remotely
        self.emb_table_rref = rpc.remote(ps, EmbeddingTable, args=(ntoken, ninp, dropout))
        # set up the LSTM locally
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        # set up the decoder remotely
        self.decoder_rref = rpc.remote(ps, Decoder, args=(ntoken, nhid, dropout))

    def forward(
        self, input: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        # pass the input to the remote embedding table and fetch the embedding back
        emb = _remote_method(EmbeddingTable.forward, self.emb_table_rref, input)
        output, hidden = self.rnn(emb, hidden)
        # pass the output to the remote decoder and fetch the decoded output back
        decoded = _remote_method(Decoder.forward, self.decoder_rref, output)
        return decoded, hidden

    def init_hidden(self, bsz: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.zeros(self.nlayers, bsz, self.nhid),
            torch.zeros(self.nlayers, bsz, self.nhid),
        )

    def parameter_rrefs(self) -> list[RRef[Any]]:
        remote_params = []
        # RRefs of the embedding table's parameters, created on their owner
        remote_params.extend(_remote_method(_parameter_rrefs, self.emb_table_rref))
        # RRefs of the local parameters
        remote_params.extend(_parameter_rrefs(self.rnn))
        # RRefs of the decoder's parameters
        remote_params.extend(_remote_method(_parameter_rrefs, self.decoder_rref))
        return remote_params


def get_batches(steps: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of (input, target), each ``SEQ_LEN x BATCH``: windows of a fixed cyclic
    sequence (a seeded permutation of the tokens) and the same windows one token later."""
    generator = torch.Generator().manual_seed(seed)
    cycle = torch.randperm(NTOKEN, generator=generator)
    sequence = cycle.repeat(SEQ_LEN // NTOKEN + 2)
    for _ in range(steps):
        starts = torch.randint(0, NTOKEN, (BATCH,), generator=generator)
        index = starts[None, :] + torch.arange(SEQ_LEN)[:, None]
        yield sequence[index], sequence[index + 1]


def build(ps: str = "ps") -> tuple[RNNModel, DistributedOptimizer, nn.Module]:
    """The model (half of it on ``ps``), its distributed optimizer and the loss; on the trainer."""
    model = RNNModel(ps, NTOKEN, NINP, NHID, NLAYERS)
    opt = DistributedOptimizer(optim.Adam, model.parameter_rrefs(), lr=LR)
    return model, opt, nn.CrossEntropyLoss()


def train_step(
    model: RNNModel,
    opt: DistributedOptimizer,
    criterion: nn.Module,
    data: torch.Tensor,
    target: torch.Tensor,
) -> float:
    """One forward, distributed backward and optimizer step; returns the loss."""
    # a distributed autograd context per step: gradients accumulate in it (not in .grad),
    # so there is nothing to zero between steps
    with dist_autograd.context() as context_id:
        output, _ = model(data, model.init_hidden(data.size(1)))
        loss = criterion(output.view(-1, NTOKEN), target.view(-1))
        dist_autograd.backward(context_id, [loss])
        opt.step(context_id)
    return loss.item()


def train(
    steps: int = 30, ps: str = "ps", on_step: Callable[[int, float], None] | None = None
) -> list[float]:
    """Train for ``steps`` steps on the trainer (after init_rpc); returns the loss of each."""
    torch.manual_seed(0)
    model, opt, criterion = build(ps)
    losses = []
    for step, (data, target) in enumerate(get_batches(steps)):
        losses.append(train_step(model, opt, criterion, data, target))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def run_worker(
    rank: int, world_size: int, init_method: str, steps: int = 30, verbose: bool = False
) -> list[float] | None:
    """Rank 0 is the parameter server, rank 1 the trainer; returns the trainer's losses.

    ``verbose`` prints the loss of every step, then the steps per second after the first
    step (which warms up: first calls, first backward pass, the optimizers' state).
    """
    options = rpc.TensorPipeRpcBackendOptions(init_method=init_method, rpc_timeout=60)
    losses = None
    if rank == 1:
        rpc.init_rpc("trainer", rank=rank, world_size=world_size, rpc_backend_options=options)
        ends: list[float] = []

        def report(step: int, loss: float) -> None:
            ends.append(time.perf_counter())
            print(f"step {step:3d}  loss {loss:.3f}", flush=True)

        losses = train(steps, on_step=report if verbose else None)
        if verbose and len(ends) > 1:
            rate = (len(ends) - 1) / (ends[-1] - ends[0])
            print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps; {rate:.1f} steps/s")
    else:
        rpc.init_rpc("ps", rank=rank, world_size=world_size, rpc_backend_options=options)
        # the parameter server does nothing: it serves the trainer's calls
    # block until all RPCs finish
    rpc.shutdown()
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description="model-parallel RNN over shmrpc")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    print(f"backend: {os.environ.get('SHMRPC_BACKEND', 'auto')}")
    with tempfile.TemporaryDirectory() as store_dir:
        mp.spawn(run_worker, args=(2, f"file://{store_dir}/store", args.steps, True), nprocs=2)


if __name__ == "__main__":
    main()
