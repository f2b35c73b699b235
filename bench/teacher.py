"""Teacher benchmark: quality of the Few2Many stage-1 recommenders and speed of representation scoring.

    python bench/teacher.py [--quick] [--out bench/results/teacher.md]

Quality: DIN AUC/LogLoss on the MovieLens-100K CTR test split (global time 8:1:1, label rating >= 4,
K_id = 60); SASRec HR@1/HR@10/NDCG@10 on the LLaRA LastFM test split with persisted 20-candidate
lists; popularity (and random) baselines beside them; 95% bootstrap intervals for the 122-row test set.
Speed: DIN scoring (read Parquet, encode, forward, write Parquet) samples/s of one single-threaded
worker, and the wall-clock throughput of 1 vs 2 Ray actors (on the training split repeated 4x), beside
what two plain processes get from the machine at that moment.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RECLORA_QUIET", "1")

from cluster.runtime import init_ray, shutdown_ray  # noqa: E402
from recdata import metrics as M  # noqa: E402
from teacher import refdata  # noqa: E402
from teacher.baselines import popularity_candidates, popularity_ctr, random_scores  # noqa: E402
from teacher.config import TeacherConfig  # noqa: E402
from teacher.data import list_shards, read_shard  # noqa: E402
from teacher.score import ScoreWorker, read_reps, score_samples  # noqa: E402
from teacher.train import train_teacher  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def _split(samples: str, split: str) -> pa.Table:
    return pa.concat_tables([read_shard(u) for u in list_shards(samples, split)])


def bench_din(work: Path, quick: bool) -> dict:
    samples, ds = str(work / "ml_samples"), str(work / "ml_ds")
    refdata.build_movielens100k_ctr(SHARED / "movielens-100k", ds, samples, k_id=60, num_shards=8)
    # Full runs use the paper defaults (TeacherConfig.defaults: 8 epochs, best epoch on validation AUC).
    cfg = TeacherConfig.defaults("din", num_threads=2, **({"epochs": 2} if quick else {}))
    res = train_teacher(samples, str(work / "din"), cfg, progress=not quick)
    tr, te = _split(samples, "train"), _split(samples, "test")
    y = te["label"].to_numpy()
    pop = popularity_ctr(tr["item_id"].to_numpy(), tr["label"].to_numpy(), te["item_id"].to_numpy())
    return {
        "samples": samples,
        "model": str(work / "din"),
        "train": res,
        "din": res["test"],
        "pop": M.ctr_metrics(y, pop),
        "n_test": len(y),
        "pos_rate": float(y.mean()),
    }


def bench_sasrec(work: Path, quick: bool) -> dict:
    samples = str(work / "lfm_samples")
    refdata.build_llara_samples(SHARED / "llara-lastfm", samples)
    cfg = TeacherConfig.defaults("sasrec", epochs=2 if quick else 8, num_threads=2)
    model = str(work / "sasrec")
    res = train_teacher(samples, model, cfg, progress=not quick)
    # Test metrics from the scored output (the same path the LLM trainer consumes), with CIs.
    score_samples(model, samples, str(work / "lfm_reps"), num_actors=0, splits=("test",))
    te = _split(samples, "test")
    reps = read_reps(str(work / "lfm_reps"), "test")
    order = {s: i for i, s in enumerate(reps["sample_id"].to_pylist())}
    idx = [order[s] for s in te["sample_id"].to_pylist()]
    scores = np.array(reps["candidate_scores"].to_pylist())[idx]
    cands = np.array(te["candidates"].to_pylist())
    target = (cands == te["item_id"].to_numpy()[:, None]).argmax(1)
    tr = _split(samples, "train")
    pop = popularity_candidates(tr["item_id"].to_numpy(), cands)
    rnd = random_scores(cands.shape, seed=0)

    def ci(fn, s):
        return M.bootstrap_ci(lambda a, b: fn(a, b), s, target, n_boot=1000, seed=0)

    out = {"train": res, "n_test": len(target)}
    for name, s in (("sasrec", scores), ("pop", pop), ("random", rnd)):
        out[name] = {
            "hr@1": ci(lambda a, b: M.hit_rate_at_k(a, b, 1), s),
            "hr@10": ci(lambda a, b: M.hit_rate_at_k(a, b, 10), s),
            "ndcg@10": ci(lambda a, b: M.ndcg_at_k(a, b, 10), s),
        }
    return out


_SPIN = """
import sys, time, torch
torch.set_num_threads(1)
a = torch.randn(512, 512)
start, secs = float(sys.argv[1]), float(sys.argv[2])
while time.time() < start:
    time.sleep(0.01)
n = 0
while time.time() < start + secs:
    a @ a
    n += 1
print(n / secs)
"""


def cpu_scaling(secs: float = 5.0) -> float:
    """Matmul throughput of 2 single-thread processes over 1, started together: what this machine gives
    two actors right now (2.0 on two idle cores, less when other jobs hold a core). The 2-actor ratio
    below can only be read against it."""

    def run(k: int) -> float:
        start = time.time() + 4.0  # past the torch import of every process
        procs = [
            subprocess.Popen([sys.executable, "-c", _SPIN, str(start), str(secs)], stdout=subprocess.PIPE, text=True)
            for _ in range(k)
        ]
        return sum(float(p.communicate()[0]) for p in procs)

    return run(2) / run(1)


def bench_speed(work: Path, samples: str, model: str, quick: bool) -> dict:
    # One worker, one thread: end-to-end per-shard throughput (Parquet read -> encode -> DIN -> Parquet).
    w = ScoreWorker(model, samples, str(work / "speed_single"), batch_size=4096, num_threads=1)
    # CPU seconds of this process as well as wall time: on a shared machine the wall rate understates
    # what one core does, the CPU-time rate does not.
    rows = secs = 0.0
    cpu0 = time.process_time()
    for shard in [Path(u).name for u in list_shards(samples, "train")][: 3 if quick else 8]:
        r = w.run({"split": "train", "shard": shard})
        rows += r["rows"]
        secs += r["seconds"]
    per_core = rows / (time.process_time() - cpu0)
    per_core_wall = rows / secs
    # Ray: the training split repeated so that scoring, not actor start-up (a fresh process importing
    # torch and loading the model, seconds on a busy machine), dominates the 1-vs-2-actor comparison.
    copies = 1 if quick else 4
    big = work / "speed_samples"
    (big / "train").mkdir(parents=True)
    for c in range(copies):
        for i, u in enumerate(list_shards(samples, "train")):
            shutil.copyfile(u, big / "train" / f"shard-{c * 1000 + i:05d}.parquet")

    calibration = cpu_scaling(2.0 if quick else 5.0)
    init_ray(num_cpus=2)
    try:
        wall = {}
        for n in (1, 2):
            t0 = time.time()
            res = score_samples(model, str(big), str(work / f"speed_ray{n}"), num_actors=n, splits=("train",))
            wall[n] = {
                "seconds": time.time() - t0,
                "rows": res["rows_scored"],
                "per_worker": res["samples_per_s_per_worker"],
            }
    finally:
        shutdown_ray()
    return {
        "per_core": per_core,
        "per_core_wall": per_core_wall,
        "ray": wall,
        "cpu_ratio_2_to_1": calibration,
        "ratio_2_to_1": (wall[2]["rows"] / wall[2]["seconds"]) / (wall[1]["rows"] / wall[1]["seconds"]),
    }


def fmt_ci(t) -> str:
    return f"{t[0]:.4f} [{t[1]:.3f}, {t[2]:.3f}]"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer epochs and shards (minutes on 2 CPU cores)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "teacher.md"))
    a = p.parse_args()
    for need in ("movielens-100k", "llara-lastfm"):
        if not (SHARED / need).exists():
            print(
                f"bench/teacher.py: {SHARED / need} not found; the benchmark needs the shared data folder",
                file=sys.stderr,
            )
            return 2
    import torch

    t0 = time.time()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-teacher-") as tmp:
        work = Path(tmp)
        din = bench_din(work, a.quick)
        sas = bench_sasrec(work, a.quick)
        speed = bench_speed(work, din["samples"], din["model"], a.quick)
    lines = [
        f"# Teacher benchmark ({'quick' if a.quick else 'full'})",
        "",
        f"torch {torch.__version__}, {os.cpu_count()} CPU cores, CPU only; total {time.time() - t0:.0f} s. "
        "Other jobs may share the cores: speed numbers are lower bounds. Load average (1/5/15 min) at start "
        f"{'/'.join(f'{x:.1f}' for x in load0)}, at end {'/'.join(f'{x:.1f}' for x in os.getloadavg())}.",
        "",
        f"## DIN on MovieLens-100K CTR (test: {din['n_test']} samples, positive rate {din['pos_rate']:.3f}; "
        f"best epoch {din['train']['best_epoch']} of {len(din['train']['history'])})",
        "",
        "| model | AUC | LogLoss |",
        "|---|---|---|",
        f"| DIN (K_id=60, rep 256) | {din['din']['auc']:.4f} | {din['din']['logloss']:.4f} |",
        f"| item popularity | {din['pop']['auc']:.4f} | {din['pop']['logloss']:.4f} |",
        "",
        "DIN per epoch (the committed model is the best epoch on validation AUC):",
        "",
        "| epoch | train loss | valid AUC | valid LogLoss |",
        "|---|---|---|---|",
        *(
            f"| {h['epoch']} | {h['train_loss']:.4f} | {h['valid_auc']:.4f} | {h['valid_logloss']:.4f} |"
            for h in din["train"]["history"]
        ),
        "",
        f"## SASRec on LLaRA LastFM (test: {sas['n_test']} rows, 20 persisted candidates; 95% bootstrap CI; "
        f"best epoch {sas['train']['best_epoch']} of {len(sas['train']['history'])})",
        "",
        "| model | HR@1 | HR@10 | NDCG@10 |",
        "|---|---|---|---|",
    ]
    for name, label in (("sasrec", "SASRec (hidden 64, 2 blocks)"), ("pop", "popularity"), ("random", "random")):
        m = sas[name]
        lines.append(f"| {label} | {fmt_ci(m['hr@1'])} | {fmt_ci(m['hr@10'])} | {fmt_ci(m['ndcg@10'])} |")
    r = speed["ray"]
    lines += [
        "",
        "## DIN scoring speed (K_id=60, batch 4096, Parquet in and out)",
        "",
        "| setting | samples/s |",
        "|---|---|",
        f"| 1 worker, 1 thread: per CPU-second of the process | {speed['per_core']:.0f} |",
        f"| 1 worker, 1 thread: per wall second | {speed['per_core_wall']:.0f} |",
        f"| Ray, 1 actor: {r[1]['rows']} rows, wall incl. actor start | {r[1]['rows'] / r[1]['seconds']:.0f} |",
        f"| Ray, 2 actors: {r[2]['rows']} rows, wall incl. actor start | {r[2]['rows'] / r[2]['seconds']:.0f} |",
        f"| ratio 2 actors / 1 actor (wall) | {speed['ratio_2_to_1']:.2f} |",
        f"| machine: 2 single-thread matmul processes / 1, just before | {speed['cpu_ratio_2_to_1']:.2f} |",
        f"| Ray, per actor while scoring (1 actor / 2 actors) | {r[1]['per_worker']:.0f} / {r[2]['per_worker']:.0f} |",
        "",
    ]
    summary = {
        "din_auc": round(din["din"]["auc"], 4),
        "din_logloss": round(din["din"]["logloss"], 4),
        "pop_auc": round(din["pop"]["auc"], 4),
        "sasrec_hr1": round(sas["sasrec"]["hr@1"][0], 4),
        "sasrec_hr10": round(sas["sasrec"]["hr@10"][0], 4),
        "sasrec_ndcg10": round(sas["sasrec"]["ndcg@10"][0], 4),
        "pop_hr1": round(sas["pop"]["hr@1"][0], 4),
        "score_samples_per_s_per_core": round(speed["per_core"], 1),
        "score_samples_per_s_wall_1thread": round(speed["per_core_wall"], 1),
        "score_ratio_2_to_1_actors": round(speed["ratio_2_to_1"], 3),
        "cpu_ratio_2_to_1_procs": round(speed["cpu_ratio_2_to_1"], 3),
        "quick": a.quick,
    }
    text = "\n".join(lines) + "\n" + json.dumps(summary)
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
