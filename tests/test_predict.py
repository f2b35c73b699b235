"""Batch prediction (trainer/predict.py) and request records (retrieval/requests.py), on real parts.

Fast: records rebuilt for (user, item, time) requests equal the records retrieval.build wrote (SUBR and
SIM with item embeddings, heavy timestamp ties, several row groups per shard; next-item candidates),
and the reasons for requests that cannot have a record.

Slow: a tiny run trained end to end by trainer/main.py (subprocess), then `trainer.predict` on real Ray
actors: p(yes) of known test samples equals the trained run's own evaluation forward on its test stream,
bad requests keep their row with a reason, a rerun skips committed parts, a missing column exits 2.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.pool import run_sharded
from recdata import storage
from recdata.layout import paths
from recdata.samples import BuildOptions, SampleSet
from recdata.schema import Dataset, write_parquet
from recdata.streams import StreamReader, collate
from recdata.synthetic import preference_dataset
from retrieval.build import build_samples
from retrieval.encoding import PromptEncoder, answer_token_ids
from retrieval.history import load_item_vectors
from retrieval.requests import RequestRetriever
from teacher.features import Encoder
from teacher.model_io import load_teacher, to_tensors
from tests.conftest import REPO
from tests.test_retrieval_build import synthetic_interactions, write_dataset
from trainer.hybrid import CANDIDATE_TOKEN, HISTORY_TOKEN, TEXT_FALLBACK, HybridLM
from trainer.lora import load_personalized
from trainer.objective import answer_loss, candidate_scores, p_yes_from_logits
from trainer.predict import (
    MANIFEST,
    PredictInputError,
    load_run_config,
    plan_tasks,
    predict,
    read_predictions,
    read_requests,
    summary_line,
)

HIST_FIELDS = (
    "hist_len",
    "text_hist_items",
    "text_hist_ratings",
    "id_hist_items",
    "id_hist_ratings",
    "id_hist_timestamps",
)


def _embeddings(url: str, n_items: int, dim: int = 16, seed: int = 3) -> str:
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(n_items, dim)).astype(np.float32)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), dim).cast(pa.list_(pa.float32()))
    write_parquet(
        pa.table({"item_id": pa.array(np.arange(n_items) + 1, pa.int64()), "embedding": emb}),
        storage.join(url, "embeddings.parquet"),
    )
    return url


def _records_for(retriever: RequestRetriever, users, items, times, cands=None):
    """Records of requests in any order: grouped by shard, returned per request (None where a reason)."""
    users = np.asarray(users, dtype=np.int64)
    shard = retriever.shard_of(users)
    out, reasons = [None] * len(users), [None] * len(users)
    for s in np.unique(shard):
        idx = np.flatnonzero(shard == s)
        rec = retriever.records(
            int(s),
            users[idx],
            [items[i] for i in idx],
            [times[i] for i in idx],
            None if cands is None else [cands[i] for i in idx],
        )
        for i, r in zip(idx, rec.reasons):
            reasons[i] = r
        for k, row in zip(rec.rows, rec.table.to_pylist()):
            out[idx[k]] = row
    return out, reasons


@pytest.fixture(scope="module")
def ctr_built(tmp_path_factory):
    root = tmp_path_factory.mktemp("requests-ctr")
    df = synthetic_interactions(seed=1).drop_duplicates(["user_id", "item_id", "timestamp"])
    ds, sm = str(root / "ds"), str(root / "samples")
    write_dataset(ds, df)
    emb = _embeddings(str(root / "emb"), 80)
    opts = BuildOptions(k_text=4, k_id=6, text_mode="subr", id_mode="sim", subr_pool=9, sim_pool=12, seed=5)
    build_samples(ds, sm, opts, num_workers=1, embeddings_url=emb)
    return {"dataset": ds, "samples": sm, "emb": emb, "opts": opts, "df": df}


def test_request_records_equal_built_samples_subr_sim(ctr_built):
    """Every built sample, asked for as a request, gets the same key, histories and label."""
    b = ctr_built
    retriever = RequestRetriever(b["dataset"], b["opts"], load_item_vectors(b["emb"], normalize=True))
    samples = SampleSet.open(b["samples"])
    want = pa.concat_tables([samples.read(s) for s in ("train", "valid", "test")]).to_pylist()
    assert len(want) > 300 and any(r["hist_len"] == 0 for r in want) and any(r["hist_len"] > 20 for r in want)
    got, reasons = _records_for(
        retriever, [r["user_id"] for r in want], [r["item_id"] for r in want], [r["timestamp"] for r in want]
    )
    assert reasons == [None] * len(want)
    for w, g in zip(want, got):
        assert g["sample_id"] == w["sample_id"] and g["label"] == w["label"] and g["rating"] == w["rating"]
        for f in HIST_FIELDS:
            assert g[f] == w[f], (f, w["sample_id"], g[f], w[f])


def test_request_without_time_uses_all_history_and_reasons(ctr_built):
    b = ctr_built
    df = b["df"]
    user = int(df.user_id.value_counts().idxmax())
    n_user = int((df.user_id == user).sum())
    first_ts = int(df[df.user_id == user].timestamp.min())
    opts = BuildOptions(**{**b["opts"].__dict__, "min_history": 2})
    retriever = RequestRetriever(b["dataset"], opts, load_item_vectors(b["emb"], normalize=True))
    users = [user, user, 777_777, user, user]
    items = [3, 3, 3, 999, 5]
    times = [None, 10**9, 5, 5, first_ts]
    got, reasons = _records_for(retriever, users, items, times)
    assert reasons == [None, None, "unknown_user", "unknown_item", "no_history"]
    assert got[0]["hist_len"] == n_user and got[1]["hist_len"] == n_user  # no time = every interaction
    assert got[0]["timestamp"] is None and got[0]["sample_id"] < 0 and got[0]["label"] is None
    assert got[0]["text_hist_items"] == got[1]["text_hist_items"]
    assert got[0]["sample_id"] != got[1]["sample_id"]  # the key hashes the (absent) time too
    again, _ = _records_for(retriever, users[:1], items[:1], times[:1])
    assert again[0]["sample_id"] == got[0]["sample_id"]  # deterministic


def test_next_item_candidates_equal_built_and_user_lists(tmp_path):
    df = synthetic_interactions(seed=2, n_items=80).drop_duplicates(["user_id", "item_id", "timestamp"])
    df["label"] = 0
    ds, sm = str(tmp_path / "ds"), str(tmp_path / "samples")
    write_dataset(ds, df, task="next_item")
    opts = BuildOptions(k_text=3, k_id=5, text_mode="recent", num_candidates=6, seed=9)
    build_samples(ds, sm, opts, num_workers=1)
    want = pa.concat_tables([SampleSet.open(sm).read(s) for s in ("valid", "test")]).to_pylist()
    retriever = RequestRetriever(ds, opts)
    got, reasons = _records_for(
        retriever, [r["user_id"] for r in want], [r["item_id"] for r in want], [r["timestamp"] for r in want]
    )
    assert reasons == [None] * len(want)
    for w, g in zip(want, got):
        assert g["candidates"] == w["candidates"] and g["text_hist_items"] == w["text_hist_items"], w["sample_id"]
    u, i = want[0]["user_id"], want[0]["item_id"]
    lists = [[i, 5, 6], [5, 6], [i, i, 5], [i, 10_000], None]
    got, reasons = _records_for(retriever, [u] * 5, [i] * 5, [None] * 5, lists)
    assert reasons == [None, "item_not_in_candidates", "malformed_candidates", "unknown_candidate", None]
    assert got[0]["candidates"] == [i, 5, 6]
    assert len(got[4]["candidates"]) == 6 and i in got[4]["candidates"]


def test_read_requests_row_reasons_and_file_errors(tmp_path):
    """Unusable values give their row a reason; an unusable file or column is an error naming it."""
    import datetime

    f = tmp_path / "r.parquet"
    when = datetime.datetime(2001, 9, 9, 1, 46, 40)  # epoch second 1_000_000_000
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array(["7", "x", None, "8", "9", "10"], pa.string()),
                "item_id": pa.array([1.0, 2.0, 3.0, float("nan"), None, 2.5]),
                "timestamp": pa.array([when, None, when, when, when, when], pa.timestamp("s")),
                "candidates": pa.array([[1, 2], None, None, None, None, [1, None]], pa.list_(pa.int64())),
            }
        ),
        f,
    )
    req, digest = read_requests(str(f), "next_item")
    assert req["reason"] == [
        None,
        "malformed_user_id",
        "missing_user_id",
        "malformed_item_id",
        "missing_item_id",
        "malformed_item_id",
    ]
    assert req["user_id"][0] == 7 and req["item_id"][0] == 1 and req["timestamp"][0] == 1_000_000_000
    assert req["has_time"].tolist() == [True, False, True, True, True, True] and req["candidates"][0] == [1, 2]
    assert read_requests(str(f), "next_item")[1] == digest  # content digest: deterministic
    tasks = plan_tasks(req, num_shards=3, rows_per_task=4)
    assert sorted(j for t in tasks for j in t["rows"]["request_index"]) == list(range(6))  # every row in one task
    assert all(len(t["rows"]["request_index"]) <= 4 for t in tasks)

    pq.write_table(
        pa.table(
            {
                "user_id": pa.array([1]),
                "item_id": pa.array([2]),
                "candidates": pa.array([[1.5]], pa.list_(pa.float64())),
            }
        ),
        f,
    )
    assert read_requests(str(f), "next_item")[0]["reason"] == ["malformed_candidates"]
    pq.write_table(pa.table({"user_id": pa.array([1]), "item": pa.array([2])}), f)
    with pytest.raises(PredictInputError, match=r"r\.parquet: missing required column 'item_id'"):
        read_requests(str(f), "ctr")
    pq.write_table(pa.table({"user_id": pa.array([[1]]), "item_id": pa.array([2])}), f)
    with pytest.raises(PredictInputError, match=r"r\.parquet: column 'user_id' has type list<.*>; expected integers"):
        read_requests(str(f), "ctr")
    with pytest.raises(PredictInputError, match="requests file not found"):
        read_requests(str(tmp_path / "nope.parquet"), "ctr")


# ------------------------------------------------------------------------------------------- end to end
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.predict", *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _eval_p_yes(run: str) -> dict[int, float]:
    """p(yes) of the run's test stream rows computed as trainer.loop.evaluate does, with the exported adapter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(f"{run}/base_model")
    ids = answer_token_ids(tok, "ctr")
    pm = load_personalized(
        AutoModelForCausalLM.from_pretrained(f"{run}/base_model", dtype=torch.float32), f"{run}/adapter"
    )
    reader = StreamReader(storage.join(run, "data", "test"))
    out = {}
    with torch.no_grad():
        for s in range(0, reader.rows, 8):
            rows = reader.rows_at(np.arange(s, min(s + 8, reader.rows)))
            batch = collate(rows, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
            _, _, logits = answer_loss(pm, batch)
            p = p_yes_from_logits(logits, batch["answer_len"], ids["Yes"], ids["No"])
            out.update({int(r["sample_id"]): float(v) for r, v in zip(rows, p)})
    reader.close()
    return out


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_predict_ctr_end_to_end(ctr_run, ray_local, tmp_path):

    run = ctr_run["run"]
    p = paths(load_run_config(run))
    reference = _eval_p_yes(run)
    known = list(reference)[:12]
    samples = SampleSet.open(p.samples)
    test = samples.read("test", sample_ids=np.asarray(known, dtype=np.int64))
    # Unknown user; unknown item; a known user asked about a time before any of their interactions.
    first = int(test["timestamp"].to_numpy().min()) - 10**7
    users = test["user_id"].to_pylist() + [424_242, test["user_id"][0].as_py(), test["user_id"][1].as_py()]
    items = test["item_id"].to_pylist() + [test["item_id"][0].as_py(), 987_654, test["item_id"][1].as_py()]
    times = test["timestamp"].to_pylist() + [first, first + 10**7, first]
    req = tmp_path / "requests.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array(users, pa.int64()),
                "item_id": pa.array(items, pa.int64()),
                "timestamp": pa.array(times, pa.int64()),
            }
        ),
        req,
    )
    out = str(tmp_path / "pred")

    m = predict(run, str(req), out, num_workers=2, batch_size=4, rows_per_task=5, runner=run_sharded)
    print(summary_line(m))
    assert m["rows"] == len(users) and len(m["parts"]) >= 3 and m["parts_skipped"] == 0
    t = read_predictions(out).to_pylist()
    assert len(t) == len(users) and [r["request_index"] for r in t] == list(range(len(users)))
    n = len(known)
    assert [r["reason"] for r in t[n:]] == ["unknown_user", "unknown_item", "no_history"]
    assert all(r["p_yes"] is None and r["teacher_score"] is None for r in t[n:])
    # Known test samples: same sample key, and p(yes) equal to the trained run's evaluation forward.
    reps = _teacher_scores(p.teacher, samples, known)
    for r, sid in zip(t[:n], known):
        assert r["reason"] is None and r["sample_id"] == sid
        assert 0.0 < r["p_yes"] < 1.0 and np.isfinite(r["p_yes"])
        assert abs(r["p_yes"] - reference[sid]) < 1e-5, (sid, r["p_yes"], reference[sid])
        assert abs(r["teacher_score"] - reps[sid]) < 1e-5
        assert r["label"] in (0, 1) and r["hist_len"] >= 0
    assert len({round(r["p_yes"], 6) for r in t[:n]}) > 1  # personalized: not one constant

    # Rerun: every part is committed, nothing is recomputed or rewritten.
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out) if f.startswith("part-")}
    m2 = predict(run, str(req), out, num_workers=2, batch_size=4, rows_per_task=5, runner=run_sharded)
    assert m2["parts_skipped"] == len(m["parts"]) and m2["parts_built"] == 0
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in before} == before
    assert pq.read_table(out).num_rows == len(users)  # the folder reads as one dataset (_ names skipped)
    assert storage.exists(storage.join(out, MANIFEST))
    # A part whose commit marker is gone (killed before the commit) is redone, alone, to the same rows.
    committed = read_predictions(out)
    os.remove(os.path.join(out, "_commits", "part-00001.json"))
    m3 = predict(run, str(req), out, num_workers=0, batch_size=4, rows_per_task=5)
    assert (m3["parts_built"], m3["parts_skipped"]) == (1, len(m["parts"]) - 1)
    again = read_predictions(out)
    assert again.drop(["p_yes"]).equals(committed.drop(["p_yes"]))
    assert np.allclose(
        again["p_yes"].to_numpy(zero_copy_only=False).astype(float),
        committed["p_yes"].to_numpy(zero_copy_only=False).astype(float),
        atol=1e-6,
        equal_nan=True,
    )


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_requests_in_source_keys(ctr_run, tmp_path):
    run = ctr_run["run"]
    p = paths(load_run_config(run))
    ds = Dataset.open(p.dataset)
    umap = dict(zip(ds.id_map("user_id")["user_id"].to_pylist(), ds.id_map("user_id")["key"].to_pylist()))
    imap = dict(zip(ds.id_map("item_id")["item_id"].to_pylist(), ds.id_map("item_id")["key"].to_pylist()))
    assert set(umap.values()) == ctr_run["users"] and set(imap.values()) == ctr_run["items"]
    test = SampleSet.open(p.samples).read("test").slice(0, 6)
    ids = test.select(["user_id", "item_id", "timestamp"])
    keys = pa.table(
        {
            "user_id": [umap[u] for u in test["user_id"].to_pylist()] + ["ANOSUCHUSER", umap[1]],
            "item_id": [imap[i] for i in test["item_id"].to_pylist()] + [imap[1], "B0NOSUCHITEM"],
            "timestamp": test["timestamp"].to_pylist() + [10**9, 10**9],
        }
    )
    pq.write_table(keys, tmp_path / "keys.parquet")
    pq.write_table(ids, tmp_path / "ids.parquet")
    m = predict(run, str(tmp_path / "keys.parquet"), str(tmp_path / "k"))
    assert m["reasons"] == {"unknown_item_key": 1, "unknown_user_key": 1}
    by_key = read_predictions(str(tmp_path / "k")).to_pylist()
    # Requests in the source's keys equal the same requests in integer ids (string keys come back beside them).
    predict(run, str(tmp_path / "ids.parquet"), str(tmp_path / "i"))
    by_id = read_predictions(str(tmp_path / "i")).to_pylist()
    for a, b in zip(by_key[:6], by_id):
        assert a["reason"] is None and a["user_id"] == b["user_id"] and a["item_id"] == b["item_id"]
        assert a["user_key"] == umap[a["user_id"]] and a["item_key"] == imap[a["item_id"]]
        assert abs(a["p_yes"] - b["p_yes"]) < 1e-6
    assert [r["reason"] for r in by_key[6:]] == ["unknown_user_key", "unknown_item_key"]
    assert np.isfinite([r["p_yes"] for r in by_key[:6]]).all()


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_return_cond_user_level_adapters_and_gap(ctr_run, tmp_path, capsys):
    """predict --return-cond gives each request's gate input (the test stream's rep for known samples); per-user
    adapters for users given by their source keys are stock PEFT folders equal to the gated model at the user-level
    vector; the per-request vs user-level test AUC gap is measured (recorded in docs/adapter.md)."""
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer import export as export_mod

    run = ctr_run["run"]
    p = paths(load_run_config(run))
    reader = StreamReader(storage.join(run, "data", "test"))
    rows = reader.rows_at(np.arange(4))
    reader.close()
    sids = np.asarray([r["sample_id"] for r in rows], dtype=np.int64)
    test = SampleSet.open(p.samples).read("test", sample_ids=sids)
    pq.write_table(test.select(["user_id", "item_id", "timestamp"]), tmp_path / "req.parquet")
    args = ("--run", run, "--requests", str(tmp_path / "req.parquet"), "--num-workers", "0")
    r = _cli(*args, "--out", str(tmp_path / "c"), "--return-cond")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "cond" in storage.read_json(str(tmp_path / "c" / MANIFEST))["columns"]
    got = read_predictions(str(tmp_path / "c")).to_pylist()
    for row, want in zip(got, rows):
        assert row["sample_id"] == want["sample_id"]
        assert np.allclose(row["cond"], want["rep"], atol=1e-5)

    ds = Dataset.open(p.dataset)
    umap = dict(zip(ds.id_map("user_id")["user_id"].to_pylist(), ds.id_map("user_id")["key"].to_pylist()))
    users = sorted(set(test["user_id"].to_pylist()))[:2]
    out = tmp_path / "users"
    rc = export_mod.main(
        ["--run", run, "--users", ",".join(umap[u] for u in users), "--out", str(out), "--recent", "5"]
    )
    assert rc == 0, capsys.readouterr().err
    index = pq.read_table(out / export_mod.USERS_INDEX).to_pylist()
    assert {i["user_key"] for i in index} == {umap[u] for u in users} and all(1 <= i["targets"] <= 5 for i in index)
    first = index[0]
    folder = out / first["path"]
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == storage.join(run, "base_model")
    assert "mean over the user's recent targets" in (folder / "README.md").read_text()
    base = f"{run}/base_model"
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), folder).eval()
    gated = load_personalized(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), f"{run}/adapter")
    ids = torch.as_tensor([rows[0]["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = gated(ids, mask, torch.as_tensor([first["cond"]])).logits
        assert (stock(input_ids=ids, attention_mask=mask).logits - want).abs().max() < 1e-4

    gap = export_mod.user_level_gap(run, recent=5)
    print("per-request vs user-level:", json.dumps(gap))
    assert gap["covered_samples"] > 0 and gap["users_with_vector"] > 0
    for key in ("auc_per_request_all", "auc_per_request", "auc_user_level"):
        assert 0.0 <= gap[key] <= 1.0


def _teacher_scores(teacher_url: str, samples: SampleSet, ids: list[int]) -> dict[int, float]:
    """The frozen teacher's score of the stored sample records (the score stage's computation)."""
    from collections import Counter

    import torch

    teacher = load_teacher(teacher_url)
    table = samples.read("test", sample_ids=np.asarray(ids, dtype=np.int64))
    enc = Encoder(teacher.space, teacher.cfg.max_hist, teacher.cfg.task).encode(table, Counter())
    with torch.inference_mode():
        b = to_tensors(enc, torch.device("cpu"))
        score = teacher.model.predict(b, teacher.model(b))["teacher_score"].float().numpy()
    return {int(s): float(v) for s, v in zip(ids, score)}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_predict_cli_missing_column_exits_2(ctr_run, tmp_path):
    req = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"user_id": pa.array([1, 2], pa.int64()), "timestamp": pa.array([5, 6], pa.int64())}), req)
    r = _cli("--run", ctr_run["run"], "--requests", str(req), "--out", str(tmp_path / "o"), "--num-workers", "0")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "item_id" in r.stderr and str(req) in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def next_item_run(tmp_path_factory):
    """A tiny next-item run: SASRec teacher, iLoRA adapter, LLaRA hybrid item tokens."""

    root = tmp_path_factory.mktemp("predict-next")
    src = preference_dataset(root)
    out = root / "runs"
    cmd = [
        sys.executable,
        "trainer/main.py",
        "--config",
        "configs/tiny.yaml",
        f"run.output_dir={out}",
        "run.name=n",
        "data.format=generic",
        f"data.src={src / 'inter.csv'}",
        f"data.items={src / 'items.csv'}",
        "data.task=next_item",
        "data.dataset_url=datasets/syn-next",
        "teacher.model=sasrec",
        "teacher.embed_dim=16",
        "teacher.rep_dim=16",
        "trainer.lora.mode=ilora",
        "trainer.lora.target_modules=[q_proj,v_proj]",
        "trainer.lora.r=8",
        "trainer.lora.num_experts=4",
        "trainer.lora.alpha=32",
        "trainer.hybrid_item_emb=true",
        "model.max_length=448",
        "trainer.num_workers=1",
        "trainer.micro_batch_size=8",
        "trainer.max_steps=4",
        "trainer.lr=0.02",
        "trainer.feed_workers=0",
        "retrieval.max_eval_samples=16",
        "retrieval.num_workers=1",
        "teacher.num_workers=1",
    ]
    job = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    return {"root": root, "run": str(out / "n")}


def _eval_candidate_scores(run: str, max_length: int) -> dict[int, tuple[list[int], np.ndarray]]:
    """Candidate scores of the run's test stream rows as trainer.loop.evaluate computes them (hybrid model)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(f"{run}/base_model")
    tok.add_special_tokens({"additional_special_tokens": [HISTORY_TOKEN, CANDIDATE_TOKEN]})
    enc = PromptEncoder(tok, max_length)
    items = Dataset.open(paths(load_run_config(run)).dataset).read_items()
    answers = {i: enc.answer_ids(t) for i, t in zip(items["item_id"].to_pylist(), items["title"].to_pylist())}
    pm = load_personalized(
        AutoModelForCausalLM.from_pretrained(f"{run}/base_model", dtype=torch.float32), f"{run}/adapter"
    )
    table = load_file(f"{run}/data/item_emb.safetensors")
    model = HybridLM(
        pm,
        table["item_ids"].numpy(),
        table["emb"],
        tok.convert_tokens_to_ids([HISTORY_TOKEN, CANDIDATE_TOKEN]),
        tok(TEXT_FALLBACK, add_special_tokens=False)["input_ids"][0],
    )
    model.projector.load_state_dict(load_file(f"{run}/adapter/projector.safetensors"))
    model.eval()
    reader = StreamReader(storage.join(run, "data", "test"))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = {}
    for r in reader.rows_at(np.arange(reader.rows)):
        cond = collate([r], pad)["cond"]
        sc = candidate_scores(model, [r], pad, lambda c: answers[c], cond, "cpu")[0].numpy()
        out[int(r["sample_id"])] = (list(r["candidates"]), sc)
    reader.close()
    return out


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_predict_next_item_hybrid_cli(next_item_run, tmp_path):

    run = next_item_run["run"]
    cfg = load_run_config(run)
    reference = _eval_candidate_scores(run, cfg.model.max_length)
    known = list(reference)[:5]
    test = SampleSet.open(paths(cfg).samples).read("test", sample_ids=np.asarray(known, dtype=np.int64))
    u0, i0 = test["user_id"][0].as_py(), test["item_id"][0].as_py()
    others = [c for c in reference[known[0]][0] if c != i0][:2]
    users = test["user_id"].to_pylist() + [u0, 31_337, u0]
    items = test["item_id"].to_pylist() + [i0, i0, i0]
    times = test["timestamp"].to_pylist() + [None, None, None]
    cands = [None] * len(known) + [[others[0], i0, others[1]], None, others]
    req = tmp_path / "requests.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array(users, pa.int64()),
                "item_id": pa.array(items, pa.int64()),
                "timestamp": pa.array(times, pa.int64()),
                "candidates": pa.array(cands, pa.list_(pa.int64())),
            }
        ),
        req,
    )
    out = str(tmp_path / "pred")
    r = _cli("--run", run, "--requests", str(req), "--out", out, "--num-workers", "0", "--batch-size", "2")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "3 with a reason" not in r.stdout and "predicted" in r.stdout, r.stdout
    t = read_predictions(out).to_pylist()
    assert len(t) == len(users)
    n = len(known)
    for row, sid in zip(t[:n], known):
        want_c, want_s = reference[sid]
        assert row["reason"] is None and row["sample_id"] == sid
        assert row["candidates"] == want_c  # the persisted list, resampled from the request's key
        assert np.abs(np.asarray(row["scores"]) - want_s).max() < 1e-5, (sid, row["scores"], want_s)
        assert row["ranking"] == [
            want_c[k] for k in np.argsort(-np.asarray(row["scores"], dtype=np.float64), kind="stable")
        ]
        assert row["predicted_item"] == row["ranking"][0] and row["ranking"][row["target_rank"] - 1] == row["item_id"]
        assert (
            len(row["teacher_candidate_scores"]) == len(want_c) and np.isfinite(row["teacher_candidate_scores"]).all()
        )
    given = t[n]
    assert given["reason"] is None and given["candidates"] == [others[0], i0, others[1]] and len(given["scores"]) == 3
    assert given["hist_len"] > 0 and given["timestamp"] is None
    assert [x["reason"] for x in t[n + 1 :]] == ["unknown_user", "item_not_in_candidates"]
    assert all(x["scores"] is None and x["ranking"] is None for x in t[n + 1 :])
