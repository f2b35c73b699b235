"""Sample building end to end: references, leakage, commits and resume, Ray workers, S3."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from cluster.pool import run_sharded
from configs.schema import Config
from recdata import storage
from recdata.samples import BuildOptions, SamplesError, SampleSet, commit_marker, options_from_config
from recdata.schema import (
    INTERACTIONS,
    SCHEMA_VERSION,
    split_array,
    user_bucket,
    write_parquet,
)
from recdata.subsets import load_subset
from retrieval.build import build_samples


def synthetic_interactions(seed=0, n_users=40, n_items=80, max_len=60, n_ts=400, item_base=1):
    """Heavy ties (few distinct timestamps), repeats, a context prefix per user, global-time splits."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, max_len, n_users)
    users = np.repeat(rng.choice(10_000, n_users, replace=False), lens)
    ts = rng.integers(0, n_ts, len(users))
    items = rng.integers(0, n_items, len(users)) + item_base
    df = pd.DataFrame({"user_id": users, "item_id": items, "timestamp": ts})
    df = df.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(drop=True)
    df["rating"] = rng.integers(1, 6, len(df)).astype(np.float32)
    q = np.quantile(df.timestamp, [0.2, 0.8, 0.9])
    df["split"] = np.select(
        [df.timestamp < q[0], df.timestamp < q[1], df.timestamp < q[2]], ["context", "train", "valid"], "test"
    )
    df["label"] = (df.rating >= 4).astype(np.int8)
    return df


def write_dataset(url, df, task="ctr", num_shards=3, row_group_size=37, n_items=80, item_base=1, titles=None):
    """The schema.Dataset layout, written directly (recdata.ingest does this for real sources)."""
    shard_of = user_bucket(df.user_id.to_numpy(), num_shards)
    shards = []
    for s in range(num_shards):
        part = df[shard_of == s].sort_values(["user_id", "timestamp", "item_id"], kind="stable")
        label = pa.array(part.label.to_numpy(), pa.int8()) if task == "ctr" else pa.nulls(len(part), pa.int8())
        table = pa.table(
            {
                "user_id": pa.array(part.user_id.to_numpy(), pa.int64()),
                "item_id": pa.array(part.item_id.to_numpy(), pa.int64()),
                "timestamp": pa.array(part.timestamp.to_numpy(), pa.int64()),
                "rating": pa.array(part.rating.to_numpy(), pa.float32()),
                "split": split_array(part.split.to_numpy()),
                "label": label,
            },
            schema=INTERACTIONS,
        )
        write_parquet(table, storage.join(url, f"interactions/shard-{s:05d}.parquet"), row_group_size=row_group_size)
        shards.append({"path": f"interactions/shard-{s:05d}.parquet", "rows": len(part)})
    ids = np.arange(n_items) + item_base
    titles = titles if titles is not None else [f"Movie {i} ({1950 + i % 50})" for i in ids]
    write_parquet(
        pa.table({"item_id": pa.array(ids, pa.int64()), "title": pa.array(titles, pa.string())}),
        storage.join(url, "items.parquet"),
    )
    storage.write_json_atomic(
        storage.join(url, "manifest.json"),
        {"schema_version": SCHEMA_VERSION, "task": task, "shards": shards, "items": {"path": "items.parquet"}},
    )
    return url


def write_embeddings(url, n_items=80, item_base=1, dim=16, seed=0):
    vec = np.random.default_rng(seed).normal(size=(n_items, dim)).astype(np.float32)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), dim).cast(pa.list_(pa.float32()))
    write_parquet(pa.table({"item_id": pa.array(np.arange(n_items) + item_base, pa.int64()), "embedding": emb}), url)
    return url, dict(zip((np.arange(n_items) + item_base).tolist(), vec.astype(np.float64)))


def all_samples(url):
    ss = SampleSet.open(url)
    t = pa.concat_tables([ss.read(s) for s in ("train", "valid", "test")])
    return t.sort_by("sample_id").to_pandas()


def _top(h, target, vecs, k, pool):
    """Brute-force cosine top-k of the last `pool` history rows, ties to the more recent, in time order."""
    cand = h.iloc[-pool:]
    t = vecs[target] / np.linalg.norm(vecs[target])
    sc = [float(np.dot(t, vecs[i] / np.linalg.norm(vecs[i]))) for i in cand.item_id]
    top = sorted(range(len(cand)), key=lambda j: (-sc[j], -j))[:k]
    return cand.iloc[sorted(top)]


def reference(df, k_text, k_id, vecs=None, pool=200, text_subr=False, id_sim_pool=None):
    """Per-row pandas/Python reference: history = same user, timestamp strictly smaller."""
    out = {}
    for u, g in df.groupby("user_id", sort=False):
        g = g.sort_values(["timestamp", "item_id"], kind="stable")
        for row in g.itertuples():
            if row.split == "context":
                continue
            h = g[g.timestamp < row.timestamp]
            text = _top(h, row.item_id, vecs, k_text, pool) if text_subr else h.tail(k_text)
            ids = h.tail(k_id) if id_sim_pool is None else _top(h, row.item_id, vecs, k_id, id_sim_pool)
            out[(u, row.item_id, row.timestamp, row.rating)] = (
                len(h),
                text.item_id.tolist(),
                text.rating.tolist(),
                ids.item_id.tolist(),
                ids.rating.tolist(),
                ids.timestamp.tolist(),
            )
    return out


def check_against_reference(samples, df, **kw):
    ref = reference(df, **kw)
    assert len(samples) == len(ref)
    for s in samples.itertuples():
        hist_len, text, text_r, ids, ids_r, ts = ref[(s.user_id, s.item_id, s.timestamp, s.rating)]
        assert s.hist_len == hist_len
        assert list(s.text_hist_items) == text and list(s.text_hist_ratings) == text_r
        assert list(s.id_hist_items) == ids and list(s.id_hist_ratings) == ids_r and list(s.id_hist_timestamps) == ts
        assert all(t < s.timestamp for t in s.id_hist_timestamps), "leakage"


def test_recent_build_matches_pandas_reference_across_row_groups(tmp_path):
    df = synthetic_interactions()
    ds = write_dataset(str(tmp_path / "ds"), df)
    m = build_samples(ds, str(tmp_path / "samples"), BuildOptions(k_text=5, k_id=12, text_mode="recent"), num_workers=1)
    samples = all_samples(str(tmp_path / "samples"))
    check_against_reference(samples, df, k_text=5, k_id=12)
    assert (samples.split != "context").all() and samples.candidates.isna().all()
    # sample_id = shard * 2**40 + row in the interaction shard: look the row up and compare.
    shard_of = user_bucket(df.user_id.to_numpy(), 3)
    for s in samples.sample(50, random_state=0).itertuples():
        shard, row = divmod(s.sample_id, 2**40)
        part = df[shard_of == shard].reset_index(drop=True)
        assert (part.loc[row, ["user_id", "item_id", "timestamp"]].tolist()) == [s.user_id, s.item_id, s.timestamp]
        assert part.loc[row, "label"] == s.label
    c = m["counts"]
    assert c["targets"] == (df.split != "context").sum() == len(samples) and c["interactions"] == len(df)
    assert c["tied_rows"] > 0 and c["target_in_history"] > 0 and c["empty_history"] > 0
    # Few2Many: nested prefixes over train sample ids.
    train = set(samples[samples.split == "train"].sample_id)
    s64, s256 = (
        load_subset(str(tmp_path / "samples"), "train", 64),
        load_subset(str(tmp_path / "samples"), "train", 256),
    )
    assert set(s64) < set(s256) <= train


def test_subr_build_matches_brute_force_with_one_based_ids(tmp_path):
    df = synthetic_interactions(seed=1, item_base=1)
    ds = write_dataset(str(tmp_path / "ds"), df, item_base=1)
    emb_url, vecs = write_embeddings(str(tmp_path / "emb.parquet"), item_base=1)
    opts = BuildOptions(k_text=4, k_id=10, text_mode="subr", subr_pool=15)
    build_samples(ds, str(tmp_path / "s"), opts, num_workers=1, embeddings_url=emb_url)
    check_against_reference(all_samples(str(tmp_path / "s")), df, k_text=4, k_id=10, vecs=vecs, pool=15, text_subr=True)
    # SIM-style ID history: top K_id by similarity among the last sim_pool, in time order.
    sim = BuildOptions(k_text=4, k_id=6, text_mode="recent", id_mode="sim", sim_pool=20)
    build_samples(ds, str(tmp_path / "sim"), sim, num_workers=1, embeddings_url=emb_url)
    check_against_reference(all_samples(str(tmp_path / "sim")), df, k_text=4, k_id=6, vecs=vecs, id_sim_pool=20)


def test_next_item_candidates_and_history_filters(tmp_path):
    df = synthetic_interactions(seed=2)
    df.loc[df.groupby("user_id").head(1).index[:5], "split"] = "train"  # users whose first row is a target
    ds = write_dataset(str(tmp_path / "ds"), df, task="next_item")
    opts = BuildOptions(
        k_text=10, k_id=20, text_mode="recent", min_history=3, empty_history="drop", max_eval_samples=10
    )
    m = build_samples(ds, str(tmp_path / "s"), opts, num_workers=1)
    s = all_samples(str(tmp_path / "s"))
    assert (s.hist_len >= 3).all() and s.label.isna().all()
    ref_len = {k: v[0] for k, v in reference(df, k_text=1, k_id=1).items()}  # hist_len per sample
    assert m["counts"]["dropped_empty_history"] == sum(v == 0 for v in ref_len.values()) > 0
    assert m["counts"]["dropped_min_history"] == sum(v in (1, 2) for v in ref_len.values()) > 0
    assert (
        m["counts"]["samples"]
        == len(s)
        == m["counts"]["targets"] - m["counts"]["dropped_empty_history"] - m["counts"]["dropped_min_history"]
    )
    for row in s.itertuples():
        c = list(row.candidates)
        seen = set(df[(df.user_id == row.user_id) & (df.timestamp < row.timestamp)].item_id)
        assert len(c) == len(set(c)) == 20 and c.count(row.item_id) == 1 and not (set(c) - {row.item_id}) & seen
    assert len(load_subset(str(tmp_path / "s"), "test")) == 10
    # A second build with the same seed persists the same lists.
    build_samples(ds, str(tmp_path / "s2"), opts, num_workers=1)
    assert all_samples(str(tmp_path / "s2")).candidates.map(list).tolist() == s.candidates.map(list).tolist()


def test_rerun_redoes_only_uncommitted_shards_and_output_is_identical(tmp_path):
    df = synthetic_interactions(seed=3)
    ds = write_dataset(str(tmp_path / "ds"), df, num_shards=4)
    out = str(tmp_path / "s")
    opts = BuildOptions(k_text=3, k_id=8, text_mode="recent")
    first = build_samples(ds, out, opts, num_workers=1)
    before = all_samples(out)
    storage.rm(commit_marker(out, 2))
    (tmp_path / "s" / "train" / "shard-00002.parquet").write_bytes(b"partial garbage")  # a crash mid-write
    again = build_samples(ds, out, opts, num_workers=1)
    assert (again["shards"]["built"], again["shards"]["skipped"], first["shards"]["built"]) == (1, 3, 4)
    pd.testing.assert_frame_equal(all_samples(out), before)
    assert not list(tmp_path.glob("s/*/*.tmp-*"))
    with pytest.raises(SamplesError, match="other inputs/options"):
        build_samples(ds, out, BuildOptions(k_text=4, k_id=8, text_mode="recent"), num_workers=1)
    assert (
        json.loads((tmp_path / "s" / "_commits" / "shard-00002.json").read_text())["rows"]["train"]
        == first["splits"]["train"]["files"][2]["rows"]
    )


def test_bad_inputs_fail_with_named_ids(tmp_path):
    df = synthetic_interactions(seed=4, n_items=10)
    titles = [f"T{i}" for i in range(9)] + [None]
    ds = write_dataset(str(tmp_path / "ds"), df, n_items=10, titles=titles)
    with pytest.raises(SamplesError, match=r"no title.*\[10\]"):
        build_samples(ds, str(tmp_path / "a"), BuildOptions(text_mode="recent"), num_workers=1)
    m = build_samples(
        ds, str(tmp_path / "b"), BuildOptions(text_mode="recent", missing_text="placeholder"), num_workers=1
    )
    assert m["counts"]["items_without_text"] > 0
    with pytest.raises(SamplesError, match="need item embeddings"):
        build_samples(ds, str(tmp_path / "c"), BuildOptions(text_mode="subr"), num_workers=1)
    emb_url, _ = write_embeddings(str(tmp_path / "emb.parquet"), n_items=9)
    with pytest.raises(Exception, match=r"no embedding for 1 item id\(s\), e.g. \[10\]"):
        build_samples(
            ds, str(tmp_path / "d"), BuildOptions(missing_text="placeholder"), num_workers=1, embeddings_url=emb_url
        )
    with pytest.raises(ValueError, match="text_mode"):
        BuildOptions(text_mode="similar").validate()


@pytest.mark.slow
def test_two_ray_workers_read_and_write_s3(s3_bucket, ray_local, tmp_path):
    df = synthetic_interactions(seed=5)
    ds = write_dataset(storage.join(s3_bucket, "ds"), df, num_shards=4)
    emb_url, vecs = write_embeddings(storage.join(s3_bucket, "emb/embeddings.parquet"))
    out = storage.join(s3_bucket, "samples")
    opts = BuildOptions(k_text=4, k_id=10, subr_pool=15)
    m = build_samples(ds, out, opts, num_workers=2, embeddings_url=storage.join(s3_bucket, "emb"), runner=run_sharded)
    assert m["shards"]["built"] == 4
    check_against_reference(all_samples(out), df, k_text=4, k_id=10, vecs=vecs, pool=15, text_subr=True)
    storage.rm(commit_marker(out, 1))
    assert (
        build_samples(ds, out, opts, num_workers=2, embeddings_url=storage.join(s3_bucket, "emb"), runner=run_sharded)[
            "shards"
        ]["skipped"]
        == 3
    )


def test_options_from_typed_config():

    cfg = Config()
    cfg.retrieval.k_text, cfg.retrieval.text_mode, cfg.retrieval.min_history, cfg.run.seed = 5, "recent", 5, 7
    o = options_from_config(cfg)
    assert (o.k_text, o.text_mode, o.min_history, o.seed, o.k_id) == (5, "recent", 5, 7, 60)
