"""Ingest throughput and peak memory: ours vs a plain pandas read-sort-write, side by side.

    python bench/ingest.py [--quick] [--rows N]

Datasets: MovieLens-100K (../shared, skipped when absent) and a synthetic generic dataset made here
(heavy-tailed users and items, Zipf-like) of 10M interactions (--quick: 2M). Each measurement runs in
its own process so peak RSS is that run's alone. Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recdata.ingest import IngestOptions, ingest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_synthetic(path: Path, rows: int, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    n_users, n_items = max(1000, rows // 50), max(1000, rows // 200)
    # Heavy tails: a few users and items account for most interactions.
    users = (rng.pareto(1.2, rows) * n_users / 20).astype(np.int64) % n_users
    items = (rng.pareto(1.0, rows) * n_items / 50).astype(np.int64) % n_items
    ts = rng.integers(1_500_000_000, 1_700_000_000, rows, dtype=np.int64)
    rating = rng.integers(1, 6, rows).astype(np.float32)
    pq.write_table(
        pa.table({"user_id": users, "item_id": items, "timestamp": ts, "rating": rating}), path, row_group_size=1 << 20
    )
    pq.write_table(
        pa.table({"item_id": np.arange(n_items, dtype=np.int64), "title": [f"Item {i}" for i in range(n_items)]}),
        path.with_name("items.parquet"),
    )


def child(kind: str, fmt: str, src: str, items: str | None, out: str) -> None:
    t0 = time.perf_counter()
    if kind == "ours":
        m = ingest(fmt, src, out, IngestOptions(task="ctr", num_shards=16, progress=False, overwrite=True), items=items)
        rows = m["rows_read"]
    else:
        rows = pandas_baseline(fmt, src, out)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": rows, "seconds": wall, "peak_rss_mb": rss}))


def pandas_baseline(fmt: str, src: str, out: str) -> int:
    """What one writes by hand: read everything, sort, label and split by global time, write one file."""
    import numpy as np
    import pandas as pd

    if fmt == "movielens":
        df = pd.read_csv(Path(src) / "u.data", sep="\t", names=["user_id", "item_id", "rating", "timestamp"])
    else:
        df = pd.read_parquet(src)
    df = df.drop_duplicates(["user_id", "item_id", "timestamp"])
    df = df.sort_values(["timestamp", "user_id", "item_id"], kind="stable").reset_index(drop=True)
    n = len(df)
    split = np.full(n, "test", dtype=object)
    split[: int(n * 0.8)] = "train"
    split[int(n * 0.8) : int(n * 0.9)] = "valid"
    df["split"] = split
    df["label"] = (df["rating"] >= 4).astype("int8")
    df = df.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    os.makedirs(out, exist_ok=True)
    df.to_parquet(os.path.join(out, "interactions.parquet"), index=False)
    return n


def run(kind: str, fmt: str, src: str, items: str | None, out: str) -> dict:
    cmd = [sys.executable, __file__, "--_child", kind, fmt, src, items or "-", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} on {fmt} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", type=int)
    ap.add_argument("--_child", nargs=5)
    a = ap.parse_args()
    if a._child:
        kind, fmt, src, items, out = a._child
        child(kind, fmt, src, None if items == "-" else items, out)
        return
    rows = a.rows or (2_000_000 if a.quick else 10_000_000)
    cores = os.cpu_count() or 1
    cache = REPO / ".cache" / "bench" / f"synthetic-{rows}"
    cache.mkdir(parents=True, exist_ok=True)
    synth = cache / "interactions.parquet"
    if not synth.exists():
        print(f"making synthetic dataset: {rows:,} interactions ...", flush=True)
        make_synthetic(synth, rows)
    cases = []
    ml = REPO.parent / "shared" / "data" / "movielens-100k"
    if ml.exists():
        cases.append(("ML-100K", "movielens", str(ml), None))
    else:
        print(f"(skipping ML-100K: {ml} not found)")
    cases.append((f"synthetic {rows / 1e6:g}M", "generic", str(synth), str(cache / "items.parquet")))
    results = []
    work = tempfile.mkdtemp(prefix="bench-ingest-")
    try:
        for name, fmt, src, items in cases:
            ours = run("ours", fmt, src, items, os.path.join(work, "ours"))
            base = run("pandas", fmt, src, items, os.path.join(work, "pandas"))
            results.append((name, ours, base))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\n{'dataset':<16} {'impl':<8} {'rows':>12} {'seconds':>8} {'rows/s':>12} {'rows/s/core':>12} {'peak RSS MB':>12}"
    )
    for name, ours, base in results:
        for impl, r in (("reclora", ours), ("pandas", base)):
            rps = r["rows"] / r["seconds"]
            print(
                f"{name:<16} {impl:<8} {r['rows']:>12,} {r['seconds']:>8.2f} {rps:>12,.0f} {rps / cores:>12,.0f} {r['peak_rss_mb']:>12,.0f}"
            )
        print(f"{'':<16} speedup vs pandas: {base['seconds'] / ours['seconds']:.2f}x")
    name, ours, base = results[-1]
    figures = {
        "dataset": name,
        "rows": ours["rows"],
        "cores": cores,
        "rows_per_s": round(ours["rows"] / ours["seconds"]),
        "rows_per_s_per_core": round(ours["rows"] / ours["seconds"] / cores),
        "peak_rss_mb": round(ours["peak_rss_mb"], 1),
        "pandas_peak_rss_mb": round(base["peak_rss_mb"], 1),
        "speedup_vs_pandas": round(base["seconds"] / ours["seconds"], 2),
    }
    if len(results) > 1:
        figures["ml100k_rows_per_s"] = round(results[0][1]["rows"] / results[0][1]["seconds"])
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
