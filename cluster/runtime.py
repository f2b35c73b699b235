"""Start or join Ray. The only place that decides how this process talks to a cluster.

Under `ray job submit` (or with RAY_ADDRESS set) we join that cluster; otherwise we start a private
local Ray bound to 127.0.0.1. The environment switches below are the known traps for loopback Ray.

The private Ray runs its API server with the State API (`include_dashboard=True`, on 127.0.0.1 and a free
port), and its workers are told where it is (RAY_API_SERVER_ADDRESS): Ray Train's PlacementGroupCleaner asks
the State API once a second whether the TrainController is alive. Without the State API (include_dashboard
=False loads none of its modules) every question fails and it logs "Failed to query Ray Train Controller actor
state" each second, and at the end the controller's stop call times out (a GetTimeoutError traceback). Without
the address it looks for "the" Ray on the machine and, with several (other users, other test runs), takes the
newest one, which may be another user's.

`setup_worker_logging` is the logging set-up of every Ray worker this project starts (Ray Train workers in
cluster.launch, actors in cluster.pool): configs.logs' one format, once per line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys

from configs.logs import progress_enabled, setup_logging

_LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# Ray Train v2 replaces `print` on its workers with a version that logs the text to the root logger and, when
# sys.stdout/stderr is not the original stream (as in a Ray worker), prints it as well: every printed line
# reached the driver twice. Prints stay prints; log records go through configs.logs' handler.
_RAY_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# A worker's stderr is never a terminal (a file, forwarded to the driver line by line): no Hugging Face progress
# bars there ("Loading weights" would arrive as one line per refresh).
_WORKER_ENV = {**_RAY_TRAIN_ENV, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
# Ray Train's worker context logs "Reporting training result N: ..." at INFO on every ray.train.report (every
# logged step here). Its logger is named after the module's file path (logging.getLogger(__file__)).
_RAY_TRAIN_CONTEXT_MODULE = "ray.train.v2._internal.execution.context"


def ray_env() -> dict[str, str]:
    """Environment every Ray worker needs (also passed to runtime_env so remote workers get it)."""
    env = {**_LOOPBACK_ENV, **_WORKER_ENV}
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
        # Tracking settings (run.report_to); never credentials (WANDB_API_KEY and the like stay in the pod env).
        "MLFLOW_TRACKING_URI",
        "MLFLOW_EXPERIMENT_NAME",
        "WANDB_MODE",
        "WANDB_PROJECT",
        "WANDB_ENTITY",
        "WANDB_DIR",
    ):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def init_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True):
    """Connect to RAY_ADDRESS / `address` if given, else start a local single-node Ray on 127.0.0.1."""
    for k, v in {**_LOOPBACK_ENV, **_RAY_TRAIN_ENV}.items():
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
        port = _free_port()
        runtime_env["env_vars"][API_SERVER_ENV] = f"http://127.0.0.1:{port}"
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=True,  # the State API, which Ray Train's placement-group cleaner polls
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            runtime_env=runtime_env,
            log_to_driver=log_to_driver,
            _node_ip_address="127.0.0.1",
        )
    return ray


def start_autoscaling_coordinator(ray) -> None:
    """Start Ray Train's AutoscalingCoordinator actor now, with time to spare.

    Each Ray Train controller registers its resource request with this detached actor, creating it on first use
    and waiting 5 s for the answer. On a busy 2-core machine the actor's process takes longer than that to start
    (it imports ray.data), so the first run of a fresh Ray logged a GetTimeoutError traceback ("Failed to send
    resource request ... safe to ignore"), which reads as a crash. Started before a controller (cluster.launch),
    the controller finds it running. Idempotent (a named detached actor). The module is Ray-internal (pinned Ray
    2.60): a Ray without it skips this, and nothing else depends on it."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:
        logging.getLogger(__name__).debug("this Ray has no AutoscalingCoordinator; not starting one")
        return
    coordinator = get_or_create_autoscaling_coordinator()
    # A no-op call (no such request to cancel): returns once the actor runs.
    ray.get(coordinator.cancel_request.remote(requester_id="reclora-startup"), timeout=300)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_worker_logging(rank: int | None = None) -> None:
    """In a Ray worker: configs.logs' handler as the only console handler of the root logger, and Ray Train's
    per-report INFO line silenced. Ray Train configures the root logger of its workers with a console handler
    of its own (ray._private.log.PlainRayHandler): with ours beside it every record would print twice. Its
    file handlers (Ray Train's log files) stay."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler).__name__ == "PlainRayHandler":
            root.removeHandler(handler)
    setup_logging(rank=rank)
    silence_ray_train_reports()


def silence_ray_train_reports() -> None:
    import importlib.util

    spec = importlib.util.find_spec(_RAY_TRAIN_CONTEXT_MODULE)
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def setup_console() -> None:
    """The set-up of an entry point (trainer/main.py, `reclora`): configs.logs' handler, and no Hugging Face
    progress bars off a terminal (a saved model's "Writing model shards" would be one long line in a log)."""
    setup_logging()
    if not progress_enabled():
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub is first imported
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        elif "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()


def adopt_deepspeed_logger() -> None:
    """DeepSpeed logs through a logger of its own with a handler on stdout, and warns there while it is
    imported ("Setting accelerator to CPU"): stdout is for results. Import it with stdout pointed at stderr,
    then hand its records to the root logger (configs.logs' format)."""
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed.utils.logging  # noqa: F401
    ds = logging.getLogger("DeepSpeed")
    for handler in list(ds.handlers):
        if type(handler) is logging.StreamHandler:
            ds.removeHandler(handler)
    ds.propagate = True
