"""The trainer on real parts: Ray Train workers, DeepSpeed ZeRO-3 on CPU (gloo), Parquet inputs, storage
checkpoints (local and the moto S3 server), SIGKILL of a worker, resume, and bad inputs."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest_lora_helpers import tiny_llama
from safetensors.torch import load_file

from cluster.launch import run_training
from configs.loader import ConfigError, load_config
from configs.schema import TrainerConfig
from recdata import storage
from recdata.ingest import IngestOptions, ingest
from recdata.samples import BuildOptions
from recdata.streams import Schedule
from recdata.synthetic import preference_dataset
from retrieval.build import build_samples
from teacher.config import TeacherConfig
from teacher.score import RepsError, score_samples
from teacher.train import train_teacher
from trainer import engine as eng
from trainer.checkpoint import CheckpointError, check_compatible, latest_complete
from trainer.evaluate import all_gather_rows, all_reduce_sum
from trainer.hybrid import HybridLM, use_hybrid
from trainer.loop import fingerprint_parts, train_worker
from trainer.lora import MixtureLoraConfig, build_personalized_model
from trainer.prepare import plan_training, prepare

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _synthetic_source(root: Path) -> Path:

    return preference_dataset(root)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Dataset -> samples -> teacher -> representations, built once with the project's own stages."""

    root = tmp_path_factory.mktemp("trainer")
    src = _synthetic_source(root)
    ds, sm, tm, rp = (str(root / x) for x in ("dataset", "samples", "teacher", "reps"))
    ingest(
        "generic", str(src / "inter.csv"), ds, IngestOptions(num_shards=2, progress=False), items=str(src / "items.csv")
    )
    build_samples(
        ds, sm, BuildOptions(k_text=5, k_id=10, text_mode="recent", min_history=1, max_eval_samples=32), num_workers=1
    )
    train_teacher(
        sm,
        tm,
        TeacherConfig(model="din", embed_dim=8, mlp_hidden=[32, 16], rep_dim=16, epochs=1, max_hist=10),
        dataset_url=ds,
        progress=False,
    )
    score_samples(tm, sm, rp, num_actors=0, expected_rep_dim=16)
    return {"root": root, "dataset": ds, "samples": sm, "reps": rp}


def tiny_cfg(inputs, out: str, name: str, *extra: str):
    return load_config(
        "tiny",
        [
            f"run.output_dir={out}",
            f"run.name={name}",
            f"data.dataset_url={inputs['dataset']}",
            f"retrieval.samples_url={inputs['samples']}",
            f"teacher.reps_url={inputs['reps']}",
            "teacher.mlp_hidden=[32,16]",
            "teacher.rep_dim=16",
            "trainer.lr=0.02",
            "trainer.batch_size=8",
            "trainer.micro_batch_size=2",
            "trainer.num_workers=2",
            "trainer.train_subset=96",
            "trainer.epochs=1",
            "trainer.checkpoint_every=4",
            "trainer.max_steps=8",
            "trainer.max_failures=1",
            "retrieval.max_eval_samples=32",
            "model.max_length=192",
            "trainer.eval_every=4",
            *extra,
        ],
    )


def run_train(cfg, node_report_dir: str | None = None, **params_extra) -> dict:

    run_url = storage.join(cfg.run.output_dir, cfg.run.name)
    params = prepare(cfg, run_url)
    params.update(params_extra)
    t = cfg.trainer
    run_training(
        train_worker,
        params,
        num_workers=t.num_workers,
        use_gpu=False,
        cpus_per_worker=1,
        name=f"{cfg.run.name}-{time.time_ns()}",
        max_failures=t.max_failures,
        placement=t.placement,
        worker_resources=t.worker_resources,
        node_report_dir=node_report_dir,
    )
    return {
        "metrics": storage.read_json(storage.join(run_url, "metrics.json")),
        "history": storage.read_json(storage.join(run_url, "logs", "train.jsonl.json")),
        "run_url": run_url,
    }


def adapter_tensors(run_url: str) -> dict[str, torch.Tensor]:

    url = latest_complete(run_url)
    fs, path = storage.get_fs(url)
    out = {}
    for f in fs.ls(path, detail=False):
        if f.endswith(".safetensors"):
            local = Path(f) if storage.is_local(url) else None
            if local is None:
                import tempfile

                local = Path(tempfile.mkdtemp()) / "t.safetensors"
                fs.get(f, str(local))
            out.update(load_file(str(local)))
    return out


@pytest.fixture(scope="module")
def baseline(inputs):
    """An uninterrupted 2-worker ZeRO-3 run: the reference for loss, metrics and resume."""
    return run_train(tiny_cfg(inputs, str(inputs["root"] / "runs"), "base"))


def test_two_workers_zero3_ctr_trains_and_evaluates(baseline):
    losses = [h["loss"] for h in baseline["history"]]
    assert len(losses) == 8
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses
    final = baseline["metrics"]["final"]
    for key in ("valid_auc", "valid_logloss", "test_auc", "test_logloss"):
        assert np.isfinite(final[key]), key
    assert final["valid_n"] == 32
    assert "valid_auc" in baseline["history"][3]  # evaluated during training (eval_every=4)
    rec = baseline["history"][-1]
    for key in (
        "tokens_per_s",
        "samples_per_s",
        "data_wait_fraction",
        "grad_norm",
        "lr",
        "gate_entropy",
        "expert_load_0",
    ):
        assert key in rec
    run = Path(baseline["run_url"])
    assert (run / "adapter" / "gates.safetensors").exists() and any((run / "tensorboard").iterdir())
    # Checkpoints hold trainable tensors only, never the frozen base.
    ck = adapter_tensors(baseline["run_url"])
    assert ck and all(("lora_" in k or k.startswith("gates.")) for k in ck)


def test_sigkill_worker_resumes_to_identical_adapter(inputs, baseline, tmp_path):
    cfg = tiny_cfg(inputs, str(tmp_path), "killed")
    out = run_train(cfg, fail_at={"step": 6, "rank": 1, "marker": str(tmp_path / "killed.marker")}, eval_zero_shot=True)
    assert (tmp_path / "killed.marker").exists(), "the worker was not killed"
    # The zero-shot score, measured before step 1, survives the resume (carried by the checkpoints).
    assert np.isfinite(out["metrics"]["final"]["zeroshot_test_auc"])
    # Per-sample evaluation files are named by step: the resumed run's final evaluations (step 8) sit beside the
    # zero-shot one (step 0) and the killed run's validation at step 4, and overwrite none of them.
    ev = Path(out["run_url"]) / "eval"
    assert sorted(p.name for p in ev.glob("*.json")) == ["test-0.json", "test-8.json", "valid-4.json", "valid-8.json"]
    zero = json.loads((ev / "test-0.json").read_text())["metrics"]
    assert zero["auc"] == out["metrics"]["final"]["zeroshot_test_auc"]
    assert json.loads((ev / "test-8.json").read_text())["metrics"]["auc"] == out["metrics"]["final"]["test_auc"]
    base = {h["step"]: h["loss"] for h in baseline["history"]}
    mine = {h["step"]: h["loss"] for h in out["history"]}
    assert sorted(mine) == list(range(1, 9))
    for s in range(5, 9):  # after the resume point (checkpoint at step 4)
        assert abs(mine[s] - base[s]) <= 1e-6, (s, mine[s], base[s])
    a, b = adapter_tensors(baseline["run_url"]), adapter_tensors(out["run_url"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_on_fewer_workers(inputs, baseline, tmp_path):
    """A 2-worker checkpoint resumes on 1 worker (every tensor is stored whole)."""
    ck = storage.join(baseline["run_url"], "checkpoints", "step-00000004")
    cfg = tiny_cfg(inputs, str(tmp_path), "one", "trainer.num_workers=1", f"trainer.resume={ck}")
    out = run_train(cfg)
    steps = [h["step"] for h in out["history"]]
    assert steps == [5, 6, 7, 8]
    base = {h["step"]: h["loss"] for h in baseline["history"]}
    # Same global batches for any worker count; only the reduction order differs.
    assert abs(out["history"][0]["loss"] - base[5]) < 1e-4


def test_incompatible_resume_is_refused(inputs, baseline):

    cfg = tiny_cfg(inputs, str(inputs["root"] / "runs"), "base", "trainer.lora.r=8", "trainer.lora.alpha=16")
    with pytest.raises(CheckpointError, match=r"lora"):
        check_compatible(latest_complete(baseline["run_url"]), fingerprint_parts(cfg))
    # A changed learning rate or step count is allowed.
    ok = tiny_cfg(inputs, str(inputs["root"] / "runs"), "base", "trainer.lr=0.001", "trainer.max_steps=12")
    check_compatible(latest_complete(baseline["run_url"]), fingerprint_parts(ok))


def test_checkpoints_on_s3(inputs, s3_bucket, s3_server):
    import ray

    ray.shutdown()  # workers must start with the S3 endpoint and keys of this test's environment
    cfg = tiny_cfg(inputs, f"{s3_bucket}/runs", "s3run", "trainer.max_steps=4", "trainer.checkpoint_every=2")
    out = run_train(cfg)
    fs, _ = storage.get_fs(s3_bucket)
    bucket = s3_bucket.removeprefix("s3://")
    names = [p.rsplit("/", 1)[-1] for p in fs.find(f"{bucket}/runs/s3run/checkpoints")]
    assert (
        "COMPLETE" in names
        and "rank-00000-of-00002.safetensors" in names
        and "rank-00001-of-00002.safetensors" in names
    )
    assert len(out["history"]) == 4
    # This Ray (started with the session's environment, S3 settings included) stays for the next test that needs one.


def test_missing_representation_is_a_clear_error(inputs, tmp_path):

    reps = tmp_path / "reps"
    shutil.copytree(inputs["reps"], reps)
    victim = sorted((reps / "train").glob("*.parquet"))[0]
    import pyarrow.parquet as pq

    t = pq.read_table(victim)
    pq.write_table(t.slice(1), victim)  # drop one sample's representation
    cfg = tiny_cfg(inputs, str(tmp_path), "norep", f"teacher.reps_url={reps}", "trainer.train_subset=null")
    with pytest.raises((RepsError, Exception), match=r"no representation for sample_id \d+"):
        prepare(cfg, str(tmp_path / "norep"))


def test_prompts_longer_than_max_length_are_counted(inputs, tmp_path):

    cfg = tiny_cfg(inputs, str(tmp_path), "short", "model.max_length=150")
    params = prepare(cfg, str(tmp_path / "short"))
    s = params["summaries"]["train"]
    assert s["history_truncated"] > 0 or s["prompt_truncated"] > 0
    assert s["max_len"] <= 150
    assert s["rows"] == 96  # nothing dropped: the stream's size is fixed before it is built


def test_rep_size_mismatch_is_refused_at_load():

    with pytest.raises(ConfigError, match="teacher.rep_dim"):
        load_config("tiny", ["teacher.rep_dim=7"])


@pytest.fixture(scope="module")
def next_item_inputs(tmp_path_factory):
    """Next-item data (leave-last-out, fixed 20-candidate lists) and a SASRec teacher."""

    root = tmp_path_factory.mktemp("trainer-next")
    src = _synthetic_source(root)
    ds, sm, tm, rp = (str(root / x) for x in ("dataset", "samples", "teacher", "reps"))
    ingest(
        "generic",
        str(src / "inter.csv"),
        ds,
        IngestOptions(task="next_item", num_shards=2, progress=False),
        items=str(src / "items.csv"),
    )
    build_samples(
        ds,
        sm,
        BuildOptions(k_text=5, k_id=10, text_mode="recent", min_history=3, num_candidates=20, max_eval_samples=16),
        num_workers=1,
    )
    train_teacher(
        sm,
        tm,
        TeacherConfig(model="sasrec", embed_dim=16, rep_dim=16, attn_layers=1, epochs=1, max_hist=10),
        dataset_url=ds,
        progress=False,
    )
    score_samples(tm, sm, rp, num_actors=0, expected_rep_dim=16)
    return {"root": root, "dataset": ds, "samples": sm, "reps": rp, "teacher": tm}


def test_curriculum_is_rank_independent_and_grows():

    draws = [use_hybrid(0, s, 1000) for s in range(1000)]
    assert draws == [use_hybrid(0, s, 1000) for s in range(1000)]  # no rank or process state involved
    assert sum(draws[:200]) < sum(draws[-200:])


def _ilora_cfg(inp, out, name, *extra):
    return load_config(
        "tiny",
        [
            f"run.output_dir={out}",
            f"run.name={name}",
            f"data.dataset_url={inp['dataset']}",
            "data.task=next_item",
            f"retrieval.samples_url={inp['samples']}",
            f"teacher.reps_url={inp['reps']}",
            "teacher.model=sasrec",
            f"teacher.model_url={inp['teacher']}",
            "teacher.embed_dim=16",
            "teacher.rep_dim=16",
            "trainer.lora.mode=ilora",
            "trainer.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
            "trainer.lora.r=8",
            "trainer.lora.num_experts=4",
            "trainer.lora.alpha=32",
            "trainer.lora.dropout=0.1",
            "trainer.lora.gate_lr_mult=0.3",
            "trainer.lr=0.02",
            "trainer.batch_size=8",
            "trainer.micro_batch_size=2",
            "trainer.num_workers=2",
            "trainer.train_subset=96",
            "trainer.max_steps=8",
            "trainer.checkpoint_every=0",
            "trainer.schedule=cosine",
            "trainer.warmup_ratio=0.1",
            "retrieval.max_eval_samples=16",
            "model.max_length=448",
            *extra,
        ],
    )


def test_two_workers_zero3_ilora_next_item(next_item_inputs, tmp_path):
    out = run_train(_ilora_cfg(next_item_inputs, tmp_path, "ilora"))
    losses = [h["loss"] for h in out["history"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    final = out["metrics"]["final"]
    assert final["valid_n"] == 16
    for k in ("valid_hr@1", "valid_hr@10", "valid_ndcg@10", "test_hr@1"):
        assert k in final and 0.0 <= final[k] <= 1.0, (k, final)
    # LLaRA's generation metric (greedy answers from both ranks, matched as text): present and consistent.
    for split in ("valid", "test"):
        vr, hv, ha = (final[f"{split}_gen_{k}"] for k in ("valid_ratio", "hr1_valid", "hr1_all"))
        assert 0.0 <= vr <= 1.0 and 0.0 <= ha <= hv <= 1.0 and ha == pytest.approx(hv * vr), final
    last = max((Path(out["run_url"]) / "eval").glob("test-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    rows = json.loads(last.read_text())
    assert len(rows["generated"]) == len(rows["sample_id"]) == 16
    assert all(isinstance(t, str) for t in rows["generated"])


def test_hybrid_item_embeddings_with_curriculum(next_item_inputs, tmp_path):
    """LLaRA hybrid prompts: placeholders after titles take projector(SASRec item embedding); the
    curriculum mixes text-only and hybrid steps; text-only steps leave the projector untouched."""
    out = run_train(
        _ilora_cfg(
            next_item_inputs,
            tmp_path,
            "hybrid",
            "trainer.hybrid_item_emb=true",
            "trainer.max_steps=10",
            "trainer.checkpoint_every=1",
            "trainer.keep_last=20",
        )
    )
    kinds = [h["hybrid_prompt"] for h in out["history"]]
    assert 0 < sum(kinds) < len(kinds), kinds
    assert all(np.isfinite(h["loss"]) for h in out["history"])
    assert (Path(out["run_url"]) / "adapter" / "projector.safetensors").exists()
    ck = Path(out["run_url"]) / "checkpoints"

    def projector(step):
        t = {}
        for f in (ck / f"step-{step:08d}").glob("*.safetensors"):
            t.update(
                {k: v for k, v in load_file(str(f)).items() if k.startswith("projector.") and k.endswith("::param")}
            )
        return t

    for i, hyb in enumerate(kinds[1:-1], start=2):  # step i's projector vs step i-1's
        before, after = projector(i - 1), projector(i)
        same = all(torch.equal(before[k], after[k]) for k in before)
        assert same == (not hyb), (i, hyb)


def test_feed_scores_inline_like_the_score_stage(inputs, tmp_path):
    """Without the score stage's output the feed runs the teacher itself on just the LLM's samples: the
    streams equal those built from the score stage's representations (same tokens, reps, teacher scores)."""
    import pyarrow.parquet as pq

    def stream(name, *extra):
        cfg = tiny_cfg(inputs, str(tmp_path), name, "trainer.feed_workers=0", "trainer.feed_part_rows=32", *extra)
        params, job = plan_training(cfg, str(tmp_path / name), splits=("train", "test"))
        assert job.worker_kwargs["reps_url"] == (None if "missing" in " ".join(extra) else inputs["reps"])
        summaries = job.run()
        assert summaries["train"]["rows"] == 96 and summaries["test"]["rows"] == 32
        return {
            s: pq.read_table(sorted((tmp_path / name / "data" / s).glob("part-*.parquet"))) for s in ("train", "test")
        }

    from_reps = stream("fromreps")
    inline = stream(
        "inline", f"teacher.reps_url={tmp_path / 'missing'}", f"teacher.model_url={inputs['root'] / 'teacher'}"
    )
    for split in from_reps:
        a, b = from_reps[split], inline[split]
        assert a["sample_id"].equals(b["sample_id"]) and a["input_ids"].equals(b["input_ids"])
        np.testing.assert_allclose(np.stack(a["rep"].to_pylist()), np.stack(b["rep"].to_pylist()), atol=1e-6)
        np.testing.assert_allclose(a["teacher_score"].to_numpy(), b["teacher_score"].to_numpy(), atol=1e-6)


# ---- engine pieces in this process (one rank, gloo) ---------------------------------------------------------------


def test_gradient_accumulation_is_one_derived_quantity():
    t = TrainerConfig(batch_size=16, micro_batch_size=2, num_workers=2)
    assert t.gradient_accumulation_iters() == 4 and t.gradient_accumulation_iters(1) == 8
    assert eng.ds_config(t, False, "float32", 2)["gradient_accumulation_steps"] == 4
    sched = Schedule(rows=32, global_batch=16, world=2, micro=2, seed=0)
    assert sched.accumulation == 4 and len(sched.rank_rows(0, 1)) == 4


def test_collectives_put_their_tensors_on_the_given_device(one_rank_group):
    # Under nccl the given device is the engine's GPU (nccl has no CPU tensors); here the gloo group's CPU,
    # and the meta device shows that the helpers move what they are given.
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    out = all_reduce_sum(x.clone(), one_rank_group)
    assert out.device == one_rank_group and out.tolist() == [1.0, 2.0]
    rows = all_gather_rows(x.unsqueeze(0), 1, one_rank_group)
    assert rows.device == one_rank_group and rows.shape == (1, 2)
    assert all_reduce_sum(x, "meta").device.type == "meta"  # one rank: no collective on meta tensors
    assert all_gather_rows(x.unsqueeze(0), 1, "meta").device.type == "meta"


def test_hybrid_lookup_tables_are_on_the_engine_device(one_rank_group):
    lm = tiny_llama(seed=0)
    pm = build_personalized_model(
        lm, MixtureLoraConfig(mode="reclora", target_modules=["q_proj"], r=2, alpha=4, num_experts=2, cond_dim=4)
    )
    item_ids = np.array([3, 5, 9])
    model = HybridLM(pm, item_ids, torch.randn(3, 6), slot_token_ids=[7], text_token_id=8)
    t = TrainerConfig(batch_size=2, micro_batch_size=2, num_workers=1)
    engine, _, _ = eng.build_engine(model, eng.ds_config(t, False, "float32", 1), t, schedule_steps=4)
    assert {name: b.device for name, b in model.named_buffers()}["item_emb"] == engine.device
    assert all(b.device == engine.device for b in model.buffers())
    eng.move_buffers(model, "meta")  # the helper build_engine uses moves every buffer, to any device
    assert {b.device.type for b in model.buffers()} == {"meta"}
