"""The whole pipeline (`trainer/main.py`) as users run it: a real `ray start --head` with `ray job submit`
and storage on the moto S3 server; a pipeline SIGKILLed in the middle of retrieval and rerun from a
relative output folder; `--dry-run` on the partly built prefix."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recdata.subsets import load_subset
from recdata.synthetic import preference_dataset
from tests.conftest import REPO, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MAIN = str(REPO / "trainer" / "main.py")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:

    return preference_dataset(tmp_path_factory.mktemp("pipeline-src"))


def data_args(src: Path) -> list[str]:
    # data.dataset_url left at its default: the stage folders are named after this data (inter.csv, CTR).
    return ["data.format=generic", f"data.src={src / 'inter.csv'}", f"data.items={src / 'items.csv'}"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = str(REPO)
    return env


def stop_processes_matching(marker: str) -> None:
    """Stop the Ray processes a test started (found by a unique string in their command line or environment):
    `ray stop` would stop every Ray on the machine, and gcs_server ignores SIGTERM, hence the SIGKILL. Ray renames
    its worker processes ("ray::SampleBuilder"), so their command line lacks the marker; they inherit the
    driver's environment (RAY_TMPDIR), which holds it. A worker left running would still commit the shard it is
    on after the caller counted the committed ones."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        if p.pid == os.getpid():
            continue
        try:
            env = p.info["environ"] or {}
            if any(marker in part for part in (p.info["cmdline"] or [])) or any(marker in v for v in env.values()):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        p.kill()


def test_ray_job_submit_runs_the_whole_pipeline_on_s3(source, s3_bucket, s3_server, tmp_path):
    """`ray job submit --working-dir . -- python trainer/main.py --config configs/tiny.yaml` against a real
    `ray start --head` on 127.0.0.1, every stage writing to the moto S3 server."""
    import boto3
    import ray

    ray.shutdown()
    port, dash = free_port(), free_port()
    env = _env()
    # The job's `python` is the one on the head's PATH: this environment's. The S3 keys reach the job
    # through the head's environment, never through the command line or the config.
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    ray_bin = str(Path(sys.executable).parent / "ray")
    tmpdir = f"/tmp/rj-{os.getpid()}"  # unique: identifies this head's processes for cleanup
    start = subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=3",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            # Not Ray's fixed default (52365): any other local Ray's dashboard agent holds that one, and a head
            # whose agent cannot bind it answers every submission with "No available agent to submit job".
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={tmpdir}",
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert start.returncode == 0, start.stderr[-2000:]
    out = f"{s3_bucket}/runs"
    try:
        cmd = [
            ray_bin,
            "job",
            "submit",
            f"--address=http://127.0.0.1:{dash}",
            "--working-dir",
            ".",
            "--",
            "python",
            "trainer/main.py",
            "--config",
            "configs/tiny.yaml",
            f"run.output_dir={out}",
            f"storage.endpoint_url={s3_server}",
            *data_args(source),
            "trainer.max_steps=4",
        ]
        for _ in range(12):  # a loaded machine may need a while before the head's job agent is up
            job = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=800)
            logs = job.stdout + job.stderr
            if "No available agent to submit job" not in logs:
                break
            time.sleep(5)
        assert job.returncode == 0, logs[-4000:]
        for stage in ("[ingest] ->", "[embed] ->", "[samples] ->", "[teacher] ->", "[train] ->"):
            assert stage in logs, stage
        assert "loss=" in logs and "tokens_per_s=" in logs and "trained LLM" in logs
    finally:
        stop_processes_matching(tmpdir)
        shutil.rmtree(tmpdir, ignore_errors=True)

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = s3_bucket.removeprefix("s3://")
    keys = {
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in page.get("Contents", [])
    }

    def has(pattern: str) -> bool:
        import fnmatch

        return any(fnmatch.fnmatch(k, pattern) for k in keys)

    for pattern in (
        "runs/datasets/inter-ctr/*/manifest.json",
        "runs/samples/inter-ctr/*/manifest.json",
        "runs/teachers/inter-ctr-din/*/teacher.json",
        "runs/embeddings/inter-ctr/*/meta.json",
        "runs/tiny/data/train/part-00000.json",
        "runs/tiny/adapter/adapter_model.safetensors",
        "runs/tiny/adapter/gates.safetensors",
        "runs/tiny/checkpoints/step-00000004/COMPLETE",
        "runs/tiny/report.md",
        "runs/tiny/metrics.json",
        "runs/tiny/inputs.json",
        "runs/tiny/feed.json",
    ):
        assert has(pattern), (pattern, sorted(keys)[:50])
    metrics = json.loads(s3.get_object(Bucket=bucket, Key="runs/tiny/metrics.json")["Body"].read())
    assert metrics["steps"] == 4
    for k in ("test_auc", "test_logloss", "valid_auc", "zeroshot_test_auc"):
        assert math.isfinite(metrics["final"][k]), (k, metrics["final"])


def _run(args: list[str], cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    """trainer/main.py in its own session; whatever it leaves behind (a killed driver's local Ray) is
    killed with its process group."""
    cmd = [sys.executable, MAIN, "--config", "tiny", *args]
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _samples_dir(root: Path) -> Path:
    (d,) = list((root / "samples" / "inter-ctr").iterdir())
    return d


def _split_tables(samples: Path) -> dict[str, object]:
    out = {}
    for split in ("train", "valid", "test"):
        t = pq.read_table(sorted((samples / split).glob("*.parquet"))).sort_by("sample_id")
        out[split] = t
    return out


def test_kill_during_retrieval_then_rerun_reuses_committed_shards(source, ray_local, tmp_path, monkeypatch, capsys):
    """SIGKILL the pipeline after the first committed retrieval shard; --dry-run shows the partial prefix;
    a rerun (from a relative output folder) reuses the committed shard, builds the rest to the same
    samples as a clean build, and goes on through teacher and training."""
    args = [*data_args(source), "data.num_shards=4", "retrieval.num_workers=2", "trainer.max_steps=2"]
    env = _env()

    # The clean build: the same command in this process (its Ray is the session's: no second interpreter and Ray
    # start for the reference).
    from trainer.main import main

    clean = main(
        ["--config", "tiny", *args, f"run.output_dir={tmp_path / 'clean'}", "--stages", "ingest,embed,samples"]
    )
    assert clean == 0

    work = tmp_path / "work"
    work.mkdir()
    # The killed driver's own Ray (its own session folder) outlives it for a moment: an actor may still commit
    # the shard it is on. Stop that Ray before counting, so the count is what a rerun finds.
    killed_ray = f"/tmp/rk-{os.getpid()}-{tmp_path.name[-8:]}"
    killed = _run(
        [*args, "run.output_dir=runs", "--stages", "ingest,embed,samples"],
        work,
        {**env, "RECLORA_KILL_AFTER": "samples:1", "RAY_TMPDIR": killed_ray},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    stop_processes_matching(killed_ray)
    shutil.rmtree(killed_ray, ignore_errors=True)
    samples = _samples_dir(work / "runs")
    committed = sorted((samples / "_commits").glob("*.json"))
    assert 1 <= len(committed) < 4 and not (samples / "manifest.json").exists()
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in committed}

    # --dry-run from the relative output folder, in this process (it starts nothing).
    monkeypatch.chdir(work)
    capsys.readouterr()  # what the clean build printed
    assert main(["--config", "tiny", *args, "run.output_dir=runs", "--dry-run"]) == 0
    plan = capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    rows = {line.split()[0]: line for line in plan.out.splitlines()[1:]}
    assert rows["ingest"].split()[1] == "reuse" and rows["embed"].split()[1] == "reuse"
    assert rows["samples"].split()[1] == "resume" and f"{len(committed)}/4 shards committed" in rows["samples"]
    assert rows["teacher"].split()[1] == "build" and rows["train"].split()[1] == "build"

    rerun = _run([*args, "run.output_dir=runs"], work, env, timeout=800)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert "[ingest] reusing" in rerun.stderr  # a status line: a log record on stderr
    for p in committed:  # the committed shard was not rebuilt
        assert (p.stat().st_mtime_ns, p.read_bytes()) == before[p.name]
    manifest = json.loads((samples / "manifest.json").read_text())
    assert manifest["shards"]["skipped"] == len(committed) and manifest["shards"]["built"] == 4 - len(committed)
    ours, theirs = _split_tables(samples), _split_tables(_samples_dir(tmp_path / "clean"))
    for split in ours:
        assert ours[split].equals(theirs[split]), split

    for split in ("train", "valid", "test"):
        assert (load_subset(str(samples), split) == load_subset(str(_samples_dir(tmp_path / "clean")), split)).all()
    run = work / "runs" / "tiny"
    assert json.loads((run / "metrics.json").read_text())["steps"] == 2
    assert (run / "adapter" / "gates.safetensors").exists() and (run / "loss_throughput.png").stat().st_size > 0
    report = (run / "report.md").read_text()
    for row in (
        "| trained LLM | test | auc |",
        "| zero-shot LLM | test | auc |",
        "| teacher (din) | test | auc |",
        "waiting for data",
        "## Gate usage",
        "## Configuration",
    ):
        assert row in report, row
    results = json.loads((run / "results.json").read_text())
    assert math.isfinite(results["teacher"]["test_auc"]) and math.isfinite(results["llm"]["zeroshot_test_auc"])
    assert "trained LLM" in rerun.stdout and "teacher" in rerun.stdout  # the final table
