"""Device maps: on which device each tensor of a message lands (torch's ``device_maps``).

A worker's ``device_maps[peer]`` maps its devices to ``peer``'s for the tensors of its
requests; replies travel back through the inverse of the *caller's* map. Every worker learns
every map at init (they travel in the rendezvous records, as JSON), checks them all with
torch's rules and texts, and builds one `Placement` per peer and direction: the function
the serializer asks where each tensor goes. A CUDA tensor with nowhere to go fails with torch's
error before anything is sent. CPU tensors stay on the CPU unless a map has a ``cpu`` key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = [
    "DeviceMaps",
    "Placement",
    "local_device_record",
    "validate_device_maps",
]

CPU = torch.device("cpu")

DeviceMap = dict[torch.device, torch.device]

_NO_MAPPING = (
    "TensorPipe RPC backend only supports CPU tensors by default, please move your tensors to "
    "CPU before sending them over RPC, or call `set_device_map` on "
    "`TensorPipeRpcBackendOptions` to explicitly configure device mapping. {direction} device "
    "mapping is not available for destination {name}"
)


class Placement:
    """Where tensors sent to one peer in one direction land: ``place(device)``."""

    __slots__ = ("_direction", "_map", "_name")

    def __init__(self, device_map: DeviceMap, name: str, direction: str) -> None:
        self._map = device_map
        self._name = name
        self._direction = direction

    def __call__(self, device: torch.device) -> torch.device:
        target = self._map.get(device)
        if target is not None:
            return target
        if device.type == "cpu":
            return CPU
        raise RuntimeError(_NO_MAPPING.format(direction=self._direction, name=self._name))


class DeviceMaps:
    """Every placement of this worker, built from all workers' maps."""

    def __init__(
        self, me: str, names: list[str], all_maps: Mapping[str, Mapping[str, DeviceMap]]
    ) -> None:
        self.requests = {
            name: Placement(dict(all_maps.get(me, {}).get(name, {})), name, "Request")
            for name in names
        }
        # A reply to ``caller`` goes back through the inverse of the caller's map to us.
        self.responses = {
            caller: Placement(
                {dst: src for src, dst in all_maps.get(caller, {}).get(me, {}).items()},
                caller,
                "Response",
            )
            for caller in names
        }


# --------------------------------------------------------------------------------- exchange
def local_device_record(
    device_maps: Mapping[str, DeviceMap], devices: Iterable[torch.device]
) -> dict[str, Any]:
    """This worker's device facts for the rendezvous record (JSON)."""
    return {
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "device_maps": {
            to: {str(src): str(dst) for src, dst in m.items()} for to, m in device_maps.items()
        },
        "devices": [str(d) for d in devices],
    }


def parse_records(
    records: list[dict[str, Any]],
) -> tuple[list[str], dict[str, int], dict[str, dict[str, DeviceMap]], dict[str, list[Any]]]:
    """Names, device counts, maps and devices of every worker, from their records."""
    names = [r["name"] for r in records]
    counts = {r["name"]: int(r["devices"]["device_count"]) for r in records}
    maps = {
        r["name"]: {
            to: {torch.device(s): torch.device(d) for s, d in m.items()}
            for to, m in r["devices"]["device_maps"].items()
        }
        for r in records
    }
    devices = {r["name"]: [torch.device(d) for d in r["devices"]["devices"]] for r in records}
    return names, counts, maps, devices


# ------------------------------------------------------------------------------- validation
def _valid(devices: Iterable[torch.device], count: int) -> bool:
    return all(
        d.type == "cpu" or (d.type == "cuda" and d.index is not None and 0 <= d.index < count)
        for d in devices
    )


def validate_device_maps(
    names: list[str],
    counts: Mapping[str, int],
    maps: Mapping[str, Mapping[str, DeviceMap]],
    devices: Mapping[str, list[torch.device]],
) -> None:
    """torch's init-time checks of every worker's maps and devices (same texts, ValueError)."""
    for node in names:
        mine = devices[node]
        if len(set(mine)) != len(mine):
            raise ValueError(f"Node {node} has duplicated devices\ndevices = {mine}")
        if not _valid(mine, counts[node]):
            raise ValueError(
                f"Node {node} has devices with invalid indices\ndevices = {mine}\n"
                f"device count = {counts[node]}"
            )
    for source in names:
        if not set(maps[source]).issubset(names):
            raise ValueError(
                f"Node {source} has invalid target node names in its device maps\n"
                f"device maps = {maps[source].keys()}\nnode names = {names}"
            )
        for target, device_map in maps[source].items():
            if len(set(device_map.values())) != len(device_map):
                raise ValueError(
                    f"Node {source} has duplicated target devices in its device map for "
                    f"{target}\ndevice map = {device_map}"
                )
            if devices[source]:
                if not set(device_map).issubset(devices[source]):
                    raise ValueError(
                        f"Node {source} has unexpected source devices in its device map for "
                        f"{target}\ndevice map = {device_map}\ndevices = {devices[source]}"
                    )
            elif not _valid(device_map, counts[source]):
                raise ValueError(
                    f"Node {source} has source devices with invalid indices in its device map "
                    f"for {target}\ndevice map = {device_map}\n"
                    f"device count = {counts[source]}"
                )
            if devices[target]:
                if not set(device_map.values()).issubset(devices[target]):
                    raise ValueError(
                        f"Node {source} has unexpected target devices in its device map for "
                        f"{target}\ndevice map = {device_map}\ndevices = {devices[target]}"
                    )
            elif not _valid(device_map.values(), counts[target]):
                raise ValueError(
                    f"Node {source} has target devices with invalid indices in its device map "
                    f"for {target}\ndevice map = {device_map}\n"
                    f"device count = {counts[target]}"
                )
