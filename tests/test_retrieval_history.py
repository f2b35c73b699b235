"""History retrieval: the leakage rule, recent == pandas reference, SUBR top-K == brute force."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrieval.history import (
    HistoryError,
    ItemVectors,
    check_sorted,
    history_bounds,
    recent,
    top_similar,
    top_similar_reference,
)


def random_block(seed: int, n_users: int, max_len: int, n_items: int, n_ts: int):
    """Sorted block with heavy timestamp ties (n_ts small) and repeated items."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, max_len + 1, n_users)
    users = np.repeat(rng.choice(10 * n_users + 10, n_users, replace=False), lens)
    ts = rng.integers(0, n_ts, len(users))
    items = rng.integers(0, n_items, len(users))
    order = np.lexsort((items, ts, users))
    return users[order].astype(np.int64), ts[order].astype(np.int64), items[order].astype(np.int64)


def lists(r):
    return [r.index[r.offsets[j] : r.offsets[j + 1]].tolist() for j in range(len(r))]


def test_bounds_exclude_same_timestamp_rows():
    users = np.array([1, 1, 1, 1, 2, 2], dtype=np.int64)
    ts = np.array([5, 7, 7, 9, 1, 1], dtype=np.int64)
    start, end = history_bounds(users, ts)
    assert start.tolist() == [0, 0, 0, 0, 4, 4]
    # Row 2 ties with row 1 (t=7): row 1 sorts earlier but is not "before", so both see only row 0.
    assert end.tolist() == [0, 1, 1, 3, 4, 4]


def test_unsorted_block_is_rejected_with_rows_named():
    with pytest.raises(HistoryError, match="rows 1 and 2"):
        check_sorted(np.array([1, 1, 1]), np.array([1, 3, 2]), np.array([0, 0, 0]), where="shard-00003")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31),
    n_users=st.integers(1, 12),
    max_len=st.integers(0, 40),
    n_ts=st.integers(1, 30),
    k=st.integers(1, 12),
    pool=st.integers(1, 30),
)
def test_no_leakage_and_brute_force_agreement(seed, n_users, max_len, n_ts, k, pool):
    pool = max(pool, k)
    users, ts, items = random_block(seed, n_users, max_len, n_items=15, n_ts=n_ts)
    check_sorted(users, ts, items)
    start, end = history_bounds(users, ts)
    targets = np.arange(len(users), dtype=np.int64)
    # Small integer vectors: float32 dot products are exact, so exact ties (repeated items) are real ties.
    vec_rng = np.random.default_rng(seed + 1)
    item_vecs = vec_rng.integers(-3, 4, (15, 6)).astype(np.float32)
    for r in (recent(start, end, targets, k), top_similar(start, end, targets, items, item_vecs, k, pool, block=7)):
        for t, hist in zip(targets, lists(r)):
            assert all(users[h] == users[t] and ts[h] < ts[t] for h in hist), "history row at or after t"
            assert hist == sorted(hist)
    got = lists(top_similar(start, end, targets, items, item_vecs, k, pool, block=5))
    assert got == top_similar_reference(start, end, targets, items, item_vecs, k, pool)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), k=st.integers(1, 15))
def test_recent_matches_pandas_reference(seed, k):
    users, ts, items = random_block(seed, n_users=8, max_len=50, n_items=30, n_ts=40)
    df = pd.DataFrame({"user_id": users, "timestamp": ts, "item_id": items, "row": np.arange(len(users))})
    start, end = history_bounds(users, ts)
    got = lists(recent(start, end, np.arange(len(users)), k))
    want = []
    for row in df.itertuples():
        prev = df[(df.user_id == row.user_id) & (df.timestamp < row.timestamp)]
        want.append(prev.sort_values(["timestamp", "item_id"]).row.tolist()[-k:] if k else [])
    assert got == want


def test_cosine_top_k_matches_float64_reference_on_real_valued_vectors():
    users, ts, items = random_block(3, n_users=30, max_len=300, n_items=500, n_ts=10_000)
    iv = ItemVectors(np.arange(1, 501), np.random.default_rng(0).normal(size=(500, 32)))  # 1-based ids
    rows = iv.rows(items + 1)
    start, end = history_bounds(users, ts)
    targets = np.arange(0, len(users), 3)
    got = lists(top_similar(start, end, targets, rows, iv.matrix, k=10, pool=200))
    want = top_similar_reference(start, end, targets, rows, iv.matrix, k=10, pool=200)
    assert got == want
    assert sum(len(g) for g in got) > 0


def test_item_vectors_lookup_by_id_and_missing_ids_named():
    iv = ItemVectors(np.array([10, 3, 7]), np.eye(3), normalize=False)
    assert iv.lookup(np.array([3, 7, 10])).tolist() == [[0, 1, 0], [0, 0, 1], [1, 0, 0]]
    with pytest.raises(HistoryError, match=r"\[4, 11\]"):
        iv.rows(np.array([3, 4, 11]))
