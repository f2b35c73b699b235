"""`reclora`: every subcommand, `--help` with defaults, `config --print`, explicit options over --config, and
`--dry-run` folder names. No Ray and no training: each stage's work is replaced by a recorder."""

from __future__ import annotations

import json

import pytest
import yaml

from cluster import cli
from configs.loader import load_config
from recdata import storage
from recdata.layout import paths
from retrieval import build, embed_items
from teacher import score
from teacher import train as teacher_train
from teacher.model_io import META_FILE
from trainer import main as train_main


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert f"reclora {command}" in out, command
    assert {"train", "ingest", "convert", "embed", "samples", "teacher", "score", "predict", "export", "config"} <= set(
        cli.COMMANDS
    )
    assert cli.main(["no-such-command"]) == 2
    assert "choose from" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, shown",
    [
        (["train"], "(default: demo)"),
        (["ingest"], "(default: 8)"),  # --num-shards
        (["convert", "llara-pickles"], "(default: False)"),
        (["embed"], "(default: 1)"),  # --num-workers
        (["samples"], "(default: 10)"),  # --k-text
        (["teacher"], "default: the config's value"),
        (["score"], "(default: 4096)"),  # --batch-size
        (["config"], "(default: demo)"),
    ],
)
def test_help_shows_defaults(argv, shown, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert shown in out, out
    # Options without a help text show their default too (ingest's --user-col had none).
    if argv == ["ingest"]:
        assert "(default: user_id)" in out and "(default: None)" not in out.split("--src")[1].split("--task")[0]


def test_config_print_is_the_resolved_yaml_with_overrides_and_defaults(capsys):
    assert cli.main(["config", "--config", "tiny", "--print", "trainer.lr=5e-4", "teacher.epochs=4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = load_config("tiny", ["trainer.lr=5e-4", "teacher.epochs=4"]).model_dump(mode="json")
    assert printed == expected
    assert printed["trainer"]["lr"] == 5e-4 and printed["teacher"]["epochs"] == 4
    assert printed["run"]["name"] == "tiny" and "stage_device" in printed["run"]  # a default tiny never sets
    assert cli.main(["config", "--config", "tiny", "teacher.epochs=x"]) == 2
    assert "teacher.epochs" in capsys.readouterr().err


def test_convert_is_a_subcommand(tmp_path, capsys):
    assert cli.main(["convert", "llara-pickles", "--src", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err


# --------------------------------------------------------------------------- explicit options over --config
def _cfg(tmp_path, *over):
    return [f"run.output_dir={tmp_path}", *over]


def test_teacher_epochs_flag_overrides_the_config(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_train(samples, out, cfg, **kw):
        seen.update(samples=samples, out=out, cfg=cfg)
        return {"valid": {}, "best_epoch": 1, "train_workers": 1}

    monkeypatch.setattr(teacher_train, "train_teacher", fake_train)
    over = _cfg(tmp_path)
    p3 = paths(load_config("tiny", [*over, "teacher.epochs=3"]))
    storage.write_json_atomic(storage.join(p3.samples, "manifest.json"), {})
    assert teacher_train.main(["--config", "tiny", *over, "--epochs", "3", "--lr", "0.01"]) == 0, capsys.readouterr()
    assert seen["cfg"].epochs == 3 and seen["cfg"].lr == 0.01 and load_config("tiny").teacher.epochs == 1
    # The teacher's folder is addressed by what it learns: the flag moves it, as teacher.epochs=3 would.
    assert seen["out"] == paths(load_config("tiny", [*over, "teacher.epochs=3", "teacher.lr=0.01"])).teacher
    assert json.loads(capsys.readouterr().out)["out"] == seen["out"]
    # --mlp-hidden keeps DIN's representation size consistent, as it does without --config.
    assert teacher_train.main(["--config", "tiny", *over, "--mlp-hidden", "48,24"]) == 0, capsys.readouterr().err
    assert seen["cfg"].mlp_hidden == [48, 24] and seen["cfg"].rep_dim == 24 and seen["cfg"].epochs == 1


def test_samples_flags_override_the_config(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_build(dataset, out, opts, num_workers, embeddings, overwrite=False, runner=None):
        seen.update(dataset=dataset, out=out, opts=opts, workers=num_workers)
        return {"splits": {}, "counts": {}}

    monkeypatch.setattr(build, "build_samples", fake_build)
    over = _cfg(tmp_path)
    argv = ["--config", "tiny", *over, "--mode", "recent", "--k-text", "5", "--num-workers", "1", "--chunk-rows", "99"]
    assert build.main(argv) == 0, capsys.readouterr().err
    opts = seen["opts"]
    assert (opts.text_mode, opts.k_text, opts.chunk_rows, seen["workers"]) == ("recent", 5, 99, 1)
    assert opts.k_id == load_config("tiny").retrieval.k_id  # not given: the config's
    cfg = load_config("tiny", [*over, "retrieval.text_mode=recent", "retrieval.k_text=5"])
    assert seen["out"] == paths(cfg).samples and seen["dataset"] == paths(cfg).dataset


def test_score_num_actors_flag_overrides_the_config(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_score(model, samples, out, num_actors, splits, batch_size, cpus, gpu, rep_dim, runner=None):
        seen.update(model=model, num_actors=num_actors, rep_dim=rep_dim, batch_size=batch_size)
        return {
            k: 0
            for k in ("rep_dim", "splits", "shards_total", "shards_skipped", "rows_scored", "seconds", "samples_per_s")
        }

    monkeypatch.setattr(score, "score_samples", fake_score)
    over = _cfg(tmp_path)
    p = paths(load_config("tiny", over))
    storage.write_json_atomic(storage.join(p.teacher, META_FILE), {})
    assert score.main(["--config", "tiny", *over, "--num-actors", "1", "--batch-size", "64"]) == 0, capsys.readouterr()
    assert (seen["num_actors"], seen["batch_size"], seen["model"]) == (1, 64, p.teacher)
    assert load_config("tiny").teacher.num_workers == 2 and seen["rep_dim"] == 32
    assert score.main(["--config", "tiny", *over]) == 0
    assert seen["num_actors"] == 2


def test_embed_flags_override_the_config(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_embed(dataset, model, out, opts, num_workers, gpus_per_worker=0.0, runner=None, model_cfg=None):
        seen.update(opts=opts, workers=num_workers, out=out)
        folder = storage.join(out, "k")
        storage.write_json_atomic(storage.join(folder, "meta.json"), {})
        return folder

    monkeypatch.setattr(embed_items, "embed_items", fake_embed)
    over = _cfg(tmp_path, "retrieval.missing_text=placeholder")
    argv = ["--config", "tiny", *over, "--model", str(tmp_path), "--pca-dims", "8", "--num-workers", "1"]
    assert embed_items.main(argv) == 0, capsys.readouterr().err
    opts = seen["opts"]
    assert (opts.pca_dims, seen["workers"], opts.domain) == (8, 1, "movie")
    assert opts.missing_text == "placeholder"  # from the config now (was the option's default "error")
    assert embed_items.main([*argv, "--missing-text", "error"]) == 0
    assert seen["opts"].missing_text == "error"


# ------------------------------------------------------------------------------------------------ dry run
def test_dry_run_names_folders_after_the_runs_own_dataset(tmp_path, capsys):
    other = [
        "data.src=../shared/data/llara-lastfm",
        "data.format=llara",
        "data.task=next_item",
        "data.split=given",
        "teacher.model=sasrec",
        "teacher.rep_dim=16",
    ]
    assert train_main.main(["--config", "tiny", f"run.output_dir={tmp_path}", *other, "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "datasets/llara-lastfm-next/" in plan and "samples/llara-lastfm-next/" in plan, plan
    assert "teachers/llara-lastfm-next-sasrec/" in plan and "ml-100k" not in plan, plan
    # The demo's own data keeps its name; a dataset_url the config names is used as given.
    assert train_main.main(["--config", "tiny", f"run.output_dir={tmp_path}", "--dry-run"]) == 0
    assert "samples/ml-100k-ctr/" in capsys.readouterr().out
    named = [f"run.output_dir={tmp_path}", *other, "data.dataset_url=datasets/lastfm"]
    assert train_main.main(["--config", "tiny", *named, "--dry-run"]) == 0
    assert "samples/lastfm/" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ worker console set-up
def test_worker_logging_keeps_one_console_handler_and_silences_ray_train_reports():
    import logging

    import ray.train.v2._internal.execution.context as ray_context
    from ray._private.log import PlainRayHandler

    from cluster.runtime import ray_env, setup_worker_logging

    root = logging.getLogger()
    ray_console = PlainRayHandler()
    root.addHandler(ray_console)  # what Ray Train's worker logging config installs on the root logger
    try:
        setup_worker_logging(rank=1)
        assert ray_console not in root.handlers
        ours = [h for h in root.handlers if getattr(h, "reclora", False)]
        assert len(ours) == 1
        # Ray Train's context logger is named after its file, not its module.
        assert logging.getLogger(ray_context.__file__).getEffectiveLevel() == logging.WARNING
    finally:
        root.removeHandler(ray_console)
        root.handlers = [h for h in root.handlers if not getattr(h, "reclora", False)]
    env = ray_env()
    assert env["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0" and env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
