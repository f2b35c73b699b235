"""Canonical dataset layout on storage, shared by every stage.

    {dataset}/manifest.json                      written last: its presence means the dataset is complete
    {dataset}/interactions/shard-00000.parquet   user-hash shards, sorted by (user_id, timestamp, item_id)
    {dataset}/items.parquet
    {dataset}/users.parquet                      (only when the source has user attributes)

A worker that owns shard s reads only that file and streams its row groups. All rows of a user live in
one shard (bucket = splitmix64(user_id) % num_shards), so per-user history never crosses shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from configs.errors import RecloraError
from recdata import storage

SCHEMA_VERSION = 1
TASKS = ("ctr", "next_item")
# `context` rows are history only: never a sample target (e.g. the LLaRA sequences' prefix items).
SPLITS = ("train", "valid", "test", "context")

INTERACTIONS = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("timestamp", pa.int64()),
        ("rating", pa.float32()),
        ("split", pa.dictionary(pa.int8(), pa.string())),
        ("label", pa.int8()),  # null where the task defines none (next item)
    ]
)
ITEMS_REQUIRED = pa.schema([("item_id", pa.int64()), ("title", pa.string())])
USERS_REQUIRED = pa.schema([("user_id", pa.int64())])


class DatasetError(RecloraError, RuntimeError):
    """A dataset on storage is missing, incomplete or of another schema version."""


def user_bucket(user_ids: np.ndarray, num_shards: int) -> np.ndarray:
    """Stable hash bucket of each user (splitmix64 finalizer): the same on every machine and run."""
    z = user_ids.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(num_shards)).astype(np.int32)


def split_array(values: list[str] | np.ndarray) -> pa.DictionaryArray:
    """Encode split names against the fixed dictionary SPLITS so every shard has identical dictionaries."""
    codes = np.asarray(values)
    if codes.dtype.kind in "US" or codes.dtype == object:
        lookup = {s: i for i, s in enumerate(SPLITS)}
        codes = np.array([lookup[v] for v in codes], dtype=np.int8)
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int8)), pa.array(list(SPLITS)))


@dataclass(frozen=True)
class Dataset:
    """A committed dataset on storage, opened through its manifest."""

    url: str
    manifest: dict[str, Any]

    @classmethod
    def open(cls, url: str) -> "Dataset":
        murl = storage.join(url, "manifest.json")
        if not storage.exists(murl):
            raise DatasetError(
                f"{url}: no manifest.json, so this is not a complete dataset (a crashed or running ingest?). "
                f"Run `python -m recdata.ingest ... --out {url}`."
            )
        manifest = storage.read_json(murl)
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DatasetError(f"{murl}: schema_version {version}, this code reads {SCHEMA_VERSION}; re-ingest")
        return cls(url, manifest)

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def shards(self) -> list[str]:
        return [storage.join(self.url, s["path"]) for s in self.manifest["shards"]]

    def read_shard(self, index: int, columns: list[str] | None = None) -> pa.Table:
        return read_parquet(self.shards[index], columns=columns)

    def iter_shard_row_groups(self, index: int, columns: list[str] | None = None):
        """Stream one shard's row groups (memory bounded by the row-group size)."""
        url = self.shards[index]
        fs, path = storage.get_fs(url)
        with storage.storage_errors(url), fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            for rg in range(pf.num_row_groups):
                yield rg, pf.read_row_group(rg, columns=columns)

    def read_interactions(self, columns: list[str] | None = None) -> pa.Table:
        return pa.concat_tables([self.read_shard(i, columns) for i in range(len(self.shards))])

    def read_items(self) -> pa.Table:
        return read_parquet(storage.join(self.url, self.manifest["items"]["path"]))

    def read_users(self) -> pa.Table | None:
        users = self.manifest.get("users")
        return read_parquet(storage.join(self.url, users["path"])) if users else None

    def id_map(self, column: str) -> pa.Table | None:
        """`column` (user_id | item_id) -> (id int64, key string) when the source's ids were strings, else None."""
        entry = (self.manifest.get("id_maps") or {}).get(column)
        return read_parquet(storage.join(self.url, entry["path"])) if entry else None


def read_parquet(url: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.get_fs(url)
    with storage.storage_errors(url):
        return pq.read_table(path, columns=columns, filesystem=storage.arrow_fs(fs))


def write_parquet(table: pa.Table, url: str, row_group_size: int = 65536, delta_columns: tuple[str, ...] = ()) -> int:
    """Write one Parquet file at url (callers write under a staging prefix and commit later).

    Dictionary encoding is used for text columns only: on high-cardinality integer columns it costs
    several times the write time for no size gain. Sorted integer columns (`delta_columns`) use delta
    encoding, which is both the fastest and the smallest there.
    """
    fs, path = storage.get_fs(url)
    dict_cols = [f.name for f in table.schema if pa.types.is_dictionary(f.type) or pa.types.is_string(f.type)]
    with storage.storage_errors(url):
        parent = path.rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        pq.write_table(
            table,
            path,
            filesystem=storage.arrow_fs(fs),
            row_group_size=row_group_size,
            compression="zstd",
            use_dictionary=dict_cols,
            column_encoding={c: "DELTA_BINARY_PACKED" for c in delta_columns} or None,
        )
        return fs.size(path)
