"""Driver-side preparation for training: base model source, tokenized streams, worker parameters.

Runs once per run before any worker starts. Streams are cached under the run (`{run}/data/`) and
reused when the inputs that shaped them (samples, subset size, tokenizer, max length) are unchanged.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

from retrieval import storage
from trainer.data import PromptEncoder, answer_token_ids, prepare_split
from trainer.hybrid import CANDIDATE_TOKEN, HISTORY_TOKEN, TEXT_FALLBACK
from trainer.model_source import ASSETS, resolve_model, tokenizer_dir


resolve = storage.resolve


def base_model_dir(cfg, run_url: str) -> str:
    """A folder workers can `from_pretrained`. A tiny random model is built once (seeded) and saved with
    the run, so every worker, on any node and any worker count, starts from identical weights."""
    if cfg.model.tiny is None:
        return resolve_model(cfg.model.name_or_path)
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
        storage.write_bytes_atomic(storage.join(url, "config.json"), open(os.path.join(tmp, "config.json"), "rb").read())
    return url if not storage.is_local(url) else storage.get_fs(url)[1]


def worker_model_dir(model_dir: str) -> str:
    """On a worker: a local folder for a model that may live on object storage."""
    return resolve_model(model_dir)


def prepare(cfg, run_url: str, splits=("train", "valid", "test")) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from retrieval.prompts import PromptRenderer, style_for
    from retrieval.samples import SampleSet
    from retrieval.schema import Dataset
    from retrieval.subsets import load_subset

    root = cfg.run.output_dir
    samples_url = resolve(cfg.retrieval.samples_url, root)
    reps_url = resolve(cfg.teacher.reps_url, root)
    model_dir = base_model_dir(cfg, run_url)
    tok = AutoTokenizer.from_pretrained(worker_model_dir(model_dir) if cfg.model.tiny is None else
                                        (ASSETS if not os.path.exists(os.path.join(str(model_dir), "tokenizer.json")) else model_dir))
    samples = SampleSet.open(samples_url)
    if samples.task != cfg.data.task:
        raise ValueError(f"data.task is {cfg.data.task!r} but {samples_url} holds {samples.task!r} samples")
    ds = Dataset.open(samples.manifest.get("dataset_url") or resolve(cfg.data.dataset_url, root))
    hybrid = cfg.trainer.hybrid_item_emb
    style = style_for(cfg.data.domain, **({"history_token": HISTORY_TOKEN, "candidate_token": CANDIDATE_TOKEN} if hybrid else {}))
    slot_ids: tuple[int, ...] = ()
    if hybrid:
        # New tokens for the placeholders: their ids never reach the embedding table (HybridLM swaps them).
        tok.add_special_tokens({"additional_special_tokens": [HISTORY_TOKEN, CANDIDATE_TOKEN]})
        slot_ids = tuple(tok.convert_tokens_to_ids([HISTORY_TOKEN, CANDIDATE_TOKEN]))
    renderer = PromptRenderer(ds.read_items(), cfg.data.task, style, ds.read_users())
    encoder = PromptEncoder(tok, cfg.model.max_length)
    streams, summaries = {}, {}
    for split in splits:
        if split not in samples.manifest["splits"]:
            continue
        n = cfg.trainer.train_subset if split == "train" else cfg.retrieval.max_eval_samples
        avail = len(load_subset(samples_url, split))
        ids = load_subset(samples_url, split, None if n is None else min(n, avail))
        url = storage.join(run_url, "data", f"{split}.parquet")
        key = hashlib.sha256(json.dumps([samples.manifest.get("fingerprint"), reps_url, len(ids), cfg.model.max_length,
                                         str(model_dir), cfg.data.task, hybrid], default=str).encode()).hexdigest()[:16]
        meta_url = url + ".json"
        if storage.exists(meta_url) and storage.read_json(meta_url).get("key") == key:
            summaries[split] = storage.read_json(meta_url)
        else:
            summaries[split] = prepare_split(samples, split, ids, reps_url, renderer, encoder, url, cfg.teacher.rep_dim,
                                             slot_token_ids=slot_ids)
            summaries[split]["key"] = key
            storage.write_json_atomic(meta_url, summaries[split])
        streams[split] = url
    ids = answer_token_ids(tok, cfg.data.task)
    params = {"config": cfg.model_dump(mode="json"), "run_url": run_url, "model_dir": model_dir, "streams": streams,
              "pad_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, "task": cfg.data.task,
              "yes_id": ids.get("Yes"), "no_id": ids.get("No"), "eval_batch_size": cfg.trainer.eval_batch_size,
              "resume": cfg.trainer.resume, "summaries": summaries}
    if hybrid:
        params["hybrid"] = {"slot_token_ids": list(slot_ids), "text_token_id": tok(TEXT_FALLBACK, add_special_tokens=False)["input_ids"][0],
                            "item_emb_url": _item_table(cfg, run_url, ds)}
    if cfg.data.task == "next_item":
        items = ds.read_items()
        params["answer_ids"] = {str(i): encoder.answer_ids(t) for i, t in zip(items["item_id"].to_pylist(), items["title"].to_pylist())}
    return params


def _item_table(cfg, run_url: str, ds) -> str:
    """The frozen teacher's item embeddings for every dataset item, saved with the run (safetensors)."""
    import numpy as np
    import torch
    from safetensors.torch import save as st_save

    from teacher.model_io import load_teacher

    teacher = load_teacher(resolve(cfg.teacher.model_url, cfg.run.output_dir))
    if not hasattr(teacher.model, "item_embeddings"):
        raise ValueError(f"trainer.hybrid_item_emb needs a teacher with item embeddings (SASRec), got {cfg.teacher.model}")
    ids = np.sort(ds.read_items()["item_id"].to_numpy())
    rows, _unknown = teacher.space.items.lookup(ids)  # unknown ids share the reserved unknown row
    table = teacher.model.item_embeddings().detach().float()[torch.as_tensor(rows)]
    url = storage.join(run_url, "data", "item_emb.safetensors")
    storage.write_bytes_atomic(url, st_save({"item_ids": torch.as_tensor(ids, dtype=torch.long), "emb": table.contiguous()}))
    return url
