"""Score every sample the LLM will see with the frozen teacher; write its gate representation.

    python -m teacher.score --model URL --samples URL --out REPS_URL [--num-actors 2] [--splits train,valid,test]
    python -m teacher.score --config NAME_OR_PATH [key=value ...]

Output, one file per input sample shard (same name), rows in input order:
    {reps}/{split}/shard-XXXXX.parquet          sample_id int64, rep fixed_size_list<float32>[d],
                                                teacher_score float32 (CTR: p(click); next item: target
                                                score), candidate_scores list<float32> (next item only)
    {reps}/{split}/_committed/shard-XXXXX.json  marker, written after the data file is in place
    {reps}/manifest.json                        written when every shard is committed
A shard is redone unless its marker exists and names the same model (sha256), so a killed job is
resumed by running it again; names starting with "_" are skipped by Parquet dataset readers.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
import tempfile
import time
from collections import Counter
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from configs.errors import RecloraError
from configs.loader import ConfigError, HelpFormatter, explicit_options, flag_overrides, load_config
from configs.logs import setup_logging
from recdata import storage
from recdata.layout import paths
from recdata.runner import Runner, run_in_process
from recdata.schema import read_parquet
from teacher.data import SamplesError, iter_row_groups, list_shards
from teacher.features import Encoder, FeatureError
from teacher.model_io import (
    META_FILE,
    MODEL_FILE,
    TeacherLoadError,
    load_teacher,
    pick_device,
    to_tensors,
)

MANIFEST = "manifest.json"
MARKER_DIR = "_committed"
SPLITS = ("train", "valid", "test")


class RepsError(RecloraError, RuntimeError):
    """Representations missing, incomplete, of the wrong size, or non-finite."""


def reps_schema(rep_dim: int, task: str) -> pa.Schema:
    fields = [("sample_id", pa.int64()), ("rep", pa.list_(pa.float32(), rep_dim)), ("teacher_score", pa.float32())]
    if task == "next_item":
        fields.append(("candidate_scores", pa.list_(pa.float32())))
    return pa.schema(fields)


def check_rep_dim(actual: int, expected: int | None, where: str) -> None:
    if expected is not None and int(actual) != int(expected):
        raise RepsError(
            f"{where}: teacher representation size is {actual}, but the trainer's gate expects {expected} "
            f"(set the gate input size to {actual}, or retrain the teacher with rep_dim={expected})"
        )


class ScoreWorker:
    """Scores whole sample shards. Plain Python: runs in-process or as a Ray actor via cluster.pool."""

    def __init__(
        self,
        model_url: str,
        samples_url: str,
        reps_url: str,
        batch_size: int = 4096,
        device: str = "cpu",
        num_threads: int = 1,
        s3_endpoint: str | None = None,
    ):
        if s3_endpoint:
            storage.configure(endpoint_url=s3_endpoint)
        torch.set_num_threads(max(1, int(num_threads)))
        self.device = pick_device(device)
        self.samples_url, self.reps_url, self.batch_size = samples_url, reps_url, int(batch_size)
        self.teacher = load_teacher(model_url, self.device)
        self.model_sha = self.teacher.meta["sha256"][MODEL_FILE]
        self.encoder = Encoder(self.teacher.space, self.teacher.cfg.max_hist, self.teacher.cfg.task)
        self.schema = reps_schema(self.teacher.rep_dim, self.teacher.cfg.task)
        # One filesystem handle per worker: creating an S3 client per call costs more than the call.
        self.fs, self.root = storage.get_fs(reps_url)

    def committed(self, split: str, shard: str) -> dict[str, Any] | None:
        path = self._path(split, MARKER_DIR, shard.replace(".parquet", ".json"))
        with storage.storage_errors(self.reps_url):
            if not self.fs.exists(path):
                return None
            with self.fs.open(path, "rb") as f:
                m = json.loads(f.read().decode("utf-8"))
        return m if m.get("model_sha256") == self.model_sha else None

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def run(self, task: dict[str, Any]) -> dict[str, Any]:
        split, shard = task["split"], task["shard"]
        done = self.committed(split, shard)
        if done is not None:
            return {**done, "skipped": True}
        t0 = time.time()
        in_url = storage.join(self.samples_url, split, shard)
        out_dir = self._path(split)
        stem = shard.removesuffix(".parquet")
        fs = self.fs
        with storage.storage_errors(self.reps_url):
            fs.makedirs(out_dir, exist_ok=True)
            # Left by a killed run: storage's atomic writes ("<name>.tmp-*"; "_tmp-<stem>-*" from earlier versions).
            for pattern in (f"{shard}.tmp-*", f"_tmp-{stem}-*"):
                for stale in fs.glob(posixpath.join(out_dir, pattern)):
                    fs.rm(stale)
        stats: Counter = Counter()
        # Streamed to a local scratch file, then copied to its final name atomically (storage's one atomic
        # write: a temporary name beside the target, then a rename), locally and on object stores.
        with tempfile.TemporaryDirectory(prefix="reclora-reps-") as scratch:
            local = os.path.join(scratch, shard)
            # Dense float vectors: dictionary encoding never pays off and zstd costs more than it saves.
            with pq.ParquetWriter(local, self.schema, compression="snappy", use_dictionary=False) as writer:
                for rg in iter_row_groups(in_url):
                    for s in range(0, rg.num_rows, self.batch_size):
                        writer.write_table(self.score_table(rg.slice(s, self.batch_size), stats, in_url))
            storage.upload_file_atomic(local, storage.join(self.reps_url, split, shard))
        marker = {
            "split": split,
            "shard": shard,
            "rows": int(stats["samples"]),
            "model_sha256": self.model_sha,
            "rep_dim": self.teacher.rep_dim,
            "stats": {k: int(v) for k, v in sorted(stats.items())},
        }
        # The marker is the commit point: written only after the data file is complete at its name.
        storage.write_json_atomic(storage.join(self.reps_url, split, MARKER_DIR, f"{stem}.json"), marker)
        return {**marker, "skipped": False, "seconds": time.time() - t0}

    @torch.inference_mode()
    def score_table(self, table: pa.Table, stats: Counter, where: str) -> pa.Table:
        """Teacher output for one batch of sample records (rows in input order); also used by the trainer's feed."""
        enc = self.encoder.encode(table, stats, where=where)
        b = to_tensors(enc, self.device)
        out = self.teacher.model(b)
        pred = self.teacher.model.predict(b, out)
        rep = out["rep"].float().cpu().numpy()
        score = pred["teacher_score"].float().cpu().numpy()
        bad = ~np.isfinite(rep).all(axis=1) | ~np.isfinite(score)
        if bad.any():
            sid = int(enc["sample_id"][np.flatnonzero(bad)[0]])
            raise RepsError(
                f"{where}: non-finite teacher output for sample_id {sid} ({int(bad.sum())} rows in this batch)"
            )
        stats["zero_reps"] += int((~rep.any(axis=1)).sum())  # possible after ReLU; counted, never substituted
        d = rep.shape[1]
        cols = [
            pa.array(enc["sample_id"]),
            pa.FixedSizeListArray.from_arrays(pa.array(rep.reshape(-1)), d),
            pa.array(score),
        ]
        if "candidate_scores" in self.schema.names:
            if "candidate_scores" in pred:
                cs = pred["candidate_scores"].float().cpu().numpy()
                offsets = pa.array(np.arange(cs.shape[0] + 1, dtype=np.int32) * cs.shape[1])
                cols.append(pa.ListArray.from_arrays(offsets, pa.array(cs.reshape(-1))))
            else:
                cols.append(pa.nulls(len(rep), pa.list_(pa.float32())))
        return pa.Table.from_arrays(cols, schema=self.schema)


def score_samples(
    model_url: str,
    samples_url: str,
    reps_url: str,
    num_actors: int = 2,
    splits: Sequence[str] = SPLITS,
    batch_size: int = 4096,
    num_cpus_per_actor: float = 1.0,
    use_gpu: bool = False,
    expected_rep_dim: int | None = None,
    runner: Runner | None = None,
) -> dict[str, Any]:
    """Score every shard of `splits` into `reps_url`. num_actors=0 (or no runner) runs in this process;
    otherwise `runner` (cluster.pool.run_sharded: Ray actors) runs the shards.
    Returns a summary: rows and unknown-id counts per split, shards skipped (already committed), speed."""
    meta_url = storage.join(model_url, META_FILE)
    if not storage.exists(meta_url):
        raise RepsError(f"{model_url}: no committed teacher ({META_FILE} missing); run teacher.train first")
    meta = storage.read_json(meta_url)
    check_rep_dim(meta["rep_dim"], expected_rep_dim, model_url)
    tasks = [
        {"split": s, "shard": posixpath.basename(u)}
        for s in splits
        for u in list_shards(samples_url, s, required=False)
    ]
    if not tasks:
        raise SamplesError(f"{samples_url}: no sample shards in splits {list(splits)}")
    kwargs = dict(
        model_url=model_url,
        samples_url=samples_url,
        reps_url=reps_url,
        batch_size=batch_size,
        device="cuda" if use_gpu else "cpu",
        num_threads=max(1, int(num_cpus_per_actor)),
        s3_endpoint=storage.s3_endpoint(),
    )
    t0 = time.time()
    run = runner if runner is not None and num_actors > 0 else run_in_process
    results = run(
        ScoreWorker,
        kwargs,
        tasks,
        num_actors=num_actors,
        num_cpus_per_actor=num_cpus_per_actor,
        num_gpus_per_actor=1.0 if use_gpu else 0.0,
        desc="teacher.score",
    )
    elapsed = time.time() - t0
    per_split: dict[str, dict[str, Any]] = {}
    for r in sorted(results, key=lambda r: (r["split"], r["shard"])):
        sp = per_split.setdefault(r["split"], {"rows": 0, "shards": [], "stats": Counter()})
        sp["rows"] += r["rows"]
        sp["shards"].append(r["shard"])
        sp["stats"].update(r["stats"])
    manifest = {
        "model_url": model_url,
        "model_sha256": meta["sha256"][MODEL_FILE],
        "model": meta["model"],
        "task": meta["task"],
        "rep_dim": meta["rep_dim"],
        "samples_url": samples_url,
        "splits": {
            s: {"rows": v["rows"], "shards": v["shards"], "stats": dict(sorted(v["stats"].items()))}
            for s, v in sorted(per_split.items())
        },
    }
    storage.write_json_atomic(storage.join(reps_url, MANIFEST), manifest)
    scored = sum(r["rows"] for r in results if not r["skipped"])
    busy = sum(r.get("seconds", 0.0) for r in results if not r["skipped"])
    return {
        **manifest,
        "shards_total": len(results),
        "shards_skipped": sum(bool(r["skipped"]) for r in results),
        "rows_scored": scored,
        "seconds": round(elapsed, 3),
        "samples_per_s": scored / elapsed if elapsed > 0 else 0.0,
        "samples_per_s_per_worker": scored / busy if busy > 0 else 0.0,
    }


# ---- reading (for the LLM trainer) -----------------------------------------------------------------


def open_reps(reps_url: str, expected_rep_dim: int | None = None) -> dict[str, Any]:
    """The reps manifest, after checking it is complete and of the size the trainer expects."""
    murl = storage.join(reps_url, MANIFEST)
    if not storage.exists(murl):
        raise RepsError(f"{reps_url}: no {MANIFEST}: scoring has not finished (rerun teacher.score to resume)")
    m = storage.read_json(murl)
    check_rep_dim(m["rep_dim"], expected_rep_dim, reps_url)
    return m


def read_reps(
    reps_url: str, split: str, expected_rep_dim: int | None = None, columns: list[str] | None = None
) -> pa.Table:
    m = open_reps(reps_url, expected_rep_dim)
    if split not in m["splits"]:
        raise RepsError(f"{reps_url}: split '{split}' was not scored (have {sorted(m['splits'])})")
    tables = [read_parquet(storage.join(reps_url, split, s), columns=columns) for s in m["splits"][split]["shards"]]
    return pa.concat_tables(tables)


def rep_matrix(reps_url: str, split: str, sample_ids: np.ndarray, expected_rep_dim: int | None = None) -> np.ndarray:
    """[len(sample_ids), d] float32 rows for the given sample ids, joined by sample_id (never by row
    order). A sample id without a representation is an error, not a zero row."""
    t = read_reps(reps_url, split, expected_rep_dim, columns=["sample_id", "rep"])
    ids = t.column("sample_id").to_numpy()
    d = t.schema.field("rep").type.list_size
    reps = pc_flatten(t.column("rep")).reshape(len(ids), d)
    order = np.argsort(ids, kind="stable")
    ids_sorted = ids[order]
    want = np.asarray(sample_ids, dtype=np.int64)
    pos = np.minimum(np.searchsorted(ids_sorted, want), max(len(ids_sorted) - 1, 0))
    missing = (len(ids_sorted) == 0) | (ids_sorted[pos] != want) if len(want) else np.zeros(0, bool)
    if np.any(missing):
        raise RepsError(
            f"{reps_url}/{split}: no representation for sample_id {int(want[np.flatnonzero(missing)[0]])} "
            f"({int(np.sum(missing))} of {len(want)} missing)"
        )
    return reps[order[pos]]


def pc_flatten(col: pa.ChunkedArray) -> np.ndarray:
    arr = col.combine_chunks()
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)


def main(argv: list[str] | None = None, runner: Runner | None = None) -> int:
    """Ray workers come from `runner` (the `reclora` command passes cluster.pool.run_sharded); without one,
    every task runs in this process."""
    p = argparse.ArgumentParser(
        prog="python -m teacher.score", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument(
        "--config",
        help="preset name or YAML: model, samples and reps URLs (recdata.layout.paths), actors "
        "(teacher.num_workers) and the expected size (teacher.rep_dim) from it; an option below given "
        "explicitly overrides the config's value",
    )
    p.add_argument("overrides", nargs="*", help="key.path=value overrides for --config")
    p.add_argument("--model", help="committed teacher URL (teacher.train --out)")
    p.add_argument("--samples")
    p.add_argument("--out", help="reps URL")
    p.add_argument("--num-actors", type=int, default=2, help="Ray actors; 0 = in this process")
    p.add_argument("--splits", default=",".join(SPLITS))
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--expected-rep-dim", type=int, default=None, help="refuse another size (default: any)")
    a = p.parse_args(argv)
    given = explicit_options(p, argv)
    setup_logging()

    try:
        if a.config:
            cfg = load_config(a.config, a.overrides + flag_overrides(a, given, {"num_actors": "teacher.num_workers"}))
            storage.configure(cfg.storage.endpoint_url, cfg.storage.region, cfg.storage.anon or None)
            pt = paths(cfg)
            model, samples, out = (a.model or pt.teacher), (a.samples or pt.samples), (a.out or pt.reps)
            num_actors = cfg.teacher.num_workers
            rep_dim = a.expected_rep_dim if "expected_rep_dim" in given else cfg.teacher.rep_dim
            if not storage.exists(storage.join(model, META_FILE)):
                cmd = " ".join(["python -m teacher.train --config", a.config, *a.overrides])
                raise RepsError(f"{model}: no committed teacher ({META_FILE} missing); run `{cmd}` first")
        else:
            missing = [f"--{n}" for n in ("model", "samples", "out") if not getattr(a, n)]
            if missing:
                raise RepsError(f"{', '.join(missing)} required (or use --config)")
            if a.overrides:
                raise RepsError(f"key=value overrides {a.overrides} need --config")
            model, samples, out, num_actors, rep_dim = a.model, a.samples, a.out, a.num_actors, a.expected_rep_dim
        res = score_samples(
            model,
            samples,
            out,
            num_actors,
            [s for s in a.splits.split(",") if s],
            a.batch_size,
            a.cpus_per_actor,
            a.gpu,
            rep_dim,
            runner=runner,
        )
    except (ConfigError, RepsError, SamplesError, FeatureError, TeacherLoadError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "out": out,
                **{
                    k: res[k]
                    for k in (
                        "rep_dim",
                        "splits",
                        "shards_total",
                        "shards_skipped",
                        "rows_scored",
                        "seconds",
                        "samples_per_s",
                    )
                },
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
