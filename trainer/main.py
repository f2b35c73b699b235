"""The recipe: one run of the reclora pipeline, top to bottom.

    python trainer/main.py --config configs/demo.yaml [key=value ...] [--stages ingest,...] [--dry-run]

Locally this starts its own Ray on 127.0.0.1; under `ray job submit` (RAY_ADDRESS set) it joins that
cluster. Every stage reads and writes storage (local path, file:// or s3://), so a rerun reuses what
is complete.

Stages now: ingest, train (against existing samples and teacher representations; the stages that
build those are run by retrieval.build and teacher.train/score for now).
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
from trainer.prepare import resolve  # noqa: E402

STAGES = ("ingest", "train")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="trainer/main.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo.yaml", help="preset name or YAML path (default: demo)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. trainer.lr=5e-4")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--dry-run", action="store_true", help="print the plan (reuse vs build) and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # ---- setup: config first, so a bad key fails before any work
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        print(f"error: --stages: unknown stage(s) {unknown}; choose from {list(STAGES)}", file=sys.stderr)
        return 2
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region, cfg.storage.anon or None)
    root = cfg.run.output_dir
    run_url = storage.join(root, cfg.run.name)
    dataset_url = resolve(cfg.data.dataset_url, root)

    plan = []
    if "ingest" in stages:
        done = storage.exists(storage.join(dataset_url, "manifest.json"))
        plan.append(("ingest", dataset_url, "reuse" if done else "build"))
    if "train" in stages:
        from trainer.checkpoint import latest_complete

        last = latest_complete(run_url)
        plan.append(("train", run_url, f"resume {last}" if last else "build"))
    if args.dry_run:
        for stage, url, action in plan:
            print(f"{stage:<10} {action:<6} {url}")
        return 0

    storage.write_bytes_atomic(storage.join(run_url, "config.yaml"), to_yaml(cfg).encode())
    t0 = time.perf_counter()
    try:
        # ---- stage: ingest (Few2Many stage 0: the full dataset, canonical and sharded)
        if "ingest" in stages:
            from retrieval.ingest import ingest, options_from_config, summary
            from retrieval.schema import Dataset

            if storage.exists(storage.join(dataset_url, "manifest.json")):
                manifest = Dataset.open(dataset_url).manifest
                print(f"[ingest] reusing {dataset_url}")
            else:
                print(f"[ingest] {cfg.data.format} {cfg.data.src} -> {dataset_url}")
                opts = options_from_config(cfg)
                opts.progress = sys.stderr.isatty()
                manifest = ingest(cfg.data.format, cfg.data.src, dataset_url, opts, items=cfg.data.items,
                                  users=cfg.data.users, columns=cfg.data.columns)
            print(summary(manifest))

        # ---- stage: train (Few2Many stage 2: the LLM on a small subset, gated by the frozen teacher)
        if "train" in stages:
            metrics = train(cfg, run_url)
            print("[train] final: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    except (IngestError, storage.StorageError, TrainSetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - t0:.1f}s; run outputs: {run_url}")
    return 0


class TrainSetupError(RuntimeError):
    pass


def train(cfg, run_url: str) -> dict:
    from cluster.launch import run_training
    from retrieval.samples import SamplesError
    from teacher.score import RepsError
    from trainer.checkpoint import CheckpointError
    from trainer.data import TrainDataError
    from trainer.loop import train_worker
    from trainer.prepare import prepare

    try:
        params = prepare(cfg, run_url)
        params["interactive"] = sys.stderr.isatty()
    except (SamplesError, RepsError, TrainDataError) as e:
        raise TrainSetupError(str(e)) from None
    for split, s in params["summaries"].items():
        print(f"[data] {split}: {s['rows']} samples, {s['tokens']} tokens, mean length {s['mean_len']:.0f}, "
              f"{s['skipped_too_long']} too long, {s['history_truncated']} with history truncated")
    t = cfg.trainer
    from trainer.checkpoint import check_compatible, latest_complete
    from trainer.loop import fingerprint_parts

    resume = t.resume or latest_complete(run_url)
    if resume:
        try:
            check_compatible(resume, fingerprint_parts(cfg))  # refuse before any worker starts
        except CheckpointError as e:
            raise TrainSetupError(str(e)) from None
    try:
        run_training(train_worker, params, num_workers=t.num_workers, use_gpu=t.use_gpu,
                              cpus_per_worker=t.cpus_per_worker, name=cfg.run.name, max_failures=t.max_failures)
    except CheckpointError as e:
        raise TrainSetupError(str(e)) from None
    final = storage.read_json(storage.join(run_url, "metrics.json"))["final"]
    return final


if __name__ == "__main__":
    sys.exit(main())
