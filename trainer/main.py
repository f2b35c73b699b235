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
import os
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
    p.add_argument("--stages", default=",".join(st.DEFAULT_STAGES),
                   help=f"comma-separated subset of {','.join(st.STAGES)} (default: {','.join(st.DEFAULT_STAGES)})")
    p.add_argument("--dry-run", action="store_true", help="print the plan (reuse vs build) and exit")
    p.add_argument("--resume", metavar="URL", help="resume training from this checkpoint (default: the run's latest)")
    return p.parse_intermixed_args(argv)  # overrides may come before or after --stages etc.


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
    where = st.where(p)

    if args.dry_run:
        print(f"{'stage':<8} {'plan':<6} {'output':<60} note")
        for s in stages:
            done = st.done(s, cfg, p)
            note = "" if done else st.progress(s, cfg, p)
            print(f"{s:<8} {'reuse' if done else ('resume' if note else 'build'):<6} {where[s]:<60} {note}".rstrip())
        return 0

    if "train" in stages and st.trained_with_other_inputs(p):
        print(f"error: {p.run} holds a run trained with another config ({storage.join(p.run, 'inputs.json')}); "
              f"pick a new run.name or delete that folder", file=sys.stderr)
        return 2
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
                st.record_inputs(cfg, p, s)  # first: a rerun with another config must not resume this run
                metrics = train(cfg, p.run)
                print("[train] final: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            if s != "train":
                st.record_inputs(cfg, p, s)
            timings[s] = round(time.perf_counter() - ts, 2)
    except (IngestError, storage.StorageError, SetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    storage.write_json_atomic(storage.join(p.run, "stage_seconds.json"), timings)
    if "train" in stages and storage.exists(storage.join(p.run, "metrics.json")):
        from trainer.report import write_report

        teacher = teacher_metrics(cfg, p)
        final = storage.read_json(storage.join(p.run, "metrics.json"))["final"]
        print(final_table(final, teacher))
        storage.write_json_atomic(storage.join(p.run, "results.json"), {"llm": final, "teacher": teacher,
                                                                        "stage_seconds": timings})
        print(f"report: {write_report(p.run, {'teacher (' + cfg.teacher.model + ')': teacher} if teacher else None)}")
    print(f"done in {time.perf_counter() - t0:.1f}s; run outputs: {p.run}")
    return 0


def teacher_metrics(cfg, p) -> dict:
    """The teacher's own scores on exactly the LLM's test samples (the feed stores them in the stream)."""
    from teacher.metrics import ctr_metrics
    from trainer.data import StreamReader

    stream = storage.join(p.run, "data", "test")
    if cfg.data.task != "ctr" or not storage.exists(storage.join(stream, "plan.json")):
        return {}
    t = StreamReader(stream, timeout_s=1.0).read_columns(["label", "teacher_score"])
    return {f"test_{k}": v for k, v in ctr_metrics(t["label"].to_numpy(), t["teacher_score"].to_numpy()).items()}


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
    from trainer.prepare import plan_training

    try:
        params, feed = plan_training(cfg, run_url, zero_shot_first=cfg.data.task == "ctr")
        params["interactive"] = sys.stderr.isatty()
        params["eval_zero_shot"] = cfg.data.task == "ctr"
    except (SamplesError, RepsError, TrainDataError, FileNotFoundError) as e:
        raise SetupError(str(e)) from None
    t = cfg.trainer
    resume = t.resume or latest_complete(run_url)
    if resume:
        try:
            check_compatible(resume, fingerprint_parts(cfg))  # refuse before any worker starts
        except CheckpointError as e:
            raise SetupError(str(e)) from None
    # The feed builds the streams part by part; with overlap the trainer starts at once and waits only for
    # parts a step needs, otherwise every part is built first.
    parts = len(feed.tasks)
    if feed.num_workers:
        from cluster.runtime import init_ray

        init_ray()  # here, before the feed thread and Ray Train could both try to start it
    if t.overlap:
        print(f"[feed] building {parts} parts on {feed.num_workers or 'the driver'} worker(s) while training starts", flush=True)
        feed.start()
    else:
        print(f"[feed] building {parts} parts before training", flush=True)
        _print_summaries(feed.run())
    try:
        run_training(train_worker, params, num_workers=t.num_workers, use_gpu=t.use_gpu, cpus_per_worker=t.cpus_per_worker,
                     name=cfg.run.name, max_failures=t.max_failures, placement=t.placement,
                     worker_resources=t.worker_resources, timeout_s=t.collective_timeout_s,
                     # which node each rank ran on, one JSON per rank (multi-node debugging and tests)
                     node_report_dir=os.environ.get("RECLORA_NODE_REPORT_DIR"))
    except Exception:
        if feed.error is not None:  # the trainer stopped because the feed did: report the cause
            raise SetupError(f"feed failed: {type(feed.error).__name__}: {feed.error}") from feed.error
        raise
    if t.overlap:
        try:
            _print_summaries(feed.join())
        except (SamplesError, RepsError, TrainDataError) as e:
            raise SetupError(f"feed failed: {e}") from None
    out = storage.read_json(storage.join(run_url, "metrics.json"))
    timing = out.get("timing", {})
    if timing:
        print(f"[train] {timing['steps_run']} steps in {timing['train_seconds']:.1f}s after {timing['setup_seconds']:.1f}s of "
              f"setup; data wait {100 * timing['data_wait_fraction']:.2f}% of the step loop "
              f"(feed: {feed.seconds:.1f}s, {'overlapped' if t.overlap else 'before training'})", flush=True)
        storage.write_json_atomic(storage.join(run_url, "feed.json"), {"overlap": t.overlap, "feed_seconds": feed.seconds,
                                                                       "parts": parts, **timing})
    return out["final"]


def _print_summaries(summaries: dict) -> None:
    for split, s in summaries.items():
        print(f"[data] {split}: {s['rows']} samples, {s['tokens']} tokens, mean length {s['mean_len']:.0f}, "
              f"{s['history_truncated']} with history truncated, {s['prompt_truncated']} prompts cut to fit", flush=True)


if __name__ == "__main__":
    sys.exit(main())
