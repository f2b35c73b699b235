"""Build sample records from a committed dataset: one worker task per interaction shard.

    python -m retrieval.build --dataset URL --out URL [--embeddings URL] [--k-text 10 --k-id 60
        --mode subr|recent --id-mode recent|sim --num-workers 2 --seed 0 ...]

A worker streams its shard's row groups (carrying the last, possibly incomplete, user into the next
group), retrieves histories with retrieval.history, and writes `{out}/{split}/shard-XXXXX.parquet`
under temporary names, renames them, and only then writes the shard's commit marker. A rerun skips
shards whose marker exists (with the same options), so a crashed build resumes where it stopped. The
driver writes the Few2Many orders and, last, manifest.json.

Memory per worker is bounded by one row group plus the longest user, times the per-target output
(chunks of `chunk_rows` targets), not by shard size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
import uuid
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits

from configs.loader import ConfigError, HelpFormatter, explicit_options, flag_overrides, load_config
from configs.logs import get_logger, setup_logging
from recdata import storage
from recdata.layout import (
    embeddings_root,
    latest_embeddings,
    paths,  # the pipeline's layout, so this CLI and trainer/main.py agree
)
from recdata.runner import Runner, run_in_process
from recdata.samples import (
    SAMPLE_SCHEMA,
    SAMPLES_VERSION,
    SHARD_STRIDE,
    TARGET_SPLITS,
    BuildOptions,
    SamplesError,
    commit_marker,
    list_array,
    options_from_config,
    sample_candidates,
    sample_file,
    value_array,
)
from recdata.schema import SPLITS, Dataset, DatasetError
from recdata.subsets import write_subsets
from retrieval.history import (
    ItemVectors,
    Ragged,
    check_sorted,
    history_bounds,
    load_item_vectors,
    recent,
    top_similar,
)

log = get_logger(__name__)

INTERACTION_COLUMNS = ["user_id", "item_id", "timestamp", "rating", "split", "label"]
_TARGET_CODES = np.array([SPLITS.index(s) for s in TARGET_SPLITS], dtype=np.int8)


def fingerprint(dataset_url: str, opts: BuildOptions, embeddings_url: str | None) -> str:
    """What a committed shard was built from; a rerun with anything else must not mix outputs."""
    key = {
        "dataset": dataset_url,
        "options": opts.content_dict(),
        "embeddings": embeddings_url if opts.needs_embeddings else None,
        "samples_version": SAMPLES_VERSION,
    }
    return storage.digest(key)


def _split_codes(col: pa.ChunkedArray) -> np.ndarray:
    """Split column (dictionary or string) -> int8 codes in schema.SPLITS order."""
    out = []
    for chunk in col.chunks:
        if pa.types.is_dictionary(chunk.type):
            names = chunk.dictionary.to_pylist()
            unknown = set(names) - set(SPLITS)
            lookup = np.array([SPLITS.index(n) if n in SPLITS else -1 for n in names], dtype=np.int8)
            idx = chunk.indices.to_numpy(zero_copy_only=False)
            codes = lookup[idx] if len(lookup) else np.zeros(0, dtype=np.int8)
        else:
            vals = np.asarray(chunk.to_pylist(), dtype=object)
            unknown = set(vals.tolist()) - set(SPLITS)
            codes = np.array([SPLITS.index(v) if v in SPLITS else -1 for v in vals], dtype=np.int8)
        if (codes < 0).any():
            raise SamplesError(f"column 'split' has values {sorted(str(u) for u in unknown)} outside {list(SPLITS)}")
        out.append(codes)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int8)


class _Block:
    """Numpy view of complete users' interactions."""

    def __init__(self, table: pa.Table):
        self.user = table.column("user_id").to_numpy().astype(np.int64, copy=False)
        self.item = table.column("item_id").to_numpy().astype(np.int64, copy=False)
        self.ts = table.column("timestamp").to_numpy().astype(np.int64, copy=False)
        self.rating = table.column("rating").to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        self.split = _split_codes(table.column("split"))
        label = table.column("label").combine_chunks() if table.num_rows else pa.array([], pa.int8())
        self.label = label


def user_blocks(row_groups: Iterator[pa.Table], where: str) -> Iterator[tuple[int, pa.Table]]:
    """Yield (first row index, table) of consecutive complete-user slices: each row group minus its
    last user, who is carried into the next group (a user's rows may straddle row groups)."""
    carry: pa.Table | None = None
    base = 0
    prev_user: int | None = None
    for rg in row_groups:
        buf = pa.concat_tables([carry, rg]) if carry is not None and carry.num_rows else rg
        if buf.num_rows == 0:
            continue
        users = buf.column("user_id").to_numpy()
        other = np.flatnonzero(users != users[-1])
        cut = int(other[-1]) + 1 if len(other) else 0
        if cut > 0:
            # Within a slice check_sorted checks the order; across slices only the boundary needs it.
            if prev_user is not None and users[0] <= prev_user:
                raise SamplesError(
                    f"{where}: user {users[0]} at row {base} follows user {prev_user}: shard not sorted by user_id"
                )
            prev_user = int(users[cut - 1])
            yield base, buf.slice(0, cut)
            base += cut
        carry = buf.slice(cut)
    if carry is not None and carry.num_rows:
        first = int(carry.column("user_id")[0].as_py())
        if prev_user is not None and first <= prev_user:
            raise SamplesError(
                f"{where}: user {first} at row {base} follows user {prev_user}: shard not sorted by user_id"
            )
        yield base, carry


class SampleShardWorker:
    """Builds the samples of one interaction shard per `run({"shard": i})`. Plain Python: the same
    class runs in-process and as a Ray actor (cluster.pool.run_sharded)."""

    def __init__(self, dataset_url: str, out_url: str, options: dict[str, Any], embeddings_url: str | None = None):
        self.opts = BuildOptions.from_dict(options)
        self.dataset = Dataset.open(dataset_url)
        self.out_url = out_url
        self.embeddings_url = embeddings_url
        self.fp = fingerprint(dataset_url, self.opts, embeddings_url)
        # One filesystem object per worker: creating an S3 client per call costs 0.1-0.5 s.
        self.out_fs, self.out_root = storage.get_fs(out_url)
        items = self.dataset.read_items()
        item_ids = items.column("item_id").to_numpy()
        titled = items.column("title").is_valid().to_numpy(zero_copy_only=False)
        titles = items.column("title").to_pylist()
        titled &= np.array([bool(t.strip()) if t is not None else False for t in titles], dtype=bool)
        self.all_items = np.sort(item_ids)
        self.untitled = np.sort(item_ids[~titled])
        # Negatives must render, so only titled items are eligible unless placeholders are allowed.
        self.catalogue = np.sort(item_ids if self.opts.missing_text == "placeholder" else item_ids[titled])
        self.vectors: ItemVectors | None = None
        if self.opts.needs_embeddings:
            if not embeddings_url:
                raise SamplesError(
                    f"text_mode={self.opts.text_mode}, id_mode={self.opts.id_mode} need item embeddings: pass --embeddings URL "
                    f"(python -m retrieval.embed_items) or use --mode recent --id-mode recent"
                )
            self.vectors = load_item_vectors(embeddings_url, normalize=self.opts.metric == "cosine")

    def run(self, task: dict[str, Any]) -> dict[str, Any]:
        shard = int(task["shard"])
        marker = commit_marker(self.out_url, shard)
        if storage.exists(marker):
            done = storage.read_json(marker)
            if done.get("fingerprint") != self.fp:
                raise SamplesError(
                    f"{marker}: committed by a build with other inputs/options (fingerprint {done.get('fingerprint')} != {self.fp}); "
                    f"use a new --out or --overwrite"
                )
            return {**done, "skipped": True}
        t0, cpu0 = time.perf_counter(), time.process_time()
        # One worker is one core: multi-threaded BLAS on these small GEMMs only adds contention
        # (measured 3.6x slower on 2 busy cores). Scale out with more workers instead.
        with threadpool_limits(limits=1):
            stats = self._build(shard)
        stats.update(
            shard=shard,
            fingerprint=self.fp,
            seconds=round(time.perf_counter() - t0, 3),
            cpu_seconds=round(time.process_time() - cpu0, 3),
            peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        )
        storage.write_json_atomic(marker, stats)
        return {**stats, "skipped": False}

    def _build(self, shard: int) -> dict[str, Any]:
        counts = {
            "interactions": 0,
            "targets": 0,
            "samples": 0,
            "empty_history": 0,
            "dropped_empty_history": 0,
            "dropped_min_history": 0,
            "dropped_too_few_negatives": 0,
            "target_in_history": 0,
            "tied_rows": 0,
            "items_without_text": 0,
        }
        rows = {s: 0 for s in TARGET_SPLITS}
        writers: dict[str, tuple[Any, Any, str, str]] = {}
        url = self.dataset.shards[shard]
        fs, path = storage.get_fs(url)
        ofs = self.out_fs
        try:
            for split in TARGET_SPLITS:
                final = sample_file(self.out_url, split, shard)
                opath = f"{self.out_root}/{split}/shard-{shard:05d}.parquet"
                tmp = f"{opath}.tmp-{uuid.uuid4().hex[:12]}"
                with storage.storage_errors(final):
                    ofs.makedirs(opath.rsplit("/", 1)[0], exist_ok=True)
                    fh = ofs.open(tmp, "wb")
                writers[split] = (pq.ParquetWriter(fh, SAMPLE_SCHEMA, compression="zstd"), fh, tmp, opath)
            with storage.storage_errors(url), fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                missing = set(INTERACTION_COLUMNS) - set(pf.schema_arrow.names)
                if missing:
                    raise SamplesError(f"{url}: missing interaction column(s) {sorted(missing)}")
                groups = (pf.read_row_group(g, columns=INTERACTION_COLUMNS) for g in range(pf.num_row_groups))
                for base, table in user_blocks(groups, url):
                    for split, out in self.samples(shard, base, table, counts, url):
                        writers[split][0].write_table(out, row_group_size=self.opts.chunk_rows)
                        rows[split] += out.num_rows
            for split, (w, fh, tmp, opath) in writers.items():
                w.close()
                fh.close()
            for split, (w, fh, tmp, opath) in writers.items():
                with storage.storage_errors(sample_file(self.out_url, split, shard)):
                    ofs.mv(tmp, opath)
            writers = {}
        finally:
            # A failed shard leaves no temporary files behind (and no marker: it is redone next run).
            for split, (w, fh, tmp, opath) in writers.items():
                _discard(w, fh)
                if ofs.exists(tmp):
                    ofs.rm(tmp)
        counts["samples"] = sum(rows.values())
        return {"counts": counts, "rows": rows, "files": {s: f"{s}/shard-{shard:05d}.parquet" for s in TARGET_SPLITS}}

    def samples(
        self, shard: int, base: int, table: pa.Table, counts: dict[str, int], url: str
    ) -> Iterator[tuple[str, pa.Table]]:
        b = _Block(table)
        n = len(b.user)
        counts["interactions"] += n
        check_sorted(b.user, b.ts, b.item, where=f"{url} (rows {base}..{base + n - 1})")
        self._check_items(b.item, url, counts)
        start, end = history_bounds(b.user, b.ts)
        tie_group = np.r_[True, (b.user[1:] != b.user[:-1]) | (b.ts[1:] != b.ts[:-1])] if n else np.zeros(0, bool)
        group_size = np.diff(np.r_[np.flatnonzero(tie_group), n])
        counts["tied_rows"] += int(group_size[group_size > 1].sum())
        targets = np.flatnonzero(np.isin(b.split, _TARGET_CODES)).astype(np.int64)
        counts["targets"] += len(targets)
        hist_len = end[targets] - start[targets]
        empty = hist_len == 0
        counts["empty_history"] += int(empty.sum())
        drop_empty = empty & (self.opts.empty_history == "drop")
        drop_min = ~drop_empty & (hist_len < self.opts.min_history)
        counts["dropped_empty_history"] += int(drop_empty.sum())
        counts["dropped_min_history"] += int(drop_min.sum())
        targets = targets[~(drop_empty | drop_min)]
        counts["target_in_history"] += _count_target_in_history(b.item, start, end, targets)
        item_rows = self.vectors.rows(b.item) if self.vectors is not None else None
        target_split = b.split[targets]
        for split in TARGET_SPLITS:
            of_split = targets[target_split == SPLITS.index(split)]
            for c0 in range(0, len(of_split), self.opts.chunk_rows):
                chunk = of_split[c0 : c0 + self.opts.chunk_rows]
                yield split, self._records(shard, base, b, start, end, chunk, item_rows, counts, split)

    def _check_items(self, items: np.ndarray, url: str, counts: dict[str, int]) -> None:
        uniq = np.unique(items)
        unknown = uniq[~np.isin(uniq, self.all_items)]
        if len(unknown):
            raise SamplesError(f"{url}: {len(unknown)} item id(s) not in items.parquet, e.g. {unknown[:20].tolist()}")
        untitled = uniq[np.isin(uniq, self.untitled)]
        if len(untitled):
            if self.opts.missing_text == "error":
                raise SamplesError(
                    f"{url}: {len(untitled)} item id(s) have no title in items.parquet, e.g. {untitled[:20].tolist()}; "
                    f"fix the items or build with missing_text=placeholder"
                )
            counts["items_without_text"] += len(untitled)

    def _records(self, shard, base, b: _Block, start, end, targets, item_rows, counts, split: str) -> pa.Table:
        o = self.opts
        sample_ids = np.int64(shard) * SHARD_STRIDE + base + targets
        if o.k_text == 0:
            text = Ragged(np.zeros(len(targets) + 1, dtype=np.int64), np.zeros(0, dtype=np.int64))
        elif o.text_mode == "recent":
            text = recent(start, end, targets, o.k_text)
        else:
            text = top_similar(start, end, targets, item_rows, self.vectors.matrix, o.k_text, o.subr_pool)
        if o.k_id == 0:
            ids = Ragged(np.zeros(len(targets) + 1, dtype=np.int64), np.zeros(0, dtype=np.int64))
        elif o.id_mode == "recent":
            ids = recent(start, end, targets, o.k_id)
        else:
            ids = top_similar(start, end, targets, item_rows, self.vectors.matrix, o.k_id, o.sim_pool)
        keep = np.ones(len(targets), dtype=bool)
        if self.dataset.task == "next_item":
            cands, ok = sample_candidates(
                sample_ids, targets, b.item, start, end, self.catalogue, o.num_candidates, o.seed
            )
            counts["dropped_too_few_negatives"] += int((~ok).sum())
            keep = ok
            cand_col = pa.FixedSizeListArray.from_arrays(pa.array(cands.ravel()), o.num_candidates).cast(
                pa.list_(pa.int64())
            )
            label_col = pa.nulls(len(targets), pa.int8())
        else:
            cand_col = pa.nulls(len(targets), pa.list_(pa.int64()))
            label_col = b.label.take(pa.array(targets))
        table = pa.table(
            {
                "sample_id": pa.array(sample_ids),
                "user_id": pa.array(b.user[targets]),
                "item_id": pa.array(b.item[targets]),
                "timestamp": pa.array(b.ts[targets]),
                "split": pa.array([split] * len(targets), pa.string()),
                "label": label_col,
                "rating": value_array(b.rating[targets], pa.float32()),
                "hist_len": pa.array((end[targets] - start[targets]).astype(np.int32)),
                "text_hist_items": list_array(text.offsets, b.item[text.index], pa.int64()),
                "text_hist_ratings": list_array(text.offsets, b.rating[text.index], pa.float32()),
                "id_hist_items": list_array(ids.offsets, b.item[ids.index], pa.int64()),
                "id_hist_ratings": list_array(ids.offsets, b.rating[ids.index], pa.float32()),
                "id_hist_timestamps": list_array(ids.offsets, b.ts[ids.index], pa.int64()),
                "candidates": cand_col,
            },
            schema=SAMPLE_SCHEMA,
        )
        return table if keep.all() else table.filter(pa.array(keep))


def _discard(writer: pq.ParquetWriter, fh: Any) -> None:
    """Close an abandoned shard file. Errors here are secondary: the exception that made us abandon
    the shard is already propagating, and the file is deleted next."""
    try:
        writer.close()
    except (OSError, ValueError, pa.ArrowException) as e:
        log.warning("closing an abandoned temporary sample file failed: %s: %s", type(e).__name__, e)
    finally:
        fh.close()


def _count_target_in_history(items: np.ndarray, start: np.ndarray, end: np.ndarray, targets: np.ndarray) -> int:
    """Targets whose item the user already interacted with before t (allowed: re-consumption)."""
    if len(targets) == 0:
        return 0
    user_group = np.cumsum(np.r_[True, start[1:] != start[:-1]]) - 1
    _, dense = np.unique(items, return_inverse=True)
    keys = user_group.astype(np.int64) * (int(dense.max()) + 1) + dense
    ukeys, first = np.unique(keys, return_index=True)
    pos = np.searchsorted(ukeys, keys[targets])
    return int((first[pos] < end[targets]).sum())


def build_samples(
    dataset_url: str,
    out_url: str,
    opts: BuildOptions | None = None,
    num_workers: int = 1,
    embeddings_url: str | None = None,
    overwrite: bool = False,
    num_cpus_per_worker: float = 1.0,
    runner: Runner | None = None,
) -> dict[str, Any]:
    """Build (or resume) the samples of every shard, then subsets and the manifest. Returns the manifest.

    num_workers == 1 runs in this process; more run on `runner` (cluster.pool.run_sharded: Ray actors).
    """
    opts = (opts or BuildOptions()).validate()
    dataset = Dataset.open(dataset_url)
    if overwrite:
        storage.rm(out_url)
    fp = fingerprint(dataset_url, opts, embeddings_url)
    murl = storage.join(out_url, "manifest.json")
    if storage.exists(murl):
        old = storage.read_json(murl)
        if old.get("fingerprint") != fp:
            raise SamplesError(
                f"{murl}: samples built from other inputs/options (fingerprint {old.get('fingerprint')} != {fp}); "
                f"use a new --out or --overwrite"
            )
    kwargs = {
        "dataset_url": dataset_url,
        "out_url": out_url,
        "options": opts.content_dict() | {"chunk_rows": opts.chunk_rows},
        "embeddings_url": embeddings_url,
    }
    tasks = [{"shard": i} for i in range(len(dataset.shards))]
    t0 = time.perf_counter()
    run = runner if runner is not None and num_workers > 1 else run_in_process
    results = run(
        SampleShardWorker, kwargs, tasks, num_actors=num_workers, num_cpus_per_actor=num_cpus_per_worker, desc="samples"
    )
    wall = time.perf_counter() - t0
    totals: dict[str, int] = {}
    splits: dict[str, dict[str, Any]] = {s: {"rows": 0, "files": []} for s in TARGET_SPLITS}
    for r in results:
        for k, v in r["counts"].items():
            totals[k] = totals.get(k, 0) + v
        for s in TARGET_SPLITS:
            splits[s]["rows"] += r["rows"][s]
            splits[s]["files"].append({"path": r["files"][s], "rows": r["rows"][s], "shard": r["shard"]})
    ids_by_split = {}
    ofs, root = storage.get_fs(out_url)
    afs = storage.arrow_fs(ofs)
    for s in TARGET_SPLITS:
        parts = []
        for f in splits[s]["files"]:
            with storage.storage_errors(storage.join(out_url, f["path"])):
                parts.append(
                    pq.read_table(f"{root}/{f['path']}", columns=["sample_id"], filesystem=afs)
                    .column("sample_id")
                    .to_numpy()
                )
        ids_by_split[s] = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    caps = {"train": opts.max_train_samples, "valid": opts.max_eval_samples, "test": opts.max_eval_samples}
    subsets = write_subsets(out_url, ids_by_split, opts.seed, caps, opts.few_shot_sizes)
    manifest = {
        "samples_version": SAMPLES_VERSION,
        "fingerprint": fp,
        "dataset": dataset_url,
        "task": dataset.task,
        "embeddings": embeddings_url if opts.needs_embeddings else None,
        "options": opts.content_dict(),
        "splits": splits,
        "counts": totals,
        "subsets": subsets,
        "shards": {
            "total": len(results),
            "built": sum(not r["skipped"] for r in results),
            "skipped": sum(bool(r["skipped"]) for r in results),
            "max_peak_rss_mb": max((r.get("peak_rss_mb", 0) for r in results), default=0),
        },
        "wall_seconds": round(wall, 3),
    }
    storage.write_json_atomic(murl, manifest)
    return manifest


# With --config: option dest -> the config key it overrides.
CONFIG_KEYS = {
    **{
        k: f"retrieval.{k}"
        for k in (
            "k_text",
            "k_id",
            "text_mode",
            "id_mode",
            "subr_pool",
            "sim_pool",
            "metric",
            "num_candidates",
            "min_history",
            "empty_history",
            "missing_text",
            "max_eval_samples",
            "max_train_samples",
            "num_workers",
        )
    },
    "seed": "run.seed",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m retrieval.build", description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument(
        "--config",
        help="preset or YAML: dataset, output, retrieval options and workers from it; an option below given "
        "explicitly overrides the config's value (--k-text 5 == retrieval.k_text=5)",
    )
    p.add_argument("overrides", nargs="*", help="key.path=value overrides for --config")
    p.add_argument("--dataset", help="committed dataset URL (recdata.ingest --out)")
    p.add_argument("--out", help="samples URL (local path or s3://)")
    p.add_argument(
        "--embeddings", default=None, help="item embeddings URL (retrieval.embed_items); needed for subr/sim"
    )
    p.add_argument("--k-text", type=int, default=BuildOptions.k_text)
    p.add_argument("--k-id", type=int, default=BuildOptions.k_id)
    p.add_argument("--mode", dest="text_mode", choices=["subr", "recent"], default=BuildOptions.text_mode)
    p.add_argument("--id-mode", choices=["recent", "sim"], default=BuildOptions.id_mode)
    p.add_argument("--subr-pool", type=int, default=BuildOptions.subr_pool)
    p.add_argument("--sim-pool", type=int, default=BuildOptions.sim_pool)
    p.add_argument("--metric", choices=["cosine", "dot"], default=BuildOptions.metric)
    p.add_argument("--num-candidates", type=int, default=BuildOptions.num_candidates)
    p.add_argument("--min-history", type=int, default=BuildOptions.min_history)
    p.add_argument("--empty-history", choices=["keep", "drop"], default=BuildOptions.empty_history)
    p.add_argument("--missing-text", choices=["error", "placeholder"], default=BuildOptions.missing_text)
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-rows", type=int, default=BuildOptions.chunk_rows)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--overwrite", action="store_true", help="delete --out first")
    a = p.parse_args(argv)
    a.given = explicit_options(p, argv)
    return a


def main(argv: list[str] | None = None, runner: Runner | None = None) -> int:
    """Ray workers come from `runner` (the `reclora` command passes cluster.pool.run_sharded); without one,
    every task runs in this process."""
    a = parse_args(argv)
    setup_logging()
    if a.config:
        return _main_from_config(a, runner)
    if not a.dataset or not a.out:
        print("error: --dataset and --out are required (or use --config)", file=sys.stderr)
        return 2
    opts = BuildOptions(
        k_text=a.k_text,
        k_id=a.k_id,
        text_mode=a.text_mode,
        id_mode=a.id_mode,
        subr_pool=a.subr_pool,
        sim_pool=a.sim_pool,
        metric=a.metric,
        num_candidates=a.num_candidates,
        min_history=a.min_history,
        empty_history=a.empty_history,
        missing_text=a.missing_text,
        seed=a.seed,
        max_eval_samples=a.max_eval_samples,
        max_train_samples=a.max_train_samples,
        chunk_rows=a.chunk_rows,
    )
    try:
        m = build_samples(a.dataset, a.out, opts, a.num_workers, a.embeddings, overwrite=a.overwrite, runner=runner)
    except (SamplesError, DatasetError, ValueError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {s: v["rows"] for s, v in m["splits"].items()}
    print(json.dumps({"out": a.out, "rows": summary, "counts": m["counts"], "shards": m["shards"]}, indent=2))
    return 0


def _main_from_config(a: argparse.Namespace, runner: Runner | None) -> int:

    try:
        cfg = load_config(a.config, a.overrides + flag_overrides(a, a.given, CONFIG_KEYS))
        opts = options_from_config(cfg)
        if "chunk_rows" in a.given:  # not a config key: how many rows a worker holds at once
            opts = dataclasses.replace(opts, chunk_rows=a.chunk_rows).validate()
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    p = paths(cfg)
    dataset = a.dataset if "dataset" in a.given else p.dataset
    out = a.out if "out" in a.given else p.samples
    embeddings = a.embeddings
    if opts.needs_embeddings and not embeddings:
        embeddings = latest_embeddings(embeddings_root(cfg))
        if embeddings is None:
            print(
                f"error: text_mode={opts.text_mode}/id_mode={opts.id_mode} needs item embeddings and none are under "
                f"{embeddings_root(cfg)}; run `python -m retrieval.embed_items --config {a.config}` first",
                file=sys.stderr,
            )
            return 2
    try:
        m = build_samples(
            dataset, out, opts, cfg.retrieval.num_workers, embeddings, overwrite=a.overwrite, runner=runner
        )
    except (SamplesError, DatasetError, ValueError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {"out": out, "rows": {s: v["rows"] for s, v in m["splits"].items()}, "counts": m["counts"]}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
