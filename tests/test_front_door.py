"""The front door, `trainer/main.py`, over raw files written here in every source format.

Each run goes ingest -> samples -> teacher -> train -> evaluation to the final table, on a tiny random
Llama and 40 users x 15 interactions over 30 titled items (recdata.synthetic.write_source): the matrix
{movielens, recbole, llara, generic, sequences} x {ctr, next_item} x {ratings on every row, on none, on some} x
{timestamps, order only}, where the format allows the combination. Every run checks the final table's
metrics (finite), the dataset manifest's counts (missing_ratings), the samples (a missing rating is null,
never NaN) and the prompts the trainer saw (no "stars" without ratings). Every preset in configs/ runs
end to end the same way (the cluster presets: --dry-run and a config check), and errors raised inside a
stage reach the user as one `error:` line naming the stage, the file and the fix.

Most runs call `main(argv)` in this process, on one local Ray for the session; one runs as a real
`python trainer/main.py` subprocess, one builds its samples with SUBR retrieval (item embeddings)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from cluster.pipeline import TABLE_COLUMNS
from configs.loader import available_presets, load_config
from recdata.ingest import ingest
from recdata.ingest import options_from_config as ingest_options
from recdata.layout import needs_embeddings
from recdata.synthetic import RawSource, write_source
from recdata.textfiles import IngestError
from retrieval.prompts import PromptRenderer
from tests.conftest import REPO
from trainer.hybrid import CANDIDATE_TOKEN, HISTORY_TOKEN
from trainer.main import main

pytestmark = pytest.mark.timeout(900)

MAIN = str(REPO / "trainer" / "main.py")
TINY_MODEL = [
    f"model.name_or_path={REPO / 'recdata' / 'assets' / 'smollm2-135m-instruct'}",
    "model.tiny={num_layers: 2, hidden_size: 64, intermediate_size: 128, num_heads: 4, num_kv_heads: 2}",
    "model.max_length=256",
]
# Sizes only: a few seconds of work per stage. Every test split fits the eval cap (40 users -> 40 test
# samples at most), so the teacher's next-item metrics are on the LLM's test samples and in the table.
SIZES = [
    "data.num_shards=2",
    "retrieval.num_workers=1",
    "retrieval.k_text=5",
    "retrieval.k_id=10",
    "retrieval.pca_dim=16",
    "retrieval.num_candidates=10",
    "retrieval.max_eval_samples=64",
    "teacher.embed_dim=16",
    "teacher.mlp_hidden=[16]",
    "teacher.rep_dim=16",
    "teacher.attn_layers=1",
    "teacher.epochs=1",
    "teacher.batch_size=256",
    "teacher.num_workers=1",
    "trainer.num_workers=1",
    "trainer.cpus_per_worker=0.5",
    "trainer.feed_workers=0",
    "trainer.max_steps=2",
    "trainer.batch_size=4",
    "trainer.micro_batch_size=2",
    "trainer.train_subset=16",
    "trainer.feed_part_rows=16",
    "trainer.eval_batch_size=16",
    "trainer.checkpoint_every=0",
    "trainer.lora.r=4",
    "trainer.lora.num_experts=4",
]
# The preset each task starts from in the matrix (the presets themselves are exercised below).
BASE_PRESET = {"ctr": "tiny", "next_item": "lastfm-ilora"}


# data.domain is free text; data.prompt holds the domain's words and whole templates (format strings).
PRODUCT_TEMPLATE = "Shopper bought: {history}. Which {item} next? Options ({n_candidates}): {candidates}. Answer:"
PRODUCT_WORDING = (
    "data.domain=product",
    "data.prompt.verb_past=bought",
    f"data.prompt.next_item_template={PRODUCT_TEMPLATE}",
)


@dataclass(frozen=True)
class Case:
    fmt: str
    task: str
    ratings: str  # all | none | some
    timestamps: bool = True
    layout: str = ""  # movielens 100k|1m|csv, generic csv|parquet
    text_mode: str = "recent"
    extra: tuple[str, ...] = ()
    slow: bool = False
    subprocess: bool = False

    @property
    def id(self) -> str:
        parts = [self.fmt, self.task, f"ratings-{self.ratings}", "ts" if self.timestamps else "order"]
        parts += [self.layout] if self.layout else []
        parts += [self.text_mode] if self.text_mode != "recent" else []
        parts += ["skip-bad-rows"] if "data.on_bad_rows=skip" in self.extra else []
        return "-".join(parts)


# The matrix beyond what the presets cover (test_preset_end_to_end: movielens/ctr/all/ts with SUBR,
# llara/next_item/some, recbole/ctr/all/ts). Unmarked: one per format and task with the presets.
CASES = [
    Case("generic", "ctr", "all", True, subprocess=True),
    Case("generic", "next_item", "some", False),
    Case("recbole", "next_item", "none", False),
    # MiniOneRec-style CSV (python lists of ASIN strings), a product catalogue in its own prompt wording.
    Case("sequences", "next_item", "all", False, extra=PRODUCT_WORDING),
    # slow: the rest of the matrix
    Case("movielens", "ctr", "all", True, "csv", slow=True),
    Case("movielens", "next_item", "all", True, "1m", slow=True),
    Case("movielens", "next_item", "some", True, "100k", slow=True),
    Case("recbole", "ctr", "all", False, slow=True),
    Case("recbole", "next_item", "some", True, slow=True),
    Case("recbole", "next_item", "all", False, slow=True),
    Case("llara", "next_item", "none", False, slow=True),
    Case("llara", "next_item", "all", False, slow=True),
    Case("llara", "ctr", "all", False, slow=True),
    Case("generic", "ctr", "all", False, "parquet", slow=True),
    Case("generic", "ctr", "some", True, extra=("data.on_bad_rows=skip",), slow=True),
    Case("generic", "next_item", "none", True, "parquet", slow=True),
    Case("generic", "next_item", "all", True, slow=True),
    Case("generic", "next_item", "some", True, text_mode="subr", slow=True),
]


# The rest of the matrix (about 9 minutes on 2 cores) runs when asked for, like the full-length teacher
# trainings: `RECLORA_LONG_TESTS=1 make test`. The default suite keeps one case per format and per task.
EXTENDED = pytest.mark.skipif(
    os.environ.get("RECLORA_LONG_TESTS") != "1", reason="extended front-door matrix; set RECLORA_LONG_TESTS=1"
)


def _param(case: Case):
    return pytest.param(case, id=case.id, marks=[pytest.mark.slow, EXTENDED] if case.slow else [])


@dataclass
class Run:
    out: Path
    name: str
    task: str
    raw: RawSource
    hybrid: bool = False
    stdout: str = ""
    stderr: str = ""
    expect: dict = field(default_factory=dict)


def run_args(preset: str, task: str, raw: RawSource, out: Path, name: str, extra=()) -> list[str]:
    """The command line of one run: the preset with the model, sizes, data source and output replaced."""
    split = (
        "given" if raw.format in ("llara", "sequences") else "leave_last_out" if task == "next_item" else "global_time"
    )
    teacher = "sasrec" if task == "next_item" else "din"
    task_keys = [f"data.task={task}", f"data.split={split}", f"teacher.model={teacher}"]
    return [
        "--config",
        preset,
        *TINY_MODEL,
        *SIZES,
        *raw.overrides,
        *task_keys,
        f"data.dataset_url=datasets/{name}",
        f"run.output_dir={out}",
        f"run.name={name}",
        *extra,
    ]


def run_main(argv: list[str], capfd) -> tuple[int, str, str]:
    """main(argv) in this process; returns (exit code, stdout, stderr) as the user's terminal shows them."""
    rc = main(argv)
    captured = capfd.readouterr()
    return rc, captured.out, captured.err


def run_subprocess(argv: list[str], cwd: Path, timeout: int = 800) -> subprocess.CompletedProcess:
    """`python trainer/main.py ...` in its own session: its private Ray goes with its process group."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = str(REPO)
    env["RECLORA_QUIET"] = "0"  # what a user sees (progress bars are off anyway: stderr is not a terminal)
    cmd = [sys.executable, MAIN, *argv]
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# ------------------------------------------------------------------------------------------------ checks
# Lines Ray forwards from its own processes ("(RayTrainWorker pid=...)"): Ray's internal actors may log
# tracebacks of their own there (e.g. a placement-group cleaner that sees another Ray on the machine).
_RAY_FORWARDED = re.compile(r"^(\x1b\[\d+m)?\(\w+ pid=\d+")


def assert_no_traceback(stderr: str) -> None:
    """Nothing escaped to the driver's terminal as a traceback."""
    driver = [line for line in stderr.splitlines() if not _RAY_FORWARDED.match(line)]
    assert not any("Traceback" in line for line in driver), stderr[-5000:]


# Ray's own noise that reads like a crash to a new user: the placement-group cleaner without a State API
# (cluster.runtime), the controller's stop timing out on it, Ray Train's line per reported step.
RAY_NOISE = (
    "PlacementGroupCleaner",
    "Failed to query Ray Train Controller",
    "GetTimeoutError",
    "Reporting training result",
)


def check_console(stdout: str, stderr: str) -> None:
    """What the user's terminal shows: none of Ray's noise, each training line once (Ray Train forwarded every
    printed worker line twice), status lines as log records on stderr, results on stdout."""
    text = stdout + stderr
    for noise in RAY_NOISE:
        assert noise not in text, (noise, [line for line in text.splitlines() if noise in line][:3])
    steps = [line for line in text.splitlines() if re.search(r"\bstep=1\b", line) and "loss=" in line]
    assert len(steps) == 1, steps
    # Each evaluation logs its rows and throughput once (and its progress when it runs long).
    evals = [line for line in text.splitlines() if re.search(r"\[eval\] test: \d+ rows on rank 0 in .* rows/s", line)]
    assert evals, text[-3000:]
    epochs = [line for line in text.splitlines() if re.search(r"din epoch 1: loss", line)]
    assert len(epochs) == 1, epochs
    assert re.search(r"^\S+ \S+ INFO \[rank 0\] cluster\.pipeline: \[train\] -> ", stderr, re.M), stderr[-3000:]
    assert "[train] ->" not in stdout and "trained LLM" in stdout
    # The driver's stdout holds results only: library warnings (DeepSpeed's own logger) go to stderr.
    driver_out = [line for line in stdout.splitlines() if not _RAY_FORWARDED.match(line)]
    assert not [line for line in driver_out if "WARNING" in line], driver_out[:20]


def _one(pattern: str, root: Path) -> Path:
    found = sorted(root.glob(pattern))
    assert len(found) == 1, (pattern, found)
    return found[0]


def _finite(values: dict, keys: list[str], who: str) -> None:
    for k in keys:
        assert k in values, (who, k, sorted(values))
        assert isinstance(values[k], (int, float)) and math.isfinite(values[k]), (who, k, values[k])


def check_final_table(run: Run) -> None:
    results = json.loads((run.out / run.name / "results.json").read_text())
    cols = [k for k, _ in TABLE_COLUMNS[run.task]]
    _finite(results["llm"], [f"test_{k}" for k in cols], "trained LLM")
    if "valid" in load_config(str(run.out / run.name / "config.yaml")).trainer.eval_splits:
        _finite(results["llm"], [f"valid_{k}" for k in cols], "trained LLM (valid)")
    if run.task == "ctr":
        _finite(results["llm"], [f"zeroshot_test_{k}" for k in cols], "zero-shot LLM")
    else:  # LLaRA's generation metric (trainer.eval_generation, on by default)
        _finite(results["llm"], [f"test_gen_{k}" for k in ("valid_ratio", "hr1_valid", "hr1_all")], "greedy answers")
    _finite(results["teacher"], [f"test_{k}" for k in cols], "teacher")
    if run.stdout:  # the final table printed at the end
        header = run.stdout[run.stdout.index("model  ") :]
        for row in ("trained LLM", "teacher"):
            assert row in header, run.stdout[-2000:]
        assert "trained on" in header.splitlines()[0], header
        if run.task == "next_item":
            assert "greedy answers: ValidRatio" in header, header
        if run.task == "ctr":  # each row with its AUC's bootstrap interval: "0.6123  [0.5012, 0.7034]"
            for row in ("zero-shot LLM", "trained LLM", "teacher"):
                line = next(x for x in header.splitlines() if x.startswith(row))
                low, high = (float(v) for v in line.rsplit("[", 1)[1].rstrip("]").split(","))
                assert 0 <= low <= high <= 1, line


def check_dataset(run: Run) -> dict:
    manifest = json.loads(_one(f"datasets/{run.name}/*/manifest.json", run.out).read_text())
    assert manifest["format"] == run.raw.format and manifest["task"] == run.task
    skipped_bad = manifest["skipped"]["nan_ratings"]
    if run.task == "next_item":
        # Rows without a rating are kept (null) and counted; none is dropped.
        assert manifest["missing_ratings"] == run.raw.missing_ratings, manifest
        assert skipped_bad == 0 and manifest["num_interactions"] == run.raw.rows
    else:
        # CTR labels come from ratings: rows without one are dropped (data.on_bad_rows=skip) and counted.
        assert skipped_bad == run.raw.missing_ratings and manifest["missing_ratings"] == 0, manifest
        assert manifest["num_interactions"] == run.raw.rows - skipped_bad
    ts = manifest["id_ranges"]["timestamp"]
    if run.raw.timestamps:
        assert ts[0] >= 978_300_000, ts
    else:  # order only: positions in each user's sequence
        assert ts[0] == 0 and ts[1] < 20, ts
    return manifest


def _values(col: pa.ChunkedArray) -> pa.Array:
    flat = pc.list_flatten(col) if pa.types.is_list(col.type) else col
    return flat.combine_chunks() if isinstance(flat, pa.ChunkedArray) else flat


def check_samples(run: Run) -> None:
    """Every split's samples: a missing rating is null, never NaN; with no ratings at all, all null."""
    root = _one(f"samples/{run.name}/*/manifest.json", run.out).parent
    nulls = rated = 0
    for split in ("train", "valid", "test"):
        files = sorted((root / split).glob("*.parquet"))
        assert files, (root, split)
        t = pq.read_table(files)
        assert t.num_rows > 0, split
        for name in t.column_names:  # no NaN in any float column (a missing rating must be null)
            typ = t.schema.field(name).type
            if pa.types.is_floating(typ.value_type if pa.types.is_list(typ) else typ):
                v = _values(t[name])
                arr = v.to_numpy(zero_copy_only=False).astype(np.float64)
                assert not np.isnan(arr[np.asarray(v.is_valid())]).any(), f"{split}/{name}: NaN in the samples"
        for name in ("rating", "text_hist_ratings", "id_hist_ratings"):
            v = _values(t[name])
            nulls += v.null_count
            rated += len(v) - v.null_count
        if run.task == "next_item":
            assert t["candidates"].null_count == 0, split
    if not run.raw.has_ratings:
        assert rated == 0, "ratings appeared in samples of a source without ratings"
    elif run.raw.missing_ratings and run.task == "next_item":
        assert nulls > 0 and rated > 0, (nulls, rated)
    else:
        assert nulls == 0, nulls


def check_prompts(run: Run) -> None:
    """The prompts the trainer saw (its tokenized test stream, decoded): stars only next to real ratings."""
    tok = AutoTokenizer.from_pretrained(run.out / run.name / "base_model")
    if run.hybrid:
        tok.add_special_tokens({"additional_special_tokens": [HISTORY_TOKEN, CANDIDATE_TOKEN]})
    t = pq.read_table(sorted((run.out / run.name / "data" / "test").glob("part-*.parquet")))
    assert t.num_rows > 0
    prompts = [tok.decode(ids[:n]) for ids, n in zip(t["input_ids"].to_pylist(), t["prompt_len"].to_pylist())]
    for p in prompts:
        assert not re.search(r"\bnan\b", p, re.IGNORECASE), p
        assert run.expect.get("prompt_has", "") in p and run.expect.get("prompt_has_too", "") in p, p
    stars = sum("stars)" in p for p in prompts)
    if run.task == "ctr" and run.raw.has_ratings:
        assert stars == len(prompts), prompts[0]  # every CTR history here has rated items
    else:
        assert stars == 0, [p for p in prompts if "stars)" in p][:1]


def check_run(run: Run) -> None:
    check_dataset(run)
    check_samples(run)
    check_final_table(run)
    check_prompts(run)


def _case_run(case: Case, tmp: Path, preset: str | None = None) -> tuple[Run, list[str]]:
    raw = write_source(tmp / "raw", case.fmt, ratings=case.ratings, timestamps=case.timestamps, layout=case.layout)
    name = case.id.replace("_", "-")
    preset = preset or BASE_PRESET[case.task]
    extra = [f"retrieval.text_mode={case.text_mode}", *case.extra]
    args = run_args(preset, case.task, raw, tmp / "out", name, extra)
    hybrid = load_config(preset).trainer.hybrid_item_emb
    run = Run(tmp / "out", name, case.task, raw, hybrid=hybrid)
    if case.extra == PRODUCT_WORDING:
        run.expect["prompt_has"] = "user\nShopper bought: Film "  # inside the model's chat template
        run.expect["prompt_has_too"] = ". Which product next? Options (10): "
    return run, args


# ------------------------------------------------------------------------------------------------ matrix
@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_matrix(case: Case, tmp_path, capfd, request):
    run, args = _case_run(case, tmp_path)
    if case.subprocess:
        res = run_subprocess(args, tmp_path)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
        run.stdout, run.stderr = res.stdout, res.stderr
        check_console(run.stdout, run.stderr)
    else:
        request.getfixturevalue("ray_local")
        rc, run.stdout, run.stderr = run_main(args, capfd)
        assert rc == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert_no_traceback(run.stderr)
    check_run(run)
    if case.text_mode == "subr":
        assert sorted((tmp_path / "out" / "embeddings").glob("*/*/meta.json")), "SUBR ran without item embeddings"


# ----------------------------------------------------------------------------------------------- presets
PRESETS = available_presets()
# Presets whose end-to-end run is in the slow suite only (another preset runs the same path unmarked).
# tiny extends demo: same format, task and code path; and tiny runs unmarked as the matrix's subprocess case.
SLOW_PRESETS = {"demo", "tiny"}
# What each source format's preset run feeds it: LLaRA with ratings on some rows (the iLoRA path with
# missing ratings), the others with every rating. The presets keep their own retrieval mode (SUBR for
# ml100k-reclora); tiny and demo are switched to recent so one SUBR run is enough.
PRESET_RATINGS = {"movielens": "all", "recbole": "all", "llara": "some", "generic": "all"}


def _preset_param(name: str):
    return pytest.param(name, id=name, marks=[pytest.mark.slow] if name in SLOW_PRESETS else [])


def test_presets_are_discovered():
    found = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert found == PRESETS and {"tiny", "demo", "lastfm-ilora", "ml100k-reclora"} <= set(found)


@pytest.mark.parametrize("preset", [_preset_param(p) for p in PRESETS])
def test_preset(preset: str, tmp_path, capfd, request):
    """Every preset validates as it is; a GPU preset plans (--dry-run) with the GPU settings it promises;
    every other preset runs end to end on generated data in its own source format and task."""
    cfg = load_config(preset)
    if cfg.trainer.use_gpu:
        # A cluster preset: bf16 on GPUs, ZeRO-3, several workers, real model. Plan it against local storage.
        assert cfg.model.tiny is None and cfg.model.dtype == "bfloat16" and cfg.trainer.zero_stage == 3
        assert cfg.trainer.num_workers >= 2 and cfg.trainer.gradient_accumulation_iters() >= 1
        out = tmp_path / "out"
        argv = ["--config", preset, f"run.output_dir={out}", "data.dataset_url=datasets/planned", "--dry-run"]
        rc, stdout, stderr = run_main(argv, capfd)
        assert rc == 0, stdout + stderr
        rows = {line.split()[0]: line.split()[1] for line in stdout.splitlines()[1:] if line.strip()}
        assert list(rows) == ["ingest", "embed", "samples", "teacher", "train"], stdout
        embed = "build" if needs_embeddings(cfg) else "reuse"  # nothing to embed for recent-only retrieval
        assert rows == {"ingest": "build", "embed": embed, "samples": "build", "teacher": "build", "train": "build"}
        assert str(out / cfg.run.name) in stdout, stdout
        assert not out.exists() or not any(out.rglob("manifest.json"))  # a plan writes nothing
        return
    fmt, task = cfg.data.format, cfg.data.task
    if fmt == "prompts":  # prompt files, not interactions: run end to end on prompt files there
        pytest.skip("tests/test_prompt_files.py runs the prompt-file presets (tallrec-movie) end to end")
    if task == "ctr" and PRESET_RATINGS[fmt] != "all":
        pytest.fail(f"{preset}: no generated data for {fmt}/{task}")
    case = Case(
        fmt,
        task,
        PRESET_RATINGS[fmt] if task == "next_item" else "all",
        fmt not in ("llara",),
        text_mode=cfg.retrieval.text_mode if preset not in ("tiny", "demo") else "recent",
    )
    run, args = _case_run(case, tmp_path, preset=preset)
    # The preset decides split and teacher; run_args only repeats the task's defaults for them.
    request.getfixturevalue("ray_local")
    rc, run.stdout, run.stderr = run_main(args, capfd)
    assert rc == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert_no_traceback(run.stderr)
    check_run(run)
    used = load_config(str(tmp_path / "out" / run.name / "config.yaml"))
    assert used.trainer.lora.mode == cfg.trainer.lora.mode
    assert used.trainer.lora.target_modules == cfg.trainer.lora.target_modules
    assert used.trainer.hybrid_item_emb == cfg.trainer.hybrid_item_emb
    assert used.retrieval.text_mode == case.text_mode
    # The final evaluation covers exactly the preset's eval_splits (the demo skips valid: it selects nothing).
    metrics = json.loads((tmp_path / "out" / run.name / "metrics.json").read_text())
    final = metrics["final"]
    evaluated = {split for split in ("valid", "test") if f"{split}_n" in final}
    assert evaluated == set(cfg.trainer.eval_splits), sorted(final)
    # Threads: the preset's, else the workers' share of the local Ray's 2 CPUs (capped by the machine's cores)
    world, cores = used.trainer.num_workers, len(os.sched_getaffinity(0))
    threads = used.trainer.torch_threads or max(1, min(2 // world, cores // world))
    assert metrics["timing"]["device"] == f"CPU ({threads} threads)", metrics["timing"]


# ------------------------------------------------------------------------------------------------ errors
def _error_line(rc: int, stderr: str, stage: str, *must: str) -> str:
    assert rc == 2, stderr[-3000:]
    assert_no_traceback(stderr)  # Ray Train's own forwarded worker logs aside (the teacher runs on a Ray worker)
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(f"error: {stage} stage: "), lines[0]
    for text in must:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def test_ingest_error_is_one_line_naming_stage_file_and_fix(tmp_path):
    """A bad row in the source: the real command line exits 2 with one line, no traceback, nothing built."""
    raw = write_source(tmp_path / "raw", "generic", ratings="all")
    inter = raw.root / "inter.csv"
    lines = inter.read_text().splitlines()
    uid, _, rest = lines[7].split(",", 2)
    lines[7] = f"{uid},x7,{rest}"  # an item id the items file does not have (string ids are mapped, not refused)
    inter.write_text("\n".join(lines) + "\n")
    args = run_args("tiny", "ctr", raw, tmp_path / "out", "bad-ingest", ["retrieval.text_mode=recent"])
    res = run_subprocess(args, tmp_path, timeout=300)
    line = _error_line(res.returncode, res.stderr, "ingest", f"{inter}:8", "'x7'", "not in the items file")
    assert res.stderr.strip().splitlines()[-1] == line
    assert not list((tmp_path / "out").glob("datasets/*/*/manifest.json"))


@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "ray-actors"])
def test_samples_error_is_one_line_naming_stage_file_and_fix(workers, tmp_path, capfd, ray_local):
    """An item loses its title after ingest: the samples stage (in this process or on Ray actors) stops
    with one line naming the stage, the shard and the fix."""
    raw = write_source(tmp_path / "raw", "generic", ratings="all")
    extra = ["retrieval.text_mode=recent", f"retrieval.num_workers={workers}"]
    args = run_args("tiny", "ctr", raw, tmp_path / "out", "bad-samples", extra)
    rc, out, err = run_main([*args, "--stages", "ingest"], capfd)
    assert rc == 0, err[-3000:]
    items_url = _one("datasets/bad-samples/*/items.parquet", tmp_path / "out")
    items = pq.read_table(items_url)
    titles = items["title"].to_pylist()
    titles[0] = " "
    pq.write_table(items.set_column(items.column_names.index("title"), "title", pa.array(titles)), items_url)
    rc, out, err = run_main(args, capfd)
    _error_line(rc, err, "samples", "interactions/shard-0000", "have no title", "missing_text=placeholder")
    assert "[ingest] reusing" in err and "[teacher]" not in err
    # SUBR retrieval: the embed stage meets the untitled item first; with placeholders both stages go on.
    subr = [*args, "retrieval.text_mode=subr"]
    rc, out, err = run_main([*subr, "--stages", "ingest,embed"], capfd)
    _error_line(rc, err, "embed", str(items_url), "without a title", "retrieval.missing_text=placeholder")
    rc, out, err = run_main([*subr, "retrieval.missing_text=placeholder", "--stages", "ingest,embed,samples"], capfd)
    assert rc == 0, err[-3000:]


def test_teacher_error_is_one_line_naming_stage_file_and_fix(tmp_path, capfd, ray_local):
    """A NaN rating in built samples (samples written before missing ratings became null): the teacher stage
    stops with one line naming the stage, the shard and how to rebuild."""
    raw = write_source(tmp_path / "raw", "generic", ratings="all")
    args = run_args("tiny", "ctr", raw, tmp_path / "out", "bad-teacher", ["retrieval.text_mode=recent"])
    rc, out, err = run_main([*args, "--stages", "ingest,samples"], capfd)
    assert rc == 0, err[-3000:]
    shard = sorted(_one("samples/bad-teacher/*/manifest.json", tmp_path / "out").parent.glob("train/*.parquet"))[0]
    t = pq.read_table(shard)
    rows = t["id_hist_ratings"].to_pylist()
    r = next(i for i, v in enumerate(rows) if v)
    rows[r] = [float("nan")] + rows[r][1:]
    col = pa.array(rows, t.schema.field("id_hist_ratings").type)
    pq.write_table(t.set_column(t.column_names.index("id_hist_ratings"), t.schema.field("id_hist_ratings"), col), shard)
    rc, out, err = run_main(args, capfd)
    line = _error_line(rc, err, "teacher", "NaN", "rebuild the samples")
    # The file named is the one holding that sample (rows carried between shards name both shards).
    assert re.search(
        rf"stage: ({re.escape(str(shard.parent))}/shard-\d+\.parquet or )?{re.escape(str(shard))}: ", line
    ), line
    assert "[samples] reusing" in err and "[train]" not in err


# ----------------------------------------------------------------------------------------- prompts, unit
@pytest.mark.parametrize("ratings", [None, [None, 4.0, float("nan")]], ids=["null-list", "some-missing"])
def test_ctr_prompt_lists_every_history_item_and_stars_only_real_ratings(ratings):
    items = pa.table({"item_id": [1, 2, 3, 4], "title": ["Alpha (1990)", "Beta (1991)", "Gamma (1992)", "Delta"]})
    record = {"sample_id": 0, "user_id": 7, "item_id": 4, "label": 1, "text_hist_items": [1, 2, 3]}
    text = PromptRenderer(items, "ctr").render({**record, "text_hist_ratings": ratings}).text
    for title in ("Alpha (1990)", "Beta (1991)", "Gamma (1992)"):
        assert title in text, text
    assert text.count("stars)") == (0 if ratings is None else 1) and "nan" not in text, text


# ------------------------------------------------------------------------------------------ readers, unit
def _ingest(raw: RawSource, out: Path, task: str = "next_item", **opts) -> dict:
    teacher = ["teacher.model=sasrec", "teacher.rep_dim=16"] if task == "next_item" else []
    cfg = load_config("tiny", [*raw.overrides, f"data.task={task}", "data.split=auto", *teacher])
    o = ingest_options(cfg)
    o.progress, o.num_shards = False, 2
    for k, v in opts.items():
        setattr(o, k, v)
    c = cfg.data
    return ingest(c.format, c.src, str(out), o, items=c.items, users=c.users, columns=c.columns)


def test_order_only_positions_continue_across_files(tmp_path):
    """Generic data without a time column, split over two files: each user's rows are numbered in file order."""
    raw = write_source(tmp_path / "raw", "generic", ratings="none", timestamps=False)
    inter = raw.root / "inter.csv"
    lines = inter.read_text().splitlines()
    (raw.root / "inter").mkdir()
    half = len(lines) // 2
    (raw.root / "inter" / "a.csv").write_text("\n".join(lines[: half + 1]) + "\n")
    (raw.root / "inter" / "b.csv").write_text("\n".join([lines[0], *lines[half + 1 :]]) + "\n")
    raw.overrides = [o.replace(f"data.src={inter}", f"data.src={raw.root / 'inter'}") for o in raw.overrides]
    m = _ingest(raw, tmp_path / "ds")
    t = pq.read_table(sorted((tmp_path / "ds" / "interactions").glob("*.parquet"))).to_pandas()
    assert m["num_interactions"] == raw.rows and t["rating"].isna().all()
    for _, g in t.groupby("user_id"):
        assert g["timestamp"].tolist() == list(range(len(g)))  # 0..14 for every user, across both files
    assert set(t.loc[t["split"] == "test", "timestamp"]) == {14}


def test_llara_bad_ratings_name_file_and_line(tmp_path):
    raw = write_source(tmp_path / "raw", "llara", ratings="some")
    f = raw.root / "val_data.jsonl"
    rows = f.read_text().splitlines()
    bad = json.loads(rows[2])
    bad["seq_ratings"] = bad["seq_ratings"][:1]
    rows[2] = json.dumps(bad)
    f.write_text("\n".join(rows) + "\n")
    with pytest.raises(IngestError, match=rf"{re.escape(str(f))}:3: seq_ratings must be a list"):
        _ingest(raw, tmp_path / "ds")
    bad["seq_ratings"] = ["five"] * 10
    rows[2] = json.dumps(bad)
    f.write_text("\n".join(rows) + "\n")
    with pytest.raises(IngestError, match=rf"{re.escape(str(f))}:3: seq_ratings must hold numbers or null"):
        _ingest(raw, tmp_path / "ds")


def test_source_without_ratings_refuses_ctr(tmp_path):
    """RecBole without a rating field has no ratings: CTR says so (it used to blame NaN ratings on row 1)."""
    raw = write_source(tmp_path / "raw", "recbole", ratings="none")
    with pytest.raises(IngestError, match="task ctr needs ratings"):
        _ingest(raw, tmp_path / "ds", task="ctr")
    assert _ingest(raw, tmp_path / "ds2")["missing_ratings"] == 0  # no ratings at all: nothing is "missing"
