"""`reclora`: one command for every stage, with Ray workers where a stage shards.

    reclora train   --config demo [key=value ...]     the whole pipeline (same as python trainer/main.py)
    reclora ingest  FORMAT --src PATH --out URL       raw data -> canonical Parquet dataset
    reclora ingest  prompts --src DIR --out URL       Alpaca / TALLRec CTR prompt files -> a prompt set
    reclora convert llara-pickles --src DIR --out DIR --trust-pickle   LLaRA's pandas pickles -> JSONL for ingest
    reclora embed   --config demo                     LLM item embeddings (+ PCA) for semantic retrieval
    reclora samples --config demo                     long-short retrieval -> sample records
    reclora teacher --config demo                     the CRM (DIN/SIM/SASRec) on the full training split
    reclora score   --config demo                     teacher representations for every sample
    reclora predict --run URL --requests URL --out URL
    reclora export  --run URL --out DIR
    reclora config  --config demo [key=value ...] --print   the resolved config, every default included, as YAML

Each subcommand takes the options of its stage (`reclora samples --help`, every option with its default). With
--config, an option given explicitly overrides the config's value (`reclora teacher --config tiny --epochs 3`
trains 3 epochs, as `teacher.epochs=3` would) and the stage's output folder follows it. The stage modules run
without Ray too (`python -m retrieval.build ...` builds in this process); this command hands them the Ray runner,
and `embed` and `teacher` run on Ray workers with a GPU each when the Ray cluster has GPUs (cluster.placement).

Output: progress and status lines are log records on stderr (configs.logs: time, level, rank, module;
RECLORA_LOG_LEVEL=DEBUG for more); each command's result (a summary, a table, JSON, the YAML) is on stdout.
"""

from __future__ import annotations

import argparse
import sys

from cluster.launch import run_training
from cluster.placement import place_embed, teacher_uses_gpu
from cluster.pool import run_sharded
from cluster.runtime import setup_console
from configs.errors import RecloraError
from configs.loader import HelpFormatter, load_config, to_yaml
from recdata import convert, ingest
from retrieval import build, embed_items
from teacher import score
from teacher import train as teacher_train
from trainer import export, predict
from trainer import main as train_main

COMMANDS = {
    "train": lambda argv: train_main.main(argv),
    "ingest": lambda argv: ingest.main(argv),
    "convert": lambda argv: convert.main(argv),
    "embed": lambda argv: embed_items.main(argv, runner=run_sharded, place=place_embed),
    "samples": lambda argv: build.main(argv, runner=run_sharded),
    "teacher": lambda argv: teacher_train.main(argv, launch=run_training, place=teacher_uses_gpu),
    "score": lambda argv: score.main(argv, runner=run_sharded),
    "predict": lambda argv: predict.main(argv, runner=run_sharded),
    "export": lambda argv: export.main(argv),
    "config": lambda argv: print_config(argv),
}


def print_config(argv: list[str]) -> int:
    """`reclora config --config NAME [key=value ...] [--print]`: the resolved config (the preset, what it
    extends, the overrides, then every default of configs.schema) as YAML on stdout, as the run saves it."""
    p = argparse.ArgumentParser(
        prog="reclora config",
        description="Print the resolved config: the preset, what it extends and the overrides over every default.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--config", default="demo", help="preset name or YAML path")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. trainer.lr=5e-4")
    p.add_argument("--print", action="store_true", help="print it as YAML (what this command does anyway)")
    a = p.parse_intermixed_args(argv)
    try:
        print(to_yaml(load_config(a.config, a.overrides)), end="")
    except RecloraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_console()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return COMMANDS[command](rest) or 0


if __name__ == "__main__":
    sys.exit(main())
