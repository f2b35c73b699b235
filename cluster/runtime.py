"""Start or join Ray. The only place that decides how this process talks to a cluster.

Under `ray job submit` (or with RAY_ADDRESS set) we join that cluster; otherwise we start a private
local Ray bound to 127.0.0.1. The environment switches below are the known traps for loopback Ray.
"""

from __future__ import annotations

import os

_LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def ray_env() -> dict[str, str]:
    """Environment every Ray worker needs (also passed to runtime_env so remote workers get it)."""
    env = dict(_LOOPBACK_ENV)
    for key in (
        "DS_ACCELERATOR",
        "DS_BUILD_OPS",
        "TORCH_EXTENSIONS_DIR",
        "HF_HOME",
        "HF_HUB_OFFLINE",
        "TOKENIZERS_PARALLELISM",
        "AWS_ENDPOINT_URL",
        "RECLORA_S3_ENDPOINT",
        "PYTHONPATH",
    ):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def init_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True):
    """Connect to RAY_ADDRESS / `address` if given, else start a local single-node Ray on 127.0.0.1."""
    for k, v in _LOOPBACK_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    # Secrets (AWS keys) reach workers through the environment they inherit on a local node, and through
    # the cluster's own secret mounts on Kubernetes; they are never put into runtime_env (it is logged).
    runtime_env = {"env_vars": ray_env()}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=log_to_driver,
            _node_ip_address="127.0.0.1",
        )
    return ray


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
