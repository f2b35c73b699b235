"""Reference sample builders for the two shared benchmark datasets, used by the teacher's tests and
benchmark until `recdata.ingest` / `retrieval.build` produce the same layout for every dataset.

They write the sample-record schema of retrieval/build (recent-K histories only, no SUBR/SIM):
    {out}/{split}/shard-XXXXX.parquet   sample_id, user_id, item_id, timestamp, split, label, rating,
        hist_len, text_hist_items/ratings (K_text), id_hist_items/ratings/timestamps (K_id), candidates
and for MovieLens a canonical dataset (manifest, interactions, items, users) beside it.

- MovieLens-100K CTR (ReLLa/RecLoRA): all ratings in global time order split 8:1:1, label rating >= 4,
  history = the user's earlier ratings (lifelong, most recent last).
- LLaRA LastFM next item: the given train/val/test rows; 20 candidates = target + 19 seeded negatives
  not in the history, shuffled, persisted (papers.md 2.1: never re-sampled per run).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from recdata import storage
from recdata.readers import ML100K_GENRES
from recdata.schema import (
    INTERACTIONS,
    SCHEMA_VERSION,
    split_array,
    user_bucket,
    write_parquet,
)

SPLIT_NAMES = ("train", "valid", "test")


# ---- generic: interactions -> samples -------------------------------------------------------------


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s+l) for each (s, l), vectorized."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offs = np.cumsum(lengths) - lengths
    return np.repeat(starts - offs, lengths) + np.arange(total)


def _list_array(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, typ: pa.DataType) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values[_ranges(starts, lengths)], typ))


def samples_from_interactions(
    df: pd.DataFrame, k_id: int = 60, k_text: int = 10, with_candidates: bool = False
) -> pa.Table:
    """One sample per non-context interaction. df: user_id, item_id, timestamp, rating, split, label.
    History = that user's earlier rows in (timestamp, item_id) order."""
    d = df.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(drop=True)
    uid = d["user_id"].to_numpy(np.int64)
    first = np.r_[True, uid[1:] != uid[:-1]]
    user_start = np.maximum.accumulate(np.where(first, np.arange(len(d)), 0))
    pos = np.arange(len(d)) - user_start  # number of earlier rows of the same user
    keep = (d["split"] != "context").to_numpy()
    rows = np.flatnonzero(keep)
    items = d["item_id"].to_numpy(np.int64)
    ratings = d["rating"].to_numpy(np.float32)
    ts = d["timestamp"].to_numpy(np.int64)
    hlen = pos[rows]
    lid = np.minimum(hlen, k_id)
    ltx = np.minimum(hlen, k_text)
    cols = {
        "sample_id": pa.array(d["sample_id"].to_numpy(np.int64)[rows] if "sample_id" in d else rows.astype(np.int64)),
        "user_id": pa.array(uid[rows]),
        "item_id": pa.array(items[rows]),
        "timestamp": pa.array(ts[rows]),
        "split": pa.array(d["split"].to_numpy()[rows].astype(str)),
        "label": pa.array(d["label"].to_numpy()[rows], pa.int8())
        if d["label"].notna().all()
        else pa.nulls(len(rows), pa.int8()),
        "rating": pa.array(ratings[rows]),
        "hist_len": pa.array(hlen.astype(np.int32)),
        "text_hist_items": _list_array(items, rows - ltx, ltx, pa.int64()),
        "text_hist_ratings": _list_array(ratings, rows - ltx, ltx, pa.float32()),
        "id_hist_items": _list_array(items, rows - lid, lid, pa.int64()),
        "id_hist_ratings": _list_array(ratings, rows - lid, lid, pa.float32()),
        "id_hist_timestamps": _list_array(ts, rows - lid, lid, pa.int64()),
    }
    cols["candidates"] = pa.nulls(len(rows), pa.list_(pa.int64()))
    return pa.table(cols)


def write_sample_shards(
    table: pa.Table, out_url: str, num_shards: int = 2, row_group_size: int = 8192
) -> dict[str, int]:
    """{out}/{split}/shard-XXXXX.parquet, users hashed to shards, rows in (user, timestamp) order."""
    counts = {}
    for split in SPLIT_NAMES:
        t = table.filter(pc.equal(table.column("split"), split))
        counts[split] = t.num_rows
        if not t.num_rows:
            continue
        bucket = user_bucket(t.column("user_id").to_numpy(), num_shards)
        for s in range(num_shards):
            part = t.filter(pa.array(bucket == s))
            if part.num_rows:
                write_parquet(
                    part, storage.join(out_url, split, f"shard-{s:05d}.parquet"), row_group_size=row_group_size
                )
    storage.write_json_atomic(storage.join(out_url, "manifest.json"), {"counts": counts, "builder": "teacher.refdata"})
    return counts


# ---- MovieLens-100K CTR -----------------------------------------------------------------------------


def read_movielens100k(src: str | Path) -> tuple[pd.DataFrame, pa.Table, pa.Table]:
    src = Path(src)
    ratings = pd.read_csv(src / "u.data", sep="\t", names=["user_id", "item_id", "rating", "timestamp"])
    raw_items = pd.read_csv(src / "u.item", sep="|", header=None, encoding="latin-1")
    flags = raw_items.iloc[:, 5:24].to_numpy(dtype=bool)
    genres = ["|".join(g for g, f in zip(ML100K_GENRES, row) if f) for row in flags]
    years = [int(m.group(1)) if (m := re.search(r"\((\d{4})\)\s*$", str(t))) else None for t in raw_items[1]]
    items = pa.table(
        {
            "item_id": pa.array(raw_items[0].to_numpy(np.int64)),
            "title": pa.array(raw_items[1].astype(str).tolist()),
            "genres": pa.array(genres),
            "year": pa.array(years, pa.int32()),
        }
    )
    u = pd.read_csv(
        src / "u.user", sep="|", names=["user_id", "age", "gender", "occupation", "zip"], dtype={"zip": str}
    )
    users = pa.table(
        {
            "user_id": pa.array(u["user_id"].to_numpy(np.int64)),
            "age": pa.array(u["age"].to_numpy(np.int32)),
            "gender": pa.array(u["gender"].tolist()),
            "occupation": pa.array(u["occupation"].tolist()),
            "zip": pa.array(u["zip"].tolist()),
        }
    )
    return ratings, items, users


def global_time_split(ratings: pd.DataFrame, ratios=(0.8, 0.1, 0.1), threshold: float = 4.0) -> pd.DataFrame:
    d = ratings.sort_values(["timestamp", "user_id", "item_id"], kind="stable").reset_index(drop=True)
    n = len(d)
    a, b = int(round(n * ratios[0])), int(round(n * (ratios[0] + ratios[1])))
    split = np.array(["train"] * n, dtype=object)
    split[a:b] = "valid"
    split[b:] = "test"
    d["split"] = split
    d["label"] = (d["rating"] >= threshold).astype(np.int8)
    d["rating"] = d["rating"].astype(np.float32)
    d["sample_id"] = np.arange(n, dtype=np.int64)  # position in global time order: stable, unique
    return d


def write_dataset(url: str, inter: pd.DataFrame, items: pa.Table, users: pa.Table | None, task: str) -> None:
    """Minimal canonical dataset (retrieval/schema.py layout) with one interactions shard."""
    t = pa.table(
        {
            "user_id": pa.array(inter["user_id"].to_numpy(np.int64)),
            "item_id": pa.array(inter["item_id"].to_numpy(np.int64)),
            "timestamp": pa.array(inter["timestamp"].to_numpy(np.int64)),
            "rating": pa.array(inter["rating"].to_numpy(np.float32)),
            "split": split_array(inter["split"].to_numpy()),
            "label": pa.array(inter["label"].to_numpy(), pa.int8()),
        },
        schema=INTERACTIONS,
    )
    write_parquet(t, storage.join(url, "interactions", "shard-00000.parquet"))
    write_parquet(items, storage.join(url, "items.parquet"))
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "task": task,
        "shards": [{"path": "interactions/shard-00000.parquet"}],
        "items": {"path": "items.parquet"},
    }
    if users is not None:
        write_parquet(users, storage.join(url, "users.parquet"))
        manifest["users"] = {"path": "users.parquet"}
    storage.write_json_atomic(storage.join(url, "manifest.json"), manifest)


def build_movielens100k_ctr(
    src: str | Path,
    dataset_url: str,
    samples_url: str,
    k_id: int = 60,
    num_shards: int = 2,
    max_users: int | None = None,
) -> dict[str, int]:
    """`max_users` keeps only the first N user ids (fast tests)."""
    ratings, items, users = read_movielens100k(src)
    if max_users is not None:
        ratings = ratings[ratings["user_id"] <= max_users]
        users = users.filter(pc.less_equal(users.column("user_id"), max_users))
    inter = global_time_split(ratings)
    write_dataset(dataset_url, inter, items, users, "ctr")
    samples = samples_from_interactions(inter, k_id=k_id)
    counts = write_sample_shards(samples, samples_url, num_shards)
    m = storage.read_json(storage.join(samples_url, "manifest.json"))
    storage.write_json_atomic(
        storage.join(samples_url, "manifest.json"), {**m, "dataset_url": dataset_url, "task": "ctr"}
    )
    return counts


# ---- LLaRA LastFM next item -------------------------------------------------------------------------


def _negatives(rng: np.random.Generator, n_items: int, exclude: list[set[int]], k: int) -> np.ndarray:
    out = np.zeros((len(exclude), k), dtype=np.int64)
    for i, ex in enumerate(exclude):
        chosen: list[int] = []
        seen = set(ex)
        while len(chosen) < k:
            for c in rng.integers(0, n_items, size=2 * k):
                c = int(c)
                if c not in seen:
                    seen.add(c)
                    chosen.append(c)
                    if len(chosen) == k:
                        break
        out[i] = chosen
    return out


def build_llara_samples(
    src: str | Path,
    samples_url: str,
    num_candidates: int = 20,
    seed: int = 0,
    num_shards: int = 2,
    max_train: int | None = None,
) -> dict[str, int]:
    """LLaRA JSONL (seq padded with pad id = #items, len_seq, next) -> next-item samples. Rows have no user
    ids, so user_id is the sample id (the SASRec teacher does not use it)."""
    src = Path(src)
    names = [
        line.split("::", 1) for line in (src / "orig" / "id2name.txt").read_text(encoding="utf-8").splitlines() if line
    ]
    n_items = len(names)
    tables = []
    for si, (split, fname) in enumerate(
        (("train", "train_data.jsonl"), ("valid", "val_data.jsonl"), ("test", "test_data.jsonl"))
    ):
        rows = [json.loads(x) for x in (src / fname).read_text().splitlines() if x.strip()]
        if split == "train" and max_train is not None:
            rows = rows[:max_train]
        hists = [[int(v) for v in r["seq"][: r["len_seq"]] if int(v) != n_items] for r in rows]
        target = np.array([int(r["next"]) for r in rows], dtype=np.int64)
        rng = np.random.default_rng([seed, si])
        neg = _negatives(rng, n_items, [set(h) | {int(t)} for h, t in zip(hists, target)], num_candidates - 1)
        cands = np.concatenate([target[:, None], neg], axis=1)
        perm = np.argsort(rng.random(cands.shape), axis=1)
        cands = np.take_along_axis(cands, perm, axis=1)
        sid = np.arange(len(rows), dtype=np.int64) + si * 10_000_000
        lens = np.array([len(h) for h in hists], dtype=np.int64)
        flat = np.array([v for h in hists for v in h], dtype=np.int64)
        starts = np.cumsum(lens) - lens
        ltx = np.minimum(lens, 10)
        tables.append(
            pa.table(
                {
                    "sample_id": pa.array(sid),
                    "user_id": pa.array(sid),
                    "item_id": pa.array(target),
                    "timestamp": pa.array(np.arange(len(rows), dtype=np.int64)),
                    "split": pa.array([split] * len(rows)),
                    "label": pa.nulls(len(rows), pa.int8()),
                    "rating": pa.nulls(len(rows), pa.float32()),
                    "hist_len": pa.array(lens.astype(np.int32)),
                    "text_hist_items": _list_array(flat, starts + lens - ltx, ltx, pa.int64()),
                    "text_hist_ratings": _list_array(
                        np.ones(len(flat), np.float32), starts + lens - ltx, ltx, pa.float32()
                    ),
                    "id_hist_items": _list_array(flat, starts, lens, pa.int64()),
                    "id_hist_ratings": _list_array(np.ones(len(flat), np.float32), starts, lens, pa.float32()),
                    "id_hist_timestamps": _list_array(np.arange(len(flat), dtype=np.int64), starts, lens, pa.int64()),
                    "candidates": pa.ListArray.from_arrays(
                        pa.array(np.arange(len(rows) + 1, dtype=np.int32) * num_candidates), pa.array(cands.reshape(-1))
                    ),
                }
            )
        )
    counts = write_sample_shards(pa.concat_tables(tables), samples_url, num_shards)
    m = storage.read_json(storage.join(samples_url, "manifest.json"))
    storage.write_json_atomic(
        storage.join(samples_url, "manifest.json"), {**m, "task": "next_item", "num_items": n_items}
    )
    return counts


# ---- small synthetic datasets (unit tests) ----------------------------------------------------------


def synthetic_ctr(
    n_users: int = 60, n_items: int = 80, per_user: int = 30, n_genres: int = 4, seed: int = 0
) -> tuple[pd.DataFrame, pa.Table, pa.Table]:
    """Users like (rating >= 4) items of their preferred genre: learnable by any CTR model."""
    rng = np.random.default_rng(seed)
    item_genre = rng.integers(0, n_genres, n_items)
    pref = rng.integers(0, n_genres, n_users)
    rows = []
    for u in range(n_users):
        for j, i in enumerate(rng.choice(n_items, size=per_user, replace=False)):
            base = 4.5 if item_genre[i] == pref[u] else 2.0
            rating = float(np.clip(np.rint(base + rng.normal(0, 0.7)), 1, 5))
            rows.append((u + 1, int(i) + 1, rating, int(rng.integers(0, 10**6))))
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    items = pa.table(
        {
            "item_id": pa.array(np.arange(1, n_items + 1, dtype=np.int64)),
            "title": pa.array([f"item {i}" for i in range(1, n_items + 1)]),
            "genres": pa.array([f"g{g}|all" for g in item_genre]),
            "year": pa.array((1990 + item_genre).astype(np.int32)),
        }
    )
    users = pa.table(
        {
            "user_id": pa.array(np.arange(1, n_users + 1, dtype=np.int64)),
            "age": pa.array(rng.integers(15, 70, n_users).astype(np.int32)),
            "gender": pa.array(rng.choice(["M", "F"], n_users).tolist()),
        }
    )
    return df, items, users


def build_synthetic_ctr(
    dataset_url: str, samples_url: str, k_id: int = 20, num_shards: int = 2, seed: int = 0, **kw
) -> dict[str, int]:
    df, items, users = synthetic_ctr(seed=seed, **kw)
    inter = global_time_split(df)
    write_dataset(dataset_url, inter, items, users, "ctr")
    counts = write_sample_shards(
        samples_from_interactions(inter, k_id=k_id), samples_url, num_shards, row_group_size=64
    )
    m = storage.read_json(storage.join(samples_url, "manifest.json"))
    storage.write_json_atomic(
        storage.join(samples_url, "manifest.json"), {**m, "dataset_url": dataset_url, "task": "ctr"}
    )
    return counts


def with_candidates(
    table: pa.Table, n_items: int, num_candidates: int = 20, seed: int = 0, first_item: int = 0
) -> pa.Table:
    """Set `candidates` = target + seeded negatives (ids first_item..first_item+n_items-1) not in the
    history, shuffled."""
    rng = np.random.default_rng(seed)
    target = table.column("item_id").to_numpy()
    hists = table.column("id_hist_items").to_pylist()
    neg = (
        _negatives(
            rng,
            n_items,
            [{h - first_item for h in (hist or [])} | {int(t) - first_item} for hist, t in zip(hists, target)],
            num_candidates - 1,
        )
        + first_item
    )
    cands = np.concatenate([target[:, None], neg], axis=1)
    cands = np.take_along_axis(cands, np.argsort(rng.random(cands.shape), axis=1), axis=1)
    arr = pa.ListArray.from_arrays(
        pa.array(np.arange(len(target) + 1, dtype=np.int32) * num_candidates),
        pa.array(cands.reshape(-1).astype(np.int64)),
    )
    return table.set_column(table.schema.get_field_index("candidates"), "candidates", arr)


def build_synthetic_next(
    samples_url: str,
    n_users: int = 80,
    n_items: int = 60,
    length: int = 16,
    k_id: int = 10,
    num_shards: int = 2,
    seed: int = 0,
) -> dict[str, int]:
    """Each user walks item ids upward with a user-specific step (1 or 2): the next item is predictable
    from the history. Per-user split: last item test, second last valid, the rest train."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        step, cur = int(rng.integers(1, 3)), int(rng.integers(0, n_items))
        for t in range(length):
            split = "test" if t == length - 1 else "valid" if t == length - 2 else "train"
            rows.append((u + 1, cur, t, 1.0, split))
            cur = (cur + step) % n_items
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating", "split"])
    df["label"] = None
    t = samples_from_interactions(df, k_id=k_id)
    t = with_candidates(t, n_items, seed=seed)
    counts = write_sample_shards(t, samples_url, num_shards, row_group_size=64)
    m = storage.read_json(storage.join(samples_url, "manifest.json"))
    storage.write_json_atomic(storage.join(samples_url, "manifest.json"), {**m, "task": "next_item"})
    return counts
