"""Where the work runs (#12): the placement decision from the Ray cluster's resources (never the driver's own
device), the refusal of a >1B-parameter model in float32 on CPU, and the pipeline running embed and the
teacher on Ray workers (processes other than the driver) on a real local Ray."""

from __future__ import annotations

import json
import logging
import os

import pytest

from cluster.launch import node_cpu_share
from cluster.pipeline import Pipeline, StageError
from cluster.placement import (
    LARGE_MODEL_PARAMS,
    PlacementError,
    estimate_params,
    model_params,
    place_embed,
    place_stage,
    refuse_large_on_cpu,
)
from configs.loader import load_config
from recdata.synthetic import preference_dataset
from tests.conftest import REPO

# lmsys/vicuna-7b-v1.5's config.json (the sizes only): 6.74B parameters.
VICUNA_7B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}


# ------------------------------------------------------------------------------------------------ decision
def test_head_without_gpu_does_not_decide_for_gpu_workers():
    """KubeRay: the driver (head pod) has no GPU, the cluster has 16: embed gets GPU actors in bf16."""
    p = place_stage("embed", {"CPU": 200.0, "GPU": 16.0}, workers=16, dtype="bfloat16")
    assert (p.use_gpu, p.num_workers, p.gpus_per_worker, p.dtype) == (True, 16, 1.0, "bfloat16")
    # More actors than GPUs would only wait for a GPU: one per GPU.
    assert place_stage("embed", {"GPU": 2.0}, workers=16, dtype="bfloat16").num_workers == 2
    # The teacher: Ray Train workers with a GPU each.
    t = place_stage("teacher", {"GPU": 16.0}, workers=1, dtype="bfloat16")
    assert (t.use_gpu, t.num_workers, t.gpus_per_worker) == (True, 1, 1.0)


def test_cpu_cluster_runs_float32_and_overrides_apply():
    p = place_stage("embed", {"CPU": 2.0}, workers=2, dtype="bfloat16")
    assert (p.use_gpu, p.num_workers, p.gpus_per_worker, p.dtype) == (False, 2, 0.0, "float32")
    assert place_stage("embed", {"GPU": 0.0}, workers=0).num_workers == 1
    # cpu: never a GPU; cuda: GPU actors although none has joined yet (GPU groups autoscaling from zero).
    assert not place_stage("embed", {"GPU": 8.0}, device="cpu", dtype="bfloat16").use_gpu
    forced = place_stage("embed", {}, device="cuda", workers=4, dtype="bfloat16")
    assert (forced.use_gpu, forced.num_workers, forced.dtype) == (True, 4, "bfloat16")
    with pytest.raises(ValueError):
        place_stage("embed", {}, device="gpu")


def test_parameter_estimate_from_config_only(tmp_path):
    assert abs(estimate_params(VICUNA_7B) - 6.74e9) < 0.05e9
    small = json.loads((REPO / "recdata" / "assets" / "smollm2-135m-instruct" / "config.json").read_text())
    assert 0.1e9 < estimate_params(small) < 0.2e9 < LARGE_MODEL_PARAMS
    assert estimate_params({"model_type": "unknown"}) is None
    assert estimate_params({"text_config": VICUNA_7B}) == estimate_params(VICUNA_7B)
    (tmp_path / "config.json").write_text(json.dumps(VICUNA_7B))
    assert model_params(str(tmp_path)) == estimate_params(VICUNA_7B) and model_params(str(tmp_path / "x")) is None


def test_large_model_in_float32_on_cpu_is_refused_in_one_line():
    cpu = place_stage("embed", {}, workers=2, dtype="bfloat16")
    with pytest.raises(PlacementError) as e:
        refuse_large_on_cpu(cpu, 6_740_000_000, "lmsys/vicuna-7b-v1.5", "the Ray cluster has 0 GPUs", "use GPUs")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("embed stage: lmsys/vicuna-7b-v1.5 has ~6.7B parameters")
    assert "float32 on CPU" in msg and "run.allow_large_on_cpu=true" in msg
    refuse_large_on_cpu(cpu, 135_000_000, "small", "", "")  # small: fine on CPU
    refuse_large_on_cpu(cpu, None, "unknown sizes", "", "")
    gpu = place_stage("embed", {"GPU": 1.0}, dtype="bfloat16")
    refuse_large_on_cpu(gpu, 6_740_000_000, "big", "", "")  # on a GPU: fine


@pytest.fixture
def big_model(monkeypatch):
    """A 7B base model as far as the guard can tell (no 13 GB download in a test)."""
    for module in ("cluster.pipeline", "cluster.placement"):
        monkeypatch.setattr(f"{module}.base_model_params", lambda *a, **k: estimate_params(VICUNA_7B))


def test_7b_preset_refuses_cpu_before_any_stage_runs(big_model, tmp_path):
    out = f"run.output_dir={tmp_path}"
    pipe = Pipeline.setup(load_config("ml1m-reclora-7b", [out]), ["embed"])
    pipe.placements["embed"] = place_stage("embed", {"CPU": 16.0}, workers=16, dtype="bfloat16")  # no GPUs
    with pytest.raises(StageError) as e:
        pipe.run()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("embed stage: lmsys/vicuna-7b-v1.5 has ~6.7B parameters")
    assert "the Ray cluster has 0 GPUs" in msg and "run.stage_device=cuda" in msg
    assert not list(tmp_path.glob("embeddings/*/*"))  # nothing ran

    pipe = Pipeline.setup(load_config("ml1m-reclora-7b", [out, "trainer.use_gpu=false"]), ["train"])
    with pytest.raises(StageError, match=r"^train stage: .*\(trainer.use_gpu=false\); set trainer.use_gpu=true"):
        pipe.preflight()
    # The explicit opt-out, and a GPU cluster, both let it through.
    pipe = Pipeline.setup(load_config("ml1m-reclora-7b", [out, "run.allow_large_on_cpu=true"]), ["embed"])
    pipe.placements["embed"] = place_stage("embed", {}, dtype="bfloat16")
    pipe.preflight()
    pipe = Pipeline.setup(load_config("ml1m-reclora-7b", [out]), ["embed"])
    pipe.placements["embed"] = place_stage("embed", {"GPU": 16.0}, workers=16, dtype="bfloat16")
    pipe.preflight()


@pytest.mark.slow  # a real local Ray
def test_reclora_embed_asks_the_cluster_and_refuses_7b_on_cpu(big_model, ray_local, tmp_path, capsys):
    from cluster.pool import run_sharded
    from retrieval.embed_items import main as embed_main

    (tmp_path / "m").mkdir()
    argv = ["--dataset", str(tmp_path / "ds"), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "e")]
    assert embed_main(argv, runner=run_sharded, place=place_embed) == 2
    err = capsys.readouterr().err
    assert "INFO [rank 0] cluster.placement: [embed] on 1 CPU worker(s), float32 (cluster GPUs: 0)" in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1]
    assert errors[0].startswith("error: embed stage: ") and "~6.7B parameters" in errors[0]


@pytest.mark.slow  # a real local Ray; ingest + embed + samples + a Ray Train teacher: ~1-2 min on 2 cores
def test_pipeline_embeds_and_trains_the_teacher_on_ray_workers(ray_local, tmp_path, monkeypatch, caplog):
    """With retrieval.num_workers=1 and teacher.train_workers=1 (the cases that used to run in the driver),
    embed runs on a Ray actor and the teacher on a Ray Train worker: other processes than this driver."""
    src = preference_dataset(tmp_path / "src")
    reports = tmp_path / "where"
    monkeypatch.setenv("RECLORA_NODE_REPORT_DIR", str(reports))
    cfg = load_config(
        "tiny",
        [
            "data.format=generic",
            f"data.src={src / 'inter.csv'}",
            f"data.items={src / 'items.csv'}",
            f"run.output_dir={tmp_path / 'runs'}",
            "retrieval.num_workers=1",
        ],
    )
    pipe = Pipeline.setup(cfg, ["ingest", "embed", "samples", "teacher"])
    caplog.set_level(logging.INFO, logger="cluster.pipeline")
    pipe.run()
    assert "[embed] on 1 CPU worker(s), float32 (cluster GPUs: 0)" in caplog.text  # status lines: log records
    assert "[teacher] on 1 CPU worker(s)" in caplog.text

    embed = [json.loads(p.read_text()) for p in (reports / "actors").glob("actor-embed-items-*.json")]
    assert len(embed) == 1 and embed[0]["pid"] != os.getpid() and embed[0]["gpu_ids"] == []
    meta = json.loads(next((tmp_path / "runs" / "embeddings").glob("*/*/meta.json")).read_text())
    assert meta["devices"] == ["cpu"] and meta["options"]["dtype"] == "float32"
    teacher = json.loads((reports / "teacher" / "rank-0.json").read_text())
    assert teacher["pid"] != os.getpid() and teacher["pid"] != embed[0]["pid"]
    assert os.path.exists(os.path.join(pipe.paths.teacher, "teacher.json"))


@pytest.mark.slow  # a real local Ray Train run
def test_one_worker_hands_back_an_actionable_error_without_restarts(ray_local, tmp_path, capfd):
    """A RecloraError on the only Ray Train worker (the teacher's default) comes back to the driver as itself,
    after one attempt, with no worker traceback forwarded to the driver's terminal."""
    from cluster.launch import run_training
    from configs.loader import ConfigError

    def refuse(params, rank, world, report):
        with open(os.path.join(params["dir"], f"attempt-{os.getpid()}"), "w"):
            pass
        raise ConfigError("teacher.lr: expected > 0, got -1")

    with pytest.raises(ConfigError, match=r"^teacher.lr: expected > 0, got -1$"):
        run_training(
            refuse,
            {"dir": str(tmp_path)},
            num_workers=1,
            use_gpu=False,
            cpus_per_worker=1,
            name="refuse",
            max_failures=2,
        )
    assert len(list(tmp_path.glob("attempt-*"))) == 1
    assert "ConfigError" not in capfd.readouterr().err


def test_training_workers_share_their_node_cpus(ray_local):
    """A worker's threads: its node's CPUs as Ray counts them (2 here) over the node's training workers, capped by
    the machine's cores; one worker on a 2-core laptop gets both (1 CPU per worker used to leave one idle)."""
    cores = len(os.sched_getaffinity(0))
    assert node_cpu_share(1) == max(1, min(2, cores))
    assert node_cpu_share(2) == 1
    assert node_cpu_share(3) == 1  # never 0
