"""The final table's AUC intervals come from the per-sample evaluation files, named by step
({run}/eval/{split}-{step}.json), so a resumed run's evaluations sit beside those of the run it resumed."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.pipeline import auc_intervals
from recdata import storage
from recdata.metrics import auc
from trainer.evaluate import eval_files


def _write(run_url: str, name: str, labels, p_yes, teacher) -> float:
    value = auc(np.asarray(labels), np.asarray(p_yes))
    rows = {"metrics": {"auc": value}, "label": labels, "p_yes": p_yes, "teacher": teacher}
    storage.write_json_atomic(storage.join(run_url, "eval", name), rows)
    return value


@pytest.mark.parametrize("where", ["local", "s3"])
def test_eval_files_by_step_and_intervals_per_row(where, tmp_path, request):
    root = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    run_url = storage.join(root, "run")
    assert eval_files(run_url, "test") == []  # no evaluation yet: no files, no error
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 64).tolist()
    noise = rng.random(64)
    zero = _write(run_url, "test-0.json", labels, noise.tolist(), [0.5] * 64)
    trained = _write(run_url, "test-64.json", labels, (0.5 * noise + 0.5 * np.asarray(labels)).tolist(), labels)
    _write(run_url, "valid-64.json", labels, noise.tolist(), labels)
    # Step order, not name order (test-64 sorts before test-8 as text), and only this split's files.
    _write(run_url, "test-8.json", labels, noise.tolist(), labels)
    files = eval_files(run_url, "test")
    assert [step for step, _ in files] == [0, 8, 64]
    assert [f["metrics"]["auc"] for _, f in files] == [zero, auc(np.asarray(labels), noise), trained]
    out = auc_intervals(run_url, {"zeroshot_test_auc": zero, "test_auc": trained}, {"test_auc": 1.0}, n_boot=50)
    assert set(out) == {"zero-shot LLM", "trained LLM", "teacher"}
    low, high = out["trained LLM"]
    assert 0.5 < low <= trained <= high <= 1.0  # the trained row's interval is its own file's, not the zero-shot's
    assert out["teacher"] == (1.0, 1.0)
