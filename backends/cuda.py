"""How CUDA buffers cross a transport: staged through host memory, or passed by IPC handle.

Nothing here runs for host-memory messages. A CUDA buffer is read after the work that the
sending thread's current stream has queued so far: staging copies on that stream and waits
for it; an IPC handle carries an event recorded on it, which the receiver's stream waits for
(torch's own CUDA sharing, ``torch.multiprocessing.reductions``). Either way the receiver
gets memory of its own on the target device (value semantics, as for host buffers), and
the sender's memory is kept alive by torch's IPC reference counter until the receiver has
copied it.
"""

from __future__ import annotations

import functools
import pickle

import torch

__all__ = ["IPC", "land", "open_shared", "share", "stage"]

#: Device code flag: the buffer's bytes are an IPC descriptor, not the data.
IPC = 1 << 40


def stage(buffer: torch.Tensor) -> torch.Tensor:
    """A host copy of a CUDA buffer, in page-locked memory (faster to copy into)."""
    host = torch.empty(buffer.numel(), dtype=torch.uint8, pin_memory=True)
    host.copy_(buffer)  # waits for the current stream, so the bytes are final
    return host


def land(buffer: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host buffer moved to the device it must arrive on."""
    return buffer.to(device)


def share(buffer: torch.Tensor) -> torch.Tensor:
    """The IPC descriptor of a snapshot of a CUDA buffer, as bytes in a host tensor.

    The snapshot (a device-to-device copy on the current stream) is what the receiver reads:
    the sender may go on writing to its tensor at once (value semantics, as ``send`` promises
    for host buffers), and a tensor sent many times is not re-shared each time. torch keeps
    the snapshot's memory alive until the receiver has let go of it.
    """
    from torch.multiprocessing.reductions import reduce_tensor

    snapshot = buffer.clone()
    _, args = reduce_tensor(snapshot)  # records an event on the current stream
    uuid = str(torch.cuda.get_device_properties(buffer.device).uuid)
    data = pickle.dumps((uuid, args), protocol=5)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def open_shared(descriptor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The buffer a descriptor names, copied into fresh memory on ``device``.

    Device indices differ between processes that see different GPUs, so the descriptor
    names the physical GPU by UUID and the receiver looks up its own index for it.
    """
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    uuid, args = pickle.loads(descriptor.numpy().tobytes())
    args = list(args)
    args[6] = _local_index(uuid)  # the storage's device, in this process's numbering
    shared = rebuild_cuda_tensor(*args)  # the current stream waits for the sender's event
    out = torch.empty(shared.numel(), dtype=torch.uint8, device=device)
    out.copy_(shared)  # peer to peer when ``device`` is another GPU
    return out


@functools.cache
def _uuids() -> dict[str, int]:
    return {
        str(torch.cuda.get_device_properties(i).uuid): i for i in range(torch.cuda.device_count())
    }


def _local_index(uuid: str) -> int:
    index = _uuids().get(uuid)
    if index is None:
        raise RuntimeError(f"CUDA device {uuid} of the sender is not visible in this process")
    return index
