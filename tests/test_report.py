"""The run report's gate section: entropy against ln N (uniform gates) and the padding fraction."""

from __future__ import annotations

import json
import math

from trainer.report import write_report


def test_gate_plot_and_text_name_the_uniform_entropy(tmp_path):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    history = [
        {
            "step": s,
            "loss": 1.0 / s,
            "tokens_per_s": 100.0,
            "samples_per_s": 2.0,
            "data_wait_fraction": 0.01,
            "padding_fraction": 0.125,
            "gate_entropy": math.log(4) - 0.01 * s,
            "gate_spread": 0.01 * s,
            **{f"expert_load_{i}": 0.25 for i in range(4)},
        }
        for s in (1, 2, 3)
    ]
    (run / "logs" / "train.jsonl.json").write_text(json.dumps(history))
    text = open(write_report(str(run))).read()
    assert "ln 4 = 1.3863" in text and "1.3763 -> 1.3563" in text
    assert "gate spread 0.0100 -> 0.0300" in text
    assert "padding 12.5% of tokens" in text
    assert (run / "gate_usage.png").stat().st_size > 0
