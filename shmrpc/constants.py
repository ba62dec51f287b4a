"""Defaults, named as in torch.distributed.rpc.constants."""

from datetime import timedelta

DEFAULT_RPC_TIMEOUT_SEC: float = 60.0
DEFAULT_INIT_METHOD: str = "env://"
DEFAULT_SHUTDOWN_TIMEOUT: float = 0
DEFAULT_NUM_WORKER_THREADS: int = 16
#: Passed as a per-call timeout, it means "use the default from the options".
UNSET_RPC_TIMEOUT: float = -1.0
DEFAULT_PROCESS_GROUP_TIMEOUT: timedelta = timedelta(milliseconds=2**31 - 1)

#: Environment variable naming the backend when init_rpc gets none.
BACKEND_ENV_VAR = "SHMRPC_BACKEND"
DEFAULT_BACKEND = "auto"
