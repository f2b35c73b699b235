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

from retrieval import storage
from retrieval.schema import read_parquet
from teacher.features import Encoder

# Only what the teacher reads; text-history columns stay on disk.
SAMPLE_COLUMNS = ("sample_id", "user_id", "item_id", "label", "hist_len", "id_hist_items", "id_hist_ratings", "candidates")


class SamplesError(RuntimeError):
    pass


def list_shards(samples_url: str, split: str, required: bool = True) -> list[str]:
    """Sorted shard URLs of one split (names shard-*.parquet; temp/marker files are ignored)."""
    fs, path = storage.get_fs(samples_url)
    pattern = posixpath.join(path, split, "shard-*.parquet")
    with storage.storage_errors(samples_url):
        found = sorted(fs.glob(pattern))
    prefix = samples_url.split("://", 1)[0] + "://" if "://" in samples_url else ""
    urls = [prefix + p if prefix and not p.startswith(prefix) else p for p in found]
    if required and not urls:
        raise SamplesError(f"{storage.join(samples_url, split)}: no shard-*.parquet files (was the '{split}' split built?)")
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


def _take(batch: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in batch.items()}


def _concat(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([a[k], b[k]]) for k in a}


def iter_train_batches(
    shard_urls: list[str],
    encoder: Encoder,
    batch_size: int,
    seed: int,
    epoch: int,
    stats: Counter | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Seeded shuffle: shard order per epoch, rows within each shard; leftovers roll into the next shard
    so every batch but the last is full."""
    rng = np.random.default_rng([seed, epoch])
    carry: dict[str, np.ndarray] | None = None
    for si in rng.permutation(len(shard_urls)):
        url = shard_urls[si]
        enc = encoder.encode(read_shard(url), stats, where=url)
        enc = _take(enc, rng.permutation(len(enc["sample_id"])))
        if carry is not None:
            enc = _concat(carry, enc)
        n = len(enc["sample_id"])
        full = n - n % batch_size
        for s in range(0, full, batch_size):
            yield {k: v[s : s + batch_size] for k, v in enc.items()}
        carry = {k: v[full:] for k, v in enc.items()} if full < n else None
    if carry is not None:
        yield carry


def load_encoded(shard_urls: list[str], encoder: Encoder, limit: int | None = None, stats: Counter | None = None) -> dict[str, np.ndarray]:
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
