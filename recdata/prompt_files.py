"""CTR prompt files in the Alpaca / TALLRec form -> a small content-addressed "prompt set".

TALLRec (and other LLM CTR baselines) ship their data already as prompts: JSON lists (or JSON lines, or Parquet) of
`{"instruction": ..., "input": ..., "output": "Yes." | "No."}`. There is no interaction log behind them, so no
retrieval, no teacher (CRM) and no gate input: `data.format: prompts` trains and evaluates them as plain LoRA (and
zero-shot), through the same tokenizer path (retrieval.encoding.PromptEncoder) and Yes/No scoring as every other
CTR run.

    {out}/{split}.parquet          sample_id, split, row (1-based row of the source file), prompt, label
    {out}/subsets/{split}.parquet  rank, sample_id: the split's seeded order (recdata.subsets): a Few2Many
    {out}/subsets/subsets.json     training set is its first trainer.train_subset ids (nested), eval sets the
                                   first retrieval.max_eval_samples
    {out}/manifest.json            written last: files, rows, positives, skipped counts, template, seed

Which file is which split: `data.prompt_files` ({train: valid.json, test: test.json}), else the files in `data.src`
named train / valid (or val, validation) / test with the suffix .json, .jsonl or .parquet. A split without a file is
not evaluated (no validation file: no valid metrics); there must be a train file.

Labels: an output that starts with "yes" -> 1, "no" -> 0 (case, spaces and punctuation ignored: "Yes.", "no",
" NO!"). Anything else, a missing key, a non-text value or a line that is not JSON is one error naming the file, the
row and the key or value; with `data.on_bad_rows: skip` such rows are dropped and counted (`skipped`) instead.
Nothing is written until every file has been read and checked.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from configs.errors import RecloraError
from configs.loader import HelpFormatter
from recdata import storage
from recdata.subsets import load_subset, write_subsets
from recdata.textfiles import IngestError, open_bytes

PROMPT_SET_VERSION = 1
SPLITS = ("train", "valid", "test")
SUFFIXES = (".json", ".jsonl", ".parquet")
SPLIT_NAMES = {"train": ("train",), "valid": ("valid", "val", "validation"), "test": ("test",)}
SAMPLE_ID_BASE = 2**40  # sample_id = split index * 2**40 + source row (1-based): stable, unique in the set

# Alpaca's prompt as TALLRec trains and evaluates with it (finetune_rec.py / evaluate.py generate_prompt), up to the
# response; the answer ("Yes." / "No.") is the model's turn. TALLRec's strings also carry a stray flake8 "noqa
# E501" comment (two spaces, a hash, then the code) inside the f-string after the first sentence; it is left out:
# the text here is alpaca-lora's templates/alpaca.json.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

PROMPT_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("split", pa.string()),
        ("row", pa.int64()),  # 1-based row (JSON list element, JSONL line, Parquet row) of the source file
        ("prompt", pa.string()),  # the Alpaca prompt (instruction + input), without the answer
        ("label", pa.int8()),
    ]
)

_ANSWER = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


class PromptFileError(IngestError):
    """A prompt file that cannot be read: one line naming the file, the row and the key or value."""


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """TALLRec's Alpaca prompt without the answer: the no-input variant when the input is empty."""
    if input_text:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def parse_label(output: str) -> int | None:
    """1 for an output starting with yes, 0 for no (case, spaces, punctuation ignored), None otherwise."""
    m = _ANSWER.match(output)
    return None if m is None else int(m.group(1).lower() == "yes")


@dataclass
class PromptOptions:
    files: dict[str, str] | None = None  # split -> file (relative to src, or absolute / a URL); None: found in src
    instruction: str = "instruction"  # column names
    input: str = "input"
    output: str = "output"
    on_bad_rows: str = "error"  # error | skip (counted)
    seed: int = 0  # the persisted seeded orders
    overwrite: bool = False

    def content(self) -> dict[str, Any]:
        """What the prompt set's content depends on (part of its address and its manifest)."""
        return {
            "files": self.files,
            "columns": {"instruction": self.instruction, "input": self.input, "output": self.output},
            "on_bad_rows": self.on_bad_rows,
            "seed": self.seed,
            "version": PROMPT_SET_VERSION,
        }


def options_from_config(cfg) -> PromptOptions:
    d = cfg.data
    return PromptOptions(
        files=dict(d.prompt_files) if d.prompt_files else None,
        instruction=d.columns.instruction,
        input=d.columns.input,
        output=d.columns.output,
        on_bad_rows=d.on_bad_rows,
        seed=cfg.run.seed,
    )


# ------------------------------------------------------------------------------------------------ which files
def split_files(src: str, files: dict[str, str] | None) -> dict[str, str]:
    """split -> file URL: the explicit mapping (names relative to src), else train / valid / test files in src."""
    if files:
        unknown = sorted(set(files) - set(SPLITS))
        if unknown:
            raise PromptFileError(f"data.prompt_files: unknown split {unknown[0]!r}; splits are {', '.join(SPLITS)}")
        out = {s: _under(src, files[s]) for s in SPLITS if files.get(s)}
        for split, url in out.items():
            if not storage.exists(url):
                raise PromptFileError(f"{url}: file not found (data.prompt_files.{split})")
    else:
        fs, path = storage.get_fs(src)
        with storage.storage_errors(src):
            if not fs.isdir(path):
                raise PromptFileError(
                    f"{src}: not a folder; data.src is the folder of the prompt files (or name them in "
                    f"data.prompt_files: {{train: FILE, valid: FILE, test: FILE}})"
                )
            names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
        out = {}
        for split in SPLITS:
            found = sorted(n + s for n in SPLIT_NAMES[split] for s in SUFFIXES if n + s in names)
            if len(found) > 1:
                raise PromptFileError(
                    f"{src}: several {split} files ({', '.join(found)}); name one in data.prompt_files.{split}"
                )
            if found:
                out[split] = storage.join(src, found[0])
    if "train" not in out:
        have = ", ".join(f"{s}={u.rsplit('/', 1)[-1]}" for s, u in out.items()) or "none"
        raise PromptFileError(
            f"{src}: no train file (train.json, train.jsonl or train.parquet; found {have}); name the training "
            f"file in data.prompt_files.train or with --train (TALLRec's movie data ships no train.json: "
            f"data.prompt_files={{train: valid.json, test: test.json}})"
        )
    return out


def _under(src: str, name: str) -> str:
    if "://" in name or name.startswith("/"):
        return name
    return storage.join(src, name)


# ------------------------------------------------------------------------------------------------ reading
@dataclass
class _Read:
    rows: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=lambda: {"bad_json": 0, "bad_key": 0, "bad_output": 0})


def _records(url: str) -> list[tuple[int, str, Any]]:
    """(row, where, record) per row of a JSON list, a JSON-lines file or a Parquet file: `row` counts from 1
    (list elements, Parquet rows; the line number in a JSON-lines file) and `where` names it in messages."""
    raw = open_bytes(url)
    if url.endswith(".parquet"):
        try:
            table = pq.read_table(io.BytesIO(raw))
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise PromptFileError(f"{url}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        return [(i, f"{url} row {i}", r) for i, r in enumerate(table.to_pylist(), 1)]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{url}: not UTF-8 text (byte {e.start}); prompt files are JSON in UTF-8") from None
    if not text.strip():
        raise PromptFileError(f"{url}: file is empty (expected a JSON list or JSON lines of instruction/input/output)")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{url}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise PromptFileError(f"{url}: expected a JSON list of objects, got {type(data).__name__}")
        return [(i, f"{url} row {i}", r) for i, r in enumerate(data, 1)]
    lines = text.splitlines()
    if sum(1 for line in lines if line.strip()) > 1:
        try:  # one JSON document that is not a list (a pretty-printed object): not JSON lines either
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if whole is not None:
            raise PromptFileError(
                f"{url}: expected a JSON list of objects or JSON lines, got one {type(whole).__name__}"
            )
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((lineno, f"{url}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((lineno, f"{url}:{lineno}", _BadJson(e.msg)))
    return out


@dataclass
class _BadJson:
    msg: str


def read_prompt_file(url: str, opts: PromptOptions) -> _Read:
    """Every row of one prompt file as (row, Alpaca prompt, label); bad rows raise or are counted (skip)."""
    out = _Read()
    cols = {"instruction": opts.instruction, "input": opts.input, "output": opts.output}

    def bad(kind: str, message: str) -> None:
        if opts.on_bad_rows != "skip":
            raise PromptFileError(f"{message}; fix the row or set data.on_bad_rows=skip to drop such rows (counted)")
        out.skipped[kind] += 1

    for row, where, rec in _records(url):
        if isinstance(rec, _BadJson):
            bad("bad_json", f"{where}: not valid JSON ({rec.msg}); one object per line")
            continue
        if not isinstance(rec, dict):
            bad("bad_key", f"{where}: expected an object with {', '.join(cols.values())}, got {type(rec).__name__}")
            continue
        values = {}
        for role, key in cols.items():
            v = rec.get(key)
            if key not in rec:
                # Alpaca-style files may leave the input out for instructions without one.
                if role == "input":
                    v = ""
                else:
                    bad("bad_key", f"{where}: missing key {key!r} (has {', '.join(map(repr, rec)) or 'none'})")
                    break
            if role == "input" and v is None:
                v = ""
            if not isinstance(v, str):
                bad("bad_key", f"{where}: key {key!r} must be text, got {type(v).__name__} {v!r:.60}")
                break
            values[role] = v
        else:
            label = parse_label(values["output"])
            if label is None:
                bad("bad_output", f"{where}: key {cols['output']!r} is {values['output']!r:.80}; expected Yes or No")
                continue
            if not values["instruction"].strip():
                bad("bad_key", f"{where}: key {cols['instruction']!r} is empty")
                continue
            out.rows.append(row)
            out.prompts.append(alpaca_prompt(values["instruction"], values["input"]))
            out.labels.append(label)
    return out


# ------------------------------------------------------------------------------------------------ ingest
def ingest_prompts(src: str, out: str, opts: PromptOptions) -> dict[str, Any]:
    """Read and check every split's file, then write the prompt set at `out` (manifest last). Returns the manifest."""
    manifest_url = storage.join(out, "manifest.json")
    if storage.exists(manifest_url) and not opts.overwrite:
        raise PromptFileError(f"{out}: a prompt set is already there (manifest.json); use --overwrite or another --out")
    files = split_files(src, opts.files)
    read = {split: read_prompt_file(url, opts) for split, url in files.items()}
    for split, r in read.items():
        if not r.rows:
            raise PromptFileError(f"{files[split]}: no usable rows for split {split!r}")
    # Everything is read and checked: only now is anything written.
    storage.rm(manifest_url)
    tables = {}
    for k, split in enumerate(SPLITS):
        if split not in read:
            continue
        r = read[split]
        rows = np.asarray(r.rows, dtype=np.int64)
        tables[split] = pa.Table.from_arrays(
            [
                pa.array(k * SAMPLE_ID_BASE + rows, pa.int64()),
                pa.array([split] * len(rows), pa.string()),
                pa.array(rows, pa.int64()),
                pa.array(r.prompts, pa.string()),
                pa.array(r.labels, pa.int8()),
            ],
            schema=PROMPT_SCHEMA,
        )
        buf = io.BytesIO()
        pq.write_table(tables[split], buf, compression="zstd")
        storage.write_bytes_atomic(storage.join(out, f"{split}.parquet"), buf.getvalue())
    subsets = write_subsets(out, {s: t["sample_id"].to_numpy() for s, t in tables.items()}, opts.seed)
    skipped: dict[str, int] = {}
    for r in read.values():
        for key, v in r.skipped.items():
            skipped[key] = skipped.get(key, 0) + v
    manifest = {
        "format": "prompts",
        "task": "ctr",
        "version": PROMPT_SET_VERSION,
        "source": src,
        "options": opts.content(),
        "files": {s: u for s, u in files.items()},
        "template": "alpaca",
        "splits": {
            s: {
                "rows": t.num_rows,
                "positives": int(np.sum(t["label"].to_numpy())),
                "path": f"{s}.parquet",
                "skipped": read[s].skipped,
            }
            for s, t in tables.items()
        },
        "skipped": skipped,
        "subsets": subsets,
    }
    manifest["fingerprint"] = storage.digest(
        {k: manifest[k] for k in ("options", "splits", "version")} | {"files": sorted(files.items())}
    )
    storage.write_json_atomic(manifest_url, manifest)
    return manifest


def summary(manifest: dict) -> str:
    lines = [
        f"prompts: {manifest['source']}   task: ctr   template: {manifest.get('template', 'alpaca')}",
        f"{'split':<8} {'rows':>10} {'positives':>10} {'pos rate':>9}  file",
    ]
    for name in SPLITS:
        st = manifest["splits"].get(name)
        if st:
            rate = f"{st['positives'] / st['rows']:.3f}" if st["rows"] else "-"
            file = manifest["files"][name].rsplit("/", 1)[-1]
            lines.append(f"{name:<8} {st['rows']:>10,} {st['positives']:>10,} {rate:>9}  {file}")
    sk = {k: v for k, v in manifest["skipped"].items() if v}
    lines.append("skipped: " + (", ".join(f"{k}={v:,}" for k, v in sk.items()) if sk else "none"))
    return "\n".join(lines)


class PromptSet:
    """A committed prompt set: `read(split, sample_ids)` returns its rows in the order of the ids."""

    def __init__(self, url: str, manifest: dict):
        self.url, self.manifest = url, manifest
        self._tables: dict[str, tuple[np.ndarray, np.ndarray, pa.Table]] = {}

    @classmethod
    def open(cls, url: str) -> "PromptSet":
        m_url = storage.join(url, "manifest.json")
        if not storage.exists(m_url):
            raise PromptFileError(f"{url}: no prompt set here (no manifest.json); run the ingest stage first")
        manifest = storage.read_json(m_url)
        if manifest.get("format") != "prompts":
            raise PromptFileError(f"{url}: holds a {manifest.get('format')!r} dataset, not a prompt set")
        return cls(url, manifest)

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self.manifest["splits"]]

    def order(self, split: str, n: int | None = None) -> np.ndarray:
        """The first n sample ids of the split's persisted seeded order."""
        return load_subset(self.url, split, n)

    def read(self, split: str, sample_ids: np.ndarray) -> pa.Table:
        if split not in self._tables:
            fs, path = storage.get_fs(storage.join(self.url, f"{split}.parquet"))
            with storage.storage_errors(self.url), fs.open(path, "rb") as f:
                t = pq.read_table(f)
            ids = t["sample_id"].to_numpy()
            order = np.argsort(ids, kind="stable")
            self._tables[split] = (ids[order], order, t)
        have, order, t = self._tables[split]
        want = np.asarray(sample_ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(have, want), max(len(have) - 1, 0))
        missing = (len(have) == 0) | (have[pos] != want)
        if np.any(missing):
            raise PromptFileError(
                f"{self.url}/{split}.parquet: no sample_id {int(want[np.flatnonzero(missing)[0]])} "
                f"({int(np.sum(missing))} of {len(want)} missing)"
            )
        return t.take(pa.array(order[pos]))


# ------------------------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="reclora ingest prompts",
        description="CTR prompt files (Alpaca / TALLRec: instruction, input, output Yes./No.) -> a prompt set.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--src", required=True, help="folder of the prompt files (train/valid/test .json, .jsonl, .parquet)")
    p.add_argument("--out", required=True, help="destination URL (local path, file:// or s3://)")
    for split in SPLITS:
        p.add_argument(
            f"--{split}", metavar="FILE", help=f"the {split} file (relative to --src); default: found in src"
        )
    p.add_argument("--instruction-column", default="instruction")
    p.add_argument("--input-column", default="input")
    p.add_argument("--output-column", default="output")
    p.add_argument("--on-bad-rows", choices=["error", "skip"], default="error")
    p.add_argument("--seed", type=int, default=0, help="seed of the persisted orders (Few2Many subsets)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    files = {s: getattr(a, s) for s in SPLITS if getattr(a, s)}
    opts = PromptOptions(
        files=files or None,
        instruction=a.instruction_column,
        input=a.input_column,
        output=a.output_column,
        on_bad_rows=a.on_bad_rows,
        seed=a.seed,
        overwrite=a.overwrite,
    )
    try:
        print(summary(ingest_prompts(a.src, a.out, opts)))
    except RecloraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
