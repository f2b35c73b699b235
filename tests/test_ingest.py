"""Ingestion of real datasets into the canonical sharded Parquet layout, locally and on S3."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from configs.schema import ColumnsConfig
from recdata import storage
from recdata.fetch import FetchError, resolve_source
from recdata.ingest import IngestOptions, ingest, summary
from recdata.schema import INTERACTIONS, Dataset, DatasetError, user_bucket
from recdata.textfiles import IngestError
from tests.conftest import shared_path

QUIET = dict(progress=False)


def _frame(ds: Dataset) -> pd.DataFrame:
    df = ds.read_interactions().to_pandas()
    df["split"] = df["split"].astype(str)
    return df


def test_movielens_100k_counts_layout_and_ctr_split(tmp_path):
    src = shared_path("data", "movielens-100k")
    out = str(tmp_path / "ml100k")
    m = ingest("movielens", str(src), out, IngestOptions(task="ctr", num_shards=4, **QUIET))
    assert (m["num_interactions"], m["num_users"], m["num_items"]) == (100_000, 943, 1_682)
    ds = Dataset.open(out)
    assert len(ds.shards) == 4
    df = _frame(ds)
    assert len(df) == 100_000
    # Every shard: canonical schema, sorted by (user, timestamp, item), users hashed to their bucket.
    for i in range(4):
        t = ds.read_shard(i)
        assert t.schema.equals(INTERACTIONS)
        s = t.to_pandas()
        assert s.equals(s.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(drop=True))
        assert (user_bucket(s["user_id"].to_numpy(), 4) == i).all()
    # ReLLa/RecLoRA split: global time order 8:1:1, exact even under timestamp ties.
    assert df["split"].value_counts().to_dict() == {"train": 80_000, "valid": 10_000, "test": 10_000}
    order = df.sort_values(["timestamp", "user_id", "item_id"]).reset_index(drop=True)
    assert (order["split"].iloc[:80_000] == "train").all()
    assert (order["split"].iloc[80_000:90_000] == "valid").all()
    assert (order["split"].iloc[90_000:] == "test").all()
    assert (df["label"] == (df["rating"] >= 4).astype("int8")).all()
    # Against the raw file, read independently with pandas.
    raw = pd.read_csv(src / "u.data", sep="\t", names=["user_id", "item_id", "rating", "timestamp"])
    merged = raw.sort_values(["user_id", "timestamp", "item_id"]).reset_index(drop=True)
    mine = df.sort_values(["user_id", "timestamp", "item_id"]).reset_index(drop=True)
    assert (
        merged[["user_id", "item_id", "timestamp"]].to_numpy() == mine[["user_id", "item_id", "timestamp"]].to_numpy()
    ).all()
    items = ds.read_items().to_pandas()
    assert items.loc[items.item_id == 1, "title"].item() == "Toy Story (1995)"
    assert "Comedy" in items.loc[items.item_id == 1, "genres"].item()
    users = ds.read_users().to_pandas()
    assert len(users) == 943 and set(users.columns) >= {"user_id", "age", "gender", "occupation"}
    assert "positives" in m["splits"]["train"]
    text = summary(m)
    assert "100,000" in text and "train" in text


def test_llara_lastfm_rows_per_split(tmp_path):
    src = shared_path("data", "llara-lastfm")
    out = str(tmp_path / "lastfm")
    m = ingest("llara", str(src), out, IngestOptions(task="next_item", num_shards=4, **QUIET))
    assert {k: v["rows"] for k, v in m["splits"].items() if k != "context"} == {
        "train": 50_800,
        "valid": 122,
        "test": 122,
    }
    assert m["num_items"] <= 4606 and m["notes"]["pad_id"] == 4606
    df = _frame(Dataset.open(out))
    # Each pseudo-user (one LLaRA row) has exactly one target, at its last position; the rest is context.
    targets = df[df.split != "context"]
    assert targets.groupby("user_id").size().max() == 1
    last = df.sort_values(["user_id", "timestamp"]).groupby("user_id").tail(1)
    assert (last["split"] != "context").all()
    assert df["label"].isna().all()
    # Compare one row with the JSONL source.
    first = json.loads((src / "test_data.jsonl").read_text().splitlines()[0])
    uid = targets[targets.split == "test"]["user_id"].min()
    rows = df[df.user_id == uid].sort_values("timestamp")
    assert rows["item_id"].tolist() == [s for s in first["seq"][: first["len_seq"]] if s != 4606] + [first["next"]]


def test_leave_last_out_and_kcore(tmp_path):
    src = shared_path("data", "movielens-100k")
    out = str(tmp_path / "ml-next")
    m = ingest("movielens", str(src), out, IngestOptions(task="next_item", kcore=20, num_shards=3, **QUIET))
    df = _frame(Dataset.open(out))
    assert m["skipped"]["kcore_removed"] > 0
    assert df.groupby("user_id").size().min() >= 20 and df.groupby("item_id").size().min() >= 20
    df = df.sort_values(["user_id", "timestamp", "item_id"])
    last = df.groupby("user_id").tail(1)
    assert (last["split"] == "test").all()
    second = df.groupby("user_id").nth(-2)
    assert (second["split"] == "valid").all()
    assert (df["split"].value_counts()["test"]) == df.user_id.nunique()


def test_deterministic_rerun_and_overwrite(tmp_path):
    src = str(shared_path("data", "movielens-100k"))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ingest("movielens", src, a, IngestOptions(num_shards=2, **QUIET))
    ingest("movielens", src, b, IngestOptions(num_shards=2, **QUIET))
    for i in range(2):
        assert Dataset.open(a).read_shard(i).equals(Dataset.open(b).read_shard(i))

    with pytest.raises(IngestError, match="already exists"):
        ingest("movielens", src, a, IngestOptions(num_shards=2, **QUIET))
    m = ingest("movielens", src, a, IngestOptions(num_shards=3, overwrite=True, **QUIET))
    assert len(Dataset.open(a).shards) == 3 and m["num_interactions"] == 100_000
    assert not [p for p in os.listdir(tmp_path) if "staging" in p]


def test_recbole_wheel_matches_grouplens_files(tmp_path):
    """The demo's data path: MovieLens-100K from the recbole wheel (pip download) equals the GroupLens files."""
    shared = shared_path("data", "movielens-100k")

    try:
        src = resolve_source("pypi:recbole==1.2.1/ml-100k")
    except FetchError as e:  # no registry reachable: say so instead of failing on a network problem
        pytest.skip(f"cannot fetch recbole wheel: {e}")
    a = _frame(Dataset.open(_ing(tmp_path / "rb", "recbole", src)))
    b = _frame(Dataset.open(_ing(tmp_path / "gl", "movielens", str(shared))))
    key = ["user_id", "timestamp", "item_id"]
    a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
    assert a[key + ["rating", "split", "label"]].equals(b[key + ["rating", "split", "label"]])


def _ing(path, fmt, src) -> str:
    ingest(fmt, str(src), str(path), IngestOptions(num_shards=2, **QUIET))
    return str(path)


def test_generic_csv_and_parquet(tmp_path):
    rng = np.random.default_rng(0)
    n = 5000
    inter = pd.DataFrame(
        {
            "uid": rng.integers(0, 200, n),
            "iid": rng.integers(0, 300, n),
            "ts": rng.integers(0, 10**6, n),
            "stars": rng.integers(1, 6, n).astype(float),
        }
    )
    items = pd.DataFrame({"item": np.arange(300), "name": [f"Item {i}" for i in range(300)], "author": "someone"})
    inter.to_csv(tmp_path / "inter.csv", index=False)
    items.to_csv(tmp_path / "items.csv", index=False)
    inter.to_parquet(tmp_path / "inter.parquet")

    cols = ColumnsConfig(user="uid", item="iid", timestamp="ts", rating="stars", item_id="item", title="name")
    m1 = ingest(
        "generic",
        str(tmp_path / "inter.csv"),
        str(tmp_path / "o1"),
        IngestOptions(**QUIET),
        items=str(tmp_path / "items.csv"),
        columns=cols,
    )
    m2 = ingest(
        "generic",
        str(tmp_path / "inter.parquet"),
        str(tmp_path / "o2"),
        IngestOptions(**QUIET),
        items=str(tmp_path / "items.csv"),
        columns=cols,
    )
    dup = int(inter.duplicated(["uid", "iid", "ts"]).sum())
    assert m1["num_interactions"] == m2["num_interactions"] == n - dup
    assert m1["skipped"]["duplicates"] == dup
    d1, d2 = _frame(Dataset.open(str(tmp_path / "o1"))), _frame(Dataset.open(str(tmp_path / "o2")))
    assert d1.equals(d2)
    assert "author" in Dataset.open(str(tmp_path / "o1")).read_items().column_names


# ------------------------------------------------------------------------------------------ S3 (moto)
def test_ingest_to_s3_matches_local(tmp_path, s3_bucket, s3_server):
    src = str(shared_path("data", "movielens-100k"))
    local = str(tmp_path / "local")
    remote = f"{s3_bucket}/datasets/ml100k"
    ingest("movielens", src, local, IngestOptions(num_shards=2, **QUIET))
    m = ingest("movielens", src, remote, IngestOptions(num_shards=2, **QUIET))
    assert m["num_interactions"] == 100_000
    # Read back with pyarrow's own S3 client (not fsspec) to show the objects are plain Parquet on S3.
    s3 = pafs.S3FileSystem(
        endpoint_override=s3_server, access_key="testing", secret_key="testing", region="us-east-1", scheme="http"
    )
    bucket = s3_bucket.removeprefix("s3://")
    for i in range(2):
        rel = f"interactions/shard-{i:05d}.parquet"
        remote_t = pq.read_table(f"{bucket}/datasets/ml100k/{rel}", filesystem=s3)
        assert remote_t.equals(pq.read_table(os.path.join(local, rel)))
    with s3.open_input_stream(f"{bucket}/datasets/ml100k/manifest.json") as f:
        assert json.loads(f.read())["num_users"] == 943
    assert Dataset.open(remote).read_interactions().num_rows == 100_000
    assert not [p for p in storage.get_fs(s3_bucket)[0].ls(bucket) if "staging" in p]


def test_incomplete_dataset_is_refused(tmp_path):
    out = tmp_path / "broken"
    (out / "interactions").mkdir(parents=True)
    pq.write_table(pa.table({"x": [1]}), out / "interactions" / "shard-00000.parquet")
    with pytest.raises(DatasetError, match="no manifest.json"):
        Dataset.open(str(out))


def test_movielens_1m_dat_format(tmp_path):
    """ML-1M layout ('::'-separated .dat): the real movies.dat/users.dat and a ratings.dat made here
    (the shared folder has no ratings.dat)."""
    ml1m = shared_path("data", "movielens-1m")
    src = tmp_path / "ml1m"
    src.mkdir()
    for name in ("movies.dat", "users.dat"):
        (src / name).write_bytes((ml1m / name).read_bytes())
    movies = [int(line.split(b"::")[0]) for line in (ml1m / "movies.dat").read_bytes().splitlines() if line]
    rng = np.random.default_rng(1)
    n = 3000
    rows = [
        f"{u}::{m}::{r}::{t}"
        for u, m, r, t in zip(
            rng.integers(1, 6041, n), rng.choice(movies, n), rng.integers(1, 6, n), rng.integers(9.5e8, 1.05e9, n)
        )
    ]
    (src / "ratings.dat").write_text("\n".join(rows) + "\n")
    m = ingest("movielens", str(src), str(tmp_path / "out"), IngestOptions(num_shards=2, **QUIET))
    ds = Dataset.open(str(tmp_path / "out"))
    assert m["num_interactions"] + m["skipped"]["duplicates"] == n
    users = ds.read_users().to_pandas().set_index("user_id")
    assert users.loc[1, "gender"] == "female" and users.loc[1, "age"] == "under 18"
    assert users.loc[1, "occupation"] == "K-12 student"
    items = ds.read_items().to_pandas().set_index("item_id")
    assert "Toy Story" in items.loc[1, "title"] if 1 in items.index else True
    assert items["year"].notna().all()
