"""Request files in, prediction files out: the formats of batch prediction (trainer/predict.py).

Reading and validating a requests Parquet (user_id, item_id, optional timestamp; next item: optional
candidates), cutting it into tasks by the dataset shard of the user, the schema of the output parts and
reading a finished output back in request order. docs/predict.md describes both formats.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import sys
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from configs.errors import RecloraError
from recdata import storage
from recdata.schema import user_bucket

FORMAT = "reclora-predictions/1"
MANIFEST = "_manifest.json"
COMMITS = "_commits"
REQUIRED_COLUMNS = ("user_id", "item_id")
# Reasons found before any retrieval (the request row itself is unusable); retrieval.requests.REASONS
# has the ones that need the dataset.
ROW_REASONS = {
    "missing_user_id": "user_id is null",
    "missing_item_id": "item_id is null",
    "malformed_user_id": "user_id is not an integer",
    "malformed_item_id": "item_id is not an integer",
    "malformed_timestamp": "timestamp is not an integer number of seconds or a date/time",
    "malformed_candidates": "the candidate list holds a null or non-integer id",
    # Datasets ingested from string ids (recdata.readers.IdMap): requests give the source's own keys.
    "unknown_user_key": "user_id is not a user id of the source (not in the dataset's id map)",
    "unknown_item_key": "item_id is not an item id of the source (not in the dataset's id map)",
}


class PredictInputError(RecloraError, ValueError):
    """A requests file, run folder or output folder that cannot be used; the message names it."""


def output_schema(task: str, return_cond: bool = False) -> pa.Schema:
    """The columns of a prediction part; `return_cond` adds `cond`, the gate input (the frozen teacher's
    representation of the request) that trainer.export turns into a standard LoRA adapter."""
    fields = [
        ("request_index", pa.int64()),  # row of the request in the requests file
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("timestamp", pa.int64()),
        ("reason", pa.string()),  # null: predicted; else why the prediction is null
        (
            "sample_id",
            pa.int64(),
        ),  # the dataset sample when the request is one of its interactions, else a negative key
        ("label", pa.int8()),  # CTR: the dataset's label for that interaction, when it is one
        ("hist_len", pa.int32()),  # interactions before the request time
        ("cold_user", pa.bool_()),  # outside the teacher's training vocabulary (it then uses its unknown row)
        ("cold_item", pa.bool_()),
        ("teacher_score", pa.float32()),  # CTR: teacher p(click); next item: the teacher's score of item_id
    ]
    if task == "ctr":
        fields.append(("p_yes", pa.float64()))
    else:
        fields += [
            ("candidates", pa.list_(pa.int64())),
            ("scores", pa.list_(pa.float32())),  # mean log-likelihood of each candidate's title, candidate order
            ("ranking", pa.list_(pa.int64())),  # candidate ids, best first
            ("predicted_item", pa.int64()),
            ("target_rank", pa.int32()),  # 1-based rank of item_id among the candidates
            ("teacher_candidate_scores", pa.list_(pa.float32())),
        ]
    if return_cond:
        fields.append(("cond", pa.list_(pa.float32())))
    return pa.schema(fields)


def read_requests(url: str, task: str, id_maps: dict[str, pa.Table] | None = None) -> tuple[dict[str, Any], str]:
    """Requests file -> normalized columns and a per-row reason (or None); plus a digest of the content.

    Missing required columns and unusable column types raise PredictInputError naming the file and
    column; unusable values in a row only give that row a reason. With `id_maps` (a dataset ingested from
    string ids: column -> (id, key) table), text columns user_id / item_id / candidates hold the source's own
    keys, integer columns the dataset's ids."""
    fs, path = storage.get_fs(url)
    with storage.storage_errors(url):
        if not fs.exists(path):
            raise PredictInputError(f"{url}: requests file not found")
        try:
            table = pq.read_table(path, filesystem=storage.arrow_fs(fs))
        except pa.ArrowInvalid as e:
            raise PredictInputError(f"{url}: not a readable Parquet file ({e})") from None
    for name in REQUIRED_COLUMNS:
        if name not in table.column_names:
            raise PredictInputError(
                f"{url}: missing required column '{name}' (columns: {table.column_names}); "
                f"requests need {list(REQUIRED_COLUMNS)} and optionally timestamp"
                + (", candidates" if task == "next_item" else "")
            )
    n = table.num_rows
    id_maps = id_maps or {}
    reasons: list[str | None] = [None] * n
    users, u_ok, u_present = _ids(table.column("user_id"), url, "user_id", id_maps.get("user_id"))
    items, i_ok, i_present = _ids(table.column("item_id"), url, "item_id", id_maps.get("item_id"))
    if "timestamp" in table.column_names:
        ts, t_ok, t_present = _ints(table.column("timestamp"), url, "timestamp", times=True)
        t_ok |= ~t_present  # a null timestamp is "no time given": every interaction is history
    else:
        ts, t_ok, t_present = np.zeros(n, np.int64), np.ones(n, bool), np.zeros(n, bool)
    cands: list[list[int] | None] = [None] * n
    c_ok = np.ones(n, bool)
    if task == "next_item" and "candidates" in table.column_names:
        cands, c_ok = _candidate_lists(table.column("candidates"), url, id_maps.get("item_id"))
    elif "candidates" in table.column_names:
        print(f"note: {url}: column 'candidates' is ignored for the ctr task", file=sys.stderr)
    for j in range(n):
        if not u_present[j]:
            reasons[j] = "missing_user_id"
        elif not u_ok[j]:
            reasons[j] = "unknown_user_key" if "user_id" in id_maps else "malformed_user_id"
        elif not i_present[j]:
            reasons[j] = "missing_item_id"
        elif not i_ok[j]:
            reasons[j] = "unknown_item_key" if "item_id" in id_maps else "malformed_item_id"
        elif not t_ok[j]:
            reasons[j] = "malformed_timestamp"
        elif not c_ok[j]:
            reasons[j] = "malformed_candidates"
    h = hashlib.sha256()
    for arr in (users, u_ok, u_present, items, i_ok, i_present, ts, t_ok, t_present):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update(json.dumps(cands).encode())
    cols = {
        "user_id": users,
        "item_id": items,
        "timestamp": ts,
        "has_time": t_present & t_ok,
        "candidates": cands,
        "reason": reasons,
        "valid_user": u_present & u_ok,
        "valid_item": i_present & i_ok,
        "rows": n,
    }
    return cols, h.hexdigest()


def _keys_to_ids(values: pa.Array, id_map: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The source's own keys (any type; compared as text) -> (int64 ids, found mask)."""
    index = pc.index_in(pc.cast(values, pa.string()), value_set=id_map["key"].combine_chunks())
    found = index.is_valid().to_numpy(zero_copy_only=False)
    ids = id_map[id_map.column_names[0]].to_numpy()
    return np.where(found, ids[index.fill_null(0).to_numpy(zero_copy_only=False)], 0).astype(np.int64), found


def ids_from_column(col, url: str, name: str, id_map: pa.Table | None = None):
    """(int64 ids, usable mask, non-null mask) of an id column as requests read it (integers, or with an id map
    the source's own keys in a text column); trainer.export's --users list reads user ids this way."""
    return _ids(col, url, name, id_map)


def _ids(col, url: str, name: str, id_map: pa.Table | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int64 ids, usable mask, non-null mask) of user_id / item_id: integers, or keys through the id map.
    With a map, a text column holds the source's keys and an integer column the dataset's own ids."""
    if id_map is None or pa.types.is_integer(col.type):
        return _ints(col, url, name)
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    present = col.is_valid().to_numpy(zero_copy_only=False) if len(col) else np.zeros(0, bool)
    ids, found = _keys_to_ids(col, id_map)
    return ids, found & present, present


def _ints(col: pa.ChunkedArray, url: str, name: str, times: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int64 values, usable mask, non-null mask) of an id or time column."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    t = col.type
    n = len(col)
    present = col.is_valid().to_numpy(zero_copy_only=False) if n else np.zeros(0, bool)
    if times and (pa.types.is_timestamp(t) or pa.types.is_date(t)):
        # Same conversion as the generic ingest: date/time columns become epoch seconds.
        col = col.cast(pa.timestamp("s")).cast(pa.int64())
        t = col.type
    if pa.types.is_integer(t):
        vals = col.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        return vals, present.copy(), present
    if pa.types.is_floating(t):
        f = col.fill_null(0).to_numpy(zero_copy_only=False).astype(np.float64)
        ok = present & np.isfinite(f) & (np.floor(f) == f) & (np.abs(f) < 2.0**63)
        return np.where(ok, f, 0).astype(np.int64), ok, present
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        vals, ok = np.zeros(n, np.int64), np.zeros(n, bool)
        for j, s in enumerate(col.to_pylist()):
            try:
                vals[j], ok[j] = int(str(s).strip()), True
            except (TypeError, ValueError, OverflowError):
                pass
        return vals, ok & present, present
    raise PredictInputError(
        f"{url}: column '{name}' has type {t}; expected integers" + (" or a date/time" if times else "")
    )


def _candidate_lists(
    col: pa.ChunkedArray, url: str, id_map: pa.Table | None = None
) -> tuple[list[list[int] | None], np.ndarray]:
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type)):
        raise PredictInputError(f"{url}: column 'candidates' has type {col.type}; expected a list of item ids")
    out: list[list[int] | None] = []
    ok = np.ones(len(col), bool)
    for j, v in enumerate(col.to_pylist()):
        if v is None:
            out.append(None)  # sampled like retrieval.build does
            continue
        if id_map is not None and not pa.types.is_integer(col.type.value_type):
            ids, found = _keys_to_ids(pa.array(v, pa.string()) if v else pa.array([], pa.string()), id_map)
            out.append(ids.tolist() if found.all() else None)
            ok[j] = bool(found.all())
            continue
        try:
            vals = [int(x) for x in v]
            if any(float(x) != int(x) for x in v):
                raise ValueError
            out.append(vals)
        except (TypeError, ValueError, OverflowError):
            out.append(None)
            ok[j] = False
    return out, ok


def plan_tasks(req: dict[str, Any], num_shards: int, rows_per_task: int) -> list[dict[str, Any]]:
    """Tasks of at most rows_per_task requests whose users share one dataset shard, in (shard, request)
    order. Rows already answered by a reason ride along with shard 0 (they need no interactions)."""

    n = req["rows"]
    shard = np.zeros(n, np.int64)
    usable = np.array([r is None for r in req["reason"]], bool)
    if usable.any():
        shard[usable] = user_bucket(req["user_id"][usable], num_shards)
    tasks = []
    for s in range(num_shards):
        idx = np.flatnonzero(shard == s)
        for c in range(0, len(idx), rows_per_task):
            chunk = idx[c : c + rows_per_task]
            tasks.append(
                {
                    "part": len(tasks),
                    "shard": s,
                    "rows": {
                        "request_index": chunk.tolist(),
                        "user_id": [int(req["user_id"][j]) if req["valid_user"][j] else None for j in chunk],
                        "item_id": [int(req["item_id"][j]) if req["valid_item"][j] else None for j in chunk],
                        "timestamp": [int(req["timestamp"][j]) if req["has_time"][j] else None for j in chunk],
                        "candidates": [req["candidates"][j] for j in chunk],
                        "reason": [req["reason"][j] for j in chunk],
                    },
                }
            )
    return tasks


def part_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


def marker_name(k: int) -> str:
    """The commit marker of part k, under COMMITS."""
    return f"part-{k:05d}.json"


def read_predictions(out_url: str) -> pa.Table:
    """Every committed part listed in the manifest, in request order."""
    murl = storage.join(out_url, MANIFEST)
    if not storage.exists(murl):
        raise PredictInputError(f"{out_url}: no {MANIFEST}: the prediction has not finished (rerun it to resume)")
    m = storage.read_json(murl)
    fs, root = storage.get_fs(out_url)
    tables = []
    for p in m["parts"]:
        with storage.storage_errors(out_url):
            tables.append(pq.read_table(posixpath.join(root, p["path"]), filesystem=storage.arrow_fs(fs)))
    if not tables:
        return output_schema(m["task"], return_cond="cond" in m.get("columns", [])).empty_table()
    t = pa.concat_tables(tables)
    t = t.take(pa.array(np.argsort(t["request_index"].to_numpy(), kind="stable")))
    for column, map_url in sorted((m.get("id_maps") or {}).items()):
        t = with_keys(t, column, read_id_map(map_url))
    return t


def read_id_map(url: str) -> pa.Table:
    fs, path = storage.get_fs(url)
    with storage.storage_errors(url):
        return pq.read_table(path, filesystem=storage.arrow_fs(fs))


def with_keys(t: pa.Table, column: str, id_map: pa.Table) -> pa.Table:
    """Add the source's own keys beside the integer ids: user_key; item_key, predicted_item_key, ranking_keys."""
    ids = id_map[column].to_numpy()
    keys = id_map["key"].combine_chunks()
    order = np.argsort(ids, kind="stable")

    def decode(values: pa.Array) -> pa.Array:
        v = values.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        pos = np.clip(np.searchsorted(ids[order], v), 0, len(ids) - 1)
        hit = (ids[order][pos] == v) & values.is_valid().to_numpy(zero_copy_only=False)
        return pa.array([keys[int(order[p])].as_py() if h else None for p, h in zip(pos, hit)], pa.string())

    if column == "user_id":
        return t.append_column("user_key", decode(t["user_id"].combine_chunks()))
    t = t.append_column("item_key", decode(t["item_id"].combine_chunks()))
    if "predicted_item" in t.column_names:
        t = t.append_column("predicted_item_key", decode(t["predicted_item"].combine_chunks()))
        ranking = t["ranking"].combine_chunks()
        flat = decode(ranking.flatten())
        t = t.append_column("ranking_keys", pa.ListArray.from_arrays(ranking.offsets, flat, mask=ranking.is_null()))
    return t
