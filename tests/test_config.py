"""Typed configuration: presets load, bad keys/values fail before any work with the key path named."""

from __future__ import annotations

import subprocess
import sys

import pytest

from configs.loader import (
    ConfigError,
    available_presets,
    load_config,
    to_yaml,
    validate,
)
from tests.conftest import REPO
from trainer.main import parse_args

PRESETS = {"tiny", "demo", "ml100k-reclora", "lastfm-ilora", "ml1m-reclora-7b", "lastfm-ilora-7b"}


def test_all_presets_exist_and_validate():
    assert PRESETS <= set(available_presets())
    for name in PRESETS:
        cfg = load_config(name)
        assert cfg.run.name


def test_paper_defaults_in_cluster_presets():
    rec = load_config("ml1m-reclora-7b").trainer.lora
    assert (rec.mode, rec.target_modules, rec.r, rec.alpha, rec.num_experts, rec.temperature) == (
        "reclora",
        ["q_proj", "v_proj"],
        8,
        16,
        16,
        5.0,
    )
    c = load_config("ml1m-reclora-7b")
    assert (c.retrieval.k_text, c.retrieval.k_id, c.trainer.lr, c.trainer.batch_size) == (10, 60, 1e-3, 256)
    il = load_config("lastfm-ilora-7b")
    assert il.trainer.lora.mode == "ilora" and len(il.trainer.lora.target_modules) == 7
    assert (il.trainer.lora.r, il.trainer.lora.num_experts, il.trainer.lora.alpha, il.trainer.lora.dropout) == (
        8,
        4,
        32,
        0.1,
    )
    assert il.retrieval.num_candidates == 20 and il.trainer.lora.gate_lr_mult == 0.3


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.lora.num_experts=x", "trainer.lora.num_experts: expected int >= 1, got 'x'"),
        ("trainer.lora.num_experts=0", "trainer.lora.num_experts: expected int >= 1, got 0"),
        ("trainer.lora.num_exprts=4", "trainer.lora.num_exprts: unknown key (did you mean 'num_experts'?)"),
        ("data.task=rank", "data.task: expected one of 'ctr' or 'next_item', got 'rank'"),
        ("trainer.lora.dropout=1.5", "trainer.lora.dropout: expected float >= 0 < 1, got 1.5"),
        ("bogus.key=1", "bogus: unknown key"),
        ("trainer.lora=3", "trainer.lora: expected"),
        ("trainer.batch_size=7", "trainer.batch_size: 7 is not divisible"),
        ("teacher.rep_dim=5", "teacher.rep_dim: DIN's representation"),
    ],
)
def test_override_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert message in str(e.value)


def test_ilora_rank_must_split_evenly():
    with pytest.raises(ConfigError, match=r"trainer.lora.r: iLoRA splits rank r=6 into num_experts=4"):
        load_config("lastfm-ilora", ["trainer.lora.r=6"])


def test_overrides_apply_and_roundtrip():
    cfg = load_config("tiny", ["trainer.lr=0.01", "trainer.lora.target_modules=[q_proj,k_proj]", "run.name=x1"])
    assert cfg.trainer.lr == 0.01 and cfg.trainer.lora.target_modules == ["q_proj", "k_proj"] and cfg.run.name == "x1"
    import yaml

    assert validate(yaml.safe_load(to_yaml(cfg))) == cfg


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available:"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    cyc = tmp_path / "cyc.yaml"
    cyc.write_text(f"extends: {cyc}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(cyc))


def test_cli_reports_config_error_before_work():
    proc = subprocess.run(
        [sys.executable, "trainer/main.py", "--config", "configs/tiny.yaml", "trainer.lora.num_experts=x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "trainer.lora.num_experts: expected int >= 1, got 'x'" in proc.stderr


def test_main_accepts_overrides_before_and_after_options():

    a = parse_args(["--config", "tiny", "trainer.lr=0.1", "--stages", "train", "trainer.max_steps=2", "--dry-run"])
    assert a.overrides == ["trainer.lr=0.1", "trainer.max_steps=2"] and a.stages == "train" and a.dry_run


def test_eval_splits_are_checked_at_load():
    assert load_config("tiny", ["trainer.eval_splits=[test]"]).trainer.eval_splits == ["test"]
    with pytest.raises(ConfigError, match="eval_splits"):
        load_config("tiny", ["trainer.eval_splits=[test,test]"])
    with pytest.raises(ConfigError, match="eval_every"):
        load_config("tiny", ["trainer.eval_splits=[test]", "trainer.eval_every=4"])
    with pytest.raises(ConfigError, match="eval_splits"):
        load_config("tiny", ["trainer.eval_splits=[train]"])
