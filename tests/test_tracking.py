"""Experiment tracking (trainer/tracking.py): one real `python trainer/main.py` run on the tiny preset with
run.report_to=[tensorboard, mlflow, wandb] (MLflow to a file store, W&B offline), read back with each tool's own
reader; TensorBoard files reaching an s3:// run folder on the timer (the moto server); the failure path; and the
one-line error of a tracker whose package is missing."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest

from configs.loader import load_config
from recdata import storage
from tests.test_front_door import assert_no_traceback
from trainer import tracking
from trainer.tracking import Trackers, TrackingError

pytestmark = pytest.mark.timeout(900)


def event_accumulator(path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(path), size_guidance={"scalars": 0})
    ea.Reload()
    return ea


def scalars(ea) -> dict[str, dict[int, float]]:
    return {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}


def tb_hparams(ea) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.string_value or v.number_value or v.bool_value for k, v in start.hparams.items()}


def wandb_records(path: Path) -> tuple[dict, dict, dict]:
    """(history: {key: {step: value}}, summary, config) of an offline W&B run file (`run-<id>.wandb`: W&B's
    LevelDB-style log of protobuf records; wandb 0.31 ships no Python reader for it)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf = path.read_bytes(), 32768, 7, b""
    history: dict[str, dict[int, float]] = {}
    summary, config = {}, {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if n == 0 and kind == 0:
            break
        buf, pos = buf + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind not in (1, 4):  # FULL or LAST: a whole record
            continue
        rec, buf = pb.Record.FromString(buf), b""
        which = rec.WhichOneof("record_type")
        if which == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            for k, v in items.items():
                history.setdefault(k, {})[int(items["_step"])] = v
        elif which == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.summary.update})
        elif which == "run":
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
    return history, summary, config


# ------------------------------------------------------------------------------------------- one real run
def test_main_reports_to_tensorboard_mlflow_and_wandb(ctr_run, monkeypatch):
    """The shared tiny run (tests/conftest.py: ctr_run, trainer/main.py with
    run.report_to=[tensorboard,mlflow,wandb], MLflow to a file store, W&B offline) read back with each tool's
    own reader."""
    from mlflow.tracking import MlflowClient

    res, name, mlruns = ctr_run["job"], ctr_run["name"], ctr_run["mlruns"]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this test's own MLflow client (MLflow 3)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert_no_traceback(res.stderr)
    run = Path(ctr_run["run"])
    final = json.loads((run / "metrics.json").read_text())["final"]
    steps = ctr_run["steps"]
    every_step = list(range(1, steps + 1))
    evals = list(range(ctr_run["eval_every"], steps + 1, ctr_run["eval_every"]))
    assert len(evals) >= 2 and evals[-1] == steps  # validation during and after training

    # TensorBoard: train scalars every step, validation during and after training, test and zero-shot, gates,
    # and the hparams with the final metrics.
    ea = event_accumulator(run / "tensorboard")
    got = scalars(ea)
    for tag in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "padding_fraction", "mfu"):
        assert sorted(got[f"train/{tag}"]) == every_step, tag
    assert sorted(got["gates/entropy"]) == every_step and "gates/expert_load/3" in got
    assert sorted(got["valid/auc"]) == evals and sorted(got["valid/logloss"]) == evals
    for key in ("test_auc", "test_logloss", "valid_auc"):
        assert got[tracking.metric_key(key)][steps] == pytest.approx(final[key], rel=1e-5), key
    assert got["zeroshot_test/auc"][0] == pytest.approx(final["zeroshot_test_auc"], rel=1e-5)
    hp = tb_hparams(ea)
    assert hp["trainer.lora.mode"] == "reclora" and hp["trainer.lora.num_experts"] == 4 and hp["data.task"] == "ctr"
    assert "_hparams_/session_end_info" in ea.PluginTagToContent("hparams")

    # MLflow: one run in experiment run.name, finished, with the params and the same final metrics.
    client = MlflowClient(tracking_uri=f"file:{mlruns}")
    (mrun,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert mrun.info.status == "FINISHED" and mrun.info.run_name == name
    assert mrun.data.params["trainer.lora.r"] == "4" and mrun.data.params["model.max_length"] == "256"
    for key in ("test_auc", "test_logloss", "valid_auc", "zeroshot_test_auc"):
        assert mrun.data.metrics[tracking.metric_key(key)] == pytest.approx(final[key], rel=1e-6), key
    assert [m.step for m in client.get_metric_history(mrun.info.run_id, "train/loss")] == every_step
    ids = json.loads((run / "logs" / "tracking.json").read_text())
    assert ids["mlflow_run_id"] == mrun.info.run_id

    # W&B offline: the run folder in the run's output folder, its history and summary.
    (wfile,) = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert ids["wandb_run_id"] in wfile.name
    history, summary, config = wandb_records(wfile)
    assert sorted(history["train/loss"]) == every_step and 0 in history["zeroshot_test/auc"]
    assert summary["test/auc"] == pytest.approx(final["test_auc"], rel=1e-6)
    assert config["trainer.lora.mode"] == "reclora" and config["trainer.lr"] == pytest.approx(ctr_run["lr"])


# ------------------------------------------------------------------------------------------- units
def _cfg(tmp_path, *extra: str):
    return load_config("tiny", [f"run.output_dir={tmp_path}", *extra])


def test_report_to_takes_the_hf_forms(tmp_path):
    assert _cfg(tmp_path).run.report_to == ["tensorboard"]
    assert _cfg(tmp_path, "run.report_to=none").run.report_to == []
    assert _cfg(tmp_path, "run.report_to=[]").run.report_to == []
    assert _cfg(tmp_path, "run.report_to=mlflow,wandb").run.report_to == ["mlflow", "wandb"]
    assert _cfg(tmp_path, "run.report_to=all").run.report_to == ["tensorboard", "mlflow", "wandb"]
    with Trackers.from_config(_cfg(tmp_path, "run.report_to=none"), str(tmp_path / "r"), 0) as t:
        assert not t
        t.log_metrics({"train/loss": 1.0}, 1)  # nothing asked for: every call a no-op
    assert not (tmp_path / "r").exists()


def test_missing_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` sees where it is not installed
    cfg = _cfg(tmp_path, "run.report_to=[tensorboard,mlflow]")
    for rank in (0, 1):  # every rank refuses at once (no rank waits in a collective for one that stopped)
        with pytest.raises(TrackingError) as e:
            Trackers.from_config(cfg, str(tmp_path / "run"), rank)
        msg = str(e.value)
        assert "\n" not in msg and "'mlflow' package is not installed" in msg
        assert 'pip install "reclora[tracking]"' in msg and "pip install mlflow-skinny" in msg


def test_mlflow_needs_a_tracking_uri_when_the_runs_are_remote(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(TrackingError, match="MLFLOW_TRACKING_URI or run.mlflow_tracking_uri"):
        tracking.require(_cfg("s3://bucket/runs", "run.report_to=[mlflow]"))
    # A local output folder: a file store beside the runs.
    assert tracking.mlflow_uri(_cfg(tmp_path, "run.report_to=[mlflow]")) == f"file:{tmp_path}/mlruns"


def test_tensorboard_reaches_s3_on_the_timer(s3_bucket, s3_server, tmp_path):
    cfg = _cfg(tmp_path, "run.report_to=[tensorboard]", "run.tracking_flush_s=0.2")
    run_url = f"{s3_bucket}/runs/timer"
    fs, _ = storage.get_fs(run_url)
    bucket = s3_bucket.removeprefix("s3://")

    def committed() -> list[str]:
        # An upload in flight shows as a '.tmp-' key that is gone a moment later (the atomic
        # write's temporary name): only committed event files are read.
        found = fs.find(f"{bucket}/runs/timer/tensorboard/", refresh=True)
        return [key for key in found if ".tmp-" not in key]

    def downloaded() -> Path:
        local = tmp_path / f"dl-{time.monotonic_ns()}"
        local.mkdir()
        for key in committed():
            fs.get(key, str(local / Path(key).name))
        return local

    trackers = Trackers.from_config(cfg, run_url, rank=0)
    trackers.log_metrics({"train/loss": 0.7, "valid/auc": 0.6}, 1)
    deadline = time.monotonic() + 30
    while not committed() and time.monotonic() < deadline:
        time.sleep(0.1)
    # Before close: the timer alone put the events on S3.
    assert scalars(event_accumulator(downloaded()))["train/loss"] == {1: pytest.approx(0.7)}
    trackers.log_metrics({"train/loss": 0.5}, 2)
    trackers.log_hparams({"trainer.lr": 0.01}, {"test_auc": 0.66})
    trackers.close()
    ea = event_accumulator(downloaded())
    assert scalars(ea)["train/loss"] == {1: pytest.approx(0.7), 2: pytest.approx(0.5)}
    assert tb_hparams(ea) == {"trainer.lr": pytest.approx(0.01)}
    assert not Path(trackers.backends[0].dir).exists()  # the local copy is gone


def test_an_exception_marks_the_mlflow_run_failed_after_a_last_flush(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    cfg = _cfg(tmp_path, "run.name=boom", "run.report_to=[tensorboard,mlflow]", "run.tracking_flush_s=0")
    run_url = str(tmp_path / "boom")
    with pytest.raises(RuntimeError, match="worker died"):
        with Trackers.from_config(cfg, run_url, rank=0) as trackers:
            trackers.log_metrics({"train/loss": 0.9, "test/hr@10": 0.25}, 3)
            raise RuntimeError("worker died")
    client = MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("boom").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.metrics == {"train/loss": pytest.approx(0.9), "test/hr_at_10": pytest.approx(0.25)}
    assert scalars(event_accumulator(Path(run_url) / "tensorboard"))["test/hr@10"] == {3: pytest.approx(0.25)}
    # A restarted worker continues the same MLflow run.
    with Trackers.from_config(cfg, run_url, rank=0, start_step=3) as trackers:
        trackers.log_metrics({"train/loss": 0.8}, 4)
        trackers.log_hparams(tracking.key_hparams(cfg), {"test_auc": 0.7})  # a final metric not logged before
    (again,) = client.search_runs([client.get_experiment_by_name("boom").experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "test/auc")] == [(4, 0.7)]
    assert again.data.params["trainer.lora.mode"] == "reclora"


def test_a_tracker_that_fails_while_logging_is_skipped(tmp_path, caplog):
    class Broken:
        def log_metrics(self, metrics, step):
            raise ConnectionError("server went away\nmore detail")

    trackers = Trackers([Broken()])
    for step in range(3):
        trackers.log_metrics({"train/loss": 1.0}, step)  # training goes on
    warnings = [r.getMessage() for r in caplog.records if "tracking:" in r.getMessage()]
    assert warnings == ["tracking: Broken.log_metrics failed: server went away"]
