"""Shared fixtures: a real S3-compatible server (moto in server mode over HTTP on loopback), the shared
data folder beside the repo, and a local Ray. Nothing here mocks a library in-process."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest
import torch

# Tests never reach for the Hugging Face hub (scripts/env.sh no longer sets this for users). Set before
# anything imports huggingface_hub, which reads it once at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cluster.runtime import init_ray, shutdown_ray  # noqa: E402
from recdata import storage  # noqa: E402
from trainer.engine import setup_distributed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RECLORA_QUIET", "1")


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with a message saying what is missing."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not found: this test needs the shared data folder beside the repo (../shared)")
    return p


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return shared_path()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1:<free port>, for the whole session; endpoint in the environment."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket per test: returns 's3://<bucket>'."""
    import boto3

    name = f"t-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray per test session (127.0.0.1, 2 CPUs, no dashboard)."""

    ray = init_ray(num_cpus=2)
    yield ray
    shutdown_ray()


@pytest.fixture(autouse=True)
def _reset_storage_options():
    """A CLI test may point storage at another endpoint (storage.configure is process-wide): undo it."""
    yield

    storage.configure()


@pytest.fixture(scope="session")
def one_rank_group():
    """torch.distributed as a worker of one (gloo), through trainer.engine.setup_distributed, for the whole
    session: DeepSpeed caches its groups per process, so a group destroyed and made again between tests
    leaves it holding a dead one ("Group ... is not registered")."""
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    )
    device = setup_distributed(use_gpu=False)
    yield device
    torch.distributed.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
