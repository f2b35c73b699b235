"""Streaming sample shards from storage: `{samples_url}/{split}/shard-XXXXX.parquet`.

Training holds one encoded shard at a time (shuffled within the shard, shard order shuffled per epoch,
both seeded), so memory is bounded by the shard size, not the dataset. Scoring streams row groups.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recdata import storage
from recdata.samples import SamplesError
from recdata.schema import read_parquet
from teacher.features import Encoder

# Only what the teacher reads; text-history columns stay on disk.
SAMPLE_COLUMNS = (
    "sample_id",
    "user_id",
    "item_id",
    "label",
    "hist_len",
    "id_hist_items",
    "id_hist_ratings",
    "candidates",
)


def list_shards(samples_url: str, split: str, required: bool = True) -> list[str]:
    """Sorted shard URLs of one split (names shard-*.parquet; temp/marker files are ignored)."""
    fs, path = storage.get_fs(samples_url)
    pattern = posixpath.join(path, split, "shard-*.parquet")
    with storage.storage_errors(samples_url):
        found = sorted(fs.glob(pattern))
    prefix = samples_url.split("://", 1)[0] + "://" if "://" in samples_url else ""
    urls = [prefix + p if prefix and not p.startswith(prefix) else p for p in found]
    if required and not urls:
        raise SamplesError(
            f"{storage.join(samples_url, split)}: no shard-*.parquet files (was the '{split}' split built?)"
        )
    return urls


def shard_columns(url: str) -> list[str]:
    fs, path = storage.get_fs(url)
    with storage.storage_errors(url), fs.open(path, "rb") as f:
        names = pq.ParquetFile(f).schema_arrow.names
    return [c for c in SAMPLE_COLUMNS if c in names]


def read_shard(url: str, columns: list[str] | None = None) -> pa.Table:
    return read_parquet(url, columns=columns if columns is not None else shard_columns(url))


def iter_row_groups(url: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    fs, path = storage.get_fs(url)
    with storage.storage_errors(url), fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        cols = columns if columns is not None else [c for c in SAMPLE_COLUMNS if c in pf.schema_arrow.names]
        for rg in range(pf.num_row_groups):
            yield pf.read_row_group(rg, columns=cols)


def _concat(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([a[k], b[k]]) for k in a}


def rank_slice(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of an n-row global batch that `rank` of `world` trains on: contiguous, sizes differ by
    at most one, together they cover the batch exactly once."""
    return rank * n // world, (rank + 1) * n // world


def iter_train_parts(
    shard_urls: list[str],
    encoder: Encoder,
    batch_size: int,
    seed: int,
    epoch: int,
    stats: Counter | None = None,
    rank: int = 0,
    world: int = 1,
) -> Iterator[tuple[dict[str, np.ndarray], int, int]]:
    """(this rank's encoded rows, their offset in the global batch, global batch size) per global batch.

    The global batches do not depend on `world`: shard order and the row order within each shard come
    from `default_rng([seed, epoch])` and leftovers roll into the next shard, so every batch but the last
    is full. Each rank then encodes only its `rank_slice` of every batch, so data-parallel training sees
    exactly the batches a single process sees. (Every rank reads every shard file: a Parquet read is cheap
    next to encoding and the forward/backward pass, which are split.)"""
    rng = np.random.default_rng([seed, epoch])
    carry: pa.Table | None = None
    url = where = carried_from = ""
    for si in rng.permutation(len(shard_urls)):
        url = shard_urls[si]
        t = read_shard(url)
        t = t.take(rng.permutation(t.num_rows))
        # Errors name the file a row came from: rows carried over belong to the shards before this one.
        where = url if carry is None else f"{url} or {carried_from}"
        if carry is not None:
            t = pa.concat_tables([carry, t])
        n = t.num_rows
        full = n - n % batch_size
        if full:
            yield from _encode_parts(
                t.slice(0, full), [batch_size] * (full // batch_size), encoder, stats, where, rank, world
            )
        carry = t.slice(full) if full < n else None
        carried_from = url if full else where  # after a full batch the carry holds rows of this shard only
    if carry is not None:
        yield from _encode_parts(carry, [carry.num_rows], encoder, stats, carried_from, rank, world)


def _encode_parts(
    t: pa.Table, sizes: list[int], encoder: Encoder, stats: Counter | None, where: str, rank: int, world: int
) -> Iterator[tuple[dict[str, np.ndarray], int, int]]:
    # One encode call per shard for this rank's rows of all its batches (per-batch calls cost more).
    spans, idx, start = [], [], 0
    for n in sizes:
        lo, hi = rank_slice(n, rank, world)
        spans.append((lo, hi, n))
        idx.append(np.arange(start + lo, start + hi))
        start += n
    rows = np.concatenate(idx)
    if len(rows):
        enc = encoder.encode(t.take(rows), stats, where=where)
    else:  # a last batch smaller than the world leaves some ranks nothing: empty arrays of the right shapes
        enc = {k: v[:0] for k, v in encoder.encode(t.slice(0, 1), None, where=where).items()}
    s = 0
    for lo, hi, n in spans:
        yield {k: v[s : s + hi - lo] for k, v in enc.items()}, lo, n
        s += hi - lo


def load_encoded(
    shard_urls: list[str], encoder: Encoder, limit: int | None = None, stats: Counter | None = None
) -> dict[str, np.ndarray]:
    """A whole (small) split encoded in file order, capped at `limit` rows: the validation set."""
    parts = []
    n = 0
    for url in shard_urls:
        t = read_shard(url)
        if limit is not None:
            t = t.slice(0, max(0, limit - n))
        if t.num_rows:
            parts.append(encoder.encode(t, stats, where=url))
            n += t.num_rows
        if limit is not None and n >= limit:
            break
    if not parts:
        raise SamplesError(f"no rows in {shard_urls[:3]}...")
    out = parts[0]
    for p in parts[1:]:
        out = _concat(out, p)
    return out
