"""Recommendation quality of the trained LLMs against their teachers and popularity, on fixed test samples.

    python bench/quality.py [--quick] [--tiny] [--demo] [--work DIR] [--reuse] [--store DIR | --no-store]

Every row is a real pipeline run (`trainer/main.py` with overrides, in one output folder, so the data, retrieval
and teacher stages are built once and shared by every run); the per-sample test results each run's evaluator
writes ({run}/eval/test-STEP.json) give the metrics, 95% percentile bootstrap intervals and paired bootstrap
intervals of differences (the same resampled test samples for both models).

CTR, MovieLens-100K (configs/ml100k-reclora.yaml: global time 8:1:1, label rating >= 4, from
../shared/data/movielens-100k), one fixed test set (retrieval.max_eval_samples) for every row, nested Few2Many
training subsets (trainer.train_subset takes a prefix of the persisted order, so the smaller set is inside the
larger one). Rows: zero-shot LLM (B = 0 before step 1), plain LoRA (q,v, r 8), RecLoRA (gate from the frozen DIN
representation, long-short retrieval), RecLoRA with random gate inputs (trainer.lora.gate_input=random), DIN (its
own scores on the same samples) and item popularity (smoothed positive rate of the item in the training samples).

Next item, LLaRA LastFM (configs/lastfm-ilora.yaml as the paper trains it; the given split, 20 candidates per row,
the whole test set, the same N budgets): plain LoRA (the 7 linears, r 8, hybrid item tokens) vs iLoRA (4 experts,
SASRec gate, hybrid item tokens), SASRec (its candidate scores) and popularity (training frequency of each candidate
as a target); HR@1/HR@5/NDCG@5 by candidate scoring, and LLaRA's generation metric from the greedy answers the
evaluator stores (ValidRatio, HR@1 over valid and over all rows); and whether an LLM row uses the user at all (its
rank agreement with SASRec, and how much of its scores is a per-title prior: recdata.metrics.title_prior).

The full run takes most of a day on 2 cores, longer than one machine may live: every row it finishes is written to
bench/results/quality_runs/ROW.json (per-sample scores without labels, timing, gate logs, the commit; to be
committed), and a later `python bench/quality.py` on any machine takes the stored rows as they are and trains only the
missing ones (a stored row whose overrides differ is trained again; --no-store ignores the store).

--quick: small subsets and test sets (timings for the full-run estimate); --tiny: the random tiny Llama (a smoke
run of the whole bench in minutes); --demo: the CTR rows only, on the demo's data (the recbole wheel) at its
budget (128 samples, 64 steps of 8 at lr 3e-3, 200 validation and test samples; about an hour on 2 cores), written
to bench/results/quality_demo.md. Writes bench/results/quality.md (not for --tiny); the last line printed is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
from configs.loader import load_config  # noqa: E402
from recdata import metrics as M  # noqa: E402
from recdata.layout import DEFAULT_STAGES, paths  # noqa: E402
from recdata.samples import SampleSet  # noqa: E402
from recdata.schema import Dataset  # noqa: E402
from recdata.storage import digest, write_bytes_atomic  # noqa: E402
from teacher.baselines import popularity_candidates, popularity_ctr  # noqa: E402
from teacher.score import read_reps, score_samples  # noqa: E402
from trainer.checkpoint import latest_complete  # noqa: E402
from trainer.evaluate import eval_files  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
ML100K, LASTFM = SHARED / "movielens-100k", SHARED / "llara-lastfm"
RESULTS = REPO / "bench" / "results" / "quality.md"
N_BOOT = 1000

SIZES = {
    # (Few2Many N lists, CTR test samples, LastFM test rows (None = all 122)); the largest N runs first (the
    # goals are at the largest N; a smaller set is a prefix of the larger one either way)
    "full": dict(ctr_n=[1024, 256], ctr_test=1000, ctr_steps=128, lfm_n=[1024, 256], lfm_test=None),
    "quick": dict(ctr_n=[32, 16], ctr_test=64, ctr_steps=4, lfm_n=[16], lfm_test=32),
    "tiny": dict(ctr_n=[32, 16], ctr_test=64, ctr_steps=4, lfm_n=[16], lfm_test=None),
    "demo": dict(ctr_n=[128], ctr_test=200, ctr_steps=64, lfm_n=None, lfm_test=None),
}
# --demo: the same CTR rows on the demo's data (configs/demo.yaml: MovieLens-100K from the recbole wheel, no
# ../shared needed) at the budget of bench/results/demo_cpu.md's comparison: the demo's 128 samples, 64 steps of
# 8 at lr 3e-3, 10 prompt items, validation and test.
DEMO = [
    "retrieval.k_text=10",
    "trainer.lr=3e-3",
    "trainer.epochs=4",
    "trainer.micro_batch_size=8",
    "trainer.eval_splits=[valid, test]",
]
TINY_MODEL = [
    "model.name_or_path=recdata/assets/smollm2-135m-instruct",
    "model.tiny={num_layers: 2, hidden_size: 64, intermediate_size: 128, num_heads: 4, num_kv_heads: 2}",
]
COMMON = [
    "trainer.num_workers=1",
    "trainer.epochs=1",
    "trainer.schedule_epochs=null",
    "trainer.eval_every=0",
    # A run takes up to an hour on 2 cores: a checkpoint every 16 steps (trainable weights and optimizer, a few MB)
    # lets a stopped bench go on where it stopped (Runner.run) instead of training the row again.
    "trainer.checkpoint_every=16",
    "trainer.log_every=1",
]
# The CTR rows' training budget (full run): 128 steps of 8 at lr 3e-3 for every N (epochs = 128 * 8 / N), test
# split only. Chosen on validation, never on test: bench/results/demo_cpu.md's study (RecLoRA's
# gates stay uniform at the preset's lr 1e-3 over tens of steps; at 3e-3 and 64 steps of 8 they moved and the
# validation AUC rose; the four demo settings A-D were compared on validation) and bench/results/
# gate_dynamics_cpu.md (16 meta-LoRAs at temperature 5 need 100-200 steps at 3e-3), hence 128 steps, not 64.
CTR_BATCH = 8
CTR_BUDGET = ["trainer.lr=3e-3", f"trainer.batch_size={CTR_BATCH}", f"trainer.micro_batch_size={CTR_BATCH}"]
CTR_BUDGET += ["trainer.eval_splits=[test]"]
CTR_ROWS = {
    "plain": ["trainer.lora.mode=plain", "trainer.lora.num_experts=1"],
    "reclora": [],
    "reclora_random_gate": ["trainer.lora.gate_input=random"],
}
LFM_ROWS = {"lora": ["trainer.lora.mode=plain", "trainer.lora.num_experts=1"], "ilora": []}


# ---- running the pipeline -----------------------------------------------------------------------------------------
# Finished rows of the full run, one JSON file each (committed): the full bench takes longer than one machine's life
# on 2 cores, so a row measured on one machine is taken as it is on the next (Runner.run) and the bench goes on with
# the rows still missing. A file holds what the analysis reads of its run (per-sample scores, timing, gates), the
# commit it ran at and its overrides; a row whose overrides differ from the bench's is trained again. Labels and
# targets are left out (MovieLens may not be redistributed; the analysis reads them from the rebuilt samples) and a
# digest of them is kept instead, so the rebuilt test set is checked against the one the row was measured on.
STORE = REPO / "bench" / "results" / "quality_runs"
HIDDEN = ("label", "target")


@dataclass
class Row:
    """What the analysis reads of one finished run: its evaluations ({split: [(step, per-sample results)]}, by
    step), its training timing and gate/padding logs, and `extra` measurements of its data (bench_ctr's)."""

    name: str
    overrides: list[str]
    evals: dict[str, list[tuple[int, dict]]]
    metrics: dict
    batch_size: int
    log: list[dict]
    wall: float | None
    commit: str
    extra: dict = field(default_factory=dict)
    hidden: dict = field(default_factory=dict)  # digests of the labels/targets a stored row was measured on

    @classmethod
    def of_run(cls, name: str, run: Path, overrides: list[str], wall: float | None, extra: dict, commit: str) -> Row:
        m = json.loads((run / "metrics.json").read_text())
        return cls(
            name=name,
            overrides=overrides,
            evals={split: eval_files(str(run), split) for split in ("valid", "test")},
            metrics={"timing": m["timing"], "steps": m["steps"]},
            batch_size=load_config(str(run / "config.yaml")).trainer.batch_size,
            log=json.loads((run / "logs" / "train.jsonl.json").read_text()),
            wall=wall,
            commit=commit,
            extra=extra,
        )

    def to_json(self) -> dict:
        d = asdict(self)
        d["evals"] = {
            s: [[step, {k: v for k, v in rows.items() if k not in HIDDEN}] for step, rows in e]
            for s, e in self.evals.items()
        }
        d["hidden"] = {
            f"{s}-{step}-{k}": digest(as_ints(rows[k]))
            for s, e in self.evals.items()
            for step, rows in e
            for k in HIDDEN
            if k in rows
        }
        return d

    @classmethod
    def from_json(cls, d: dict) -> Row:
        d = dict(d)
        d["evals"] = {s: [(int(step), rows) for step, rows in e] for s, e in d["evals"].items()}
        return cls(**d)

    def restore(self, split: str, key: str, values: list) -> None:
        """Put `key` (label or target, as the rebuilt samples give it) back into this stored row's `split` results;
        exits when the values differ from those the row was measured on."""
        for step, rows in self.evals[split]:
            want = self.hidden.get(f"{split}-{step}-{key}")
            if key in rows:
                same = as_ints(rows[key]) == as_ints(values)
            else:
                same = want is None or digest(as_ints(values)) == want
                rows[key] = as_ints(values)
            if not same:
                sys.exit(f"{self.name}: its {split} {key}s differ from the samples' (stored or evaluated)")


def as_ints(values) -> list[int]:
    return np.asarray(values).astype(np.int64).tolist()


def git_commit() -> str:
    """HEAD's short hash, with '+dirty' when tracked files have uncommitted changes."""
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "."], capture_output=True).returncode != 0
    return (head or "unknown") + ("+dirty" if dirty else "")


class Runner:
    """Runs trainer/main.py per row and returns the finished run as a Row.

    A row stored under `store` (a finished row of an earlier full run, perhaps on another machine) with the same
    overrides is taken as it is. With `reuse`, a run folder that already holds a finished run (metrics.json) is
    taken as it is (re-analysis of an earlier bench folder; wall times come from its walls.json). An unfinished run
    (the bench was stopped) goes on from its latest checkpoint; its wall time then counts only the resumed part.
    Every row finished here is written to `store` (when one is given)."""

    def __init__(self, work: Path, reuse: bool = False, store: Path | None = None):
        self.work, self.reuse, self.store = work, reuse, store
        self.commit = git_commit()  # the code the rows run with (the runs start from this checkout)
        (work / "logs").mkdir(parents=True, exist_ok=True)
        self.walls_file = work / "walls.json"
        self.walls = json.loads(self.walls_file.read_text()) if self.walls_file.is_file() else {}

    def run(self, name: str, preset: str, overrides: list[str], measure=None) -> Row:
        """The row `name`: stored, reused or trained; `measure(run folder) -> dict` adds measurements of the run's
        data to a row finished here (they are stored with it)."""
        stored = self.store / f"{name}.json" if self.store else None
        if stored and stored.is_file():
            row = Row.from_json(json.loads(stored.read_text()))
            if row.overrides == overrides:
                shown = stored.relative_to(REPO) if stored.is_relative_to(REPO) else stored
                print(f"[quality] {name}: taken from {shown} (measured at {row.commit})", flush=True)
                return row
            print(f"[quality] {name}: {stored.name} was measured with other overrides; training it again", flush=True)
        run = self.work / "runs" / name
        if self.reuse and (run / "metrics.json").is_file():
            print(f"[quality] {name}: reusing the finished run", flush=True)
        else:
            self.train(name, preset, overrides)
        extra = measure(run) if measure else {}
        row = Row.of_run(name, run, overrides, self.walls.get(name), extra, self.commit)
        if stored:
            stored.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(str(stored), json.dumps(row.to_json(), separators=(",", ":")).encode())
        return row

    def train(self, name: str, preset: str, overrides: list[str], stages: str | None = None) -> None:
        run = self.work / "runs" / name
        # An unfinished run of the same config resumes from its latest complete checkpoint (trainer/main.py does
        # that by itself; a run of another config in that folder is refused there, by name).
        ckpt = latest_complete(str(run)) if run.is_dir() else None
        what = f"stages {stages}" if stages else f"resuming from {Path(ckpt).name}" if ckpt else "training"
        print(f"[quality] {name}: {what}", flush=True)
        args = ["--config", preset, f"run.output_dir={self.work / 'runs'}", f"run.name={name}", *overrides]
        args += ["--stages", stages] if stages else []
        env = {**os.environ, "PYTHONPATH": str(REPO), "RECLORA_QUIET": "1"}
        log = self.work / "logs" / f"{name}.log"
        t0 = time.perf_counter()
        with open(log, "w") as f:
            rc = subprocess.run(
                [sys.executable, str(REPO / "trainer" / "main.py"), *args],
                cwd=REPO,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
            ).returncode
        self.walls[name] = time.perf_counter() - t0
        self.walls_file.write_text(json.dumps(self.walls))
        if rc != 0:
            sys.exit(f"trainer/main.py {' '.join(args)} failed (exit {rc}); log: {log}")
        print(f"[quality] {name}: {self.walls[name]:.0f}s", flush=True)

    def ensure_data(self, preset: str, overrides: list[str], rows) -> None:
        """Build the data stages (samples, teacher) the analysis reads when every row came from the store (none ran
        in this folder); stages already built are skipped by the pipeline itself."""
        if not any((self.work / "runs" / row.name).is_dir() for row in rows):
            self.train(f"data-{preset}", preset, overrides, stages=",".join(s for s in DEFAULT_STAGES if s != "train"))


def eval_rows(row: Row, split: str = "test") -> tuple[dict, dict]:
    """(zero-shot results or None, final results) of a row: its evaluations of `split` at step 0 (the zero-shot
    one, when the run has a later one) and at its last step."""
    files = row.evals[split]
    zero = files[0][1] if len(files) > 1 and files[0][0] == 0 else None
    return zero, files[-1][1]


def timing(row: Row, eval_samples: int) -> dict:
    t, steps = row.metrics["timing"], row.metrics["steps"]
    # The zero-shot evaluation runs inside the worker's setup: everything but the step loop counts as evaluation
    # (model loading included, so the rate errs high); the rest of the wall time is the run's fixed overhead.
    evals = t["worker_seconds"] - t["train_seconds"]
    return {
        "train_s": t["train_seconds"],
        "steps": steps,
        "train_samples": steps * row.batch_size,
        "eval_s": evals,
        "eval_samples": eval_samples,
    }


def gate_log(row: Row) -> dict:
    hist = row.log
    ent = [h["gate_entropy"] for h in hist if "gate_entropy" in h]
    pad = [h["padding_fraction"] for h in hist if "padding_fraction" in h]
    return {
        "entropy_first": ent[0] if ent else None,
        "entropy_last": ent[-1] if ent else None,
        "entropy_min": min(ent) if ent else None,
        "padding_fraction": statistics.mean(pad) if pad else None,
    }


def padding_compare(run: Path) -> dict:
    """Padding fraction of the run's training steps with the length bucketing and with the plain contiguous split
    (the same global batches), from the train stream's lengths and the run's own schedule."""
    from recdata.streams import Schedule, StreamReader

    t = load_config(str(run / "config.yaml")).trainer
    reader = StreamReader(str(run / "data" / "train"), timeout_s=1.0)
    sched = Schedule(rows=reader.rows, global_batch=t.batch_size, world=t.num_workers, micro=t.micro_batch_size, seed=0)
    out = {}
    for name, bucketed in (("bucketed", True), ("contiguous", False)):
        pad = total = 0
        for step in range(sched.steps_per_epoch):
            lengths = reader.lengths_at(sched.global_rows(step))
            at = dict(zip(sched.global_rows(step).tolist(), lengths.tolist()))
            for rank in range(t.num_workers):
                for mb in sched.rank_rows(step, rank, lengths if bucketed else None):
                    n = [at[int(i)] for i in mb]
                    pad += max(n) * len(n) - sum(n)
                    total += max(n) * len(n)
        out[name] = pad / max(1, total)
    return out


def rep_norm(run: Path) -> float:
    from recdata.streams import StreamReader

    reps = StreamReader(str(run / "data" / "test"), timeout_s=1.0).read_columns(["rep"])["rep"].to_pylist()
    return float(np.linalg.norm(np.asarray(reps, dtype=np.float64), axis=1).mean())


def data_measures(run: Path) -> dict:
    """Measurements of a RecLoRA run's data streams, kept with its row: the padding of its training micro-batches
    and the scale of the gate's input."""
    return {"padding": padding_compare(run), "rep_norm": rep_norm(run)}


# ---- metrics ------------------------------------------------------------------------------------------------------
def ci(fn, *arrays) -> tuple[float, float, float]:
    return M.bootstrap_ci(fn, *arrays, n_boot=N_BOOT, seed=0)


def paired(fn, a, b, *rest) -> tuple[float, float, float]:
    """Bootstrap of fn(a) - fn(b) over the same resampled samples."""
    return M.bootstrap_ci(lambda x, y, *r: fn(x, *r) - fn(y, *r), a, b, *rest, n_boot=N_BOOT, seed=0)


def auc_of(p, y):
    return M.auc(y, p)


def hr1(s, t):
    return M.hit_rate_at_k(s, t.astype(int), 1)


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a markdown table."""
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header)] + [f"| {' | '.join(r)} |" for r in rows]


def fmt(c: tuple[float, float, float]) -> str:
    return f"{c[0]:.4f} [{c[1]:.4f}, {c[2]:.4f}]"


# ---- next-item inputs shared with bench/next_item_budget.py ----------------------------------------------------
def candidate_rows(cfg, split: str, ids: np.ndarray) -> tuple[np.ndarray, list[list[str]], np.ndarray]:
    """[rows, C] candidate item ids of `split`'s samples `ids` (in that order), their titles, and each row's target
    index (the sample's item among its candidates; the evaluator's `target` must agree: Row.restore)."""
    p = paths(cfg)
    rows = SampleSet.open(p.samples).read(split, columns=["item_id", "candidates"], sample_ids=ids)
    cands = np.asarray(rows["candidates"].to_pylist())
    target = (cands == rows["item_id"].to_numpy()[:, None]).argmax(1)
    items = Dataset.open(p.dataset).read_items()
    title = dict(zip(items["item_id"].to_pylist(), items["title"].to_pylist()))
    return cands, [[title[int(c)] for c in row] for row in cands], target


def sasrec_candidate_scores(cfg, work: Path, split: str, ids: np.ndarray) -> np.ndarray:
    """SASRec's [rows, C] candidate scores for `split`'s samples `ids`, from the run's scored reps, or scored here
    into {work}/sasrec-{split}-reps when the feed scored inline (no reps were persisted)."""
    p = paths(cfg)
    url = p.reps
    if not (Path(p.reps) / "manifest.json").is_file():
        url = str(work / f"sasrec-{split}-reps")
        score_samples(p.teacher, p.samples, url, num_actors=0, splits=(split,))
    reps = read_reps(url, split, columns=["sample_id", "candidate_scores"])
    at = {s: i for i, s in enumerate(reps["sample_id"].to_pylist())}
    return np.asarray(reps["candidate_scores"].to_pylist())[[at[s] for s in ids]]


# ---- the two benchmarks -------------------------------------------------------------------------------------------
def bench_ctr(runner: Runner, size: dict, tiny: list[str], preset: str = "ml100k-reclora", extra: tuple = ()) -> dict:
    base = [*COMMON, *tiny, f"retrieval.max_eval_samples={size['ctr_test']}"]
    base += ["trainer.batch_size=8"] if preset == "demo" else CTR_BUDGET
    base += extra
    if tiny:
        base += ["teacher.embed_dim=16", "teacher.mlp_hidden=[64, 32]", "teacher.rep_dim=32", "retrieval.pca_dim=16"]
    runs = {}
    for n in size["ctr_n"]:
        for row, row_extra in CTR_ROWS.items():
            # The zero-shot model (B = 0) is the same in every run: only the first run evaluates it.
            once = [] if not runs else ["trainer.zero_shot_eval=false"]
            epochs = [] if preset == "demo" else [f"trainer.epochs={max(1, size['ctr_steps'] * CTR_BATCH // n)}"]
            runs[(row, n)] = runner.run(
                f"ctr-{row}-n{n}",
                preset,
                [*base, f"trainer.train_subset={n}", *epochs, *row_extra, *once],
                measure=data_measures if row == "reclora" else None,
            )
    first = runs[("plain", size["ctr_n"][0])]
    zero, _ = eval_rows(first)
    ids = np.asarray(zero["sample_id"], dtype=np.int64)
    for row in runs.values():
        if not np.array_equal(np.asarray(eval_rows(row)[1]["sample_id"], dtype=np.int64), ids):
            sys.exit(
                f"{row.name}: its test samples differ from {first.name}'s (the test set must be the same for every row)"
            )
    cfg = load_config(preset, [*base, f"run.output_dir={runner.work / 'runs'}"])
    runner.ensure_data(preset, base, runs.values())
    samples = SampleSet.open(paths(cfg).samples)
    y = np.asarray(as_ints(samples.read("test", columns=["label"], sample_ids=ids)["label"].to_pylist()))
    for row in runs.values():
        row.restore("test", "label", y)
    scores = {"zeroshot": np.asarray(zero["p_yes"]), "din": np.asarray(zero["teacher"])}
    scores.update({f"{row}_n{n}": np.asarray(eval_rows(run)[1]["p_yes"]) for (row, n), run in runs.items()})
    train = samples.read("train", columns=["item_id", "label"])
    test_items = samples.read("test", columns=["item_id"], sample_ids=ids)["item_id"].to_numpy()
    scores["popularity"] = popularity_ctr(train["item_id"].to_numpy(), train["label"].to_numpy(), test_items)
    table = {
        name: {"auc": ci(auc_of, s, y), "logloss": ci(lambda p, t: M.logloss(t, np.clip(p, 1e-6, 1 - 1e-6)), s, y)}
        for name, s in scores.items()
    }
    big = max(size["ctr_n"])
    diffs = {
        f"reclora - plain (N={n})": paired(auc_of, scores[f"reclora_n{n}"], scores[f"plain_n{n}"], y)
        for n in size["ctr_n"]
    }
    diffs.update(
        {f"reclora - din (N={n})": paired(auc_of, scores[f"reclora_n{n}"], scores["din"], y) for n in size["ctr_n"]}
    )
    diffs.update(
        {
            f"reclora - random gate (N={n})": paired(
                auc_of, scores[f"reclora_n{n}"], scores[f"reclora_random_gate_n{n}"], y
            )
            for n in size["ctr_n"]
        }
    )
    eval_n = size["ctr_test"] * (2 if preset == "demo" else 1)  # the final evaluation(s) (+ the zero-shot test)
    times = {
        f"{r}_n{n}": timing(run, eval_n + (size["ctr_test"] if eval_rows(run)[0] else 0))
        for (r, n), run in runs.items()
    }
    gates = {f"{r}_n{n}": gate_log(run) for (r, n), run in runs.items()}
    walls = {f"{r}_n{n}": run.wall for (r, n), run in runs.items()}
    return {
        "table": table,
        "diffs": diffs,
        "n_test": len(y),
        "pos_rate": float(y.mean()),
        "big": big,
        "times": times,
        "walls": walls,
        "gates": gates,
        "padding": runs[("reclora", big)].extra["padding"],
        "rep_norm": runs[("reclora", big)].extra["rep_norm"],
        "rep_norm_random": float(np.sqrt(cfg.teacher.rep_dim)),
    }


def bench_next_item(runner: Runner, size: dict, tiny: list[str]) -> dict:
    base = [*COMMON, *tiny, f"retrieval.max_eval_samples={size['lfm_test'] or 'null'}"]
    if tiny:
        base.append("teacher.epochs=2")
    runs = {
        (row, n): runner.run(f"lastfm-{row}-n{n}", "lastfm-ilora", [*base, f"trainer.train_subset={n}", *extra])
        for n in size["lfm_n"]
        for row, extra in LFM_ROWS.items()
    }
    ref_run = runs[("lora", size["lfm_n"][0])]
    _, ref = eval_rows(ref_run)
    ids = np.asarray(ref["sample_id"], dtype=np.int64)
    cfg = load_config("lastfm-ilora", [*base, f"run.output_dir={runner.work / 'runs'}"])
    runner.ensure_data("lastfm-ilora", base, runs.values())
    samples = SampleSet.open(paths(cfg).samples)
    cands, cand_titles, target = candidate_rows(cfg, "test", ids)
    scores, gen = {}, {}
    for (row, n), run in runs.items():
        _, final = eval_rows(run)
        if not np.array_equal(np.asarray(final["sample_id"], dtype=np.int64), ids):
            sys.exit(f"{run.name}: its test samples differ from {ref_run.name}'s")
        run.restore("test", "target", target)
        scores[f"{row}_n{n}"] = np.asarray(final["scores"])
        if "generated" in final:
            # [rows, 2]: (valid, correct) by LLaRA's rule, from the greedy answers the evaluator stored
            targets = [titles[int(t)] for titles, t in zip(cand_titles, target)]
            gen[f"{row}_n{n}"] = np.asarray(M.generation_flags(final["generated"], cand_titles, targets), dtype=float)
    scores["sasrec"] = sasrec_candidate_scores(cfg, runner.work, "test", ids)
    scores["popularity"] = popularity_candidates(
        samples.read("train", columns=["item_id"])["item_id"].to_numpy(), cands
    )
    # Whether the LLMs use the user at all: agreement with SASRec's ranking of the same candidates, and how much of
    # their scores is a per-title prior (the same for every user)
    diagnosis = {
        name: {"sasrec_rho": M.rank_agreement(s, scores["sasrec"]), "title_prior": M.title_prior(s, cands)}
        for name, s in scores.items()
        if name != "sasrec"
    }
    table = {
        name: {
            "hr@1": ci(hr1, s, target),
            "hr@5": ci(lambda a, t: M.hit_rate_at_k(a, t.astype(int), 5), s, target),
            "ndcg@5": ci(lambda a, t: M.ndcg_at_k(a, t.astype(int), 5), s, target),
        }
        for name, s in scores.items()
    }
    generation = {
        name: {
            "valid_ratio": ci(lambda f: f[:, 0].mean(), f),
            "hr1_valid": ci(lambda f: f[:, 1].sum() / max(1.0, f[:, 0].sum()), f),
            "hr1_all": ci(lambda f: f[:, 1].mean(), f),
        }
        for name, f in gen.items()
    }
    diffs = {}
    for n in size["lfm_n"]:
        diffs[f"ilora - lora (N={n}), HR@1"] = paired(hr1, scores[f"ilora_n{n}"], scores[f"lora_n{n}"], target)
        diffs[f"ilora - sasrec (N={n}), HR@1"] = paired(hr1, scores[f"ilora_n{n}"], scores["sasrec"], target)
        if f"ilora_n{n}" in gen and f"lora_n{n}" in gen:
            diffs[f"ilora - lora (N={n}), generation HR@1 over all"] = M.bootstrap_ci(
                lambda a, b: a[:, 1].mean() - b[:, 1].mean(), gen[f"ilora_n{n}"], gen[f"lora_n{n}"],
                n_boot=N_BOOT, seed=0,
            )  # fmt: skip
    times = {f"{row}_n{n}": timing(run, 2 * len(target)) for (row, n), run in runs.items()}
    return {
        "table": table,
        "generation": generation,
        "diagnosis": diagnosis,
        "diffs": diffs,
        "n_test": len(target),
        "big": max(size["lfm_n"]),
        "times": times,
        "gates": {f"{row}_n{n}": gate_log(run) for (row, n), run in runs.items()},
    }


# ---- estimate, report ---------------------------------------------------------------------------------------------
def estimate_full(ctr: dict, lfm: dict | None) -> float:
    """Seconds of the full run from this run's per-sample train and eval rates and its other overheads."""
    full = SIZES["full"]
    rate_train = statistics.median(t["train_s"] / max(1, t["train_samples"]) for t in ctr["times"].values())
    rate_eval = statistics.median(t["eval_s"] / t["eval_samples"] for t in ctr["times"].values())
    walls = ctr["walls"]
    overhead = statistics.median(walls[k] - t["train_s"] - t["eval_s"] for k, t in ctr["times"].items())
    data_stages = max(walls.values()) - statistics.median(walls.values())  # the first run built them
    total = rate_eval * full["ctr_test"]  # the one zero-shot evaluation
    for n in full["ctr_n"]:
        for _ in CTR_ROWS:
            total += overhead + rate_train * max(n, full["ctr_steps"] * CTR_BATCH) + rate_eval * full["ctr_test"]
    total += data_stages
    if lfm:
        lt = statistics.median(t["train_s"] / max(1, t["train_samples"]) for t in lfm["times"].values())
        le = statistics.median(t["eval_s"] / t["eval_samples"] for t in lfm["times"].values())
        for n in full["lfm_n"]:
            total += len(LFM_ROWS) * (overhead + lt * n + le * 2 * lfm["n_test"])
    return total


def report(ctr: dict, lfm: dict | None, mode: str, wall: float, estimate: float | None) -> str:
    out = [
        f"# Recommendation quality ({mode})",
        "",
        f"Command: `python bench/quality.py{'' if mode == 'full' else ' --' + mode.replace('+', ' --')}`; wall {wall / 60:.1f} min.",
    ]
    if estimate:
        out.append(f"Estimated full-run time from this run's rates: {estimate / 3600:.1f} h.")
    if mode == "full":
        out += [
            "",
            f"Training budgets. CTR: configs/ml100k-reclora.yaml (16 meta-LoRAs, temperature 5, q,v, r 8) with "
            f"{SIZES['full']['ctr_steps']} steps of {CTR_BATCH} at lr 3e-3 for every N, chosen on validation "
            "(bench/results/demo_cpu.md, gate_dynamics_cpu.md), never on test. Next item: configs/lastfm-ilora.yaml "
            "as the paper trains it (lr 7e-4, batches of 16, one epoch).",
        ]
    out += [
        "",
        f"## CTR, MovieLens-100K ({ctr['n_test']} test samples, positive rate {ctr['pos_rate']:.3f}; 95% bootstrap CI)",
        "",
    ]
    out += md_table(
        ["model", "AUC", "LogLoss"], [[k, fmt(v["auc"]), fmt(v["logloss"])] for k, v in ctr["table"].items()]
    )
    out += ["", "Paired bootstrap (same resampled samples), AUC difference:", ""]
    out += md_table(["difference", "AUC [95% CI]"], [[k, fmt(v)] for k, v in ctr["diffs"].items()])
    out += [
        "",
        "Gates (training logs): entropy at the first / last step, ln N for uniform gates; mean padding fraction per step:",
        "",
    ]
    out += md_table(
        ["run", "entropy first", "entropy last", "padding fraction"],
        [
            [k, *("-" if e is None else f"{e:.4f}" for e in (g["entropy_first"], g["entropy_last"]))]
            + [f"{g['padding_fraction']:.3f}"]
            for k, g in ctr["gates"].items()
        ],
    )
    pc = ctr["padding"]
    out.append(
        f"\nPadding fraction of the N={ctr['big']} RecLoRA run's training micro-batches: {pc['bucketed']:.4f} bucketed by "
        f"length, {pc['contiguous']:.4f} with the contiguous split of the same global batches."
    )
    out.append(
        f"\nGate input scale: mean L2 norm of the DIN representation {ctr['rep_norm']:.3f} "
        f"(random gate input: ~{ctr['rep_norm_random']:.1f})."
    )
    if lfm:
        out += [
            "",
            f"## Next item, LLaRA LastFM ({lfm['n_test']} test rows, 20 candidates; 95% bootstrap CI)",
            "",
            "Candidate scoring (each of the 20 candidate titles' mean log-likelihood as the answer):",
            "",
        ]
        out += md_table(
            ["model", "HR@1", "HR@5", "NDCG@5"],
            [[k, *(fmt(v[m]) for m in ("hr@1", "hr@5", "ndcg@5"))] for k, v in lfm["table"].items()],
        )
        out += [
            "",
            "Generation (greedy answer; valid when exactly one candidate title is in its first line, LLaRA's rule):",
            "",
        ]
        out += md_table(
            ["model", "ValidRatio", "HR@1 over valid", "HR@1 over all"],
            [[k, *(fmt(v[m]) for m in ("valid_ratio", "hr1_valid", "hr1_all"))] for k, v in lfm["generation"].items()],
        )
        out += ["", "Paired bootstrap:", ""]
        out += md_table(["difference", "[95% CI]"], [[k, fmt(v)] for k, v in lfm["diffs"].items()])
        out += [
            "",
            "Does the model use the user? Mean per-row Spearman correlation of its candidate scores with SASRec's "
            "(0: unrelated), and the correlation of its row-centred scores with the same title's mean score in the "
            "other rows (title prior; 1: every user gets the same ranking of a title):",
            "",
        ]
        out += md_table(
            ["model", "Spearman with SASRec", "title prior"],
            [[k, f"{v['sasrec_rho']:+.3f}", f"{v['title_prior']:+.3f}"] for k, v in lfm["diagnosis"].items()],
        )
        for k, g in lfm["gates"].items():
            if g["entropy_first"] is not None:
                out.append(
                    f"\n{k}: gate entropy {g['entropy_first']:.4f} -> {g['entropy_last']:.4f}; padding fraction {g['padding_fraction']:.3f}"
                )
    return "\n".join(out) + "\n"


def next_item_json(lfm: dict | None) -> dict:
    """The next-item fields of the JSON line, at the largest N (None without a next-item run)."""
    keys = ["ilora_hr1", "lora_hr1", "sasrec_hr1", "ilora_over_lora_hr1", "ilora_minus_lora_hr1_ci"]
    keys += ["ilora_gen_hr1_all", "lora_gen_hr1_all", "ilora_gen_valid_ratio", "lora_gen_valid_ratio"]
    if not lfm:
        return dict.fromkeys(keys)
    n, t, g = lfm["big"], lfm["table"], lfm["generation"]
    il, lo = t[f"ilora_n{n}"]["hr@1"][0], t[f"lora_n{n}"]["hr@1"][0]
    return {
        "ilora_hr1": il,
        "lora_hr1": lo,
        "sasrec_hr1": t["sasrec"]["hr@1"][0],
        "ilora_over_lora_hr1": il / max(lo, 1e-9),
        "ilora_minus_lora_hr1_ci": list(lfm["diffs"][f"ilora - lora (N={n}), HR@1"]),
        "ilora_gen_hr1_all": g.get(f"ilora_n{n}", {}).get("hr1_all", [None])[0],
        "lora_gen_hr1_all": g.get(f"lora_n{n}", {}).get("hr1_all", [None])[0],
        "ilora_gen_valid_ratio": g.get(f"ilora_n{n}", {}).get("valid_ratio", [None])[0],
        "lora_gen_valid_ratio": g.get(f"lora_n{n}", {}).get("valid_ratio", [None])[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small subsets and test sets")
    ap.add_argument("--tiny", action="store_true", help="the random tiny Llama (smoke run)")
    ap.add_argument(
        "--demo",
        action="store_true",
        help="CTR rows only, on the demo's data and budget (bench/results/quality_demo.md)",
    )
    ap.add_argument("--work", help="output folder (default: a new temporary one; reuse one to skip built stages)")
    ap.add_argument("--skip-next-item", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="take finished runs in --work as they are (re-analysis)")
    ap.add_argument(
        "--store",
        help=f"folder of finished rows, taken as they are and added to (default for the full run: {STORE.relative_to(REPO)})",
    )
    ap.add_argument("--no-store", action="store_true", help="train every row here, even those the store holds")
    a = ap.parse_args()
    if not a.demo and not (ML100K / "u.data").is_file():
        print(f"skipped: MovieLens-100K not found at {ML100K}")
        return
    size = SIZES["demo" if a.demo else "tiny" if a.tiny else "quick" if a.quick else "full"]
    mode = "+".join(m for m, on in (("demo", a.demo), ("quick", a.quick), ("tiny", a.tiny)) if on) or "full"
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-quality-"))
    store = None if a.no_store else Path(a.store) if a.store else STORE if mode == "full" else None
    runner = Runner(work, reuse=a.reuse, store=store)
    tiny = TINY_MODEL if a.tiny else []
    t0 = time.perf_counter()
    ctr = bench_ctr(runner, size, tiny, *(("demo", DEMO) if a.demo else ()))
    lfm = None
    if not (a.skip_next_item or a.demo):
        if (LASTFM / "test_data.jsonl").is_file():
            lfm = bench_next_item(runner, size, tiny)
        else:
            print(f"next item skipped: LLaRA LastFM not found at {LASTFM}")
    wall = time.perf_counter() - t0
    estimate = estimate_full(ctr, lfm) if mode not in ("full", "demo") else None
    text = report(ctr, lfm, mode, wall, estimate)
    print(text)
    if not a.tiny:
        (RESULTS.with_name("quality_demo.md") if a.demo else RESULTS).write_text(text)
    big = ctr["big"]
    d = ctr["diffs"][f"reclora - plain (N={big})"]
    result = {
        "mode": mode,
        "reclora_auc": ctr["table"][f"reclora_n{big}"]["auc"][0],
        "plain_auc": ctr["table"][f"plain_n{big}"]["auc"][0],
        "reclora_random_gate_auc": ctr["table"][f"reclora_random_gate_n{big}"]["auc"][0],
        "din_auc": ctr["table"]["din"]["auc"][0],
        "popularity_auc": ctr["table"]["popularity"]["auc"][0],
        "zeroshot_auc": ctr["table"]["zeroshot"]["auc"][0],
        "reclora_minus_plain_auc": d[0],
        "reclora_minus_plain_ci_low": d[1],
        "reclora_minus_plain_ci_high": d[2],
        "reclora_minus_din_auc": ctr["diffs"][f"reclora - din (N={big})"][0],
        **next_item_json(lfm),
        "n_train": size["ctr_n"],
        "n_test": ctr["n_test"],
        "n_train_next_item": size["lfm_n"],
        "n_test_next_item": lfm and lfm["n_test"],
        "wall_s": round(wall, 1),
        "estimated_full_s": estimate and round(estimate),
        "work": str(work),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
