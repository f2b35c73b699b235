"""The recipe: one run of the reclora pipeline, top to bottom.

    python trainer/main.py --config configs/demo.yaml [key=value ...] [--stages a,b,...] [--dry-run]

Stages: ingest -> embed (LLM item embeddings, for semantic retrieval) -> samples (long-short retrieval
workers) -> teacher (CRM on the full training split) -> score (teacher representations for every
sample) -> train (the personalized LLM on the Few2Many subset, then validation/test evaluation).

Locally this starts its own Ray on 127.0.0.1; under `ray job submit` (RAY_ADDRESS set) it joins that
cluster. Every stage reads and writes storage (local path, file:// or s3://) and is skipped when its
output is already complete, so a rerun continues where the last one stopped.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Runnable as a script (`python trainer/main.py`) from any working directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.loader import ConfigError, load_config, to_yaml  # noqa: E402
from retrieval import storage  # noqa: E402
from retrieval.textfiles import IngestError  # noqa: E402
from trainer import stages as st  # noqa: E402


class SetupError(RuntimeError):
    """A stage cannot start: its inputs are missing or inconsistent (the message says which)."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="trainer/main.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo.yaml", help="preset name or YAML path (default: demo)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. trainer.lr=5e-4")
    p.add_argument("--stages", default=",".join(st.STAGES), help=f"comma-separated subset of {','.join(st.STAGES)}")
    p.add_argument("--dry-run", action="store_true", help="print the plan (reuse vs build) and exit")
    p.add_argument("--resume", metavar="URL", help="resume training from this checkpoint (default: the run's latest)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # ---- setup: config first, so a bad key fails before any work
    try:
        cfg = load_config(args.config, args.overrides + ([f"trainer.resume={args.resume}"] if args.resume else []))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in st.STAGES]
    if unknown:
        print(f"error: --stages: unknown stage(s) {unknown}; choose from {list(st.STAGES)}", file=sys.stderr)
        return 2
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region, cfg.storage.anon or None)
    if storage.is_local(cfg.run.output_dir):
        # Workers (Ray actors, Ray Train) run in other directories: hand them absolute paths.
        cfg.run.output_dir = str(Path(cfg.run.output_dir.removeprefix("file://")).resolve())
    p = st.paths(cfg)
    where = {"ingest": p.dataset, "embed": p.embeddings, "samples": p.samples, "teacher": p.teacher, "score": p.reps,
             "train": p.run}

    if args.dry_run:
        for s in stages:
            print(f"{s:<8} {'reuse' if st.done(s, cfg, p) else 'build':<6} {where[s]}")
        return 0

    storage.write_bytes_atomic(storage.join(p.run, "config.yaml"), to_yaml(cfg).encode())
    t0 = time.perf_counter()
    timings = {}
    embeddings = None
    try:
        for s in stages:
            ts = time.perf_counter()
            if st.done(s, cfg, p) and s != "embed":
                print(f"[{s}] reusing {where[s]}")
                if s == "ingest":
                    from retrieval.ingest import summary
                    from retrieval.schema import Dataset

                    print(summary(Dataset.open(p.dataset).manifest))
                continue
            print(f"[{s}] -> {where[s]}", flush=True)
            if s == "ingest":
                from retrieval.ingest import summary

                print(summary(st.run_ingest(cfg, p)))
            elif s == "embed":
                embeddings = st.run_embed(cfg, p)
            elif s == "samples":
                if embeddings is None and (cfg.retrieval.text_mode == "subr" or cfg.retrieval.id_mode == "sim"):
                    embeddings = st.run_embed(cfg, p)
                st.run_samples(cfg, p, embeddings)
            elif s == "teacher":
                res = st.run_teacher(cfg, p)
                print(f"[teacher] valid: {res.get('valid')}  test: {res.get('test')}")
            elif s == "score":
                st.run_score(cfg, p)
            elif s == "train":
                metrics = train(cfg, p.run)
                print("[train] final: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            timings[s] = round(time.perf_counter() - ts, 2)
    except (IngestError, storage.StorageError, SetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    storage.write_json_atomic(storage.join(p.run, "stage_seconds.json"), timings)
    if "train" in stages and storage.exists(storage.join(p.run, "metrics.json")):
        from trainer.report import write_report

        teacher = teacher_metrics(cfg, p)
        print(final_table(storage.read_json(storage.join(p.run, "metrics.json"))["final"], teacher))
        print(f"report: {write_report(p.run, {'teacher (' + cfg.teacher.model + ')': teacher} if teacher else None)}")
    print(f"done in {time.perf_counter() - t0:.1f}s; run outputs: {p.run}")
    return 0


def teacher_metrics(cfg, p) -> dict:
    """The teacher's own scores on exactly the LLM's test samples (same ids), for the final table."""
    import numpy as np
    import pyarrow.parquet as pq

    from teacher.metrics import ctr_metrics
    from teacher.score import read_reps

    stream = storage.join(p.run, "data", "test.parquet")
    if cfg.data.task != "ctr" or not storage.exists(stream):
        return {}
    fs, path = storage.get_fs(stream)
    with fs.open(path, "rb") as f:
        t = pq.ParquetFile(f).read(columns=["sample_id", "label"])
    reps = read_reps(p.reps, "test", columns=["sample_id", "teacher_score"])
    ids, scores = reps["sample_id"].to_numpy(), reps["teacher_score"].to_numpy()
    order = np.argsort(ids)
    pos = order[np.searchsorted(ids, t["sample_id"].to_numpy(), sorter=order)]
    return {f"test_{k}": v for k, v in ctr_metrics(t["label"].to_numpy(), scores[pos]).items()}


def final_table(final: dict, teacher: dict) -> str:
    rows = [("zero-shot LLM", "zeroshot_test_"), ("trained LLM", "test_")]
    out = [f"{'model':<16} {'test AUC':>9} {'test LogLoss':>13}"]
    for name, prefix in rows:
        if f"{prefix}auc" in final:
            out.append(f"{name:<16} {final[prefix + 'auc']:>9.4f} {final[prefix + 'logloss']:>13.4f}")
    if teacher:
        out.append(f"{'teacher':<16} {teacher['test_auc']:>9.4f} {teacher['test_logloss']:>13.4f}")
    return "\n".join(out)


def train(cfg, run_url: str) -> dict:
    from cluster.launch import run_training
    from retrieval.samples import SamplesError
    from teacher.score import RepsError
    from trainer.checkpoint import CheckpointError, check_compatible, latest_complete
    from trainer.data import TrainDataError
    from trainer.loop import fingerprint_parts, train_worker
    from trainer.prepare import prepare

    try:
        params = prepare(cfg, run_url)
        params["interactive"] = sys.stderr.isatty()
        params["eval_zero_shot"] = cfg.data.task == "ctr"
    except (SamplesError, RepsError, TrainDataError) as e:
        raise SetupError(str(e)) from None
    for split, s in params["summaries"].items():
        print(f"[data] {split}: {s['rows']} samples, {s['tokens']} tokens, mean length {s['mean_len']:.0f}, "
              f"{s['skipped_too_long']} too long, {s['history_truncated']} with history truncated")
    t = cfg.trainer
    resume = t.resume or latest_complete(run_url)
    if resume:
        try:
            check_compatible(resume, fingerprint_parts(cfg))  # refuse before any worker starts
        except CheckpointError as e:
            raise SetupError(str(e)) from None
    run_training(train_worker, params, num_workers=t.num_workers, use_gpu=t.use_gpu, cpus_per_worker=t.cpus_per_worker,
                 name=cfg.run.name, max_failures=t.max_failures, placement=t.placement,
                 worker_resources=t.worker_resources, timeout_s=t.collective_timeout_s)
    return storage.read_json(storage.join(run_url, "metrics.json"))["final"]


if __name__ == "__main__":
    sys.exit(main())
