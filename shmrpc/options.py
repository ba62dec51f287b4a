"""BackendType and RpcBackendOptions: how a user picks and tunes a backend."""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from typing import Any

import torch

from .constants import DEFAULT_INIT_METHOD, DEFAULT_NUM_WORKER_THREADS, DEFAULT_RPC_TIMEOUT_SEC

__all__ = ["BackendType", "RpcBackendOptions", "TensorPipeRpcBackendOptions"]


class BackendType(enum.Enum):
    """Built-in backends. Third-party backends are named by string (their entry point)."""

    SHM = "shm"
    TCP = "tcp"
    AUTO = "auto"
    #: torch's only backend; code written for torch keeps working and gets ``auto``.
    TENSORPIPE = "auto"

    def __repr__(self) -> str:
        return f"BackendType.{self.name}"


DeviceLike = int | str | torch.device

#: Where the tcp transport listens, and the address peers dial, when the options do not say.
LISTEN_ADDR_ENV_VAR = "SHMRPC_LISTEN_ADDR"
ADVERTISE_ADDR_ENV_VAR = "SHMRPC_ADVERTISE_ADDR"


def _device(d: DeviceLike) -> torch.device:
    dev = torch.device(d) if not isinstance(d, int) else torch.device("cuda", d)
    if dev.index is not None and dev.index < 0:
        raise RuntimeError("Device index must not be negative")
    return dev


class RpcBackendOptions:
    """Options for ``init_rpc``; the common fields mirror TensorPipeRpcBackendOptions.

    Backend-specific fields are keyword-only:

    * ``ring_size`` (shm): bytes in each ring between two workers; larger messages stream
      through it in chunks, so it bounds memory, never message size.
    * ``listen_addr`` / ``advertise_addr`` (tcp): where to listen and the address peers
      should dial. Not given: ``$SHMRPC_LISTEN_ADDR`` / ``$SHMRPC_ADVERTISE_ADDR`` (so a
      torchrun script spans hosts without a change), else loopback and ``listen_addr``.
    * ``host_id`` (auto/shm): identity of this host; workers with equal ids use shm with each
      other. Defaults to one derived from the kernel boot id and namespaces.
    * ``spin_us``: how long a waiting thread polls before it blocks (0 disables spinning).
      250 µs covers a round trip that runs Python and torch code on both sides; with 100 µs
      a small ``remote()`` + ``to_here()`` fell asleep between calls and took 2-3x longer.
    * ``max_message_size``: refuse to send or accept larger messages (None: no limit).
    * ``auth_key``: secret that authenticates tcp connections, the same on every worker
      (default: ``$SHMRPC_AUTH_KEY``; else, on one host, a random per-world key passed in a
      file only the user can read; see ``world_key.py``).
    """

    def __init__(
        self,
        init_method: str = DEFAULT_INIT_METHOD,
        rpc_timeout: float = DEFAULT_RPC_TIMEOUT_SEC,
        num_worker_threads: int = DEFAULT_NUM_WORKER_THREADS,
        device_maps: Mapping[str, Mapping[DeviceLike, DeviceLike]] | None = None,
        devices: list[DeviceLike] | None = None,
        *,
        ring_size: int = 4 << 20,
        listen_addr: str | None = None,
        advertise_addr: str | None = None,
        host_id: str | None = None,
        spin_us: float = 250.0,
        max_message_size: int | None = None,
        auth_key: bytes | str | None = None,
        **transport_options: Any,
    ) -> None:
        if not isinstance(rpc_timeout, (int, float)) or isinstance(rpc_timeout, bool):
            raise TypeError(f"rpc_timeout must be a number of seconds, got {rpc_timeout!r}")
        if rpc_timeout < 0:
            raise ValueError(f"rpc_timeout must be >= 0 (0 means no timeout), got {rpc_timeout}")
        if not isinstance(num_worker_threads, int) or num_worker_threads < 1:
            raise ValueError(f"num_worker_threads must be a positive int, got {num_worker_threads}")
        if ring_size < 64 << 10 or ring_size & (ring_size - 1):
            raise ValueError(f"ring_size must be a power of two >= 64 KiB, got {ring_size}")
        if max_message_size is not None and max_message_size <= 0:
            raise ValueError(f"max_message_size must be positive or None, got {max_message_size}")
        if spin_us < 0:
            raise ValueError(f"spin_us must be >= 0, got {spin_us}")
        self.init_method = init_method
        self.rpc_timeout = float(rpc_timeout)
        self.num_worker_threads = num_worker_threads
        self.device_maps: dict[str, dict[torch.device, torch.device]] = {}
        for to, device_map in (device_maps or {}).items():
            self.set_device_map(to, device_map)
        self.devices: list[torch.device] = []
        if devices:
            self.set_devices(devices)
        self.ring_size = ring_size
        self.listen_addr = listen_addr or os.environ.get(LISTEN_ADDR_ENV_VAR) or "127.0.0.1"
        self.advertise_addr = advertise_addr or os.environ.get(ADVERTISE_ADDR_ENV_VAR) or None
        self.host_id = host_id
        self.spin_us = float(spin_us)
        self.max_message_size = max_message_size
        self.auth_key = auth_key
        self.transport_options = dict(transport_options)

    def set_device_map(self, to: str, device_map: Mapping[DeviceLike, DeviceLike]) -> None:
        """Map local devices to ``to``'s devices for tensors sent there (1-to-1).

        A map that fails a check leaves the options as they were.
        """
        current = dict(self.device_maps.get(to, {}))
        for src, dst in device_map.items():
            s, d = _device(src), _device(dst)
            if s in current and current[s] != d:
                raise ValueError(
                    "`set_device_map` only supports 1-to-1 mapping, trying to map "
                    f"{s} to {d} and {current[s]}"
                )
            current[s] = d
        targets = list(current.values())
        if len(set(targets)) != len(targets):
            raise ValueError(
                f"`device_map` only supports 1-to-1 mapping, got {current} for worker {to}"
            )
        self.device_maps[to] = current

    def set_devices(self, devices: list[DeviceLike]) -> None:
        parsed = [_device(d) for d in devices]
        for d in parsed:
            if d.type != "cuda":
                raise ValueError(
                    f"`set_devices` expect a list of CUDA devices, but got device type {d.type}."
                )
        self.devices = parsed

    def transport_config_options(self) -> dict[str, Any]:
        """The options every transport sees (backend-specific fields plus extras)."""
        return {
            "ring_size": self.ring_size,
            "listen_addr": self.listen_addr,
            "advertise_addr": self.advertise_addr,
            "host_id": self.host_id,
            "max_message_size": self.max_message_size,
            **self.transport_options,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(init_method={self.init_method!r}, "
            f"rpc_timeout={self.rpc_timeout}, num_worker_threads={self.num_worker_threads})"
        )


class TensorPipeRpcBackendOptions(RpcBackendOptions):
    """torch's option class name and keyword-only signature, so torch code runs unchanged."""

    def __init__(
        self,
        *,
        num_worker_threads: int = DEFAULT_NUM_WORKER_THREADS,
        rpc_timeout: float = DEFAULT_RPC_TIMEOUT_SEC,
        init_method: str = DEFAULT_INIT_METHOD,
        device_maps: Mapping[str, Mapping[DeviceLike, DeviceLike]] | None = None,
        devices: list[DeviceLike] | None = None,
        _transports: list[str] | None = None,
        _channels: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            init_method, rpc_timeout, num_worker_threads, device_maps, devices, **kwargs
        )
