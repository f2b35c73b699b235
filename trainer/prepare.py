"""Driver-side preparation for training: base model source, tokenized streams, worker parameters.

Runs once per run before any worker starts. Streams are cached under the run (`{run}/data/`) and
reused when the inputs that shaped them (samples, subset size, tokenizer, max length) are unchanged.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any

from recdata import storage
from recdata.layout import is_prompts, paths
from recdata.model_source import model_reference, resolve_model, tokenizer_dir
from recdata.prompt_files import PromptSet
from recdata.samples import SampleSet
from recdata.schema import Dataset
from recdata.streams import FEED_FAILED
from recdata.subsets import load_subset
from retrieval.encoding import PromptEncoder, answer_token_ids
from teacher.model_io import META_FILE, MODEL_FILE, load_teacher
from teacher.score import MANIFEST, check_rep_dim
from trainer.feed import FeedJob, PromptFeedWorker, plan_split, stream_key
from trainer.hybrid import CANDIDATE_TOKEN, HISTORY_TOKEN, TEXT_FALLBACK

resolve = storage.resolve


def base_model_dir(cfg, run_url: str) -> str:
    """The model *reference* workers resolve on their own node (`worker_model_dir`): a hub id pinned to a
    commit, an s3:// URL or an absolute local path, never a folder that exists only on the driver. A tiny
    random model is built once (seeded) and saved with the run, so every worker, on any node and any
    worker count, starts from identical weights."""
    if cfg.model.tiny is None:
        return model_reference(cfg.model)
    url = storage.join(run_url, "base_model")
    if storage.exists(storage.join(url, "config.json")):
        return url if not storage.is_local(url) else storage.get_fs(url)[1]
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    src = tokenizer_dir(cfg.model.name_or_path, tiny=True)
    c = AutoConfig.from_pretrained(src)
    tiny = cfg.model.tiny
    c.num_hidden_layers, c.hidden_size, c.intermediate_size = tiny.num_layers, tiny.hidden_size, tiny.intermediate_size
    c.num_attention_heads, c.num_key_value_heads = tiny.num_heads, tiny.num_kv_heads
    c.head_dim = tiny.hidden_size // tiny.num_heads
    torch.manual_seed(cfg.run.seed)
    model = AutoModelForCausalLM.from_config(c, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        for f in sorted(os.listdir(tmp)):
            if f != "config.json":
                storage.write_bytes_atomic(storage.join(url, f), open(os.path.join(tmp, f), "rb").read())
        storage.write_bytes_atomic(
            storage.join(url, "config.json"), open(os.path.join(tmp, "config.json"), "rb").read()
        )
    return url if not storage.is_local(url) else storage.get_fs(url)[1]


def worker_model_dir(model_dir: str, model_cfg=None) -> str:
    """On a worker: a local folder for the model reference from `base_model_dir`, fetched once per node
    into the node-local cache (the other processes of the node wait for it); `model_cfg` is the config's
    `model` section (allow_pickle, trust_remote_code)."""
    return resolve_model(model_dir, model_cfg)


def plan_training(cfg, run_url: str, splits=("train", "valid", "test"), zero_shot_first: bool = False):
    """Fix every stream's sample order and layout and return (worker params, FeedJob). Nothing is built
    yet: `FeedJob.run()` builds the parts, `.start()` builds them in the background while training runs."""
    from transformers import AutoTokenizer

    p = paths(cfg)
    model_dir = base_model_dir(cfg, run_url)
    # Tokenizer files only: no weights on the driver. Feed actors resolve the same reference on their node.
    tiny = cfg.model.tiny is not None
    tok_dir = tokenizer_dir(str(model_dir), tiny=tiny, model_cfg=cfg.model)
    tok = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=cfg.model.trust_remote_code)
    if is_prompts(cfg):
        return _plan_prompts(cfg, run_url, p, model_dir, tok, splits, zero_shot_first)
    samples = SampleSet.open(p.samples)
    if samples.task != cfg.data.task:
        raise ValueError(f"data.task is {cfg.data.task!r} but {p.samples} holds {samples.task!r} samples")
    dataset_url = samples.manifest.get("dataset") or p.dataset  # the dataset the samples were built from
    ds = Dataset.open(dataset_url)
    hybrid = cfg.trainer.hybrid_item_emb
    slot_tokens = [HISTORY_TOKEN, CANDIDATE_TOKEN] if hybrid else None
    slot_ids: tuple[int, ...] = ()
    if hybrid:
        # New tokens for the placeholders: their ids never reach the embedding table (HybridLM swaps them).
        tok.add_special_tokens({"additional_special_tokens": slot_tokens})
        slot_ids = tuple(tok.convert_tokens_to_ids(slot_tokens))
    # Representations: the score stage's output when it exists for this teacher, else the feed runs the
    # teacher itself on the samples it feeds.

    meta_url = storage.join(p.teacher, META_FILE)
    teacher_id = storage.read_json(meta_url)["sha256"][MODEL_FILE] if storage.exists(meta_url) else None
    reps_url = None
    if storage.exists(storage.join(p.reps, MANIFEST)):
        reps_meta = storage.read_json(storage.join(p.reps, MANIFEST))
        if teacher_id in (None, reps_meta["model_sha256"]):
            check_rep_dim(reps_meta["rep_dim"], cfg.teacher.rep_dim, p.reps)
            reps_url, teacher_id = p.reps, reps_meta["model_sha256"]
    if teacher_id is None:
        raise FileNotFoundError(
            f"{p.teacher}: no trained teacher ({META_FILE}) and no representations under {p.reps}; "
            f"run the teacher stage first"
        )
    data_url = storage.join(run_url, "data")
    t = cfg.trainer
    order = _split_order(splits, zero_shot_first)
    tasks, plans = [], {}
    prompt_words = cfg.data.prompt.model_dump(mode="json", exclude_none=True)
    for split in dict.fromkeys(order):
        if split not in samples.manifest["splits"]:
            continue
        n = t.train_subset if split == "train" else cfg.retrieval.max_eval_samples
        ids = load_subset(p.samples, split)
        ids = ids if n is None else ids[:n]
        key = stream_key(
            [
                samples.manifest.get("fingerprint"),
                teacher_id,
                hashlib.sha256(ids.tobytes()).hexdigest(),
                cfg.model.max_length,
                str(model_dir),
                cfg.data.task,
                cfg.data.domain,
                hybrid,
                t.feed_part_rows,
            ]
            # Custom wording changes the prompts; the default wording keeps the streams' earlier keys.
            + ([prompt_words] if prompt_words else [])
        )
        plans[split], split_tasks = plan_split(data_url, split, ids, t.feed_part_rows, key)
        tasks += split_tasks
    if "train" not in plans:
        raise ValueError(f"{p.samples}: no train split to train on")
    _clear_feed_failure(data_url)
    job = FeedJob(
        worker_kwargs={
            "samples_url": p.samples,
            "dataset_url": dataset_url,
            "model_ref": str(model_dir),
            "tiny": tiny,
            "model_cfg": cfg.model.model_dump(mode="json"),
            "max_length": cfg.model.max_length,
            "task": cfg.data.task,
            "domain": cfg.data.domain,
            "prompt": cfg.data.prompt.model_dump(mode="json"),
            "rep_dim": cfg.teacher.rep_dim,
            "teacher_url": p.teacher,
            "reps_url": reps_url,
            "slot_tokens": slot_tokens,
            "s3_endpoint": storage.s3_endpoint(),
            "num_threads": max(1, int(t.feed_cpus_per_worker)),
        },
        tasks=tasks,
        data_url=data_url,
        num_workers=t.feed_workers,
        cpus_per_worker=t.feed_cpus_per_worker,
        splits=plans,
    )
    params = _worker_params(cfg, run_url, model_dir, tok, data_url, plans)
    if hybrid:
        params["hybrid"] = {
            "slot_token_ids": list(slot_ids),
            "text_token_id": tok(TEXT_FALLBACK, add_special_tokens=False)["input_ids"][0],
            "item_emb_url": _item_table(cfg, run_url, ds),
        }
    if cfg.data.task == "next_item":
        items = ds.read_items()
        encoder = PromptEncoder(tok, cfg.model.max_length)
        params["answer_ids"] = {
            str(i): encoder.answer_ids(t) for i, t in zip(items["item_id"].to_pylist(), items["title"].to_pylist())
        }
        if cfg.trainer.eval_generation:
            # LLaRA's generation metric: greedy answers as long as the longest title (+ its end token), matched
            # against the candidate titles as text.
            params["titles"] = {str(i): t for i, t in zip(items["item_id"].to_pylist(), items["title"].to_pylist())}
            params["eos_id"] = encoder.eos
            params["gen_max_new_tokens"] = max(len(a) for a in params["answer_ids"].values())
    return params, job


def _split_order(splits, zero_shot_first: bool) -> list[str]:
    """The order the feed builds the splits in: the zero-shot evaluation's test split first when it runs."""
    order = [s for s in (["test"] if zero_shot_first else []) + ["train", "valid", "test"] if s in splits]
    return list(dict.fromkeys(order))


def _clear_feed_failure(data_url: str) -> None:
    """A failure marker from an earlier run must not stop this one's readers."""
    if storage.exists(storage.join(data_url, FEED_FAILED)):
        fs, path = storage.get_fs(storage.join(data_url, FEED_FAILED))
        with storage.storage_errors(data_url):
            fs.rm(path)


def _worker_params(cfg, run_url: str, model_dir, tok, data_url: str, plans: dict) -> dict[str, Any]:
    ids = answer_token_ids(tok, cfg.data.task)
    t = cfg.trainer
    return {
        "config": cfg.model_dump(mode="json"),
        "run_url": run_url,
        "model_dir": model_dir,
        "streams": {s: storage.join(data_url, s) for s in plans},
        "pad_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        "task": cfg.data.task,
        "yes_id": ids.get("Yes"),
        "no_id": ids.get("No"),
        "eval_batch_size": t.eval_batch_size,
        "resume": t.resume,
        "feed_timeout_s": t.feed_timeout_s,
    }


def _plan_prompts(cfg, run_url: str, p, model_dir, tok, splits, zero_shot_first: bool):
    """plan_training for prompt files (data.format=prompts): the streams come from the prompt set (its persisted
    seeded orders: train's first trainer.train_subset, valid/test's first retrieval.max_eval_samples), through the
    same chat template and answer tokens; no teacher, so no representations or teacher scores."""
    prompts = PromptSet.open(p.dataset)
    data_url = storage.join(run_url, "data")
    t = cfg.trainer
    tasks, plans = [], {}
    for split in _split_order(splits, zero_shot_first):
        if split not in prompts.splits:
            continue
        n = t.train_subset if split == "train" else cfg.retrieval.max_eval_samples
        ids = prompts.order(split)
        ids = ids if n is None else ids[:n]
        key = stream_key(
            [
                "prompts",
                prompts.manifest["fingerprint"],
                hashlib.sha256(ids.tobytes()).hexdigest(),
                cfg.model.max_length,
                str(model_dir),
                t.feed_part_rows,
            ]
        )
        plans[split], split_tasks = plan_split(data_url, split, ids, t.feed_part_rows, key)
        tasks += split_tasks
    if "train" not in plans:
        raise ValueError(f"{p.dataset}: no train split to train on")
    _clear_feed_failure(data_url)
    job = FeedJob(
        worker_kwargs={
            "prompts_url": p.dataset,
            "model_ref": str(model_dir),
            "tiny": cfg.model.tiny is not None,
            "model_cfg": cfg.model.model_dump(mode="json"),
            "max_length": cfg.model.max_length,
            "s3_endpoint": storage.s3_endpoint(),
            "num_threads": max(1, int(t.feed_cpus_per_worker)),
        },
        tasks=tasks,
        data_url=data_url,
        num_workers=t.feed_workers,
        cpus_per_worker=t.feed_cpus_per_worker,
        splits=plans,
        worker_cls=PromptFeedWorker,
    )
    return _worker_params(cfg, run_url, model_dir, tok, data_url, plans), job


def prepare(cfg, run_url: str, splits=("train", "valid", "test")) -> dict[str, Any]:
    """Plan and build every stream now (no overlap); the worker params, with per-split `summaries`."""
    params, job = plan_training(cfg, run_url, splits)
    params["summaries"] = job.run()
    return params


def _item_table(cfg, run_url: str, ds) -> str:
    """The frozen teacher's item embeddings for every dataset item, saved with the run (safetensors)."""
    import numpy as np
    import torch
    from safetensors.torch import save as st_save

    teacher = load_teacher(paths(cfg).teacher)
    if not hasattr(teacher.model, "item_embeddings"):
        raise ValueError(
            f"trainer.hybrid_item_emb needs a teacher with item embeddings (SASRec), got {cfg.teacher.model}"
        )
    ids = np.sort(ds.read_items()["item_id"].to_numpy())
    rows, _unknown = teacher.space.items.lookup(ids)  # unknown ids share the reserved unknown row
    table = teacher.model.item_embeddings().detach().float()[torch.as_tensor(rows)]
    url = storage.join(run_url, "data", "item_emb.safetensors")
    storage.write_bytes_atomic(
        url, st_save({"item_ids": torch.as_tensor(ids, dtype=torch.long), "emb": table.contiguous()})
    )
    return url
