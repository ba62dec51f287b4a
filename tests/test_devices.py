"""Device maps without a GPU: validation, placements, the tensor table and the frame codes.

What needs CUDA itself is in test_cuda.py (skipped where there is none).
"""

from __future__ import annotations

import torch

import shmrpc as rpc
from backends.framing import Frame, assemble, describe, for_the_wire
from shmrpc.devices import DeviceMaps, Placement, validate_device_maps
from shmrpc.serialization import Serializer
from shmrpc.transport import Message
from tests.harness import add, expect_raises, new_init_method, run_world, worker_options

CPU = torch.device("cpu")


def cuda(index):
    return torch.device("cuda", index)


NAMES = ["worker0", "worker1"]


def validate(maps, counts=(2, 2), devices=((), ())):
    validate_device_maps(
        NAMES,
        dict(zip(NAMES, counts, strict=True)),
        {name: maps.get(name, {}) for name in NAMES},
        {name: list(d) for name, d in zip(NAMES, devices, strict=True)},
    )


# ------------------------------------------------------------------------------ validation


def test_valid_maps_pass():
    validate({"worker0": {"worker1": {cuda(0): cuda(1), CPU: cuda(0)}}})
    validate({"worker0": {"worker1": {cuda(1): cuda(0)}}}, devices=((cuda(1),), (cuda(0),)))


def test_invalid_maps_fail_with_torchs_texts():
    cases = [
        ({"worker0": {"worker7": {cuda(0): cuda(0)}}}, {}, "invalid target node names"),
        ({"worker0": {"worker1": {cuda(2): cuda(0)}}}, {}, "source devices with invalid indices"),
        ({"worker0": {"worker1": {cuda(0): cuda(5)}}}, {}, "target devices with invalid indices"),
        (
            {"worker0": {"worker1": {cuda(0): cuda(0), cuda(1): cuda(0)}}},
            {},
            "duplicated target devices in its device map for worker1",
        ),
        (
            {"worker0": {"worker1": {cuda(1): cuda(0)}}},
            {"devices": ((cuda(0),), ())},
            "unexpected source devices",
        ),
        (
            {"worker0": {"worker1": {cuda(0): cuda(1)}}},
            {"devices": ((), (cuda(0),))},
            "unexpected target devices",
        ),
        ({}, {"devices": ((cuda(0), cuda(0)), ())}, "Node worker0 has duplicated devices"),
        ({}, {"devices": ((), (cuda(3),))}, "Node worker1 has devices with invalid indices"),
    ]
    for maps, extra, text in cases:
        expect_raises(ValueError, validate, maps, match=text, **extra)


def test_a_cpu_only_host_has_no_cuda_to_map_to():
    expect_raises(
        ValueError,
        validate,
        {"worker0": {"worker1": {cuda(0): cuda(0)}}},
        counts=(0, 0),
        match="Node worker0 has source devices with invalid indices in its device map for worker1",
    )


def test_options_refuse_bad_maps():
    options = rpc.RpcBackendOptions()
    options.set_device_map("worker1", {0: 1})
    expect_raises(ValueError, options.set_device_map, "worker1", {0: 2}, match="1-to-1")
    expect_raises(ValueError, options.set_device_map, "worker1", {1: 1}, match="1-to-1")
    expect_raises(RuntimeError, options.set_device_map, "worker1", {-1: 0}, match="negative")
    expect_raises(ValueError, options.set_devices, ["cpu"], match="expect a list of CUDA")
    assert options.device_maps == {"worker1": {cuda(0): cuda(1)}}


# ------------------------------------------------------------------------------ placements


def test_requests_use_the_map_and_replies_its_inverse():
    maps = {
        "worker0": {"worker1": {cuda(0): cuda(1), CPU: cuda(0)}},
        "worker1": {},
    }
    mine, theirs = DeviceMaps("worker0", NAMES, maps), DeviceMaps("worker1", NAMES, maps)
    assert mine.requests["worker1"](cuda(0)) == cuda(1)
    assert mine.requests["worker1"](CPU) == cuda(0)
    # worker1 answers worker0 through the inverse of worker0's map
    assert theirs.responses["worker0"](cuda(1)) == cuda(0)
    assert theirs.responses["worker0"](cuda(0)) == CPU
    plain = DeviceMaps("worker0", NAMES, {"worker0": {}, "worker1": {}})
    assert all(p(CPU) == CPU for p in (*plain.requests.values(), *plain.responses.values()))


def test_unmapped_cuda_fails_with_torchs_text_and_cpu_stays():
    request = Placement({}, "worker1", "Request")
    response = Placement({}, "worker0", "Response")
    assert request(CPU) == CPU
    expect_raises(
        RuntimeError,
        request,
        cuda(0),
        match="only supports CPU tensors by default, please move your tensors to CPU",
    )
    expect_raises(
        RuntimeError,
        request,
        cuda(0),
        match="Request device mapping is not available for destination worker1",
    )
    expect_raises(
        RuntimeError,
        response,
        cuda(0),
        match="Response device mapping is not available for destination worker0",
    )


# --------------------------------------------------------------------- table and the frame


def test_the_tensor_table_says_where_each_tensor_lands():
    """A placement that moves host tensors to a GPU: nothing travels inline, every blob and
    table entry names the target (no CUDA is needed to describe it)."""
    small, empty = torch.ones(4), torch.ones(0)
    pickled = Serializer().dumps([small, empty], Placement({CPU: cuda(1)}, "w", "Request"))
    assert pickled.targets == [cuda(1)] and len(pickled.buffers) == 1
    entries = memoryview(pickled.table).cast("q").tolist()
    assert entries[1:4] == [1, 0, 2], "one blob, nothing inline, two tensors"
    first_device = entries[4 + 4]
    second_device = entries[4 + 6 + 2 * 1 + 4]
    assert first_device == 1 and second_device == 1
    plain = Serializer().dumps([small], Placement({}, "w", "Request"))
    assert plain.targets == [] and not plain.buffers, "host to host: inline, no targets"


def test_frames_carry_device_codes_only_when_a_gpu_is_involved():
    buffer = torch.arange(100, dtype=torch.uint8)
    plain = Message(b"h", b"p", [buffer])
    wire, codes = for_the_wire(plain, ipc=True)
    assert wire is plain and codes == []
    head, total = describe(plain)
    assert not Frame(head[:24]).placed and total == len(head) + 2 + 100
    placed = Message(b"h", b"p", [buffer], [CPU])
    wire, codes = for_the_wire(placed, ipc=True)
    assert codes == [-1]
    head, total = describe(wire, codes)
    frame = Frame(head[:24])
    assert frame.placed and frame.buffer_count == 1 and frame.lengths_size == 16
    assert list(frame.device_codes(head[24:])) == [-1]
    assert total == len(head) + 2 + 100
    message = assemble(frame, head[24:], b"h", b"p", [buffer.clone()])
    assert torch.equal(message.buffers[0], buffer) and message.header == b"h"


# ----------------------------------------------------------------------------- in a world


def _init_with_bad_map(rank, init_method, backend):
    maps = {"worker1": {0: 0}} if rank == 0 else {}
    options = worker_options(backend, rank, 2, init_method, device_maps=maps)
    error = expect_raises(
        ValueError,
        rpc.init_rpc,
        f"worker{rank}",
        backend=backend,
        rank=rank,
        world_size=2,
        rpc_backend_options=options,
        match="Node worker0 has source devices with invalid indices",
    )
    del error
    # RPC is left uninitialized, and a later init with good options works
    expect_raises(RuntimeError, rpc.get_worker_info, match="RPC has not been initialized")
    options = worker_options(backend, rank, 2, init_method + "-again")
    rpc.init_rpc(
        f"worker{rank}", backend=backend, rank=rank, world_size=2, rpc_backend_options=options
    )
    result = rpc.rpc_sync(f"worker{1 - rank}", add, (torch.ones(2), rank))
    rpc.shutdown()
    return result.tolist()


def test_a_map_to_a_missing_device_fails_at_init_on_every_worker(backend):
    if torch.cuda.device_count():
        return  # with a GPU cuda:0 exists; test_cuda.py covers maps there
    assert run_world(_init_with_bad_map, 2, (new_init_method(), backend)) == [
        [1.0, 1.0],
        [2.0, 2.0],
    ]
