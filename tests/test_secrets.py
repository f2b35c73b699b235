"""No credentials in outputs: a sentinel secret given through the environment (as S3 keys, really used
against the moto server) and through the config (embedded in an endpoint URL) appears in no file of the
run, no console output and no file of the Ray session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from recdata.synthetic import preference_dataset

REPO = Path(__file__).resolve().parents[1]
MAIN = str(REPO / "trainer" / "main.py")
SECRET = "SENTINEL-7f3a9c2e-do-not-log"
KEY_ID = "SENTINELKEYID7F3A9C2E"


def _env(ray_tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(PYTHONPATH=str(REPO), RAY_TMPDIR=str(ray_tmp), RECLORA_QUIET="1", **extra)
    return env


def _files_holding(root: Path, needle: bytes) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                if needle in p.read_bytes():
                    hits.append(str(p))
            except OSError:  # sockets and files that vanish while Ray shuts down
                continue
    return hits


def test_credentials_in_an_endpoint_url_are_refused_without_echo(tmp_path):
    out = tmp_path / "runs"
    # Both commands at once (each is mostly interpreter start-up and imports).
    procs = [
        subprocess.Popen(
            [sys.executable, MAIN, "--config", "tiny", f"run.output_dir={out}", *args],
            env=_env(tmp_path / "ray", **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args, env in [
            ([f"storage.endpoint_url=http://{KEY_ID}:{SECRET}@127.0.0.1:9000"], {}),
            ([], {"AWS_ENDPOINT_URL": f"http://{KEY_ID}:{SECRET}@127.0.0.1:9000"}),
        ]
    ]
    try:
        outputs = [proc.communicate(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, (stdout, stderr) in zip(procs, outputs):
        r = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        assert r.returncode == 2, r.stderr[-2000:]
        assert "holds credentials" in r.stderr and "Traceback" not in r.stderr
        assert SECRET not in r.stdout + r.stderr and KEY_ID not in r.stdout + r.stderr
        assert not out.exists()  # refused before anything was written


@pytest.mark.slow
def test_secret_in_the_environment_reaches_no_output(tmp_path, s3_server):
    """A whole tiny pipeline on S3 with the sentinel as the AWS keys (moto accepts any): every object the
    run wrote, the console and every file of the Ray session are free of it."""
    src = preference_dataset(tmp_path / "src")
    bucket = "secrets-run"
    s3 = boto3.client(
        "s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET
    )
    s3.create_bucket(Bucket=bucket)
    ray_tmp = Path(f"/tmp/rs-{os.getpid()}")  # short: Ray's socket paths must stay under 108 bytes
    env = _env(ray_tmp, AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_ENDPOINT_URL=s3_server)
    r = subprocess.run(
        [sys.executable, MAIN, "--config", "tiny", f"run.output_dir=s3://{bucket}/runs",
         "data.format=generic", f"data.src={src / 'inter.csv'}", f"data.items={src / 'items.csv'}",
         "trainer.num_workers=1", "trainer.feed_workers=0", "trainer.max_steps=2", "retrieval.num_workers=1",
         "teacher.num_workers=1"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in page["Contents"]]
    assert any(k.endswith("runs/tiny/metrics.json") for k in keys)  # the run really wrote to S3
    leaked = [k for k in keys if SECRET.encode() in s3.get_object(Bucket=bucket, Key=k)["Body"].read()]
    assert not leaked, f"objects holding the secret: {leaked}"
    assert SECRET not in r.stdout + r.stderr and KEY_ID not in r.stdout + r.stderr
    assert ray_tmp.exists() and any(ray_tmp.rglob("*.log"))  # the Ray session wrote its logs here
    try:
        for needle in (SECRET, KEY_ID):
            assert not _files_holding(ray_tmp, needle.encode()), f"Ray session files hold {needle}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
