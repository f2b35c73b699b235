"""The sample record: one row per (user, target, time) holding its key, label or target, candidate list,
short text history and long ID history together, so the prompt side and the ID side can never drift
apart by row order (RecLoRA joined a JSON file and an h5 file by position).

Layout under a samples URL (written by retrieval.build):

    {samples}/{split}/shard-00003.parquet   samples whose target row lives in interaction shard 3
    {samples}/_commits/shard-00003.json     written after the split files of shard 3: rows per split
    {samples}/subsets/{split}.parquet       seeded order of sample ids (Few2Many prefixes, eval caps)
    {samples}/manifest.json                 written last: options, counts, file list
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from configs.errors import RecloraError
from recdata import storage

SAMPLES_VERSION = 3  # 2: a missing rating is null (1 wrote NaN); 3: exact grid similarity scores (retrieval.history)
TARGET_SPLITS = ("train", "valid", "test")
# sample_id = shard_index * 2**40 + row index in the interaction shard: stable across reruns and worker
# counts, unique while shards hold < 2**40 rows and there are < 2**23 shards.
SHARD_STRIDE = 2**40

SAMPLE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),  # the target
        ("timestamp", pa.int64()),
        ("split", pa.string()),
        ("label", pa.int8()),  # CTR label; null for next_item
        ("rating", pa.float32()),
        ("hist_len", pa.int32()),  # interactions strictly before `timestamp`, before any K cut
        ("text_hist_items", pa.list_(pa.int64())),  # K_text, time order (oldest first)
        ("text_hist_ratings", pa.list_(pa.float32())),
        ("id_hist_items", pa.list_(pa.int64())),  # K_id, time order
        ("id_hist_ratings", pa.list_(pa.float32())),
        ("id_hist_timestamps", pa.list_(pa.int64())),
        ("candidates", pa.list_(pa.int64())),  # next_item: target + negatives, fixed; null for CTR
    ]
)


@dataclass(frozen=True)
class BuildOptions:
    k_text: int = 10
    k_id: int = 60
    text_mode: str = "subr"  # subr: ReLLa semantic top-K re-sorted to time order; recent: last K
    id_mode: str = "recent"  # recent: last K_id; sim: top K_id by embedding similarity (SIM), time order
    subr_pool: int = 200  # SUBR scores only the most recent subr_pool history items (bounds cost)
    sim_pool: int = 1000  # same bound for id_mode=sim
    metric: str = "cosine"  # cosine (ReLLa ML-1M) or dot (ReLLa ML-25M, on PCA vectors)
    num_candidates: int = 20  # next_item only: target + num_candidates-1 negatives
    min_history: int = 0  # ReLLa drops samples with < 5 history items; iLoRA < 3
    empty_history: str = "keep"  # keep | drop samples whose user has no interaction before t
    missing_text: str = "error"  # error | placeholder for items without a title
    seed: int = 0
    max_eval_samples: int | None = None  # cap of the persisted valid/test order (RecLoRA: 30000)
    max_train_samples: int | None = None  # cap of the persisted train order (the Few2Many pool)
    few_shot_sizes: tuple[int, ...] = (70000,)  # extra nested sizes besides 64, 256, 1024, ...
    chunk_rows: int = 65536  # targets per output row group (memory bound; not part of the content)

    def validate(self) -> "BuildOptions":
        def bad(key: str, msg: str) -> None:
            raise ValueError(f"build option {key}: {msg}, got {getattr(self, key)!r}")

        if self.text_mode not in ("subr", "recent"):
            bad("text_mode", "expected 'subr' or 'recent'")
        if self.id_mode not in ("recent", "sim"):
            bad("id_mode", "expected 'recent' or 'sim'")
        if self.metric not in ("cosine", "dot"):
            bad("metric", "expected 'cosine' or 'dot'")
        if self.empty_history not in ("keep", "drop"):
            bad("empty_history", "expected 'keep' or 'drop'")
        if self.missing_text not in ("error", "placeholder"):
            bad("missing_text", "expected 'error' or 'placeholder'")
        for key in ("k_text", "k_id", "min_history"):
            if getattr(self, key) < 0:
                bad(key, "must be >= 0")
        if self.subr_pool < self.k_text:
            bad("subr_pool", f"must be >= k_text={self.k_text}")
        if self.sim_pool < self.k_id:
            bad("sim_pool", f"must be >= k_id={self.k_id}")
        if self.num_candidates < 2:
            bad("num_candidates", "must be >= 2")
        if self.chunk_rows < 1:
            bad("chunk_rows", "must be >= 1")
        return self

    @property
    def needs_embeddings(self) -> bool:
        return (self.text_mode == "subr" and self.k_text > 0) or (self.id_mode == "sim" and self.k_id > 0)

    def content_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("chunk_rows")
        d["few_shot_sizes"] = list(self.few_shot_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BuildOptions":
        d = dict(d)
        if "few_shot_sizes" in d:
            d["few_shot_sizes"] = tuple(d["few_shot_sizes"])
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown build option(s) {sorted(unknown)}")
        return cls(**d).validate()


def options_from_config(cfg: Any) -> BuildOptions:
    """BuildOptions from the typed config (configs.schema.Config): its `retrieval` section and run seed.
    Keys the config does not have keep the BuildOptions defaults."""
    r = cfg.retrieval
    known = {f.name for f in dataclasses.fields(BuildOptions)}
    values = {k: v for k, v in r.model_dump().items() if k in known}
    return BuildOptions(**values, seed=cfg.run.seed).validate()


class SamplesError(RecloraError, RuntimeError):
    """A samples folder that is missing, incomplete, or was built with other options."""


def sample_file(samples_url: str, split: str, shard: int) -> str:
    return storage.join(samples_url, split, f"shard-{shard:05d}.parquet")


def commit_marker(samples_url: str, shard: int) -> str:
    return storage.join(samples_url, "_commits", f"shard-{shard:05d}.json")


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64: a counter-based hash, so a sample's random draws depend only on
    (seed, sample_id, draw index), never on which worker or chunk produced it."""
    z = np.asarray(x).astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def keyed_uniform_ints(seed: int, sample_ids: np.ndarray, draws: np.ndarray, high: int, stream: int = 0) -> np.ndarray:
    """(n, len(draws)) integers in [0, high), a pure function of (seed, stream, sample_id, draw)."""
    with np.errstate(over="ignore"):
        base = mix64(
            mix64(np.uint64(seed) * np.uint64(0x100000001B3) + np.uint64(stream)) ^ sample_ids.astype(np.uint64)
        )
        h = mix64(base[:, None] + np.asarray(draws, dtype=np.uint64)[None, :] * np.uint64(0xD6E8FEB86659FD93))
    return (h % np.uint64(high)).astype(np.int64)


def sample_candidates(
    sample_ids: np.ndarray,
    target_rows: np.ndarray,
    block_items: np.ndarray,
    hist_start: np.ndarray,
    hist_end: np.ndarray,
    catalogue: np.ndarray,
    num_candidates: int,
    seed: int,
    max_rounds: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Fixed next-item candidate lists: the target plus num_candidates-1 distinct negatives drawn
    uniformly from `catalogue` (sorted item ids) excluding the target and every item the user
    interacted with before the target's time (the history the model sees), at a keyed position.

    Returns (candidates (n, num_candidates) int64, ok mask). ok is False where the catalogue has too
    few eligible items (the caller drops and counts those samples).
    """
    n_neg = num_candidates - 1
    n = len(target_rows)
    C = len(catalogue)
    cat_idx = np.searchsorted(catalogue, block_items)
    if np.any(cat_idx >= C) or np.any(catalogue[np.minimum(cat_idx, C - 1)] != block_items):
        bad = np.unique(block_items[(cat_idx >= C) | (catalogue[np.minimum(cat_idx, C - 1)] != block_items)])
        raise SamplesError(f"items {bad[:20].tolist()} are in interactions but not in the item catalogue")
    # First row of each (user, item) pair: an item is in a target's history iff that row < hist_end.
    user_group = np.cumsum(np.r_[True, hist_start[1:] != hist_start[:-1]]) - 1 if len(hist_start) else hist_start
    keys = user_group.astype(np.int64) * C + cat_idx
    ukeys, first_pos = np.unique(keys, return_index=True)
    t_user = user_group[target_rows].astype(np.int64) * C
    t_end = hist_end[target_rows]
    t_item = cat_idx[target_rows]
    chosen = np.full((n, n_neg), -1, dtype=np.int64)
    filled = np.zeros(n, dtype=np.int64)
    todo = np.arange(n)
    m = 2 * n_neg + 8
    for rnd in range(max_rounds):
        if len(todo) == 0:
            break
        draws = keyed_uniform_ints(seed, sample_ids[todo], np.arange(rnd * m, (rnd + 1) * m), C)
        kk = t_user[todo, None] + draws
        pos = np.minimum(np.searchsorted(ukeys, kk), len(ukeys) - 1)
        seen = (ukeys[pos] == kk) & (first_pos[pos] < t_end[todo, None])
        ok = ~seen & (draws != t_item[todo, None])
        # Already chosen negatives come first so a redraw never duplicates them.
        allc = np.concatenate([chosen[todo], draws], axis=1)
        okc = np.concatenate([chosen[todo] >= 0, ok], axis=1)
        order = np.argsort(allc, axis=1, kind="stable")
        srt = np.take_along_axis(allc, order, axis=1)
        dup_sorted = np.zeros_like(srt, dtype=bool)
        dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
        dup = np.empty_like(dup_sorted)
        np.put_along_axis(dup, order, dup_sorted, axis=1)
        okc &= ~dup
        take = okc & (np.cumsum(okc, axis=1) <= n_neg)
        r, c = np.nonzero(take)
        slot = np.cumsum(take, axis=1)[r, c] - 1
        new = np.full((len(todo), n_neg), -1, dtype=np.int64)
        new[r, slot] = allc[r, c]
        chosen[todo] = new
        filled[todo] = take.sum(axis=1)
        todo = todo[filled[todo] < n_neg]
    ok_mask = np.ones(n, dtype=bool)
    # Users who have seen most of a small catalogue: exact per-sample fallback (rare, off the hot path).
    for j in todo:
        hist_items = np.unique(cat_idx[hist_start[target_rows[j]] : t_end[j]])
        eligible = np.setdiff1d(np.arange(C), np.r_[hist_items, t_item[j]])
        if len(eligible) < n_neg:
            ok_mask[j] = False
            continue
        rank = keyed_uniform_ints(seed, sample_ids[j : j + 1], eligible, 2**62, stream=2)[0]
        chosen[j] = eligible[np.argsort(rank, kind="stable")[:n_neg]]
    slot = keyed_uniform_ints(seed, sample_ids, np.array([0]), num_candidates, stream=1)[:, 0]
    out = np.empty((n, num_candidates), dtype=np.int64)
    col = np.arange(num_candidates)[None, :]
    neg_col = col - (col > slot[:, None])  # negative index for each column after removing the target slot
    neg_col = np.minimum(neg_col, n_neg - 1)
    out[:] = np.where(col == slot[:, None], t_item[:, None], np.take_along_axis(np.maximum(chosen, 0), neg_col, axis=1))
    return catalogue[out], ok_mask


def list_array(offsets: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), value_array(values, value_type))


def value_array(values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """Arrow values; a float NaN (a missing rating read through numpy) becomes null, the one missing state."""
    if pa.types.is_floating(value_type):
        return pa.array(values, type=value_type, mask=np.isnan(values))
    return pa.array(values, type=value_type)


@dataclass(frozen=True)
class SampleSet:
    """A committed samples folder (its manifest exists)."""

    url: str
    manifest: dict[str, Any]

    @classmethod
    def open(cls, url: str) -> "SampleSet":
        murl = storage.join(url, "manifest.json")
        if not storage.exists(murl):
            raise SamplesError(
                f"{url}: no manifest.json, so the samples are incomplete; run python -m retrieval.build --out {url}"
            )
        manifest = storage.read_json(murl)
        if manifest.get("samples_version") != SAMPLES_VERSION:
            raise SamplesError(
                f"{murl}: samples_version {manifest.get('samples_version')}, this code reads {SAMPLES_VERSION}; rebuild"
            )
        return cls(url, manifest)

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def options(self) -> dict[str, Any]:
        return self.manifest["options"]

    @functools.cached_property
    def _fs(self) -> tuple[Any, str, Any]:
        """(fsspec fs, root path, pyarrow fs), made once: an S3 client per file read is slow."""
        fs, root = storage.get_fs(self.url)
        return fs, root, storage.arrow_fs(fs)

    def _path(self, url: str) -> str:
        return self._fs[1] + url[len(self.url.rstrip("/")) :]

    def files(self, split: str) -> list[str]:
        if split not in self.manifest["splits"]:
            raise SamplesError(f"{self.url}: no split {split!r}; have {sorted(self.manifest['splits'])}")
        return [storage.join(self.url, f["path"]) for f in self.manifest["splits"][split]["files"]]

    def num_rows(self, split: str) -> int:
        return int(self.manifest["splits"][split]["rows"])

    def read(self, split: str, columns: list[str] | None = None, sample_ids: np.ndarray | None = None) -> pa.Table:
        """All samples of a split (or only `sample_ids`, returned in the order given)."""
        tables = []
        fs, _, afs = self._fs
        for url in self.files(split):
            path = self._path(url)
            read_cols = columns
            if columns is not None and sample_ids is not None:
                read_cols = list(dict.fromkeys(["sample_id", *columns]))
            with storage.storage_errors(url):
                t = pq.read_table(path, columns=read_cols, filesystem=afs)
            if sample_ids is not None:
                t = t.filter(pc.is_in(t["sample_id"], value_set=pa.array(np.asarray(sample_ids, dtype=np.int64))))
            tables.append(t)
        table = pa.concat_tables(tables) if tables else SAMPLE_SCHEMA.empty_table()
        if sample_ids is None:
            return table
        ids = np.asarray(sample_ids, dtype=np.int64)
        have = table["sample_id"].to_numpy()
        order = np.argsort(have)
        pos = np.minimum(np.searchsorted(have, ids, sorter=order), max(len(have) - 1, 0))
        found = have[order[pos]] == ids if len(have) else np.zeros(len(ids), dtype=bool)
        if not np.all(found):
            missing = ids[~found]
            raise SamplesError(
                f"{self.url}/{split}: {len(missing)} requested sample ids not found, e.g. {missing[:10].tolist()}"
            )
        table = table.take(pa.array(order[pos]))
        return table if columns is None else table.select(columns)

    def iter_batches(
        self, split: str, batch_rows: int = 65536, columns: list[str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Stream a split file by file (memory bounded by one batch)."""
        fs = self._fs[0]
        for url in self.files(split):
            with storage.storage_errors(url), fs.open(self._path(url), "rb") as f:
                yield from pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns)
