"""Few2Many subsets and fixed evaluation sets, persisted beside the samples.

Every split gets one seeded order of its sample ids; a subset of size n is the first n of that order,
so the 64-shot set is inside the 256-shot set, inside the 1024-shot set, ... (ReLLa issue #9 does the
same with one sampled pool). The order is by a keyed hash of (seed, sample_id), not a permutation of a
list, so it does not depend on how many samples exist or on shard/worker counts: adding samples
inserts them into the order without reshuffling the rest.

    {samples}/subsets/{split}.parquet    rank int64, sample_id int64 (rank 0 first; capped)
    {samples}/subsets/subsets.json       seed, caps, counts, and the nested few-shot sizes
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from recdata import storage
from recdata.samples import SamplesError, mix64
from recdata.schema import read_parquet, write_parquet

FEW_SHOT_BASE = 64
FEW_SHOT_FACTOR = 4


def seeded_order(sample_ids: np.ndarray, seed: int) -> np.ndarray:
    """sample_ids sorted by a keyed hash rank (ties, practically impossible, broken by id)."""
    ids = np.asarray(sample_ids, dtype=np.int64)
    with np.errstate(over="ignore"):
        key = mix64(ids.astype(np.uint64) ^ mix64(np.uint64(seed) + np.uint64(0x5DEECE66D)))
    order = np.argsort(key)
    skey = key[order]
    if len(skey) > 1 and np.any(skey[1:] == skey[:-1]):  # a 64-bit hash collision: settle it by id
        order = np.lexsort((ids, key))
    return ids[order]


def nested_sizes(n: int, extra: tuple[int, ...] = ()) -> list[int]:
    """64, 256, 1024, ... below n, any `extra` sizes (e.g. 70000) below n, and n itself."""
    sizes = set(s for s in extra if 0 < s < n)
    s = FEW_SHOT_BASE
    while s < n:
        sizes.add(s)
        s *= FEW_SHOT_FACTOR
    if n > 0:
        sizes.add(n)
    return sorted(sizes)


def subsets_url(samples_url: str, split: str) -> str:
    return storage.join(samples_url, "subsets", f"{split}.parquet")


def write_subsets(
    samples_url: str,
    ids_by_split: dict[str, np.ndarray],
    seed: int,
    caps: dict[str, int | None] | None = None,
    extra_sizes: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Persist one seeded order per split (first `caps[split]` ids when capped). Returns the summary
    that also goes to subsets/subsets.json and into the samples manifest."""
    caps = caps or {}
    summary: dict[str, Any] = {"seed": seed, "splits": {}}
    for split, ids in sorted(ids_by_split.items()):
        order = seeded_order(ids, seed)
        cap = caps.get(split)
        if cap is not None:
            order = order[:cap]
        table = pa.table({"rank": pa.array(np.arange(len(order), dtype=np.int64)), "sample_id": pa.array(order)})
        write_parquet(table, subsets_url(samples_url, split))
        summary["splits"][split] = {
            "available": int(len(ids)),
            "kept": int(len(order)),
            "cap": cap,
            "path": f"subsets/{split}.parquet",
            "nested_sizes": nested_sizes(len(order), extra_sizes),
        }
    storage.write_json_atomic(storage.join(samples_url, "subsets", "subsets.json"), summary)
    return summary


def load_subset(samples_url: str, split: str, n: int | None = None) -> np.ndarray:
    """The first n sample ids of a split's persisted order (all kept ids when n is None)."""
    url = subsets_url(samples_url, split)
    if not storage.exists(url):
        raise SamplesError(
            f"{url}: no persisted order for split {split!r}; build samples first (python -m retrieval.build)"
        )
    ids = read_parquet(url, columns=["rank", "sample_id"])
    ranks = ids["rank"].to_numpy()
    order = ids["sample_id"].to_numpy()[np.argsort(ranks, kind="stable")]
    if n is not None:
        if n > len(order):
            raise SamplesError(f"{url}: asked for the first {n} samples of {split!r}, only {len(order)} are persisted")
        order = order[:n]
    return order
