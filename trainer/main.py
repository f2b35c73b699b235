"""The recipe: one run of the reclora pipeline, top to bottom.

    python trainer/main.py --config configs/demo.yaml [key=value ...] [--stages a,b,...] [--dry-run]

Stages: ingest -> embed -> samples -> teacher -> score -> train (cluster/pipeline.py runs them; see there).
Locally this starts its own Ray on 127.0.0.1; under `ray job submit` (RAY_ADDRESS set) it joins that
cluster. Every stage reads and writes storage (local path, file:// or s3://) and is skipped when its
output is already complete, so a rerun continues where the last one stopped.

Output: progress and status lines are log records on stderr (time, level, rank, module; RECLORA_LOG_LEVEL sets
the level); the results (the dataset summary, the final table, the report's path, `--dry-run`'s plan) are plain
text on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Runnable as a script (`python trainer/main.py`) from any working directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.pipeline import Pipeline  # noqa: E402
from cluster.runtime import setup_console  # noqa: E402
from configs.errors import RecloraError  # noqa: E402
from configs.loader import HelpFormatter, load_config  # noqa: E402
from recdata.layout import DEFAULT_STAGES, STAGES  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="trainer/main.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument("--config", default="demo", help="preset name or YAML path")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. trainer.lr=5e-4")
    p.add_argument(
        "--stages",
        default=",".join(DEFAULT_STAGES),
        help=f"comma-separated subset of {','.join(STAGES)}",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan (reuse vs build) and exit")
    p.add_argument("--resume", metavar="URL", help="resume training from this checkpoint (default: the run's latest)")
    return p.parse_intermixed_args(argv)  # overrides may come before or after --stages etc.


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_console()
    t0 = time.perf_counter()
    try:
        cfg = load_config(args.config, args.overrides + ([f"trainer.resume={args.resume}"] if args.resume else []))
        pipeline = Pipeline.setup(cfg, [s.strip() for s in args.stages.split(",") if s.strip()])
        if args.dry_run:
            print(pipeline.plan())
            return 0
        pipeline.run()
        pipeline.report()
    except RecloraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - t0:.1f}s; run outputs: {pipeline.paths.run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
