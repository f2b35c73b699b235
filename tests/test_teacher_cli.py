"""`python -m teacher.train --config` and `python -m teacher.score --config`: the URLs come from
trainer.stages.paths (where the pipeline looks), the teacher settings from the run config, and mistakes
exit 2 with a message naming the key, the path or the command that is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs.loader import load_config
from recdata import storage
from recdata.layout import paths
from teacher import refdata
from teacher.data import list_shards, read_shard
from teacher.model_io import load_teacher
from teacher.score import main as score_main
from teacher.score import open_reps
from teacher.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
# Small and fast: tiny's teacher (embed 16, MLP 64-32, rep 32, 1 epoch) with smaller batches.
OVERRIDES = ["teacher.batch_size=128", "teacher.lr=0.002", "run.seed=3"]


def _run(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "RECLORA_QUIET": "1"},
    )


@pytest.fixture
def built(tmp_path):
    """Synthetic CTR samples and dataset where the tiny preset's pipeline would put them."""
    over = [f"run.output_dir={tmp_path}", *OVERRIDES]
    p = paths(load_config("tiny", over))
    refdata.build_synthetic_ctr(p.dataset, p.samples, k_id=20)
    return over, p


def test_train_cli_from_config_commits_where_the_pipeline_looks(built):
    over, p = built
    proc = _run("teacher.train", "--config", "tiny", *over)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["out"] == p.teacher and res["train_workers"] == 1 and "auc" in res["valid"] and "auc" in res["test"]
    t = load_teacher(p.teacher)
    cfg = load_config("tiny", over)
    # Settings from the run config: the teacher section, the seed and K_id as the history length.
    assert (t.cfg.model, t.cfg.embed_dim, t.cfg.mlp_hidden, t.rep_dim) == ("din", 16, [64, 32], 32)
    assert (t.cfg.batch_size, t.cfg.lr, t.cfg.seed, t.cfg.max_hist) == (128, 0.002, 3, cfg.retrieval.k_id)
    assert t.cfg.epochs == cfg.teacher.epochs == 1
    # The dataset's attribute tables were used (found through paths(cfg).dataset), not ids alone.
    assert t.meta["dataset_url"] == p.dataset and t.space.num_genres > 0


def test_config_mistakes_exit_2_naming_the_problem(tmp_path, capsys):

    out = f"run.output_dir={tmp_path}"
    assert train_main(["--config", "tiny", out, "teacher.epochs=x"]) == 2
    assert "teacher.epochs" in capsys.readouterr().err
    assert train_main(["--config", "tiny", out, "teacher.train_workers=0"]) == 2
    assert "teacher.train_workers" in capsys.readouterr().err
    assert train_main(["--config", "no-such-preset", out]) == 2
    assert "unknown preset" in capsys.readouterr().err
    p = paths(load_config("tiny", [out]))
    # Nothing built yet: each command names its input and the command that makes it.
    assert train_main(["--config", "tiny", out]) == 2
    err = capsys.readouterr().err
    assert p.samples in err and f"python -m retrieval.build --config tiny {out}" in err
    assert score_main(["--config", "tiny", out]) == 2
    err = capsys.readouterr().err
    assert p.teacher in err and f"python -m teacher.train --config tiny {out}" in err
    # Without --config the explicit URLs are required, and overrides make no sense.
    assert train_main(["--model", "din"]) == 2
    assert "--samples, --out required" in capsys.readouterr().err
    assert score_main(["--model", "m", "--samples", "s", "--out", "o", "teacher.epochs=2"]) == 2
    assert "need --config" in capsys.readouterr().err


@pytest.mark.slow  # starts a local Ray in the scoring subprocess
def test_score_cli_from_config_writes_reps_where_the_trainer_reads(built):
    over, p = built
    proc = _run("teacher.train", "--config", "tiny", *over)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run("teacher.score", "--config", "tiny", *over, "teacher.num_workers=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["out"] == p.reps and res["rep_dim"] == 32
    m = open_reps(p.reps, expected_rep_dim=load_config("tiny", over).teacher.rep_dim)
    for split in ("train", "valid", "test"):
        rows = sum(read_shard(u, columns=["sample_id"]).num_rows for u in list_shards(p.samples, split))
        assert m["splits"][split]["rows"] == rows > 0
    assert (
        m["model_sha256"] == storage.read_json(storage.join(p.teacher, "teacher.json"))["sha256"]["model.safetensors"]
    )
