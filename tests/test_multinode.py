"""Two Ray nodes on one machine (a head and a second node joined with `ray start --address`, both on
127.0.0.1, each with its own custom resource): the whole tiny pipeline (`trainer/main.py`) on that cluster
with trainer workers forced onto different nodes and every output on the moto S3 server, then a preemption:
the second node's processes are killed mid-training and the run finishes like the uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from configs.loader import load_config
from recdata import storage
from tests.conftest import REPO, free_port
from tests.test_pipeline import data_args, source  # noqa: F401  (module fixture reused)
from tests.test_trainer import run_train

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
RAY = str(Path(sys.executable).parent / "ray")
STEPS = 7


def _start(args: list[str]) -> None:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    # `0` (our single-node default) makes `ray start --address` refuse to join: a real multi-node cluster here.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    proc = subprocess.run(
        [RAY, "start", *args, "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def _node_procs(marker: str):
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                found.append(p)
                found.extend(p.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _kill(procs, sig=signal.SIGKILL) -> None:
    """Signal the processes; whatever is still alive after 20 s (gcs_server ignores SIGTERM) is killed."""
    import psutil

    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            continue


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    import ray

    ray.shutdown()
    port = free_port()
    tmpdir = f"/tmp/rn-{os.getpid()}"
    node_b_port = free_port()
    head = [
        "--head",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=2",
        "--include-dashboard=false",
        f"--temp-dir={tmpdir}",
        '--resources={"node_head": 1, "trainer_slot": 1}',
    ]
    node_b = [
        f"--address=127.0.0.1:{port}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=2",
        f"--node-manager-port={node_b_port}",
        '--resources={"node_b": 1, "trainer_slot": 1}',
    ]
    _start(head)
    _start(node_b)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    state = {"node_b": node_b, "node_b_marker": f"--node_manager_port={node_b_port}", "tmpdir": tmpdir}
    yield state
    ray.shutdown()
    _kill(_node_procs(tmpdir), signal.SIGTERM)
    _kill(_node_procs(state["node_b_marker"]), signal.SIGTERM)


def _overrides(src, s3_bucket, s3_server, name) -> list[str]:
    return [
        f"run.output_dir={s3_bucket}/runs",
        f"run.name={name}",
        f"storage.endpoint_url={s3_server}",
        *data_args(src),
        "trainer.placement=SPREAD",
        "trainer.worker_resources={trainer_slot: 1}",
        "trainer.max_failures=3",
        "trainer.lr=0.02",
        # 7, not 8: the preempted run pauses after every step that is a multiple of checkpoint_every (the window
        # for the kill); a last step off that grid spares it a pause after its final checkpoint.
        f"trainer.max_steps={STEPS}",
        "trainer.checkpoint_every=4",
    ]


def _adapter(run_url: str) -> dict[str, torch.Tensor]:
    from tests.test_trainer import adapter_tensors

    return adapter_tensors(run_url)


def test_pipeline_across_nodes_and_survive_preemption(source, s3_server, s3_bucket, cluster, tmp_path):  # noqa: F811
    import ray

    # Uninterrupted reference: the whole pipeline, joining the 2-node cluster through RAY_ADDRESS (as under
    # `ray job submit`), one trainer worker on each node.
    env = {**os.environ, "PYTHONPATH": str(REPO), "RECLORA_NODE_REPORT_DIR": str(tmp_path / "ref-nodes")}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "trainer" / "main.py"),
            "--config",
            "tiny",
            *_overrides(source, s3_bucket, s3_server, "ref"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    fs, _ = storage.get_fs(s3_bucket)
    names = [p.rsplit("/", 1)[-1] for p in fs.find(f"{s3_bucket.removeprefix('s3://')}/runs/ref/checkpoints")]
    assert "rank-00000-of-00002.safetensors" in names and "rank-00001-of-00002.safetensors" in names
    nodes = {json.loads(p.read_text())["node_id"] for p in (tmp_path / "ref-nodes").glob("*.json")}
    assert len(nodes) == 2, "SPREAD with one trainer slot per node must put the workers on different nodes"
    ref = {
        "history": storage.read_json(f"{s3_bucket}/runs/ref/logs/train.jsonl.json"),
        "run_url": f"{s3_bucket}/runs/ref",
    }

    # The same run, with the second node's processes killed while training sits after its step-4 checkpoint.
    # The same training on the pipeline's stored stages (content-addressed, so found from the config alone).
    storage.configure(endpoint_url=s3_server)
    cfg = load_config("tiny", _overrides(source, s3_bucket, s3_server, "pre"))
    result: dict = {}

    def go():
        try:
            result["out"] = run_train(cfg, pause_after_checkpoint=20, eval_zero_shot=True)
        except BaseException as e:  # surfaced to the test thread below
            result["error"] = e

    th = threading.Thread(target=go)
    th.start()
    marker = f"{cfg.run.output_dir}/pre/checkpoints/step-00000004/COMPLETE"
    deadline = time.monotonic() + 400
    while not storage.exists(marker):
        assert time.monotonic() < deadline and th.is_alive(), f"no checkpoint appeared: {result.get('error')}"
        time.sleep(0.5)
    victims = _node_procs(cluster["node_b_marker"])
    assert victims, "second node's processes not found"
    _kill(victims)
    time.sleep(5)
    _start(cluster["node_b"])  # capacity returns
    th.join(timeout=600)
    assert not th.is_alive()
    assert "error" not in result, result.get("error")
    out = result["out"]
    base = {h["step"]: h["loss"] for h in ref["history"]}
    mine = {h["step"]: h["loss"] for h in out["history"]}
    assert sorted(mine) == list(range(1, STEPS + 1))
    for s in range(5, STEPS + 1):  # after the resume point (the step-4 checkpoint)
        assert abs(mine[s] - base[s]) <= 1e-6, (s, mine[s], base[s])
    a, b = _adapter(ref["run_url"]), _adapter(out["run_url"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert np.isfinite(out["metrics"]["final"]["valid_auc"])
    ray.shutdown()
