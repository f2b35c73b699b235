"""Shared fixtures: a real S3-compatible server (moto in server mode over HTTP on loopback), the shared
data folder beside the repo, and a local Ray. Nothing here mocks a library in-process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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


def _user_key(u: int) -> str:
    return f"A{u * 7919 % 100003:06d}X"


def _item_key(i: int) -> str:
    return f"{i:010d}" if i % 5 == 0 else f"B0{i * 104729 % 65536:04X}Q"  # some ASINs are all digits


@pytest.fixture(scope="session")
def ctr_run(tmp_path_factory):
    """One tiny CTR run trained by `python trainer/main.py` on the synthetic preference dataset (SUBR retrieval
    with the tiny model's item embeddings, DIN teacher, RecLoRA adapter), shared by the predict/export tests
    (tests/test_predict.py) and the tracking test (tests/test_tracking.py):
    - the source speaks Amazon's string ids (reviewer ids, ASINs, some all digits): ingest maps them, requests may
      use them;
    - run.report_to=[tensorboard, mlflow, wandb] (MLflow to a file store, W&B offline), validation every 2 steps;
    - the console as a user sees it (RECLORA_QUIET=0)."""
    import pandas as pd

    from recdata.synthetic import preference_dataset

    root = tmp_path_factory.mktemp("predict-run")
    src = preference_dataset(root)
    inter, items = pd.read_csv(src / "inter.csv"), pd.read_csv(src / "items.csv")
    inter["user_id"], inter["item_id"] = inter["user_id"].map(_user_key), inter["item_id"].map(_item_key)
    items["item_id"] = items["item_id"].map(_item_key)
    inter.rename(columns={"user_id": "reviewerID", "item_id": "asin"}).to_csv(src / "reviews.csv", index=False)
    items.rename(columns={"item_id": "asin"}).to_csv(src / "meta.csv", index=False)
    out = root / "runs"
    steps, eval_every, lr = 4, 2, 0.02
    cmd = [
        sys.executable,
        "trainer/main.py",
        "--config",
        "configs/tiny.yaml",
        f"run.output_dir={out}",
        "run.name=p",
        "data.format=generic",
        f"data.src={src / 'reviews.csv'}",
        f"data.items={src / 'meta.csv'}",
        "data.columns.user=reviewerID",
        "data.columns.item=asin",
        "data.columns.item_id=asin",
        "data.dataset_url=datasets/syn",
        "trainer.num_workers=1",
        "trainer.micro_batch_size=8",
        f"trainer.max_steps={steps}",
        f"trainer.lr={lr}",
        f"trainer.eval_every={eval_every}",
        "trainer.feed_workers=0",
        "retrieval.max_eval_samples=32",
        "retrieval.num_workers=1",
        "teacher.num_workers=1",
        "run.report_to=[tensorboard,mlflow,wandb]",
    ]
    mlruns = root / "mlruns"
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("WANDB_DIR", None)
    env.update(
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        RECLORA_QUIET="0",  # what a user sees (progress bars are off anyway: stderr is not a terminal)
        MLFLOW_TRACKING_URI=f"file:{mlruns}",
        MLFLOW_ALLOW_FILE_STORE="true",
        WANDB_MODE="offline",
    )
    job = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    assert "string ids mapped" in job.stdout + job.stderr  # the ingest summary says so
    return {
        "root": root,
        "run": str(out / "p"),
        "name": "p",
        "users": set(inter["user_id"]),
        "items": set(items["item_id"]),
        "job": job,
        "mlruns": mlruns,
        "steps": steps,
        "eval_every": eval_every,
        "lr": lr,
    }
