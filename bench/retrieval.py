"""Benchmark of the long-short sample builder (retrieval.build): samples/s per core, memory, scaling.

    python bench/retrieval.py [--quick] [--workers 2] [--keep DIR]

Runs, each in this one invocation:
  * MovieLens-100K (ingested with recdata.ingest from ../shared/data/movielens-100k, when present);
  * a synthetic dataset of 2.5M and 25M interactions (--quick: 250k and 2.5M), heavy-tailed users
    (lognormal lengths, mean ~155 like ML-25M) and Zipf-like item popularity, ~20% timestamp ties;
for recent and SUBR text modes (K_text=10, K_id=60 recent, SUBR pool 200, 512-dim item vectors).
Item vectors are random unit vectors: retrieval cost depends on their dimension, not their values
(real ones come from retrieval.embed_items). The full worker path is timed: Parquet read, retrieval,
record building, zstd Parquet write, commit.

samples/s/core = samples / sum of the workers' CPU seconds (each worker is pinned to one BLAS/Arrow
thread, so CPU seconds = core seconds; wall time is reported too, and suffers when others share the cores).
The baseline is a per-row pandas implementation of the same retrieval (per-user frames prepared up
front, then per sample: filter t' < t, tail / cosine top-K / re-sort, build the record), timed in CPU
seconds on a random subset of shard 0 of the largest synthetic set and extrapolated per sample.
`speedup_vs_naive` compares it with the builder's own retrieval + record building on all of that shard
(no writing on either side); the end-to-end figure divides by the full builder, writes included.

The last line printed is one JSON object: subr_samples_per_s_per_core, recent_samples_per_s_per_core
(largest synthetic set), speedup_vs_naive (SUBR), peak_rss_mb_25m (max worker peak RSS at 25M; null
with --quick), scaling_ratio_10x (worker CPU time of the larger / the smaller synthetic set, SUBR).
"""

from __future__ import annotations

import os

# One thread per worker for BLAS and Arrow (per-core numbers); must be set before numpy/pyarrow load.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("RECLORA_QUIET", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recdata import storage  # noqa: E402
from recdata.ingest import IngestOptions, ingest  # noqa: E402
from recdata.samples import BuildOptions  # noqa: E402
from recdata.schema import (  # noqa: E402
    INTERACTIONS,
    SCHEMA_VERSION,
    SPLITS,
    Dataset,
    user_bucket,
    write_parquet,
)
from recdata.schema import read_parquet as read_pq  # noqa: E402
from retrieval.build import (  # noqa: E402
    INTERACTION_COLUMNS,
    SampleShardWorker,
    build_samples,  # noqa: E402
    user_blocks,
)

K_TEXT, K_ID, POOL, DIM = 10, 60, 200, 512
N_ITEMS_SYNTH = 60_000
SHARDS_SYNTH = 16


def synth_interactions(n: int, seed: int = 0) -> pa.Table:
    """~n interactions: lognormal user lengths (heavy tail, capped at 20k), Zipf(0.9) item popularity,
    per-user time lines with exponential gaps, 20% of gaps zero (same-second ties)."""
    rng = np.random.default_rng(seed)
    mean_len = 155
    n_users = max(1, n // mean_len)
    lens = np.minimum(np.maximum(rng.lognormal(np.log(mean_len) - 0.6, 1.1, n_users), 1), 20_000).astype(np.int64)
    lens = np.maximum((lens * (n / lens.sum())).astype(np.int64), 1)
    lens[-1] += n - lens.sum() if n > lens.sum() else 0
    total = int(lens.sum())
    user_ids = rng.permutation(10 * n_users)[:n_users].astype(np.int64) + 1
    users = np.repeat(user_ids, lens)
    pop = 1.0 / np.arange(1, N_ITEMS_SYNTH + 1) ** 0.9
    items = rng.choice(N_ITEMS_SYNTH, size=total, p=pop / pop.sum()).astype(np.int64) + 1
    gaps = rng.exponential(3600.0, total).astype(np.int64)
    gaps[rng.random(total) < 0.2] = 0
    starts = np.repeat(rng.integers(1_300_000_000, 1_450_000_000, n_users), lens)
    first = np.repeat(np.cumsum(lens) - lens, lens)
    csum = np.cumsum(gaps)
    ts = starts + csum - csum[first]
    order = np.lexsort((items, ts, users))
    users, items, ts = users[order], items[order], ts[order]
    rating = (rng.integers(1, 11, total) / 2).astype(np.float32)
    q80, q90 = np.quantile(ts, [0.8, 0.9])
    codes = {name: SPLITS.index(name) for name in ("train", "valid", "test")}
    split = np.where(ts < q80, codes["train"], np.where(ts < q90, codes["valid"], codes["test"])).astype(np.int8)
    return pa.table(
        {
            "user_id": users,
            "item_id": items,
            "timestamp": ts,
            "rating": rating,
            "split": pa.DictionaryArray.from_arrays(pa.array(split), pa.array(list(SPLITS))),
            "label": (rating > 3.0).astype(np.int8),
        },
        schema=INTERACTIONS,
    )


def write_synth_dataset(url: str, n: int, seed: int = 0) -> str:
    """Writes the schema.Dataset layout directly (sorted user-hash shards + manifest)."""
    t = synth_interactions(n, seed)
    bucket = user_bucket(t.column("user_id").to_numpy(), SHARDS_SYNTH)
    shards = []
    for s in range(SHARDS_SYNTH):
        part = t.filter(pa.array(bucket == s))  # keeps the (user, time, item) order
        write_parquet(part, storage.join(url, f"interactions/shard-{s:05d}.parquet"))
        shards.append({"path": f"interactions/shard-{s:05d}.parquet", "rows": part.num_rows})
    ids = np.arange(1, N_ITEMS_SYNTH + 1, dtype=np.int64)
    write_parquet(pa.table({"item_id": ids, "title": [f"Item {i}" for i in ids]}), storage.join(url, "items.parquet"))
    storage.write_json_atomic(
        storage.join(url, "manifest.json"),
        {"schema_version": SCHEMA_VERSION, "task": "ctr", "shards": shards, "items": {"path": "items.parquet"}},
    )
    return url


def write_random_embeddings(url: str, item_ids: np.ndarray, dim: int = DIM, seed: int = 0) -> str:
    vec = np.random.default_rng(seed).normal(size=(len(item_ids), dim)).astype(np.float32)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), dim).cast(pa.list_(pa.float32()))
    write_parquet(pa.table({"item_id": pa.array(item_ids, pa.int64()), "embedding": emb}), url)
    return url


def run_build(ds: str, out: str, mode: str, emb: str, workers: int) -> dict:
    opts = BuildOptions(k_text=K_TEXT, k_id=K_ID, text_mode=mode, id_mode="recent", subr_pool=POOL)
    t0 = time.perf_counter()
    m = build_samples(ds, out, opts, num_workers=workers, embeddings_url=emb if mode == "subr" else None)
    wall = time.perf_counter() - t0
    markers = [
        storage.read_json(storage.join(out, "_commits", f"shard-{s['shard']:05d}.json"))
        for s in m["splits"]["train"]["files"]
    ]
    # CPU seconds of the workers (each pinned to one thread): robust to other jobs sharing the cores.
    busy = sum(mk["cpu_seconds"] for mk in markers)
    samples = m["counts"]["samples"]
    out_bytes = sum(f.stat().st_size for f in Path(out).rglob("*.parquet"))
    shutil.rmtree(out)
    return {
        "samples": samples,
        "busy_s": busy,
        "wall_s": wall,
        "per_core": samples / busy,
        "peak_rss_mb": max(mk["peak_rss_mb"] for mk in markers),
        "bytes_per_sample": out_bytes / max(samples, 1),
    }


def naive(ds_url: str, emb_url: str, n_samples: int, seed: int = 0) -> dict:
    """Per-row pandas retrieval (no writing) for n random targets of shard 0; seconds per sample."""
    ds = Dataset.open(ds_url)
    df = ds.read_shard(0).to_pandas()
    df["split"] = df["split"].astype(str)
    e = pd.read_parquet(emb_url)
    mat = np.stack(e.embedding.to_numpy()).astype(np.float32)
    mat /= np.linalg.norm(mat, axis=1, keepdims=True)
    row_of = pd.Series(np.arange(len(e)), index=e.item_id.to_numpy())
    groups = {u: g for u, g in df.groupby("user_id", sort=False)}
    pick = df.sample(n_samples, random_state=seed)
    out = {}
    for mode in ("recent", "subr"):
        t0 = time.process_time()  # CPU time, like the workers' figures (this process is single-threaded)
        records = []
        for row in pick.itertuples():
            g = groups[row.user_id]
            h = g[g.timestamp < row.timestamp]
            ids = h.tail(K_ID)
            if mode == "recent":
                text = h.tail(K_TEXT)
            else:
                cand = h.tail(POOL)
                sc = mat[row_of[cand.item_id].to_numpy()] @ mat[row_of[row.item_id]]
                top = np.lexsort((-np.arange(len(sc)), -sc))[:K_TEXT]  # ties to the more recent, as in history.py
                text = cand.iloc[np.sort(top)]
            records.append(
                {
                    "user_id": row.user_id,
                    "item_id": row.item_id,
                    "hist_len": len(h),
                    "text_hist_items": text.item_id.tolist(),
                    "text_hist_ratings": text.rating.tolist(),
                    "id_hist_items": ids.item_id.tolist(),
                    "id_hist_ratings": ids.rating.tolist(),
                    "id_hist_timestamps": ids.timestamp.tolist(),
                }
            )
        out[mode] = (time.process_time() - t0) / n_samples
    return out


def vectorized_no_write(ds_url: str, emb_url: str, scratch: Path) -> dict:
    """The builder's retrieval + record building for every sample of shard 0, without Parquet writing:
    the same work the naive loop does, so the two per-sample times compare like for like."""
    from threadpoolctl import threadpool_limits

    ds = Dataset.open(ds_url)
    table = read_pq(ds.shards[0], columns=INTERACTION_COLUMNS)
    out = {}
    for mode in ("recent", "subr"):
        opts = BuildOptions(k_text=K_TEXT, k_id=K_ID, text_mode=mode, id_mode="recent", subr_pool=POOL)
        w = SampleShardWorker(ds_url, str(scratch / "unused"), opts.content_dict(), emb_url if mode == "subr" else None)
        counts: dict = dict.fromkeys(
            (
                "interactions",
                "targets",
                "empty_history",
                "dropped_empty_history",
                "dropped_min_history",
                "dropped_too_few_negatives",
                "target_in_history",
                "tied_rows",
                "items_without_text",
            ),
            0,
        )
        n = 0
        t0 = time.process_time()
        with threadpool_limits(limits=1):
            groups = (pa.Table.from_batches([b]) for b in table.to_batches(max_chunksize=65536))  # like row groups
            for base, block in user_blocks(groups, "shard 0"):
                for _, records in w.samples(0, base, block, counts, "shard 0"):
                    n += records.num_rows
        out[mode] = (time.process_time() - t0) / n
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="250k and 2.5M synthetic interactions instead of 2.5M and 25M")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--naive-samples", type=int, default=1000)
    p.add_argument("--tmp", default=None, help="scratch folder (default: a new temporary folder, removed at the end)")
    a = p.parse_args()
    scratch = Path(a.tmp or tempfile.mkdtemp(prefix="bench-retrieval-"))
    scratch.mkdir(parents=True, exist_ok=True)
    sizes = (250_000, 2_500_000) if a.quick else (2_500_000, 25_000_000)
    rows, results = [], {}
    print(
        f"# retrieval benchmark ({'quick' if a.quick else 'full'}): K_text={K_TEXT} K_id={K_ID} pool={POOL} dim={DIM} "
        f"workers={a.workers}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        flush=True,
    )
    try:
        datasets = []
        ml = REPO.parent / "shared" / "data" / "movielens-100k"
        if ml.exists():
            url = str(scratch / "ml100k")
            ingest("movielens", str(ml), url, IngestOptions(task="ctr", num_shards=8, progress=False))
            datasets.append(("ml-100k", url, 1))
        else:
            print(f"(skipping MovieLens-100K: {ml} not found)")
        for n in sizes:
            datasets.append((f"synth-{n / 1e6:g}M", n, a.workers))
        for name, url, workers in datasets:
            if isinstance(url, int):  # generated just before use: ML-100K runs in this process, before
                n = url  # generation inflates its peak RSS
                t0 = time.perf_counter()
                url = write_synth_dataset(str(scratch / f"synth-{n}"), n)
                print(f"generated synthetic {n:,} interactions in {time.perf_counter() - t0:.1f}s", flush=True)
                datasets[[d[0] for d in datasets].index(name)] = (name, url, workers)
            item_ids = Dataset.open(url).read_items().column("item_id").to_numpy()
            emb = write_random_embeddings(str(scratch / f"{name}-emb.parquet"), item_ids)
            for mode in ("recent", "subr"):
                r = run_build(url, str(scratch / f"{name}-{mode}"), mode, emb, workers)
                results[(name, mode)] = r
                rows.append((name, mode, workers, r))
                print(
                    f"{name:>14} {mode:>6}: {r['samples']:>11,} samples  {r['per_core']:>9,.0f}/s/core  wall {r['wall_s']:7.1f}s  "
                    f"cpu {r['busy_s']:7.1f}s  peak RSS/worker {r['peak_rss_mb']:6.0f} MB  {r['bytes_per_sample']:.0f} B/sample",
                    flush=True,
                )
        naive_name, naive_ds, _ = datasets[-1]  # the largest synthetic set, as compared in the summary
        nv = naive(naive_ds, str(scratch / f"{naive_name}-emb.parquet"), a.naive_samples)
        vz = vectorized_no_write(naive_ds, str(scratch / f"{naive_name}-emb.parquet"), scratch)
    finally:
        if a.tmp is None:
            shutil.rmtree(scratch, ignore_errors=True)
    small, big = (f"synth-{n / 1e6:g}M" for n in sizes)
    subr_big = results[(big, "subr")]
    rec_big = results[(big, "recent")]
    # Like for like: retrieval + record building, both in CPU seconds per sample on the same shard.
    speed_subr = nv["subr"] / vz["subr"]
    speed_rec = nv["recent"] / vz["recent"]
    # End to end: the builder including its zstd Parquet writes and commits, against the naive loop without any.
    e2e_subr = nv["subr"] * subr_big["per_core"]
    e2e_rec = nv["recent"] * rec_big["per_core"]
    scaling = results[(big, "subr")]["busy_s"] / results[(small, "subr")]["busy_s"]
    scaling_recent = results[(big, "recent")]["busy_s"] / results[(small, "recent")]["busy_s"]
    print()
    print(
        "| dataset | mode | workers | samples | samples/s/core | wall s | worker CPU s | peak RSS/worker MB | bytes/sample |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, mode, w, r in rows:
        print(
            f"| {name} | {mode} | {w} | {r['samples']:,} | {r['per_core']:,.0f} | {r['wall_s']:.1f} | {r['busy_s']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r['bytes_per_sample']:.0f} |"
        )
    print()
    print(
        f"naive per-row pandas on {a.naive_samples} samples of {naive_name} shard 0 (retrieval only, no writing): "
        f"recent {1 / nv['recent']:,.0f} samples/s, subr {1 / nv['subr']:,.0f} samples/s"
    )
    print(
        f"vectorized retrieval + records on the same shard, no writing: recent {1 / vz['recent']:,.0f} samples/s, "
        f"subr {1 / vz['subr']:,.0f} samples/s"
    )
    print(f"speedup vs naive (same work, CPU time): subr {speed_subr:,.0f}x, recent {speed_rec:,.0f}x")
    print(
        f"speedup vs naive end to end (builder incl. Parquet writing vs naive without): subr {e2e_subr:,.0f}x, recent {e2e_rec:,.0f}x"
    )
    print(f"scaling {small} -> {big} (10x data): worker CPU time x{scaling:.2f} (subr), x{scaling_recent:.2f} (recent)")
    print(
        f"driver peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB (includes data generation)"
    )
    summary = {
        "subr_samples_per_s_per_core": round(subr_big["per_core"]),
        "recent_samples_per_s_per_core": round(rec_big["per_core"]),
        "speedup_vs_naive": round(speed_subr, 1),
        "speedup_vs_naive_recent": round(speed_rec, 1),
        "speedup_vs_naive_end_to_end": round(e2e_subr, 1),
        # The 25M figure exists only in a full run; --quick reports its largest (2.5M) run separately.
        "peak_rss_mb_25m": None if a.quick else max(results[(big, m)]["peak_rss_mb"] for m in ("recent", "subr")),
        "peak_rss_mb_largest": max(results[(big, m)]["peak_rss_mb"] for m in ("recent", "subr")),
        "scaling_ratio_10x": round(scaling, 3),
        "quick": a.quick,
        "sizes": list(sizes),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
