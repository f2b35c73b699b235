"""Bad input gets a one-line error naming file, line/column and the fix (or a counted skip), a non-zero
exit, and nothing at the destination."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recdata.ingest import main
from recdata.schema import Dataset
from tests.conftest import REPO, free_port, shared_path


@pytest.fixture
def ml100k(tmp_path) -> Path:
    """A private copy of ML-100K we can damage."""
    src = shared_path("data", "movielens-100k")
    dst = tmp_path / "src"
    dst.mkdir()
    for name in ("u.data", "u.item", "u.user", "u.genre"):
        shutil.copy(src / name, dst / name)
    return dst


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args + ["--quiet"])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def fails(args, capsys, out: Path, *needles: str) -> str:
    code, _, err = run_cli(args + ["--out", str(out)], capsys)
    assert code != 0, "bad input must exit non-zero"
    line = err.strip()
    assert line.startswith("error: ") and "\n" not in line, f"expected one error line, got {err!r}"
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    assert not out.exists(), "a failed ingest must leave nothing at the destination"
    assert not [p for p in out.parent.iterdir() if "staging" in p.name]
    return line


def test_truncated_file(ml100k, tmp_path, capsys):
    data = (ml100k / "u.data").read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    cut = start + data[start:].index(b"\t", data[start:].index(b"\t") + 1)  # mid-row, after two fields
    (ml100k / "u.data").write_bytes(data[:cut])
    line = fails(["movielens", "--src", str(ml100k)], capsys, tmp_path / "out", "u.data:100000", "truncated")
    assert "found" in line


def test_empty_file(ml100k, tmp_path, capsys):
    (ml100k / "u.data").write_bytes(b"")
    fails(["movielens", "--src", str(ml100k)], capsys, tmp_path / "out", "u.data", "empty")


def test_wrong_delimiter(ml100k, tmp_path, capsys):
    text = (ml100k / "u.data").read_text().replace("\t", ",")
    (ml100k / "u.data").write_text(text)
    fails(["movielens", "--src", str(ml100k)], capsys, tmp_path / "out", "u.data:1", "wrong delimiter")


def test_non_numeric_id(ml100k, tmp_path, capsys):
    lines = (ml100k / "u.data").read_text().splitlines()
    lines[41] = "abc\t242\t3\t881250949"
    (ml100k / "u.data").write_text("\n".join(lines) + "\n")
    fails(["movielens", "--src", str(ml100k)], capsys, tmp_path / "out", "u.data:42", "user_id", "'abc'")


def test_nan_rating_error_then_counted_skip(ml100k, tmp_path, capsys):
    lines = (ml100k / "u.data").read_text().splitlines()
    lines[9] = lines[9].split("\t")[0] + "\t" + lines[9].split("\t")[1] + "\tnan\t" + lines[9].split("\t")[3]
    (ml100k / "u.data").write_text("\n".join(lines) + "\n")
    fails(["movielens", "--src", str(ml100k)], capsys, tmp_path / "out", "u.data:10", "NaN", "--on-bad-rows skip")
    code, out, _ = run_cli(
        ["movielens", "--src", str(ml100k), "--out", str(tmp_path / "ok"), "--on-bad-rows", "skip"], capsys
    )
    assert code == 0 and "nan_ratings=1" in out
    assert Dataset.open(str(tmp_path / "ok")).manifest["num_interactions"] == 99_999


def test_duplicate_rows_are_counted_skips(ml100k, tmp_path, capsys):
    lines = (ml100k / "u.data").read_text().splitlines()
    (ml100k / "u.data").write_text("\n".join(lines + lines[:25]) + "\n")
    code, out, _ = run_cli(["movielens", "--src", str(ml100k), "--out", str(tmp_path / "o")], capsys)
    assert code == 0 and "duplicates=25" in out
    m = Dataset.open(str(tmp_path / "o")).manifest
    assert m["num_interactions"] == 100_000 and m["skipped"]["duplicates"] == 25


def test_items_without_titles(ml100k, tmp_path, capsys):
    raw = (ml100k / "u.item").read_bytes().split(b"\n")
    for i in (4, 9):
        f = raw[i].split(b"|")
        f[1] = b""
        raw[i] = b"|".join(f)
    (ml100k / "u.item").write_bytes(b"\n".join(raw))
    fails(["movielens", "--src", str(ml100k)], capsys, tmp_path / "out", "u.item", "no title", "[5, 10]", "placeholder")
    code, _, _ = run_cli(
        ["movielens", "--src", str(ml100k), "--out", str(tmp_path / "o"), "--missing-title", "placeholder"], capsys
    )
    assert code == 0
    items = Dataset.open(str(tmp_path / "o")).read_items().to_pandas()
    assert items.loc[items.item_id == 5, "title"].item() == "an untitled item"


def test_unknown_item_ids(ml100k, tmp_path, capsys):
    with open(ml100k / "u.data", "a") as f:
        f.write("1\t99999\t4\t881250949\n")
    fails(
        ["movielens", "--src", str(ml100k)], capsys, tmp_path / "out", "u.data:100001", "99999", "not in the items file"
    )


def _generic(tmp_path: Path, inter: pd.DataFrame, **kw) -> Path:
    d = tmp_path / "gen"
    d.mkdir(exist_ok=True)
    pd.DataFrame({"item_id": [1, 2, 3], "title": ["A", "B", "C"]}).to_csv(d / "items.csv", index=False)
    inter.to_csv(d / "inter.csv", index=False, **kw)
    return d


def test_missing_or_misspelled_column(tmp_path, capsys):
    d = _generic(tmp_path, pd.DataFrame({"user": [1, 2], "item_id": [1, 2], "timestamp": [1, 2], "rating": [4, 5]}))
    fails(
        ["generic", "--src", str(d / "inter.csv"), "--items", str(d / "items.csv")],
        capsys,
        tmp_path / "out",
        "inter.csv",
        "'user_id'",
        "did you mean 'user'",
        "--user-col",
    )


def test_string_item_ids_against_integer_items_file(tmp_path, capsys):
    # String ids are mapped (tests/test_ingest_string_ids.py); one that the items file lacks is named as written.
    d = _generic(
        tmp_path, pd.DataFrame({"user_id": ["u1", "u2"], "item_id": ["1", "x9"], "timestamp": [1, 2], "rating": [4, 5]})
    )
    fails(
        ["generic", "--src", str(d / "inter.csv"), "--items", str(d / "items.csv")],
        capsys,
        tmp_path / "out",
        "inter.csv:3",
        "'x9'",
        "not in the items file",
    )


def test_nan_rating_in_generic_names_line(tmp_path, capsys):
    d = _generic(
        tmp_path,
        pd.DataFrame(
            {"user_id": [1, 2, 3], "item_id": [1, 2, 3], "timestamp": [1, 2, 3], "rating": [4.0, np.nan, 5.0]}
        ),
    )
    fails(
        ["generic", "--src", str(d / "inter.csv"), "--items", str(d / "items.csv")],
        capsys,
        tmp_path / "out",
        "inter.csv:3",
        "NaN",
    )


def test_unreadable_encoding(tmp_path, capsys):
    d = tmp_path / "enc"
    d.mkdir()
    (d / "inter.csv").write_bytes("user_id,item_id,timestamp,rating\n1,1,1,4\n2,2,2,5\n".encode())
    (d / "items.csv").write_bytes("item_id,title\n1,Amélie\n2,Léon\n".encode("latin-1"))
    fails(
        ["generic", "--src", str(d / "inter.csv"), "--items", str(d / "items.csv")],
        capsys,
        tmp_path / "out",
        "items.csv:2",
        "not valid utf-8",
        "--encoding",
    )
    code, _, _ = run_cli(
        [
            "generic",
            "--src",
            str(d / "inter.csv"),
            "--items",
            str(d / "items.csv"),
            "--encoding",
            "latin-1",
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 0
    assert "Amélie" in Dataset.open(str(tmp_path / "o")).read_items()["title"].to_pylist()


def test_corrupt_parquet(tmp_path, capsys):
    d = tmp_path / "pq"
    d.mkdir()
    pd.DataFrame({"user_id": [1], "item_id": [1], "timestamp": [1], "rating": [4.0]}).to_parquet(d / "inter.parquet")
    data = (d / "inter.parquet").read_bytes()
    (d / "inter.parquet").write_bytes(data[: len(data) // 2])
    pd.DataFrame({"item_id": [1], "title": ["A"]}).to_csv(d / "items.csv", index=False)
    fails(
        ["generic", "--src", str(d / "inter.parquet"), "--items", str(d / "items.csv")],
        capsys,
        tmp_path / "out",
        "inter.parquet",
        "corrupt",
    )


def test_unreachable_s3_endpoint(capsys, monkeypatch):
    port = free_port()  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-never-printed")
    t0 = time.monotonic()
    code, _, err = run_cli(
        [
            "movielens",
            "--src",
            str(shared_path("data", "movielens-100k")),
            "--out",
            "s3://bucket/x",
            "--endpoint-url",
            f"http://127.0.0.1:{port}",
        ],
        capsys,
    )
    assert code != 0 and "s3://bucket/x" in err and "unreachable" in err and f"127.0.0.1:{port}" in err
    assert "secret-never-printed" not in err
    assert time.monotonic() - t0 < 60


def test_unauthorized_s3(tmp_path, capsys, monkeypatch):
    """A moto server that enforces auth (separate process), and keys it does not know."""
    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-never-printed")
        code, _, err = run_cli(
            [
                "movielens",
                "--src",
                str(shared_path("data", "movielens-100k")),
                "--out",
                "s3://private/ml",
                "--endpoint-url",
                f"http://127.0.0.1:{port}",
            ],
            capsys,
        )
        assert code != 0 and "s3://private/ml" in err
        assert any(w in err for w in ("access denied", "InvalidAccessKeyId", "Forbidden", "storage error")), err
        assert "secret-never-printed" not in err
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_port(port: int, timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_killed_ingest_leaves_no_complete_dataset(tmp_path):
    """SIGKILL at several points of a real ingest: the destination is either absent, or complete with a
    manifest; never a dataset that looks complete but is not. A rerun then succeeds."""
    rng = np.random.default_rng(0)
    n = 2_000_000
    pd.DataFrame(
        {
            "user_id": rng.integers(0, 50_000, n),
            "item_id": rng.integers(0, 1000, n),
            "timestamp": rng.integers(0, 10**9, n),
            "rating": rng.integers(1, 6, n).astype("float32"),
        }
    ).to_parquet(tmp_path / "inter.parquet")
    pd.DataFrame({"item_id": np.arange(1000), "title": [f"t{i}" for i in range(1000)]}).to_parquet(
        tmp_path / "items.parquet"
    )
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "recdata.ingest",
        "generic",
        "--src",
        str(tmp_path / "inter.parquet"),
        "--items",
        str(tmp_path / "items.parquet"),
        "--out",
        str(out),
        "--quiet",
        "--overwrite",
    ]
    for delay in (0.5, 1.5, 3.0):
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (out / "manifest.json").exists():
            assert (
                Dataset.open(str(out)).read_interactions(["user_id"]).num_rows
                == n - Dataset.open(str(out)).manifest["skipped"]["duplicates"]
            )
        else:
            with pytest.raises(Exception, match="no manifest.json"):
                Dataset.open(str(out))
    assert subprocess.run(cmd, cwd=REPO, capture_output=True).returncode == 0
    m = Dataset.open(str(out)).manifest
    assert m["num_interactions"] + m["skipped"]["duplicates"] == n
