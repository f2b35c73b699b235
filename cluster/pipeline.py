"""The pipeline driver: the stages in order over storage URLs, with Ray supplying the workers.

Stages: ingest -> embed (LLM item embeddings, for semantic retrieval) -> samples (long-short retrieval
workers) -> teacher (CRM on the full training split) -> score (teacher representations for every
sample) -> train (the personalized LLM on the Few2Many subset, then validation/test evaluation).

Each stage writes under its content-addressed URL (recdata.layout) and is skipped when its output is
already complete, so a killed pipeline rerun continues where it stopped; the sharded stages themselves
resume shard by shard. Locally Ray starts on 127.0.0.1; with RAY_ADDRESS set (`ray job submit`) it joins
that cluster.

Where the work runs is asked from the Ray cluster, never read off the driver (on KubeRay the head pod has no
GPU): embed runs on Ray actors with a GPU each and the model in model.dtype when the cluster has GPUs, the
teacher trains on a Ray Train worker (a GPU one when there are GPUs), the trainer follows trainer.use_gpu
(cluster.placement). A base model over 1B parameters that would run in float32 on CPU is refused up front.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from cluster.launch import run_training
from cluster.placement import (
    Placement,
    base_model_params,
    cpu_reason,
    place_stage,
    refuse_large_on_cpu,
    stage_placement,
)
from cluster.pool import run_sharded
from cluster.runtime import adopt_deepspeed_logger, init_ray
from configs.errors import RecloraError
from configs.loader import to_yaml
from configs.logs import get_logger, progress_enabled
from recdata import layout, storage
from recdata.ingest import ingest, summary
from recdata.ingest import options_from_config as ingest_options
from recdata.metrics import auc, bootstrap_ci, ctr_metrics
from recdata.prompt_files import PromptSet, ingest_prompts
from recdata.prompt_files import options_from_config as prompt_options
from recdata.prompt_files import summary as prompt_summary
from recdata.samples import options_from_config as build_options
from recdata.schema import Dataset
from recdata.streams import StreamReader
from retrieval.build import build_samples
from retrieval.embed_items import EmbedOptions, embed_items
from teacher.config import TeacherConfig
from teacher.score import score_samples
from teacher.train import train_teacher
from trainer import tracking
from trainer.checkpoint import check_compatible, latest_complete, verify
from trainer.engine import ds_config
from trainer.evaluate import eval_files
from trainer.loop import fingerprint_parts, train_worker
from trainer.prepare import base_model_dir, plan_training
from trainer.report import write_report

log = get_logger(__name__)


class SetupError(RecloraError, RuntimeError):
    """A stage cannot start: its inputs are missing or inconsistent (the message says which)."""


class StageError(RecloraError, RuntimeError):
    """A stage stopped on an error the user can act on: `{stage} stage: {the cause's one-line message}`."""


class Pipeline:
    """One run: `setup` resolves the config and where every stage's output lives; `run` builds what is
    missing, stage by stage; `report` prints the final table and writes results.json and report.md.
    Status lines are log records (stderr); the dataset summary, the final table and the report's path are the
    run's results and go to stdout."""

    def __init__(self, cfg, stages: list[str]):
        self.cfg = cfg
        self.stages = stages
        self.paths = layout.paths(cfg)
        self.timings: dict[str, float] = {}
        self.embeddings: str | None = None
        self.placements: dict[str, Placement] = {}

    @classmethod
    def setup(cls, cfg, stages: list[str]) -> "Pipeline":
        unknown = [s for s in stages if s not in layout.STAGES]
        if unknown:
            raise SetupError(f"--stages: unknown stage(s) {unknown}; choose from {list(layout.STAGES)}")
        stages = cls.applicable(cfg, stages)
        storage.configure(cfg.storage.endpoint_url, cfg.storage.region, cfg.storage.anon or None)
        if storage.is_local(cfg.run.output_dir):
            # Workers (Ray actors, Ray Train) run in other directories: hand them absolute paths.
            cfg.run.output_dir = str(Path(cfg.run.output_dir.removeprefix("file://")).resolve())
            storage.check_writable(cfg.run.output_dir, "run.output_dir")  # a file on the way, a read-only folder
        if "train" in stages:
            tracking.require(cfg)  # a missing mlflow / wandb stops the run now, not after hours of earlier stages
        return cls(cfg, stages)

    @staticmethod
    def applicable(cfg, stages: list[str]) -> list[str]:
        """Prompt files (data.format=prompts) have stages ingest and train only: the default list adapts (with a
        log line); naming another stage is an error."""
        allowed = layout.stages_for(cfg)
        if list(allowed) == list(layout.STAGES):
            return stages
        if list(stages) == list(layout.DEFAULT_STAGES):
            kept = [s for s in stages if s in allowed]
            log.info(
                "[pipeline] data.format=%s: stages %s (%s do not apply: no retrieval, no teacher)",
                cfg.data.format,
                ", ".join(kept),
                ", ".join(s for s in stages if s not in allowed),
            )
            return kept
        extra = [s for s in stages if s not in allowed]
        if extra:
            raise SetupError(
                f"--stages: {', '.join(extra)} do not apply to data.format={cfg.data.format} (prompt files carry no "
                f"interactions: no retrieval, no teacher); its stages are {', '.join(allowed)}"
            )
        return stages

    def plan(self) -> str:
        """For --dry-run: per stage, reuse / resume (what a rerun picks up) / build."""
        rows = [f"{'stage':<8} {'plan':<6} {'output':<60} note"]
        where = self.paths.where()
        for s in self.stages:
            done = layout.done(s, self.cfg, self.paths)
            note = "" if done else self.progress(s)
            rows.append(
                f"{s:<8} {'reuse' if done else ('resume' if note else 'build'):<6} {where[s]:<60} {note}".rstrip()
            )
        return "\n".join(rows)

    def progress(self, stage: str) -> str:
        p = self.paths
        if stage == "samples":
            have, n = layout.committed_sample_shards(self.cfg, p)
            return f"{have}/{n} shards committed" if have else ""
        if stage == "train":
            if layout.trained_with_other_inputs(p):
                return "holds a run of another config: pick a new run.name"
            ckpt = latest_complete(p.run) if storage.exists(p.run) else None
            return f"resumes from {ckpt}" if ckpt else ""
        return ""

    def run(self) -> None:
        cfg, p = self.cfg, self.paths
        if "train" in self.stages and layout.trained_with_other_inputs(p):
            raise SetupError(
                f"{p.run} holds a run trained with another config ({storage.join(p.run, 'inputs.json')}); "
                f"pick a new run.name or delete that folder"
            )
        if "train" in self.stages and cfg.trainer.resume:
            # Before anything is written: a damaged or incompatible checkpoint must not leave a half-made run.
            verify(cfg.trainer.resume)
            check_compatible(cfg.trainer.resume, fingerprint_parts(cfg))
        storage.write_bytes_atomic(storage.join(p.run, "config.yaml"), to_yaml(cfg).encode())
        if any(s in self.stages and not layout.done(s, cfg, p) for s in ("embed", "train")):
            adopt_deepspeed_logger()  # the LLM stages import DeepSpeed (in this process too): its lines on stderr
        self.preflight()
        for stage in self.stages:
            t0 = time.perf_counter()
            if layout.done(stage, cfg, p) and stage != "embed":
                log.info("[%s] reusing %s", stage, p.where()[stage])
                if stage == "ingest" and layout.is_prompts(cfg):
                    print(prompt_summary(PromptSet.open(p.dataset).manifest))
                elif stage == "ingest":
                    print(summary(Dataset.open(p.dataset).manifest))
                continue
            log.info("[%s] -> %s", stage, p.where()[stage])
            if stage == "train":
                layout.record_inputs(cfg, p, stage)  # first: a rerun with another config must not resume this run
            try:
                getattr(self, f"run_{stage}")()
            except RecloraError as e:  # from a Ray worker: the cause, without the worker's traceback
                cause = e.cause if isinstance(getattr(e, "cause", None), RecloraError) else e
                raise StageError(f"{stage} stage: {cause}") from e
            if stage != "train":
                layout.record_inputs(cfg, p, stage)
            self.timings[stage] = round(time.perf_counter() - t0, 2)
        storage.write_json_atomic(storage.join(p.run, "stage_seconds.json"), self.timings)

    # ------------------------------------------------------------------------------------------ placement
    def placement(self, stage: str) -> Placement:
        """Where `stage` runs: embed and teacher from the Ray cluster's resources (run.stage_device), train
        from trainer.use_gpu. Asked once per run."""
        if stage not in self.placements:
            cfg = self.cfg
            if stage == "train":
                t = cfg.trainer
                resources = {"GPU": float(t.num_workers)} if t.use_gpu else {}
                device = "cuda" if t.use_gpu else "cpu"
                place = place_stage("train", resources, device=device, workers=t.num_workers, dtype=cfg.model.dtype)
            else:
                workers = cfg.retrieval.num_workers if stage == "embed" else cfg.teacher.train_workers
                place = stage_placement(stage, device=cfg.run.stage_device, workers=workers, dtype=cfg.model.dtype)
            self.placements[stage] = place
        return self.placements[stage]

    def refuse_large_on_cpu(self, stage: str) -> None:
        """A base model over 1B parameters must not run in float32 on CPU (hours, or out of memory) unless
        run.allow_large_on_cpu: one line naming the stage and the fix."""
        cfg, place = self.cfg, self.placement(stage)
        if place.use_gpu or cfg.run.allow_large_on_cpu:
            return
        params = base_model_params(cfg.model.name_or_path, cfg.model, tiny=cfg.model.tiny is not None)
        if stage == "train":
            why, fix = "trainer.use_gpu=false", "set trainer.use_gpu=true on a Ray cluster with GPU workers"
        else:
            why, fix = cpu_reason(place, cfg.run.stage_device)
        refuse_large_on_cpu(place, params, cfg.model.name_or_path, why, fix)

    def preflight(self) -> None:
        """Before any stage runs: the LLM stages that still have work must not put a large model on CPU."""
        cfg, p = self.cfg, self.paths
        for stage in ("embed", "train"):
            if stage in self.stages and not layout.done(stage, cfg, p):
                try:
                    self.refuse_large_on_cpu(stage)
                except RecloraError as e:
                    raise StageError(str(e)) from None  # names the stage already
        if "train" in self.stages and cfg.trainer.use_gpu and not layout.done("train", cfg, p):
            gpus = stage_placement("teacher", device="auto").cluster_gpus
            if gpus < cfg.trainer.num_workers:
                log.warning(
                    "trainer.use_gpu=true with %d workers, but the Ray cluster has %g GPUs now; Ray Train waits until "
                    "GPU workers join (autoscaling)",
                    cfg.trainer.num_workers,
                    gpus,
                )

    # ------------------------------------------------------------------------------------------ stages
    def run_ingest(self) -> None:
        c = self.cfg.data
        if layout.is_prompts(self.cfg):
            print(prompt_summary(ingest_prompts(c.src, self.paths.dataset, prompt_options(self.cfg))))
            return
        m = ingest(
            c.format,
            c.src,
            self.paths.dataset,
            ingest_options(self.cfg),
            items=c.items,
            users=c.users,
            columns=c.columns,
        )
        print(summary(m))

    def run_embed(self) -> None:
        """LLM item embeddings + PCA for semantic (SUBR/SIM) retrieval; cached by model and text template."""
        cfg = self.cfg
        if not layout.needs_embeddings(cfg):
            return
        model_ref = base_model_dir(cfg, self.paths.run)  # workers fetch it on their own node
        place = self.placement("embed")
        opts = EmbedOptions(
            domain=cfg.data.domain,
            pca_dims=cfg.retrieval.pca_dim,
            seed=cfg.run.seed,
            missing_text=cfg.retrieval.missing_text,
            dtype=place.dtype,  # model.dtype on GPU actors, float32 on CPU ones
        )

        def runner(worker_cls, worker_kwargs, tasks, **kw):
            if tasks:  # the LLM runs only for parts not cached yet
                self.refuse_large_on_cpu("embed")
                log.info("%s", place.describe())
            return run_sharded(worker_cls, worker_kwargs, tasks, **kw)

        self.embeddings = embed_items(
            self.paths.dataset,
            model_ref,
            self.paths.embeddings,
            opts,
            num_workers=place.num_workers,
            gpus_per_worker=place.gpus_per_worker,
            runner=runner,
            model_cfg=cfg.model.model_dump(),
        )

    def run_samples(self) -> None:
        if self.embeddings is None and layout.needs_embeddings(self.cfg):
            self.run_embed()
        build_samples(
            self.paths.dataset,
            self.paths.samples,
            build_options(self.cfg),
            num_workers=self.cfg.retrieval.num_workers,
            embeddings_url=self.embeddings,
            runner=run_sharded,
        )

    def run_teacher(self) -> None:
        # The same settings `reclora teacher --config` uses (teacher.train_workers > 1: data-parallel), on Ray
        # Train workers (one by default), never in the driver; with a GPU each when the cluster has GPUs.
        place = self.placement("teacher")
        log.info("%s", place.describe())
        res = train_teacher(
            self.paths.samples,
            self.paths.teacher,
            TeacherConfig.from_run_config(self.cfg),
            dataset_url=self.paths.dataset,
            launch=run_training,
            use_gpu=place.use_gpu,
        )
        log.info("[teacher] valid: %s  test: %s", res.get("valid"), res.get("test"))

    def run_score(self) -> None:
        score_samples(
            self.paths.teacher,
            self.paths.samples,
            self.paths.reps,
            num_actors=self.cfg.teacher.num_workers,
            expected_rep_dim=self.cfg.teacher.rep_dim,
            runner=run_sharded,
        )

    def run_train(self) -> None:
        metrics = train(self.cfg, self.paths.run)
        log.info("[train] final: %s", " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    # ------------------------------------------------------------------------------------------ report
    def report(self) -> None:
        p = self.paths
        if "train" not in self.stages or not storage.exists(storage.join(p.run, "metrics.json")):
            return
        teacher = teacher_metrics(self.cfg, p)
        done = storage.read_json(storage.join(p.run, "metrics.json"))
        final, task = done["final"], self.cfg.data.task
        intervals = auc_intervals(p.run, final, teacher) if task == "ctr" else {}
        print(final_table(final, teacher, task, self.trained_on(done["steps"]), intervals))
        storage.write_json_atomic(
            storage.join(p.run, "results.json"), {"llm": final, "teacher": teacher, "stage_seconds": self.timings}
        )
        named = {f"teacher ({self.cfg.teacher.model})": teacher} if teacher else None
        print(f"report: {write_report(p.run, named)}")

    def trained_on(self, steps: int) -> dict[str, str]:
        """The final table's "trained on" cell per row: how many training samples each model saw."""
        p, t = self.paths, self.cfg.trainer
        plan = storage.join(p.run, "data", "train", "plan.json")
        rows = storage.read_json(plan)["rows"] if storage.exists(plan) else None
        seen = steps * t.batch_size
        llm = f"{rows:,} ({seen:,} seen)" if rows is not None and seen != rows else f"{seen:,}"
        out = {"zero-shot LLM": "0", "trained LLM": llm}
        manifest = storage.join(p.samples, "manifest.json")
        if not layout.is_prompts(self.cfg) and storage.exists(manifest):
            out["teacher"] = f"{storage.read_json(manifest)['splits']['train']['rows']:,} (all)"
        return out


def auc_intervals(run_url: str, final: dict, teacher: dict, n_boot: int = 1000) -> dict[str, tuple[float, float]]:
    """CTR: 95% bootstrap intervals of the test AUC of each final-table row, from the per-sample scores the
    evaluations saved ({run}/eval/test-{step}.json). A file belongs to a row when its AUC is the row's (a resumed
    run that never evaluated zero-shot itself takes that row from the run it resumed)."""
    files = [rows for _, rows in eval_files(run_url, "test")]

    def scored(key: str) -> dict | None:  # the last file holding the row's AUC (the same JSON double)
        return next((f for f in reversed(files) if key in final and f["metrics"].get("auc") == final[key]), None)

    out = {}
    for name, key in (("zero-shot LLM", "zeroshot_test_auc"), ("trained LLM", "test_auc")):
        if rows := scored(key):
            out[name] = bootstrap_ci(auc, rows["label"], rows["p_yes"], n_boot=n_boot)[1:]
    rows = scored("test_auc")
    if teacher and rows and rows.get("teacher") and None not in rows["teacher"]:
        out["teacher"] = bootstrap_ci(auc, rows["label"], rows["teacher"], n_boot=n_boot)[1:]
    return out


def teacher_metrics(cfg, p: layout.Paths) -> dict:
    """The teacher's own test scores on exactly the LLM's test samples. CTR: from the teacher scores the feed
    stored in the test stream. Next item: the teacher's test ranking metrics from its commit (teacher.json),
    used only when they were measured on as many test samples as the LLM's test stream holds."""
    stream = storage.join(p.run, "data", "test")
    if layout.is_prompts(cfg) or not storage.exists(storage.join(stream, "plan.json")):
        return {}  # prompt files: no teacher, so no teacher row
    if cfg.data.task == "ctr":
        t = StreamReader(stream, timeout_s=1.0).read_columns(["label", "teacher_score"])
        if t["teacher_score"].null_count:  # streams built without a teacher
            return {}
        return {f"test_{k}": v for k, v in ctr_metrics(t["label"].to_numpy(), t["teacher_score"].to_numpy()).items()}
    meta_url = storage.join(p.teacher, "teacher.json")
    test = storage.read_json(meta_url)["metrics"].get("test") if storage.exists(meta_url) else None
    rows = storage.read_json(storage.join(stream, "plan.json")).get("rows")
    if not test or test.get("n") != rows:
        return {}
    return {f"test_{k}": v for k, v in test.items()}


# The final table's columns per task: (metric key, header).
TABLE_COLUMNS = {
    "ctr": [("auc", "test AUC"), ("logloss", "test LogLoss")],
    "next_item": [("hr@1", "test HR@1"), ("hr@5", "test HR@5"), ("ndcg@5", "test NDCG@5"), ("n", "n")],
}


def final_table(
    final: dict,
    teacher: dict,
    task: str = "ctr",
    trained_on: dict[str, str] | None = None,
    intervals: dict[str, tuple[float, float]] | None = None,
) -> str:
    """Zero-shot LLM, trained LLM and teacher on the same test samples, one row each (a row whose metrics are
    missing, such as the teacher of a prompt-file run, is left out), with the training samples each saw and,
    where given, the 95% bootstrap interval of the first metric."""
    cols, trained_on, intervals = TABLE_COLUMNS[task], trained_on or {}, intervals or {}
    seen_w = max([10, *(len(v) for v in trained_on.values())])
    out = [f"{'model':<16} {'trained on':>{seen_w}}" + "".join(f" {h:>13}" for _, h in cols)]
    if intervals:
        out[0] += f"  {'AUC 95% interval':<16}"
    rows = [("zero-shot LLM", final, "zeroshot_test_"), ("trained LLM", final, "test_"), ("teacher", teacher, "test_")]
    for name, values, prefix in rows:
        if all(f"{prefix}{k}" in values for k, _ in cols):
            cells = "".join(
                f" {int(values[prefix + k]):>13d}" if k == "n" else f" {values[prefix + k]:>13.4f}" for k, _ in cols
            )
            line = f"{name:<16} {trained_on.get(name, ''):>{seen_w}}{cells}"
            if name in intervals:
                line += f"  [{intervals[name][0]:.4f}, {intervals[name][1]:.4f}]"
            out.append(line.rstrip())
    if "test_gen_valid_ratio" in final:  # next item: LLaRA's generation metric (greedy answers, matched as text)
        out.append(
            f"trained LLM, greedy answers: ValidRatio {final['test_gen_valid_ratio']:.4f}, HR@1 over valid "
            f"{final['test_gen_hr1_valid']:.4f}, HR@1 over all {final['test_gen_hr1_all']:.4f}"
        )
    if intervals and "test_n" in final:
        out.append(f"(all rows on the same {int(final['test_n'])} test samples; intervals: bootstrap, 1,000 resamples)")
    return "\n".join(out)


def train(cfg, run_url: str) -> dict:
    """Plan the streams, start the feed (Ray actors), then the Ray Train workers; returns the final metrics."""
    eval_splits = cfg.trainer.eval_splits
    zero_shot = cfg.data.task == "ctr" and cfg.trainer.zero_shot_eval and "test" in eval_splits
    try:
        params, feed = plan_training(cfg, run_url, splits=("train", *eval_splits), zero_shot_first=zero_shot)
    except FileNotFoundError as e:
        raise SetupError(str(e)) from None
    params["interactive"] = progress_enabled()
    params["eval_zero_shot"] = zero_shot
    feed.runner = run_sharded
    t = cfg.trainer
    # The DeepSpeed config the workers will build (generated, then trainer.deepspeed merged over it), saved
    # with the run; a bad trainer.deepspeed fails here, before any worker starts.
    storage.write_json_atomic(
        storage.join(run_url, "deepspeed.json"), ds_config(t, t.use_gpu, cfg.model.dtype, t.num_workers)
    )
    resume = t.resume or latest_complete(run_url)
    if resume:
        check_compatible(resume, fingerprint_parts(cfg))  # refuse before any worker starts
    # The feed builds the streams part by part; with overlap the trainer starts at once and waits only for
    # parts a step needs, otherwise every part is built first.
    parts = len(feed.tasks)
    if feed.num_workers:
        init_ray()  # here, before the feed thread and Ray Train could both try to start it
    if t.overlap:
        log.info(
            "[feed] building %d parts on %s worker(s) while training starts", parts, feed.num_workers or "the driver"
        )
        feed.start()
    else:
        log.info("[feed] building %d parts before training", parts)
        _print_summaries(feed.run())
    try:
        run_training(
            train_worker,
            params,
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            cpus_per_worker=t.cpus_per_worker,
            name=cfg.run.name,
            max_failures=t.max_failures,
            placement=t.placement,
            worker_resources=t.worker_resources,
            timeout_s=t.collective_timeout_s,
            share_node_cpus=True,
            # which node each rank ran on, one JSON per rank (multi-node debugging and tests)
            node_report_dir=os.environ.get("RECLORA_NODE_REPORT_DIR"),
        )
    except Exception:
        if feed.error is not None:  # the trainer stopped because the feed did: report the cause
            raise SetupError(f"feed failed: {type(feed.error).__name__}: {feed.error}") from feed.error
        raise
    if t.overlap:
        try:
            _print_summaries(feed.join())
        except RecloraError as e:
            raise SetupError(f"feed failed: {e}") from None
    out = storage.read_json(storage.join(run_url, "metrics.json"))
    timing = out.get("timing", {})
    if timing:
        log.info(
            "[train] %d steps in %.1fs after %.1fs of setup; data wait %.2f%% of the step loop (feed: %.1fs, %s)",
            timing["steps_run"],
            timing["train_seconds"],
            timing["setup_seconds"],
            100 * timing["data_wait_fraction"],
            feed.seconds,
            "overlapped" if t.overlap else "before training",
        )
        storage.write_json_atomic(
            storage.join(run_url, "feed.json"),
            {"overlap": t.overlap, "feed_seconds": feed.seconds, "parts": parts, **timing},
        )
    return out["final"]


def _print_summaries(summaries: dict) -> None:
    for split, s in summaries.items():
        log.info(
            "[data] %s: %d samples, %d tokens, mean length %.0f, %d with history truncated, %d prompts cut to fit",
            split,
            s["rows"],
            s["tokens"],
            s["mean_len"],
            s["history_truncated"],
            s["prompt_truncated"],
        )
