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
}


class PredictInputError(RecloraError, ValueError):
    """A requests file, run folder or output folder that cannot be used; the message names it."""


def output_schema(task: str) -> pa.Schema:
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
    return pa.schema(fields)


def read_requests(url: str, task: str) -> tuple[dict[str, Any], str]:
    """Requests file -> normalized columns and a per-row reason (or None); plus a digest of the content.

    Missing required columns and unusable column types raise PredictInputError naming the file and
    column; unusable values in a row only give that row a reason."""
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
    reasons: list[str | None] = [None] * n
    users, u_ok, u_present = _ints(table.column("user_id"), url, "user_id")
    items, i_ok, i_present = _ints(table.column("item_id"), url, "item_id")
    if "timestamp" in table.column_names:
        ts, t_ok, t_present = _ints(table.column("timestamp"), url, "timestamp", times=True)
        t_ok |= ~t_present  # a null timestamp is "no time given": every interaction is history
    else:
        ts, t_ok, t_present = np.zeros(n, np.int64), np.ones(n, bool), np.zeros(n, bool)
    cands: list[list[int] | None] = [None] * n
    c_ok = np.ones(n, bool)
    if task == "next_item" and "candidates" in table.column_names:
        cands, c_ok = _candidate_lists(table.column("candidates"), url)
    elif "candidates" in table.column_names:
        print(f"note: {url}: column 'candidates' is ignored for the ctr task", file=sys.stderr)
    for j in range(n):
        if not u_present[j]:
            reasons[j] = "missing_user_id"
        elif not u_ok[j]:
            reasons[j] = "malformed_user_id"
        elif not i_present[j]:
            reasons[j] = "missing_item_id"
        elif not i_ok[j]:
            reasons[j] = "malformed_item_id"
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


def _candidate_lists(col: pa.ChunkedArray, url: str) -> tuple[list[list[int] | None], np.ndarray]:
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type)):
        raise PredictInputError(f"{url}: column 'candidates' has type {col.type}; expected a list of item ids")
    out: list[list[int] | None] = []
    ok = np.ones(len(col), bool)
    for j, v in enumerate(col.to_pylist()):
        if v is None:
            out.append(None)  # sampled like retrieval.build does
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
        return output_schema(m["task"]).empty_table()
    t = pa.concat_tables(tables)
    return t.take(pa.array(np.argsort(t["request_index"].to_numpy(), kind="stable")))
