"""The quality bench's row store (bench/quality.py): the full run outlives one machine, so finished rows are
committed without the dataset's labels and taken as they are by a later run; the labels come back from the rebuilt
samples and must be the ones the row was measured on."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_quality", REPO / "bench" / "quality.py")
quality = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = quality  # dataclasses resolve their annotations through the module's entry
spec.loader.exec_module(quality)


def finished_row(labels: list[int]) -> quality.Row:
    zero = {"sample_id": [3, 5, 9], "p_yes": [0.2, 0.6, 0.4], "teacher": [0.1, 0.8, 0.3], "label": labels}
    final = {"sample_id": [3, 5, 9], "p_yes": [0.1, 0.9, 0.7], "teacher": [0.1, 0.8, 0.3], "label": labels}
    return quality.Row(
        name="ctr-plain-n8",
        overrides=["trainer.train_subset=8"],
        evals={"valid": [], "test": [(0, zero), (2, final)]},
        metrics={"timing": {"worker_seconds": 10.0, "train_seconds": 4.0}, "steps": 2},
        batch_size=4,
        log=[{"step": 1, "gate_entropy": 2.77}, {"step": 2, "gate_entropy": 2.70}],
        wall=12.5,
        commit="abc1234",
        extra={"rep_norm": 2.1},
    )


def test_stored_row_leaves_labels_out_and_takes_back_only_the_same_ones():
    stored = json.loads(json.dumps(finished_row([0, 1, 1]).to_json()))
    assert all("label" not in rows for _, rows in stored["evals"]["test"])
    assert "[0, 1, 1]" not in json.dumps(stored["evals"])

    row = quality.Row.from_json(stored)
    zero, final = quality.eval_rows(row)
    assert zero["p_yes"] == [0.2, 0.6, 0.4] and final["p_yes"] == [0.1, 0.9, 0.7]
    assert quality.timing(row, 3)["train_samples"] == 8 and quality.gate_log(row)["entropy_last"] == 2.70
    row.restore("test", "label", [0.0, 1.0, 1.0])  # the samples' labels, as floats: the same values
    assert final["label"] == [0, 1, 1]

    other = quality.Row.from_json(stored)
    with pytest.raises(SystemExit, match="ctr-plain-n8: its test labels differ"):
        other.restore("test", "label", [1, 1, 1])


def test_evaluated_row_must_agree_with_the_samples():
    row = finished_row([0, 1, 1])
    row.restore("test", "label", [0, 1, 1])
    with pytest.raises(SystemExit, match="its test labels differ"):
        row.restore("test", "label", [0, 1, 0])


def test_runner_takes_a_stored_row_only_with_the_same_overrides(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "ctr-plain-n8.json").write_text(json.dumps(finished_row([0, 1, 1]).to_json()))
    runner = quality.Runner(tmp_path / "work", store=store)
    row = runner.run("ctr-plain-n8", "ml100k-reclora", ["trainer.train_subset=8"])
    assert row.commit == "abc1234" and row.wall == 12.5 and row.extra == {"rep_norm": 2.1}
    assert not (tmp_path / "work" / "runs").exists()  # nothing was trained

    # Other overrides: the row is trained again (here with a preset that does not exist, so the run fails fast)
    with pytest.raises(SystemExit, match="no-such-preset .* failed"):
        runner.run("ctr-plain-n8", "no-such-preset", ["trainer.train_subset=16"])
