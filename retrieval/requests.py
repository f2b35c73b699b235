"""Sample records for arbitrary (user, item, time) requests, built with the retrieval of retrieval.build.

A request is (user u, item i, time t) — t optional — plus, for next_item datasets, an optional candidate
list. Its record has the schema of recdata.samples.SAMPLE_SCHEMA and is built by the same rules as a
sample of the training pipeline:

* history = u's interactions with timestamp strictly less than t (all of u's interactions when t is not
  given), in the shard's (timestamp, item_id) order; `hist_len` counts all of it;
* short text history (K_text): `recent` or SUBR (`top_similar` over the most recent `subr_pool` items,
  scored against the request item's embedding), long ID history (K_id): `recent` or `sim`;
* next_item candidates, when the request has none: `sample_candidates` with the build's seed and
  `num_candidates`, keyed by the request's sample key.

The sample key: a request equal to an interaction of the dataset (same user, item and timestamp, split
train/valid/test) gets that interaction's `sample_id` (shard * 2**40 + row), so its record — candidates
included — is the one retrieval.build wrote. Any other request gets a negative key hashed from
(user, item, timestamp): never a real sample id, and the same on every run and worker.

How it is done: the requested users' rows are read from their user-hash shard (only row groups whose
user_id statistics overlap); each request becomes a virtual row placed after its user's real rows, and
the build's vectorized functions run on that block with history bounds [user start, rows before t).
Requests that cannot become a record get a reason instead (see REASONS); none is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recdata import storage
from recdata.samples import (
    SAMPLE_SCHEMA,
    SHARD_STRIDE,
    TARGET_SPLITS,
    list_array,
    mix64,
    sample_candidates,
)
from recdata.schema import Dataset, user_bucket
from retrieval.history import ItemVectors, Ragged, check_sorted, recent, top_similar

# Why a request has no record (the caller answers it with a null prediction and this reason).
REASONS = {
    "unknown_user": "the user has no interaction in the dataset and is not in its users table",
    "unknown_item": "the item is not in the dataset's items table (or has no item embedding)",
    "item_without_text": "the item has no title and the samples were built with missing_text=error",
    "no_history": "no interaction before the request time, and training drops such samples "
    "(empty_history=drop or min_history > 0)",
    "short_history": "fewer interactions before the request time than the samples' min_history",
    "unknown_candidate": "a candidate is not in the dataset's items table (or has no title)",
    "item_not_in_candidates": "the request's item is not in its candidate list",
    "malformed_candidates": "the candidate list is empty, has one item, or repeats an item",
    "too_few_negatives": "the user has seen nearly every item: fewer eligible negatives than num_candidates - 1",
}
_COLUMNS = ["user_id", "item_id", "timestamp", "rating", "split", "label"]
# Hash salt for request keys: distinct from every counter-based stream in recdata.samples.
_KEY_SALT = np.uint64(0x5DEECE66D1CE4E5B)
NO_TIME = np.iinfo(np.int64).max  # stands for "no timestamp given": every interaction is history


def request_keys(user_ids: np.ndarray, item_ids: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """Negative int64 keys, a pure function of (user, item, timestamp); NO_TIME for a request without time."""
    with np.errstate(over="ignore"):
        h = mix64(np.asarray(user_ids).astype(np.uint64) ^ _KEY_SALT)
        h = mix64(h ^ np.asarray(item_ids).astype(np.uint64))
        h = mix64(h ^ np.asarray(timestamps).astype(np.uint64))
    return -((h >> np.uint64(2)).astype(np.int64)) - 1


@dataclass
class RequestRecords:
    """`table`: one SAMPLE_SCHEMA row per request that has a record, in request order; `rows`: the
    request positions of those rows; `reasons`: per request, None or a key of REASONS."""

    table: pa.Table
    rows: np.ndarray
    reasons: list[str | None]


class RequestRetriever:
    """Builds records for requests against one committed dataset with one set of build options.

    `options` is a retrieval.build.BuildOptions (the samples manifest's `options` reproduce a build);
    `vectors` the item embeddings when the options need them (SUBR or SIM)."""

    def __init__(self, dataset_url: str, options: Any, vectors: ItemVectors | None = None):
        self.opts = options
        self.dataset = Dataset.open(dataset_url)
        self.task = self.dataset.task
        if options.needs_embeddings and vectors is None:
            raise ValueError(f"text_mode={options.text_mode}, id_mode={options.id_mode} need item embeddings")
        self.vectors = vectors
        items = self.dataset.read_items()
        ids = items.column("item_id").to_numpy()
        titles = items.column("title").to_pylist()
        titled = np.array([t is not None and bool(str(t).strip()) for t in titles], dtype=bool)
        self.all_items = np.sort(ids)
        self.titled = np.sort(ids[titled])
        # Same eligibility as SampleShardWorker: negatives must render unless placeholders are allowed.
        self.catalogue = self.all_items if options.missing_text == "placeholder" else self.titled
        users = self.dataset.read_users()
        self.listed_users = np.sort(users.column("user_id").to_numpy()) if users is not None else np.zeros(0, np.int64)
        self.num_shards = len(self.dataset.shards)

    # ---- where a user's rows live
    def shard_of(self, user_ids: np.ndarray) -> np.ndarray:
        return user_bucket(np.asarray(user_ids, dtype=np.int64), self.num_shards)

    def read_users(self, shard: int, users: np.ndarray) -> tuple[pa.Table, np.ndarray]:
        """Rows of `users` (sorted unique) in shard `shard`, in shard order, and their row positions."""
        url = self.dataset.shards[shard]
        fs, path = storage.get_fs(url)
        parts, positions = [], []
        with storage.storage_errors(url), fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            missing = set(_COLUMNS) - set(pf.schema_arrow.names)
            if missing:
                raise ValueError(f"{url}: missing interaction column(s) {sorted(missing)}")
            col = next(i for i in range(pf.metadata.num_columns) if pf.metadata.schema.column(i).path == "user_id")
            base = 0
            for g in range(pf.num_row_groups):
                md = pf.metadata.row_group(g)
                n = md.num_rows
                st = md.column(col).statistics
                # Shards are sorted by user: row-group statistics skip almost every group.
                if st is not None and st.has_min_max:
                    j = np.searchsorted(users, st.min)
                    if j >= len(users) or users[j] > st.max:
                        base += n
                        continue
                t = pf.read_row_group(g, columns=_COLUMNS)
                idx = np.flatnonzero(np.isin(t.column("user_id").to_numpy(), users))
                if len(idx):
                    parts.append(t.take(pa.array(idx)))
                    positions.append(base + idx)
                base += n
        if not parts:
            return _empty_rows(), np.zeros(0, np.int64)
        table = pa.concat_tables([p.cast(parts[0].schema) for p in parts])
        return table, np.concatenate(positions).astype(np.int64)

    # ---- records
    def records(
        self,
        shard: int,
        user_ids: Sequence[int],
        item_ids: Sequence[int],
        timestamps: Sequence[int | None],
        candidates: Sequence[Sequence[int] | None] | None = None,
    ) -> RequestRecords:
        """Records for requests whose users all live in `shard` (see shard_of). `timestamps[j]` None: no
        time given. `candidates[j]`: next_item only; None samples them as retrieval.build does."""
        o = self.opts
        users = np.asarray(user_ids, dtype=np.int64)
        items = np.asarray(item_ids, dtype=np.int64)
        n = len(users)
        has_time = np.array([t is not None for t in timestamps], dtype=bool)
        ts = np.array([NO_TIME if t is None else int(t) for t in timestamps], dtype=np.int64)
        cands = list(candidates) if candidates is not None else [None] * n
        if n and np.any(self.shard_of(users) != shard):
            raise ValueError(f"records(shard={shard}): some requested users live in another shard")
        reasons: list[str | None] = [None] * n

        uniq = np.unique(users)
        rows, pos = self.read_users(shard, uniq)
        r_user = rows.column("user_id").to_numpy().astype(np.int64)
        r_item = rows.column("item_id").to_numpy().astype(np.int64)
        r_ts = rows.column("timestamp").to_numpy().astype(np.int64)
        r_rating = rows.column("rating").to_numpy(zero_copy_only=False).astype(np.float32)
        r_split = rows.column("split").cast(pa.string()).to_pylist()
        r_label = rows.column("label").to_pylist()
        check_sorted(r_user, r_ts, r_item, where=self.dataset.shards[shard])

        u_lo = np.searchsorted(r_user, users, side="left")
        u_hi = np.searchsorted(r_user, users, side="right")
        known_user = (u_hi > u_lo) | _isin_sorted(users, self.listed_users)
        known_item = _isin_sorted(items, self.all_items)
        if self.vectors is not None:
            known_item &= _isin_sorted(items, self.vectors.item_ids)
        titled = _isin_sorted(items, self.titled) | (o.missing_text == "placeholder")
        # Rows strictly before t (the leakage rule), or all of the user's rows without a time.
        end = u_lo.copy()
        for j in range(n):
            lo, hi = u_lo[j], u_hi[j]
            end[j] = hi if not has_time[j] else lo + np.searchsorted(r_ts[lo:hi], ts[j], side="left")
        hist_len = end - u_lo

        # A request equal to a dataset interaction of a target split keeps that sample's id.
        keys = request_keys(users, items, ts)
        label = [None] * n
        rating = [None] * n
        for j in range(n):
            if not has_time[j]:
                continue
            lo = end[j]
            hi = lo + np.searchsorted(r_ts[lo : u_hi[j]], ts[j], side="right")
            hit = lo + np.flatnonzero(r_item[lo:hi] == items[j])
            if len(hit) and r_split[hit[0]] in TARGET_SPLITS:
                keys[j] = np.int64(shard) * SHARD_STRIDE + pos[hit[0]]
                label[j] = r_label[hit[0]] if self.task == "ctr" else None
                rating[j] = None if np.isnan(r_rating[hit[0]]) else float(r_rating[hit[0]])

        for j in range(n):
            if not known_user[j]:
                reasons[j] = "unknown_user"
            elif not known_item[j]:
                reasons[j] = "unknown_item"
            elif not titled[j]:
                reasons[j] = "item_without_text"
            elif hist_len[j] == 0 and (o.empty_history == "drop" or o.min_history > 0):
                reasons[j] = "no_history"
            elif hist_len[j] < o.min_history:
                reasons[j] = "short_history"
            elif self.task == "next_item" and cands[j] is not None:
                reasons[j] = self._check_candidates(items[j], cands[j])

        ok = np.array([r is None for r in reasons], dtype=bool)
        # Block: per user, its real rows, then its requests (virtual rows) in time order, so every
        # target's history range and SUBR window lie in its own user's real rows and the ranges are
        # non-decreasing along the targets (what top_similar's blocking expects).
        req = np.flatnonzero(ok)
        req = req[np.lexsort((req, end[req], users[req]))]
        if len(req) == 0:
            return RequestRecords(SAMPLE_SCHEMA.empty_table(), np.zeros(0, np.int64), reasons)
        b_item, b_ts, b_rating, b_start, b_end, targets = [], [], [], [], [], []
        at = 0
        for u in np.unique(users[req]):
            lo, hi = np.searchsorted(r_user, u, "left"), np.searchsorted(r_user, u, "right")
            mine = req[users[req] == u]
            start = at
            b_item.append(r_item[lo:hi])
            b_ts.append(r_ts[lo:hi])
            b_rating.append(r_rating[lo:hi])
            b_start.append(np.full(hi - lo, start, np.int64))
            b_end.append(np.arange(start, start + hi - lo, dtype=np.int64))  # unused for real rows
            at += hi - lo
            b_item.append(items[mine])
            b_ts.append(ts[mine])
            b_rating.append(np.zeros(len(mine), np.float32))
            b_start.append(np.full(len(mine), start, np.int64))
            b_end.append(start + (end[mine] - lo))
            targets.append(np.arange(at, at + len(mine), dtype=np.int64))
            at += len(mine)
        bi, bt, br = np.concatenate(b_item), np.concatenate(b_ts), np.concatenate(b_rating)
        bs, be, tg = np.concatenate(b_start), np.concatenate(b_end), np.concatenate(targets)
        item_rows = self.vectors.rows(bi) if self.vectors is not None else None

        def retrieve(mode: str, k: int, pool: int) -> Ragged:
            if k == 0:
                return Ragged(np.zeros(len(tg) + 1, dtype=np.int64), np.zeros(0, dtype=np.int64))
            if mode == "recent":
                return recent(bs, be, tg, k)
            return top_similar(bs, be, tg, item_rows, self.vectors.matrix, k, pool)

        text = retrieve("recent" if o.text_mode == "recent" else "subr", o.k_text, o.subr_pool)
        idh = retrieve("recent" if o.id_mode == "recent" else "sim", o.k_id, o.sim_pool)

        cand_lists: list[list[int] | None] = [None] * len(req)
        keep = np.ones(len(req), dtype=bool)
        if self.task == "next_item":
            need = np.array([cands[j] is None for j in req], dtype=bool)
            for k in np.flatnonzero(~need):
                cand_lists[k] = [int(c) for c in cands[req[k]]]
            if need.any():
                drawn, good = sample_candidates(
                    keys[req[need]], tg[need], bi, bs, be, self.catalogue, o.num_candidates, o.seed
                )
                for k, row, g in zip(np.flatnonzero(need), drawn, good):
                    cand_lists[k] = row.tolist() if g else None
                    if not g:
                        reasons[req[k]] = "too_few_negatives"
                        keep[k] = False

        table = pa.table(
            {
                "sample_id": pa.array(keys[req]),
                "user_id": pa.array(users[req]),
                "item_id": pa.array(items[req]),
                "timestamp": pa.array([int(ts[j]) if has_time[j] else None for j in req], pa.int64()),
                "split": pa.nulls(len(req), pa.string()),
                "label": pa.array([label[j] for j in req], pa.int8()),
                "rating": pa.array([rating[j] for j in req], pa.float32()),
                "hist_len": pa.array(hist_len[req].astype(np.int32)),
                "text_hist_items": list_array(text.offsets, bi[text.index], pa.int64()),
                "text_hist_ratings": list_array(text.offsets, br[text.index], pa.float32()),
                "id_hist_items": list_array(idh.offsets, bi[idh.index], pa.int64()),
                "id_hist_ratings": list_array(idh.offsets, br[idh.index], pa.float32()),
                "id_hist_timestamps": list_array(idh.offsets, bt[idh.index], pa.int64()),
                "candidates": pa.array(cand_lists, pa.list_(pa.int64())),
            },
            schema=SAMPLE_SCHEMA,
        )
        # Back to request order.
        order = np.argsort(req[keep], kind="stable")
        table = table.filter(pa.array(keep)).take(pa.array(order))
        return RequestRecords(table, req[keep][order].astype(np.int64), reasons)

    def _check_candidates(self, item: int, cands: Sequence[int]) -> str | None:
        c = np.asarray(list(cands), dtype=np.int64)
        if len(c) < 2 or len(np.unique(c)) != len(c):
            return "malformed_candidates"
        if not _isin_sorted(c, self.catalogue).all():
            return "unknown_candidate"
        if item not in set(c.tolist()):
            return "item_not_in_candidates"
        return None


def _isin_sorted(values: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.int64)
    if len(sorted_ids) == 0:
        return np.zeros(values.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_ids, values), len(sorted_ids) - 1)
    return sorted_ids[pos] == values


def _empty_rows() -> pa.Table:
    return pa.table(
        {
            "user_id": pa.array([], pa.int64()),
            "item_id": pa.array([], pa.int64()),
            "timestamp": pa.array([], pa.int64()),
            "rating": pa.array([], pa.float32()),
            "split": pa.array([], pa.string()),
            "label": pa.array([], pa.int8()),
        }
    )
