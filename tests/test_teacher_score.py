"""teacher.score: complete, correctly keyed output; Ray actors; resume after SIGKILL; S3 over HTTP;
bad input (rep size, missing sample ids, NaN features)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cluster.pool import run_sharded
from recdata import storage
from recdata.schema import write_parquet
from teacher import refdata
from teacher.config import TeacherConfig
from teacher.data import list_shards, read_shard
from teacher.features import Encoder, FeatureError
from teacher.model_io import load_teacher, to_tensors
from teacher.score import RepsError, open_reps, read_reps, rep_matrix, score_samples
from teacher.train import train_teacher

REPO = Path(__file__).resolve().parents[1]
SMALL_DIN = dict(epochs=1, batch_size=128, num_threads=1, mlp_hidden=[64, 32], rep_dim=32, max_hist=20)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    samples = str(root / "samples")
    # 6 sample shards per split with small row groups, so resume has several shards to skip or redo.
    refdata.build_synthetic_ctr(str(root / "ds"), samples, num_shards=6, n_users=90)
    model = str(root / "model")
    train_teacher(samples, model, TeacherConfig.defaults("din", **SMALL_DIN), progress=False)
    return samples, model


def _all_samples(samples: str) -> pa.Table:
    return pa.concat_tables(
        [
            read_shard(u, columns=["sample_id", "split"])
            for s in ("train", "valid", "test")
            for u in list_shards(samples, s)
        ]
    )


def _reps_by_id(reps: str) -> dict[int, tuple]:
    out = {}
    for split in ("train", "valid", "test"):
        t = read_reps(reps, split)
        for sid, rep, score in zip(t["sample_id"].to_pylist(), t["rep"].to_pylist(), t["teacher_score"].to_pylist()):
            assert sid not in out, f"duplicate sample_id {sid}"
            out[sid] = (split, tuple(rep), score)
    return out


def _data_files(reps: str) -> list[str]:
    return sorted(str(p.relative_to(reps)) for p in Path(reps).rglob("*") if p.is_file())


def test_in_process_scoring_is_complete_and_keyed(trained, tmp_path):
    samples, model = trained
    reps = str(tmp_path / "reps")
    res = score_samples(model, samples, reps, num_actors=0)
    keys = _all_samples(samples)
    got = _reps_by_id(reps)
    assert sorted(got) == sorted(keys["sample_id"].to_pylist())
    assert res["rows_scored"] == keys.num_rows and res["shards_total"] == 18
    assert pq.read_schema(f"{reps}/valid/shard-00000.parquet").field("rep").type == pa.list_(pa.float32(), 32)
    # the stored rep and score are what the frozen teacher computes for that sample_id
    t = load_teacher(model)
    tab = read_shard(list_shards(samples, "test")[0])
    with torch.no_grad():
        b = to_tensors(Encoder(t.space, t.cfg.max_hist, "ctr").encode(tab), torch.device("cpu"))
        out = t.model(b)
    ids = tab["sample_id"].to_numpy()
    np.testing.assert_allclose(
        rep_matrix(reps, "test", ids, expected_rep_dim=32), out["rep"].numpy(), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose([got[i][2] for i in ids], torch.sigmoid(out["logit"]).numpy(), rtol=1e-5)
    # a rerun finds everything committed
    again = score_samples(model, samples, reps, num_actors=0)
    assert again["shards_skipped"] == 18 and again["rows_scored"] == 0


def test_two_ray_actors_write_the_same_output(trained, tmp_path, ray_local):
    samples, model = trained
    local, ray_out = str(tmp_path / "local"), str(tmp_path / "ray")
    score_samples(model, samples, local, num_actors=0)
    res = score_samples(model, samples, ray_out, num_actors=2, runner=run_sharded)
    assert res["shards_total"] == 18
    assert _reps_by_id(local) == _reps_by_id(ray_out)


def test_resume_after_sigkill_gives_identical_output(trained, tmp_path):
    samples, model = trained
    clean, killed = str(tmp_path / "clean"), str(tmp_path / "killed")
    # Same batch size in both runs: results are bit-identical only for identical batching.
    score_samples(model, samples, clean, num_actors=0, batch_size=16)
    cmd = [
        sys.executable,
        "-m",
        "teacher.score",
        "--model",
        model,
        "--samples",
        samples,
        "--out",
        killed,
        "--num-actors",
        "0",
        "--batch-size",
        "16",
    ]
    env = {**os.environ, "RECLORA_QUIET": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any(Path(killed).glob("*/_committed/*.json")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed_before = len(list(Path(killed).glob("*/_committed/*.json")))
    assert 1 <= committed_before < 18, proc.stderr.read().decode()[-2000:]
    assert not (Path(killed) / "manifest.json").exists()
    res = score_samples(model, samples, killed, num_actors=0, batch_size=16)
    assert res["shards_skipped"] == committed_before
    assert _reps_by_id(clean) == _reps_by_id(killed)
    assert not [f for f in _data_files(killed) if "_tmp-" in f]  # partial files of the killed run are gone
    assert not [f for f in _data_files(killed) if ".tmp-" in f]  # (storage's atomic writes name them so)


def test_deleted_markers_are_redone_and_foreign_model_is_not_trusted(trained, tmp_path):
    samples, model = trained
    reps = str(tmp_path / "reps")
    score_samples(model, samples, reps, num_actors=0)
    before = _reps_by_id(reps)
    for m in list(Path(reps).glob("train/_committed/*.json"))[:3]:
        m.unlink()
    Path(reps, "train", "shard-00001.parquet").write_bytes(b"garbage")  # its marker gone too? make sure it is redone
    Path(reps, "train", "_committed", "shard-00001.json").unlink(missing_ok=True)
    res = score_samples(model, samples, reps, num_actors=0)
    assert 18 - res["shards_skipped"] in (3, 4)
    assert _reps_by_id(reps) == before
    # a marker from another model does not count as committed
    other = str(tmp_path / "other")
    train_teacher(samples, other, TeacherConfig.defaults("din", **{**SMALL_DIN, "seed": 5}), progress=False)
    res = score_samples(other, samples, reps, num_actors=0)
    assert res["shards_skipped"] == 0


def test_s3_output_over_http(trained, s3_bucket):
    samples, model = trained
    reps = f"{s3_bucket}/reps"
    model_s3 = f"{s3_bucket}/model"
    fs, path = storage.get_fs(model_s3)
    fs.put(model + "/", path, recursive=True)
    res = score_samples(model_s3, samples, reps, num_actors=0, splits=("valid", "test"))
    assert res["shards_total"] == 12
    m = open_reps(reps, expected_rep_dim=32)
    assert set(m["splits"]) == {"valid", "test"}
    ids = read_shard(list_shards(samples, "valid")[0], columns=["sample_id"])["sample_id"].to_numpy()
    assert rep_matrix(reps, "valid", ids).shape == (len(ids), 32)
    assert storage.exists(f"{reps}/valid/_committed/shard-00000.json")


def test_rep_size_mismatch_and_missing_ids_are_errors(trained, tmp_path):
    samples, model = trained
    reps = str(tmp_path / "reps")
    with pytest.raises(RepsError, match="size is 32.*expects 256"):
        score_samples(model, samples, reps, num_actors=0, expected_rep_dim=256)
    with pytest.raises(RepsError, match="scoring has not finished"):
        open_reps(reps)
    score_samples(model, samples, reps, num_actors=0, splits=("valid",))
    with pytest.raises(RepsError, match="expects 64"):
        rep_matrix(reps, "valid", np.array([0]), expected_rep_dim=64)
    with pytest.raises(RepsError, match="no representation for sample_id 123456789"):
        rep_matrix(reps, "valid", np.array([123456789]))
    with pytest.raises(RepsError, match="split 'test' was not scored"):
        read_reps(reps, "test")


def test_nan_feature_fails_the_shard_naming_sample(trained, tmp_path):
    samples, model = trained
    bad = str(tmp_path / "bad")
    t = pq.read_table(list_shards(samples, "valid")[0])
    ratings = t["id_hist_ratings"].to_pylist()
    row = next(i for i, r in enumerate(ratings) if r)
    ratings[row] = [float("nan")] * len(ratings[row])
    t = t.set_column(
        t.schema.get_field_index("id_hist_ratings"), "id_hist_ratings", pa.array(ratings, pa.list_(pa.float32()))
    )
    write_parquet(t, f"{bad}/valid/shard-00000.parquet")
    sid = t["sample_id"][row].as_py()
    with pytest.raises(FeatureError, match=rf"id_hist_ratings.*NaN.*sample_id {sid}"):
        score_samples(model, bad, str(tmp_path / "reps"), num_actors=0)
    assert not (tmp_path / "reps" / "valid" / "_committed" / "shard-00000.json").exists()
