"""Vocabularies and the vectorized encoder from sample records (Arrow) to model inputs (numpy).

Index 0 is padding and 1 is "unknown" in every vocabulary. Vocabularies are built from the training split
only, so an id first seen in validation/test (or in another dataset) maps to the reserved unknown row and
is counted, never silently given some other id's embedding.

Items and users have two indices: the id-embedding index (training vocabulary) and the attribute row
(catalog from items.parquet / users.parquet). A cold item thus keeps its real genres and year even
though its id embedding is the unknown one.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from configs.errors import RecloraError

PAD, UNK = 0, 1
NUM_RESERVED = 2
# Rating buckets of 0.5 stars from 0 to 10 (covers 1-5 stars and 0-10 scales); 0 pad, 1 missing.
RATING_BUCKETS = 21 + NUM_RESERVED
# ML-1M's age groups (RecLoRA/ReLLa profile sentence); ages are bucketed so unseen ages are not unknown.
AGE_EDGES = (18, 25, 35, 45, 50, 56)
AGE_LABELS = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")


class FeatureError(RecloraError, ValueError):
    """A sample or side table that cannot be encoded; the message names the sample_id/user_id and field."""


class IdVocab:
    """Sorted int64 ids -> index (id at position p gets p + 2). Small non-negative id ranges use a
    dense lookup array (one gather instead of a binary search per value)."""

    DENSE_MAX = 1 << 24  # at most 128 MB of int64 per vocabulary

    def __init__(self, ids: np.ndarray):
        self.ids = np.unique(np.asarray(ids, dtype=np.int64))
        self._dense: np.ndarray | None = None
        if len(self.ids) and self.ids[0] >= 0 and self.ids[-1] < self.DENSE_MAX:
            self._dense = np.full(int(self.ids[-1]) + 1, UNK, dtype=np.int64)
            self._dense[self.ids] = np.arange(NUM_RESERVED, len(self.ids) + NUM_RESERVED)

    def __len__(self) -> int:
        return len(self.ids) + NUM_RESERVED

    def lookup(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index array, boolean mask of unknown ids)."""
        v = np.asarray(values, dtype=np.int64)
        if len(self.ids) == 0:
            return np.full(v.shape, UNK, dtype=np.int64), np.ones(v.shape, dtype=bool)
        if self._dense is not None:
            inside = (v >= 0) & (v < len(self._dense))
            idx = np.where(inside, self._dense[np.where(inside, v, 0)], UNK)
            return idx, idx == UNK
        pos = np.searchsorted(self.ids, v)
        pos_c = np.minimum(pos, len(self.ids) - 1)
        found = self.ids[pos_c] == v
        return np.where(found, pos_c + NUM_RESERVED, UNK).astype(np.int64), ~found


def _genre_lists(col: pa.ChunkedArray | pa.Array) -> list[list[str]]:
    out = []
    for v in col.to_pylist():
        out.append([g.strip() for g in v.split("|") if g.strip()] if v else [])
    return out


@dataclass
class FeatureSpace:
    items: IdVocab
    users: IdVocab
    item_catalog: IdVocab
    item_genres: np.ndarray  # [len(item_catalog), max_genres] genre indices, 0 = none
    item_year: np.ndarray  # [len(item_catalog)] year index
    genre_names: list[str]
    year_values: list[int]
    user_catalog: IdVocab
    user_attr: np.ndarray  # [len(user_catalog), num_fields]
    user_fields: list[str]
    user_field_tokens: dict[str, list[str]] = field(default_factory=dict)

    # ---- sizes the models need ----
    @property
    def num_genres(self) -> int:
        return len(self.genre_names) + NUM_RESERVED if self.genre_names else 0

    @property
    def num_years(self) -> int:
        return len(self.year_values) + NUM_RESERVED if self.year_values else 0

    @property
    def user_field_sizes(self) -> list[int]:
        return [len(self.user_field_tokens[f]) + NUM_RESERVED for f in self.user_fields]

    # ---- construction ----
    @classmethod
    def build(
        cls,
        train_user_ids: np.ndarray,
        train_item_ids: np.ndarray,
        items: pa.Table | None = None,
        users: pa.Table | None = None,
    ) -> "FeatureSpace":
        item_vocab = IdVocab(train_item_ids)
        user_vocab = IdVocab(train_user_ids)
        catalog_items = item_vocab.ids
        genre_names: list[str] = []
        year_values: list[int] = []
        item_genres = np.zeros((len(item_vocab), 1), dtype=np.int64)
        item_year = np.zeros(len(item_vocab), dtype=np.int64)
        if items is not None and items.num_rows:
            if "item_id" not in items.column_names:
                raise FeatureError(f"items table has no item_id column (columns: {items.column_names})")
            ids = items.column("item_id").to_numpy()
            catalog_items = np.union1d(ids, item_vocab.ids)
        item_catalog = IdVocab(catalog_items)
        if items is not None and items.num_rows:
            rows, _ = item_catalog.lookup(items.column("item_id").to_numpy())
            in_train = item_vocab.lookup(items.column("item_id").to_numpy())[1] == 0
            if "genres" in items.column_names:
                lists = _genre_lists(items.column("genres"))
                genre_names = sorted({g for gl, t in zip(lists, in_train) if t for g in gl})
                gidx = {g: i + NUM_RESERVED for i, g in enumerate(genre_names)}
                width = max(1, max((len(g) for g in lists), default=1))
                item_genres = np.zeros((len(item_catalog), width), dtype=np.int64)
                for r, gl in zip(rows, lists):
                    for j, g in enumerate(gl):
                        item_genres[r, j] = gidx.get(g, UNK)
            else:
                item_genres = np.zeros((len(item_catalog), 1), dtype=np.int64)
            item_year = np.full(len(item_catalog), UNK, dtype=np.int64)
            item_year[PAD] = PAD
            if "year" in items.column_names:
                years = items.column("year").cast(pa.float64()).to_numpy(zero_copy_only=False)
                known = ~np.isnan(years)
                year_values = sorted({int(y) for y, t in zip(years, in_train) if t and not np.isnan(y)})
                yv = np.asarray(year_values, dtype=np.int64)
                if len(yv):
                    p = np.searchsorted(yv, np.where(known, years, 0).astype(np.int64))
                    pc_ = np.minimum(p, len(yv) - 1)
                    hit = known & (yv[pc_] == np.where(known, years, 0).astype(np.int64))
                    item_year[rows] = np.where(hit, pc_ + NUM_RESERVED, UNK)
            else:
                item_year = np.zeros(len(item_catalog), dtype=np.int64)
        else:
            item_genres = np.zeros((len(item_catalog), 1), dtype=np.int64)
            item_year = np.zeros(len(item_catalog), dtype=np.int64)

        user_fields: list[str] = []
        tokens: dict[str, list[str]] = {}
        user_catalog = IdVocab(user_vocab.ids)
        user_attr = np.zeros((len(user_catalog), 0), dtype=np.int64)
        if users is not None and users.num_rows:
            if "user_id" not in users.column_names:
                raise FeatureError(f"users table has no user_id column (columns: {users.column_names})")
            uids = users.column("user_id").to_numpy()
            user_catalog = IdVocab(np.union1d(uids, user_vocab.ids))
            rows, _ = user_catalog.lookup(uids)
            in_train = user_vocab.lookup(uids)[1] == 0
            user_fields = [c for c in users.column_names if c != "user_id"]
            user_attr = np.full((len(user_catalog), len(user_fields)), UNK, dtype=np.int64)
            user_attr[PAD] = PAD
            for j, name in enumerate(user_fields):
                values = _user_field_strings(users, name, uids)
                vocab = sorted({v for v, t in zip(values, in_train) if t and v is not None})
                tokens[name] = vocab
                index = {v: i + NUM_RESERVED for i, v in enumerate(vocab)}
                user_attr[rows, j] = [index.get(v, UNK) if v is not None else UNK for v in values]
        return cls(
            item_vocab,
            user_vocab,
            item_catalog,
            item_genres,
            item_year,
            genre_names,
            year_values,
            user_catalog,
            user_attr,
            user_fields,
            tokens,
        )

    # ---- persistence (arrays -> safetensors, strings -> JSON) ----
    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "items.ids": self.items.ids,
            "users.ids": self.users.ids,
            "item_catalog.ids": self.item_catalog.ids,
            "item_genres": self.item_genres,
            "item_year": self.item_year,
            "user_catalog.ids": self.user_catalog.ids,
            "user_attr": self.user_attr,
        }

    def meta(self) -> dict[str, Any]:
        return {
            "genre_names": self.genre_names,
            "year_values": self.year_values,
            "user_fields": self.user_fields,
            "user_field_tokens": self.user_field_tokens,
            "num_items": len(self.items),
            "num_users": len(self.users),
        }

    @classmethod
    def from_saved(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> "FeatureSpace":
        def vocab(key: str) -> IdVocab:
            return IdVocab(arrays[key])

        return cls(
            vocab("items.ids"),
            vocab("users.ids"),
            vocab("item_catalog.ids"),
            np.asarray(arrays["item_genres"], dtype=np.int64),
            np.asarray(arrays["item_year"], dtype=np.int64),
            list(meta["genre_names"]),
            [int(y) for y in meta["year_values"]],
            vocab("user_catalog.ids"),
            np.asarray(arrays["user_attr"], dtype=np.int64),
            list(meta["user_fields"]),
            {k: list(v) for k, v in meta["user_field_tokens"].items()},
        )

    def summary(self) -> str:
        return json.dumps(
            {
                "items": len(self.items.ids),
                "users": len(self.users.ids),
                "catalog_items": len(self.item_catalog.ids),
                "genres": len(self.genre_names),
                "years": len(self.year_values),
                "user_fields": self.user_fields,
            }
        )


def _user_field_strings(users: pa.Table, name: str, uids: np.ndarray) -> list[str | None]:
    col = users.column(name)
    if pa.types.is_floating(col.type) or pa.types.is_integer(col.type):
        vals = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
        nulls = col.is_null().to_numpy(zero_copy_only=False)
        bad = np.isnan(vals) & ~nulls
        if bad.any():
            raise FeatureError(f"users table: field '{name}' is NaN for user_id {int(uids[np.flatnonzero(bad)[0]])}")
        if name == "age":
            labels = np.asarray(AGE_LABELS)[np.searchsorted(AGE_EDGES, np.where(nulls, 0, vals), side="right")]
            return [None if n else str(v) for v, n in zip(labels, nulls)]
        return [None if n else repr(float(v)) for v, n in zip(vals, nulls)]
    return [None if v is None else str(v) for v in col.to_pylist()]


# ---- sample encoding ------------------------------------------------------------------------------


def pad_lists_right(
    arr: pa.Array | pa.ChunkedArray, k: int, fill: Any = 0, dtype=np.int64
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """List column -> ([n, k] values right-aligned so the most recent item is last, [n, k] mask of real
    entries, per-row lengths, [n, k] mask of null values inside lists). Longer lists keep their last k
    values; null lists are empty. One vectorized gather, no per-row Python."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    n = len(arr)
    offsets = arr.offsets.to_numpy().astype(np.int64)  # sliced arrays: offsets index into arr.values
    lengths = np.diff(offsets)
    if arr.null_count:
        lengths = np.where(arr.is_valid().to_numpy(zero_copy_only=False), lengths, 0)
    values = arr.values
    if pa.types.is_floating(values.type) or dtype in (np.float32, np.float64):
        vals = values.cast(pa.float64()).to_numpy(zero_copy_only=False)
    else:
        vals = (values.fill_null(0) if values.null_count else values).to_numpy(zero_copy_only=False)
    take = np.minimum(lengths, k)
    cols = np.arange(k)
    mask = cols[None, :] >= (k - take)[:, None]
    if n == 0 or len(vals) == 0:
        return np.full((n, k), fill, dtype=dtype), mask & False, lengths, np.zeros((n, k), dtype=bool)
    src = np.clip(offsets[1:, None] - k + cols[None, :], 0, len(vals) - 1)
    out = np.where(mask, vals[src], fill).astype(dtype, copy=False)
    if values.null_count:
        nulls = mask & values.is_null().to_numpy(zero_copy_only=False)[src]
    else:
        nulls = np.zeros((n, k), dtype=bool)
    return out, mask, lengths, nulls


def _np(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def _require_no_nulls(table: pa.Table, name: str, sample_ids: np.ndarray, where: str) -> None:
    nulls = table.column(name).is_null().to_numpy(zero_copy_only=False)
    if nulls.any():
        raise FeatureError(f"{where}: field '{name}' is null for sample_id {int(sample_ids[np.flatnonzero(nulls)[0]])}")


class Encoder:
    """Arrow sample table -> dict of numpy arrays. Counts unknown ids and empty histories into `stats`."""

    def __init__(self, space: FeatureSpace, max_hist: int, task: str):
        self.space = space
        self.k = max_hist
        self.task = task

    def encode(self, table: pa.Table, stats: Counter | None = None, where: str = "samples") -> dict[str, np.ndarray]:
        s = self.space
        if "sample_id" not in table.column_names:
            raise FeatureError(f"{where}: no sample_id column (columns: {table.column_names})")
        sample_id = _np(table, "sample_id").astype(np.int64)
        for name in ("user_id", "item_id", "id_hist_items"):
            if name not in table.column_names:
                raise FeatureError(f"{where}: missing column '{name}' (columns: {table.column_names})")
        _require_no_nulls(table, "sample_id", np.arange(len(sample_id)), where)
        _require_no_nulls(table, "user_id", sample_id, where)
        _require_no_nulls(table, "item_id", sample_id, where)
        user_ids = _np(table, "user_id").astype(np.int64)
        item_ids = _np(table, "item_id").astype(np.int64)
        out: dict[str, np.ndarray] = {"sample_id": sample_id}
        out["user_idx"], unk_user = s.users.lookup(user_ids)
        out["user_row"], _ = s.user_catalog.lookup(user_ids)
        out["item_idx"], unk_item = s.items.lookup(item_ids)
        out["item_row"], _ = s.item_catalog.lookup(item_ids)

        hist_ids, mask, lengths, hist_nulls = pad_lists_right(table.column("id_hist_items"), self.k)
        if hist_nulls.any():
            r = int(np.flatnonzero(hist_nulls.any(axis=1))[0])
            raise FeatureError(f"{where}: field 'id_hist_items' has a null item for sample_id {int(sample_id[r])}")
        hidx, hunk = s.items.lookup(hist_ids)
        hrow, _ = s.item_catalog.lookup(hist_ids)
        out["hist_idx"] = np.where(mask, hidx, PAD)
        out["hist_row"] = np.where(mask, hrow, PAD)
        out["hist_mask"] = mask
        if "id_hist_ratings" in table.column_names:
            ratings, rmask, rlengths, rnull = pad_lists_right(
                table.column("id_hist_ratings"), self.k, fill=0.0, dtype=np.float64
            )
            if not np.array_equal(rlengths, lengths) and not (rlengths == 0).all():
                r = int(np.flatnonzero(rlengths != lengths)[0])
                raise FeatureError(
                    f"{where}: sample_id {int(sample_id[r])}: id_hist_ratings has {int(rlengths[r])} values but "
                    f"id_hist_items has {int(lengths[r])}"
                )
            nan = np.isnan(ratings) & rmask & ~rnull
            if nan.any():
                r = int(np.flatnonzero(nan.any(axis=1))[0])
                raise FeatureError(
                    f"{where}: field 'id_hist_ratings' is NaN for sample_id {int(sample_id[r])}; a missing rating "
                    f"must be null: rebuild the samples (delete that samples folder and rerun)"
                )
            bucket = np.clip(np.rint(np.where(nan | rnull, 0, ratings) * 2), 0, 20).astype(np.int64) + NUM_RESERVED
            bucket = np.where(rnull | ~rmask, UNK, bucket)
            out["hist_rating"] = np.where(mask, bucket, PAD)
        else:
            out["hist_rating"] = np.where(mask, UNK, PAD)
        hist_len = lengths
        if "hist_len" in table.column_names:
            hl = table.column("hist_len").cast(pa.float64()).to_numpy(zero_copy_only=False)
            if np.isnan(hl).any():
                raise FeatureError(
                    f"{where}: field 'hist_len' is null/NaN for sample_id {int(sample_id[np.flatnonzero(np.isnan(hl))[0]])}"
                )
            hist_len = np.maximum(hl, lengths)
        out["hist_len"] = np.log1p(np.asarray(hist_len, dtype=np.float32)).astype(np.float32)

        if self.task == "ctr" and "label" in table.column_names:
            lab = table.column("label")
            out["label_valid"] = ~lab.is_null().to_numpy(zero_copy_only=False)
            out["label"] = lab.cast(pa.float32()).fill_null(0).to_numpy(zero_copy_only=False).astype(np.float32)
        if (
            self.task == "next_item"
            and "candidates" in table.column_names
            and table.column("candidates").null_count < table.num_rows
        ):
            cands = table.column("candidates")
            if cands.null_count:
                r = int(np.flatnonzero(cands.is_null().to_numpy(zero_copy_only=False))[0])
                raise FeatureError(f"{where}: field 'candidates' is null for sample_id {int(sample_id[r])}")
            lens = pc.list_value_length(cands).to_numpy(zero_copy_only=False)
            if (lens != lens[0]).any():
                r = int(np.flatnonzero(lens != lens[0])[0])
                raise FeatureError(
                    f"{where}: sample_id {int(sample_id[r])} has {int(lens[r])} candidates, others {int(lens[0])}"
                )
            c = (
                pc.list_flatten(cands)
                .to_numpy(zero_copy_only=False)
                .astype(np.int64)
                .reshape(len(sample_id), int(lens[0]))
            )
            pos = c == item_ids[:, None]
            missing = ~pos.any(axis=1)
            if missing.any():
                r = int(np.flatnonzero(missing)[0])
                raise FeatureError(
                    f"{where}: sample_id {int(sample_id[r])}: target item {int(item_ids[r])} is not among its candidates"
                )
            out["cand_idx"], cunk = s.items.lookup(c)
            out["target_pos"] = pos.argmax(axis=1).astype(np.int64)
            if stats is not None:
                stats["unknown_candidates"] += int(cunk.sum())
        if stats is not None:
            stats["samples"] += len(sample_id)
            if self.task == "ctr":  # SASRec has no user input; its rows' user ids are not features
                stats["unknown_users"] += int(unk_user.sum())
            stats["unknown_items"] += int(unk_item.sum())
            stats["unknown_hist_items"] += int((hunk & mask).sum())
            stats["empty_history"] += int((~mask.any(axis=1)).sum())
        return out


def training_ids(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(user ids, item ids) seen in a training table: targets and history items."""
    users = np.unique(_np(table, "user_id").astype(np.int64))
    hist = pc.list_flatten(table.column("id_hist_items")).drop_null().to_numpy(zero_copy_only=False)
    items = np.unique(np.concatenate([_np(table, "item_id").astype(np.int64), hist.astype(np.int64)]))
    return users, items
