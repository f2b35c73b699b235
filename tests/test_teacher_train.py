"""Few2Many stage 1 on the shared real data: DIN on MovieLens-100K CTR, SASRec on LLaRA LastFM.
They must beat the popularity and random baselines on validation (one epoch), and the longer runs check
the benchmark targets. All are marked slow: real data on 2 shared cores takes minutes."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
from conftest import shared_path

from recdata.metrics import auc, hit_rate_at_k, ndcg_at_k
from teacher import refdata
from teacher.baselines import popularity_candidates, popularity_ctr
from teacher.config import TeacherConfig
from teacher.data import list_shards, read_shard
from teacher.train import train_teacher

pytestmark = pytest.mark.shared


def _split(samples: str, split: str, columns=None) -> pa.Table:
    return pa.concat_tables([read_shard(u, columns=columns) for u in list_shards(samples, split)])


def _ctr_pop_auc(samples: str, split: str) -> float:
    tr, ev = _split(samples, "train"), _split(samples, split)
    p = popularity_ctr(tr["item_id"].to_numpy(), tr["label"].to_numpy(), ev["item_id"].to_numpy())
    return auc(ev["label"].to_numpy(), p)


def _next_pop(samples: str, split: str) -> tuple[float, float]:
    tr, ev = _split(samples, "train"), _split(samples, split)
    cands = np.array(ev["candidates"].to_pylist())
    target = (cands == ev["item_id"].to_numpy()[:, None]).argmax(1)
    s = popularity_candidates(tr["item_id"].to_numpy(), cands)
    return hit_rate_at_k(s, target, 1), ndcg_at_k(s, target, 10)


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    src = shared_path("data", "movielens-100k")
    root = tmp_path_factory.mktemp("ml100k")
    refdata.build_movielens100k_ctr(src, str(root / "ds"), str(root / "samples"))
    return str(root / "samples")


@pytest.fixture(scope="module")
def lastfm(tmp_path_factory):
    src = shared_path("data", "llara-lastfm")
    root = tmp_path_factory.mktemp("lastfm")
    refdata.build_llara_samples(src, str(root / "samples"))
    return str(root / "samples")


@pytest.mark.slow  # ~20 s alone, over a minute on a shared 2-core machine
def test_din_beats_popularity_on_ml100k(ml100k, tmp_path):
    cfg = TeacherConfig.defaults("din", epochs=1, num_threads=2)
    res = train_teacher(ml100k, str(tmp_path / "din"), cfg, progress=False, evaluate_test=False)
    pop = _ctr_pop_auc(ml100k, "valid")
    assert res["valid"]["auc"] > pop + 0.01, (res["valid"], pop)
    assert res["unknown"]["train"]["unknown_users"] == 0  # vocabularies come from the training split


@pytest.mark.slow
def test_sasrec_beats_popularity_and_random_on_lastfm(lastfm, tmp_path):
    cfg = TeacherConfig.defaults("sasrec", epochs=1, num_threads=2)
    res = train_teacher(lastfm, str(tmp_path / "sasrec"), cfg, progress=False, evaluate_test=False)
    pop_hr1, pop_ndcg = _next_pop(lastfm, "valid")
    assert res["valid"]["hr@1"] > max(0.05, pop_hr1), (res["valid"], pop_hr1)  # random HR@1 is 1/20
    assert res["valid"]["ndcg@10"] > pop_ndcg + 0.05, (res["valid"], pop_ndcg)


# The full-length runs repeat bench/teacher.py's quality figures (several minutes each on 2 cores): they run
# only when asked for, e.g. `RECLORA_LONG_TESTS=1 pytest tests/test_teacher_train.py`.
long_test = pytest.mark.skipif(
    os.environ.get("RECLORA_LONG_TESTS") != "1",
    reason="full-length teacher training; set RECLORA_LONG_TESTS=1 (bench/teacher.py measures it)",
)


@pytest.mark.slow
@long_test
def test_din_full_ml100k_reaches_target(ml100k, tmp_path):
    cfg = TeacherConfig.defaults("din", epochs=6, num_threads=2)
    res = train_teacher(ml100k, str(tmp_path / "din"), cfg, progress=False)
    assert res["test"]["auc"] > _ctr_pop_auc(ml100k, "test") + 0.02, res["test"]
    assert res["test"]["auc"] >= 0.745, res["test"]


@pytest.mark.slow
@long_test
def test_sasrec_full_lastfm(lastfm, tmp_path):
    cfg = TeacherConfig.defaults("sasrec", num_threads=2, epochs=6)
    res = train_teacher(lastfm, str(tmp_path / "sasrec"), cfg, progress=False)
    assert res["test"]["hr@1"] > 0.15, res["test"]
