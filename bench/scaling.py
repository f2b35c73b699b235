"""Data-parallel scaling of the trainer: tokens/s with 1 and 2 Ray Train workers (DeepSpeed ZeRO-3).

    python bench/scaling.py [--quick] [--device cuda --shape 7b]

CPU (default): the tiny preset on a small synthetic dataset built with the project's own stages, the same
global batch for both runs (so 2 workers do half the accumulation each). Scaling efficiency =
tokens/s(2) / (2 * tokens/s(1)). On a 2-core machine two workers share the cores, so expect < 1.
Last line: one JSON object with tokens_per_s_1, tokens_per_s_2, scaling_efficiency.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script from anywhere: the repository root first (bench/retrieval.py and bench/teacher.py would
# otherwise shadow the retrieval and teacher packages).
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.launch import run_training  # noqa: E402
from configs.loader import load_config  # noqa: E402
from recdata import storage  # noqa: E402
from recdata.ingest import IngestOptions, ingest  # noqa: E402
from recdata.samples import BuildOptions  # noqa: E402
from recdata.synthetic import preference_dataset as _synthetic_source  # noqa: E402
from retrieval.build import build_samples  # noqa: E402
from teacher.config import TeacherConfig  # noqa: E402
from teacher.score import score_samples  # noqa: E402
from teacher.train import train_teacher  # noqa: E402
from trainer.loop import train_worker  # noqa: E402
from trainer.prepare import prepare  # noqa: E402


def build_inputs(root: Path) -> dict:

    src = _synthetic_source(root)
    ds, sm, tm, rp = (str(root / x) for x in ("dataset", "samples", "teacher", "reps"))
    ingest(
        "generic", str(src / "inter.csv"), ds, IngestOptions(num_shards=2, progress=False), items=str(src / "items.csv")
    )
    build_samples(
        ds, sm, BuildOptions(k_text=5, k_id=10, text_mode="recent", min_history=1, max_eval_samples=8), num_workers=1
    )
    train_teacher(
        sm,
        tm,
        TeacherConfig(model="din", embed_dim=8, mlp_hidden=[32, 16], rep_dim=16, epochs=1, max_hist=10),
        dataset_url=ds,
        progress=False,
    )
    score_samples(tm, sm, rp, num_actors=0, expected_rep_dim=16)
    return {"dataset": ds, "samples": sm, "reps": rp}


def run(inputs: dict, out: str, workers: int, steps: int) -> dict:

    cfg = load_config(
        "tiny",
        [
            f"run.output_dir={out}",
            f"run.name=w{workers}",
            f"data.dataset_url={inputs['dataset']}",
            f"retrieval.samples_url={inputs['samples']}",
            f"teacher.reps_url={inputs['reps']}",
            "teacher.mlp_hidden=[32,16]",
            "teacher.rep_dim=16",
            "trainer.batch_size=8",
            "trainer.micro_batch_size=2",
            f"trainer.num_workers={workers}",
            "trainer.train_subset=96",
            f"trainer.max_steps={steps}",
            "trainer.checkpoint_every=0",
            "retrieval.max_eval_samples=8",
            "model.max_length=192",
        ],
    )
    run_url = storage.join(out, cfg.run.name)
    params = prepare(cfg, run_url)
    run_training(
        train_worker,
        params,
        num_workers=workers,
        use_gpu=False,
        cpus_per_worker=1,
        name=f"scaling-w{workers}-{time.time_ns()}",
        max_failures=0,
    )
    hist = storage.read_json(storage.join(run_url, "logs", "train.jsonl.json"))[2:]  # skip warm-up steps
    return {
        "tokens_per_s": statistics.median(h["tokens_per_s"] for h in hist),
        "samples_per_s": statistics.median(h["samples_per_s"] for h in hist),
        "data_wait_fraction": statistics.median(h["data_wait_fraction"] for h in hist),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", default="tiny", choices=["tiny", "7b"])
    a = ap.parse_args()
    if a.device == "cuda" or a.shape == "7b":
        print(
            "The 7B single-GPU figure comes from bench/train_step.py --device cuda --shape 7b; "
            "multi-GPU scaling needs more than one GPU, which this script does not assume."
        )
    os.environ.setdefault("RECLORA_QUIET", "1")
    steps = 6 if a.quick else 12
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        inputs = build_inputs(Path(tmp) / "in")
        one = run(inputs, str(Path(tmp) / "runs"), 1, steps)
        two = run(inputs, str(Path(tmp) / "runs"), 2, steps)
    eff = two["tokens_per_s"] / (2 * one["tokens_per_s"])
    print(f"\n{'workers':>7} {'tokens/s':>10} {'samples/s':>10} {'data wait':>10}")
    for n, r in ((1, one), (2, two)):
        print(f"{n:>7} {r['tokens_per_s']:>10.0f} {r['samples_per_s']:>10.1f} {r['data_wait_fraction']:>10.3f}")
    print(f"scaling efficiency (2 workers): {eff:.2f}   cores: {os.cpu_count()}   load: {os.getloadavg()[0]:.1f}")
    print(
        json.dumps(
            {
                "tokens_per_s_1": round(one["tokens_per_s"], 1),
                "tokens_per_s_2": round(two["tokens_per_s"], 1),
                "scaling_efficiency": round(eff, 3),
                "cores": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
