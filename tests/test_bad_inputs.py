"""Every bad input gets a clear error, not a traceback (issue #15): one table, one row per input.

Each row runs a command through its front door (`python -m recdata.ingest`, `reclora ...`, `python
trainer/main.py`, `python -m teacher.train`, `python -m trainer.predict`): in this process through the
module's `main(argv)`, or as a subprocess where the row says so. It checks the exit code, that the error is
ONE line starting with "error: " that holds the given words (and none of the forbidden ones), that no
traceback was printed, and that nothing partial is left: the output absent (or, for a file in the way,
unchanged) and no `*.staging-*` beside it. Rows with exit code 0 are inputs that are accepted but counted
(negative ids skipped, future timestamps and negative ratings flagged, stale leftovers of a killed ingest
removed). Fast: tiny generated inputs, no training (the checkpoints are written by trainer.checkpoint.save).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cluster.cli import main as reclora_main
from configs.loader import load_config
from recdata.ingest import main as ingest_main
from recdata.ingest import owner_tag
from recdata.schema import Dataset
from teacher.train import main as teacher_main
from tests.conftest import REPO, free_port
from trainer import checkpoint
from trainer.export import main as export_main
from trainer.loop import fingerprint_parts
from trainer.main import main as train_main
from trainer.predict import main as predict_main

FRONT_DOORS: dict[str, tuple[Callable[[list[str]], int], list[str]]] = {
    # name: (in-process main, the command line a user types)
    "ingest": (ingest_main, [sys.executable, "-m", "recdata.ingest"]),
    "reclora": (reclora_main, [sys.executable, "-m", "cluster.cli"]),
    "train": (train_main, [sys.executable, "trainer/main.py"]),
    "teacher": (teacher_main, [sys.executable, "-m", "teacher.train"]),
    "predict": (predict_main, [sys.executable, "-m", "trainer.predict"]),
    "export": (export_main, [sys.executable, "-m", "trainer.export"]),
}

FUTURE = 4_000_000_000  # 2096: later than "now + 1 day"


@dataclass
class Case:
    name: str
    door: str
    argv: Callable[[Path], list[str]]  # tmp folder (inputs already written there) -> arguments
    code: int
    words: tuple[str, ...]
    out: str | None = "out"  # what must stay absent (or unchanged, when it is a file already), relative to tmp
    never: tuple[str, ...] = ()  # words the message must not hold (a wrong hint)
    check: Callable[[Path], None] | None = None  # extra checks after an accepted input
    subprocess: bool = False
    env: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------- inputs
def _write_inputs(tmp: Path) -> None:
    g = tmp / "g"
    g.mkdir()
    pd.DataFrame({"item_id": [1, 2, 3], "title": ["A", "B", "C"]}).to_csv(g / "items.csv", index=False)
    (g / "items_header_only.csv").write_text("item_id,title\n")
    ok = {"user_id": [1, 2], "item_id": [1, 2], "timestamp": [1, 2], "rating": [4.0, 5.0]}
    pd.DataFrame(ok).to_csv(g / "ok.csv", index=False)
    pd.DataFrame(dict(ok, rating=[4, 5 * 10**18])).to_csv(g / "big_rating.csv", index=False)
    (g / "slashes.csv").write_text("user_id,item_id,timestamp,rating\n1,1,2020/01/06,4\n2,2,2020/01/07,5\n")
    (g / "header_only.csv").write_text("user_id,item_id,timestamp,rating\n")
    pd.DataFrame(dict(ok, user_id=[1, -2])).to_csv(g / "negative_id.csv", index=False)
    pd.DataFrame(
        {"user_id": [1, 2, 3, 4], "item_id": [1, 2, 3, 1], "timestamp": [1, 2, FUTURE, 3], "rating": [4, -1, 4, 2]}
    ).to_csv(g / "flagged.csv", index=False)
    # A Parquet file whose footer is fine but whose pages are damaged.
    n = 1000
    pq.write_table(
        pa.table(
            {
                "user_id": np.arange(n) % 3 + 1,
                "item_id": np.arange(n) % 3 + 1,
                "timestamp": np.arange(n),
                "rating": np.full(n, 4.0, np.float32),
            }
        ),
        g / "pages.parquet",
    )
    data = bytearray((g / "pages.parquet").read_bytes())
    for i in range(100, 900):
        data[i] ^= 0x5A
    (g / "pages.parquet").write_bytes(bytes(data))
    rb = tmp / "rb"
    rb.mkdir()
    (rb / "x.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t4\t881250949.5\n2\t2\t5\t881250950\n"
    )
    (rb / "x.item").write_text("item_id:token\tmovie_title:token_seq\n1\tA\n2\tB\n")
    (tmp / "afile").write_text("a file, not a folder\n")


def _read_only_folder(tmp: Path) -> Path:
    """A folder nothing can be created in: chmod 555 for users; root ignores modes, so /sys (read-only)."""
    if os.geteuid() != 0:
        d = tmp / "ro"
        d.mkdir(exist_ok=True)
        d.chmod(0o555)
        return d / "out"
    return Path("/sys/reclora-test-read-only/out")


def _checkpoints(tmp: Path) -> None:
    """A real checkpoint of the tiny config (trainer.checkpoint.save, one rank) and a copy with its tensor
    file truncated."""
    parts = fingerprint_parts(load_config("tiny"))
    meta = {"fingerprint": checkpoint.config_fingerprint(parts), "fingerprint_parts": parts}
    url = checkpoint.save(
        str(tmp / "ck" / "good"), 2, 0, 1, {"w::param": torch.zeros(64)}, {}, meta, barrier=lambda: None
    )
    bad = checkpoint.save(
        str(tmp / "ck" / "bad"), 2, 0, 1, {"w::param": torch.zeros(64)}, {}, meta, barrier=lambda: None
    )
    tensors = Path(bad) / "rank-00000-of-00001.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    (tmp / "ck" / "urls.json").write_text(json.dumps({"good": url, "bad": bad}))


def _ck(tmp: Path, which: str) -> str:
    return json.loads((tmp / "ck" / "urls.json").read_text())[which]


def _gen(tmp: Path, inter: str, *extra: str) -> list[str]:
    return [
        "generic",
        "--src",
        str(tmp / "g" / inter),
        "--items",
        str(tmp / "g" / "items.csv"),
        "--out",
        str(tmp / "out"),
        "--quiet",
        *extra,
    ]


def _train(tmp: Path, *extra: str) -> list[str]:
    return ["--config", "tiny", f"run.output_dir={tmp / 'runs'}", "run.name=out", *extra]


def _stale_leftovers(tmp: Path) -> None:
    """What a killed ingest leaves: a staging folder beside the output and a spill folder in the temp dir,
    both named after its (now dead) process."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    pid = proc.pid
    (tmp / f"out.staging-{owner_tag(pid)}-0123abcd" / "interactions").mkdir(parents=True)
    spill = Path(tempfile.gettempdir()) / f"reclora-ingest-{owner_tag(pid)}-test{os.getpid()}"
    spill.mkdir(exist_ok=True)
    (tmp / "stale.json").write_text(json.dumps([str(spill)]))


def _manifest(tmp: Path) -> dict:
    return Dataset.open(str(tmp / "out")).manifest


def _check_negative_skipped(tmp: Path) -> None:
    m = _manifest(tmp)
    assert m["skipped"]["negative_ids"] == 1 and m["num_interactions"] == 1


def _check_flagged(tmp: Path) -> None:
    m = _manifest(tmp)
    assert m["flagged"] == {"future_timestamps": 1, "negative_ratings": 1}
    assert m["num_interactions"] == 4  # counted, kept


def _check_stale_removed(tmp: Path) -> None:
    assert Dataset.open(str(tmp / "out")).manifest["num_interactions"] == 2
    assert not list(tmp.glob("out.staging-*")), "a dead ingest's staging folder must be removed"
    for spill in json.loads((tmp / "stale.json").read_text()):
        assert not Path(spill).exists(), f"a dead ingest's spill folder {spill} must be removed"


PORT = free_port()  # nothing listens there

CASES = [
    # --------------------------------------------------------------------------------------- ingest
    Case(
        "items file with only a header",
        "ingest",
        lambda t: [*_gen(t, "ok.csv")[:4], str(t / "g" / "items_header_only.csv"), *_gen(t, "ok.csv")[5:]],
        2,
        ("items_header_only.csv", "no items", "header"),
        subprocess=True,
    ),
    Case(
        "rating column of large integers",
        "ingest",
        lambda t: _gen(t, "big_rating.csv"),
        2,
        ("big_rating.csv:3", "'rating'", "too large", "--rating-col"),
    ),
    Case(
        "RecBole timestamp with a fraction",
        "ingest",
        lambda t: ["recbole", "--src", str(t / "rb"), "--out", str(t / "out"), "--quiet"],
        2,
        ("x.inter:2", "timestamp", "881250949.5", "fraction", "round"),
    ),
    Case(
        "corrupt Parquet page",
        "ingest",
        lambda t: _gen(t, "pages.parquet"),
        2,
        ("pages.parquet", "corrupt", "again"),
        never=("unreachable", "AWS"),
    ),
    Case(
        "timestamp like 2020/01/06",
        "ingest",
        lambda t: _gen(t, "slashes.csv"),
        2,
        ("slashes.csv:2", "'timestamp'", "'2020/01/06'", "Unix seconds", "2020-01-06T00:00:00"),
        never=("string ids",),
    ),
    Case(
        "header-only CSV",
        "ingest",
        lambda t: _gen(t, "header_only.csv"),
        2,
        ("header_only.csv", "only a header", "no rows"),
        never=("None",),
    ),
    Case(
        "--row-group-size 0",
        "ingest",
        lambda t: _gen(t, "ok.csv", "--row-group-size", "0"),
        2,
        ("--row-group-size", ">= 1", "got 0"),
    ),
    Case(
        "--out under a file",
        "ingest",
        lambda t: [*_gen(t, "ok.csv")[:6], str(t / "afile" / "out"), "--quiet"],
        2,
        ("afile", "is a file", "--out"),
        out="afile",
    ),
    Case(
        "--out under a file (reclora ingest)",
        "reclora",
        lambda t: ["ingest", *_gen(t, "ok.csv")[:6], str(t / "afile" / "out"), "--quiet"],
        2,
        ("afile", "is a file", "--out"),
        out="afile",
    ),
    Case(
        "--out in a read-only folder",
        "ingest",
        lambda t: [*_gen(t, "ok.csv")[:6], str(_read_only_folder(t)), "--quiet"],
        2,
        ("read-only", "--out"),
        never=("AWS", "storage unreachable"),
    ),
    Case(
        "negative user id",
        "ingest",
        lambda t: _gen(t, "negative_id.csv"),
        2,
        ("negative_id.csv:3", "user_id", "negative id -2", "--on-bad-rows skip"),
    ),
    Case(
        "negative user id, --on-bad-rows skip: counted skip",
        "ingest",
        lambda t: _gen(t, "negative_id.csv", "--on-bad-rows", "skip"),
        0,
        ("negative_ids=1",),
        check=_check_negative_skipped,
    ),
    Case(
        "future timestamp and negative rating: kept, counted",
        "ingest",
        lambda t: _gen(t, "flagged.csv"),
        0,
        ("flagged", "future_timestamps=1", "negative_ratings=1"),
        check=_check_flagged,
    ),
    Case(
        "leftovers of a killed ingest are removed by the next one",
        "ingest",
        lambda t: (_stale_leftovers(t), _gen(t, "ok.csv"))[1],
        0,
        ("wrote",),
        check=_check_stale_removed,
    ),
    # ---------------------------------------------------------------------------------- trainer/main.py
    Case(
        "retrieval.k_text=500 (above retrieval.subr_pool)",
        "train",
        lambda t: _train(t, "retrieval.k_text=500"),
        2,
        ("retrieval.subr_pool", "k_text=500"),
        out="runs",
    ),
    Case("trainer.lr=inf", "train", lambda t: _train(t, "trainer.lr=inf"), 2, ("trainer.lr", "finite"), out="runs"),
    Case(
        "run.output_dir under a file",
        "train",
        lambda t: ["--config", "tiny", f"run.output_dir={t / 'afile' / 'runs'}"],
        2,
        ("afile", "is a file", "run.output_dir"),
        out="afile",
    ),
    Case(
        "run.output_dir in a read-only folder",
        "train",
        lambda t: ["--config", "tiny", f"run.output_dir={_read_only_folder(t)}"],
        2,
        ("read-only", "run.output_dir"),
        out=None,
        never=("AWS",),
    ),
    Case(
        "run.output_dir on an unreachable endpoint",
        "train",
        lambda t: [
            "--config",
            "tiny",
            "run.output_dir=s3://bucket/runs",
            f"storage.endpoint_url=http://127.0.0.1:{PORT}",
        ],
        2,
        ("s3://bucket/runs", "unreachable", f"127.0.0.1:{PORT}"),
        out=None,
        never=("secret-never-printed",),
        env={"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "secret-never-printed"},
    ),
    Case(
        "--resume from a truncated checkpoint shard",
        "train",
        lambda t: (_checkpoints(t), _train(t, "--stages", "train", "--resume", _ck(t, "bad")))[1],
        2,
        ("rank-00000-of-00001.safetensors", "truncated", "--resume"),
        out="runs/out",
    ),
    Case(
        "--resume with an incompatible adapter",
        "train",
        lambda t: (_checkpoints(t), _train(t, "trainer.lora.r=8", "--stages", "train", "--resume", _ck(t, "good")))[1],
        2,
        ("cannot resume", "lora", "run.name"),
        out="runs/out",
    ),
    # ----------------------------------------------------------------------------- predict, teacher
    Case(
        "predict --out is a file",
        "predict",
        lambda t: ["--run", str(t / "no-run"), "--requests", str(t / "no-requests.parquet"), "--out", str(t / "afile")],
        2,
        ("afile", "is a file", "--out"),
        out="afile",
    ),
    Case(
        "reclora predict --out under a file",
        "reclora",
        lambda t: [
            "predict",
            "--run",
            str(t / "r"),
            "--requests",
            str(t / "q.parquet"),
            "--out",
            str(t / "afile" / "p"),
        ],
        2,
        ("afile", "is a file", "--out"),
        out="afile",
    ),
    Case(
        "export --out under a file",
        "export",
        lambda t: ["--adapter", str(t / "adapter"), "--cond", str(t / "c.npy"), "--out", str(t / "afile" / "u42")],
        2,
        ("afile", "is a file", "--out"),
        out="afile",
    ),
    Case(
        "reclora export --adapter that is no adapter folder",
        "reclora",
        lambda t: ["export", "--adapter", str(t / "g"), "--cond", str(t / "c.npy"), "--out", str(t / "out")],
        2,
        ("--adapter", "mixture_config.json", "not found", "RUN/adapter"),
    ),
    Case(
        "teacher --lr -1",
        "teacher",
        lambda t: ["--samples", str(t / "samples"), "--out", str(t / "out"), "--model", "din", "--lr", "-1"],
        2,
        ("--lr", "greater than 0", "-1"),
    ),
    Case(
        "teacher --mlp-hidden 64,abc",
        "teacher",
        lambda t: [
            "--samples",
            str(t / "samples"),
            "--out",
            str(t / "out"),
            "--model",
            "din",
            "--mlp-hidden",
            "64,abc",
        ],
        2,
        ("--mlp-hidden", "'64,abc'", "256,256"),
    ),
]


def _snapshot(p: Path) -> bytes | None:
    return p.read_bytes() if p.is_file() else None


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path, capsys, monkeypatch):
    _write_inputs(tmp_path)
    argv = case.argv(tmp_path)
    out = tmp_path / case.out if case.out else None
    before = _snapshot(out) if out else None
    existed = out.exists() if out else False
    if case.subprocess:
        env = dict(os.environ, **case.env, PYTHONPATH=str(REPO))
        proc = subprocess.run(
            FRONT_DOORS[case.door][1] + argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    else:
        for k, v in case.env.items():
            monkeypatch.setenv(k, v)
        try:
            code = FRONT_DOORS[case.door][0](argv)
        except SystemExit as e:  # argparse
            code = e.code
        except BaseException:
            pytest.fail(f"{case.name}: a traceback instead of an error line:\n{traceback.format_exc()}")
        cap = capsys.readouterr()
        stdout, stderr = cap.out, cap.err
    assert "Traceback" not in stdout + stderr, (stdout + stderr)[-3000:]
    assert code == case.code, f"exit {code}, expected {case.code}: {(stdout + stderr)[-2000:]}"
    if case.code == 0:
        for w in case.words:
            assert w in stdout, f"{w!r} not in the summary:\n{stdout}"
    else:
        lines = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
        assert len(lines) == 1, f"expected one 'error: ' line, got {stderr!r}"
        line = lines[0]
        for w in case.words:
            assert w in line, f"{w!r} not in {line!r}"
        for w in case.never:
            assert w not in line, f"{w!r} (a wrong hint) in {line!r}"
        if out is not None:
            if existed:
                assert _snapshot(out) == before, f"{out} changed"
            else:
                assert not out.exists(), f"a refused input left {out} behind"
            assert not list(out.parent.glob(f"{out.name}.staging-*"))
    if case.check:
        case.check(tmp_path)
