"""`python -m recdata.convert llara-pickles`: LLaRA's published pandas pickles become the JSONL the ingester
reads, only with --trust-pickle; the ingester itself never unpickles."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from recdata.ingest import IngestOptions, ingest
from recdata.textfiles import IngestError
from tests.conftest import REPO, shared_path


def _convert(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "recdata.convert", "llara-pickles", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("name", ["llara-lastfm", "llara-movielens"])
def test_published_pickles_convert_to_the_published_jsonl(name, tmp_path):
    orig = shared_path("data", name, "orig")
    res = _convert("--src", str(orig), "--out", str(tmp_path / "out"), "--trust-pickle")
    assert res.returncode == 0, res.stderr
    assert "runs any code" in res.stderr  # the warning is printed every time
    written = sorted(p.name for p in (tmp_path / "out").glob("*.jsonl"))
    assert written, res.stdout
    for jsonl in written:
        # Byte for byte what ../shared holds (its JSONL files were converted from the same pickles).
        assert (tmp_path / "out" / jsonl).read_bytes() == (orig.parent / jsonl).read_bytes(), jsonl
    items = "id2name.txt" if name == "llara-lastfm" else "u.item"
    assert (tmp_path / "out" / items).read_bytes() == (orig / items).read_bytes()


class Payload:
    """A pickle that writes a file when it is loaded: what an untrusted pickle can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_without_trust_nothing_is_unpickled(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    marker = tmp_path / "marker"
    (src / "train_data.df").write_bytes(pickle.dumps(Payload(marker)))
    res = _convert("--src", str(src), "--out", str(tmp_path / "out"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("error: ") and "--trust-pickle" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "out").exists()
    # The ingester never loads pickles: it names the conversion command instead.
    with pytest.raises(IngestError, match=r"recdata\.convert llara-pickles .*--trust-pickle"):
        ingest("llara", str(src), str(tmp_path / "ds"), IngestOptions(task="next_item", progress=False))
    assert not marker.exists()


def test_converted_pickles_ingest(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    frame = pd.DataFrame({"seq": [[0, 3, 3], [0, 1, 3]], "len_seq": [1, 2], "next": [1, 2]})
    frame.to_pickle(src / "train_data.df")
    frame.iloc[:1].to_pickle(src / "Val_data.df")
    frame.iloc[1:].to_pickle(src / "Test_data.df")
    (src / "id2name.txt").write_text("0::Artist A\n1::Artist B\n2::Artist C\n")
    res = _convert("--src", str(src), "--out", str(tmp_path / "out"), "--trust-pickle")
    assert res.returncode == 0, res.stderr
    m = ingest("llara", str(tmp_path / "out"), str(tmp_path / "ds"), IngestOptions(task="next_item", progress=False))
    assert m["splits"]["train"]["rows"] == 2 and m["splits"]["test"]["rows"] == 1


def test_not_a_dataframe_is_named(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "Test_data.df").write_bytes(pickle.dumps([1, 2, 3]))
    res = _convert("--src", str(src), "--out", str(tmp_path / "out"), "--trust-pickle")
    assert res.returncode == 2 and "Test_data.df: holds a list, not a pandas DataFrame" in res.stderr
