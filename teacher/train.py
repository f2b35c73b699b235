"""Few2Many stage 1: train the conventional recommender on the FULL training split.

    python -m teacher.train --samples URL --out URL --model din|sasrec [--dataset URL] [--epochs N] ...

Streams the training shards, evaluates on validation every epoch (AUC for CTR, NDCG@10 over the
persisted candidates for next item), early-stops on it, keeps the best epoch, and commits
safetensors + JSON to `--out` (teacher.json written last). Deterministic for a given seed and thread
count. Single process (CPU or one GPU); data-parallel training over Ray Train is not implemented: the
datasets this targets (ML-100K/1M, LastFM, ML-25M at K_id=60) train in minutes on one device.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from retrieval import storage
from retrieval.schema import Dataset
from teacher import metrics as M
from teacher.config import TeacherConfig
from teacher.data import SamplesError, iter_train_batches, list_shards, load_encoded, read_shard
from teacher.features import Encoder, FeatureSpace, training_ids
from teacher.model_io import apply_unk_dropout, build_model, pick_device, save_teacher, to_tensors

log = logging.getLogger("teacher.train")


def _quiet() -> bool:
    return os.environ.get("RECLORA_QUIET", "0") == "1"


def side_tables(samples_url: str, dataset_url: str | None) -> tuple[pa.Table | None, pa.Table | None, str | None]:
    """items/users tables from the canonical dataset. Found via --dataset, else the samples manifest's
    `dataset_url` (written by retrieval.build); without either the teacher uses ids only."""
    if dataset_url is None:
        murl = storage.join(samples_url, "manifest.json")
        if storage.exists(murl):
            m = storage.read_json(murl)
            dataset_url = m.get("dataset_url") or m.get("dataset")
    if not dataset_url:
        return None, None, None
    ds = Dataset.open(dataset_url)
    return ds.read_items(), ds.read_users(), dataset_url


@torch.inference_mode()
def predict_encoded(model: torch.nn.Module, enc: dict[str, np.ndarray], batch_size: int, device: torch.device) -> dict[str, np.ndarray]:
    """Model outputs for an encoded split, batch by batch, in eval mode."""
    was_training = model.training
    model.eval()
    n = len(enc["sample_id"])
    parts: dict[str, list[np.ndarray]] = {}
    for s in range(0, n, batch_size):
        b = to_tensors({k: v[s : s + batch_size] for k, v in enc.items()}, device)
        out = model(b)
        res = {"rep": out["rep"], **model.predict(b, out)}
        for k, v in res.items():
            parts.setdefault(k, []).append(v.float().cpu().numpy())
    model.train(was_training)
    return {k: np.concatenate(v) for k, v in parts.items()}


def evaluate(model: torch.nn.Module, enc: dict[str, np.ndarray], task: str, batch_size: int, device: torch.device) -> dict[str, float]:
    pred = predict_encoded(model, enc, batch_size, device)
    if task == "ctr":
        keep = enc["label_valid"] if "label_valid" in enc else np.ones(len(enc["sample_id"]), bool)
        return {**M.ctr_metrics(enc["label"][keep], pred["teacher_score"][keep]), "n": int(keep.sum())}
    if "candidate_scores" not in pred:
        raise SamplesError("next-item validation samples have no candidates; retrieval.build must persist them")
    return {**M.ranking_metrics(pred["candidate_scores"], enc["target_pos"], ks=(1, 5, 10)), "n": len(enc["sample_id"])}


def selection_metric(task: str) -> str:
    return "auc" if task == "ctr" else "ndcg@10"


def build_feature_space(train_shards: list[str], items: pa.Table | None, users: pa.Table | None) -> FeatureSpace:
    user_parts, item_parts = [], []
    for url in train_shards:
        u, i = training_ids(read_shard(url, columns=["user_id", "item_id", "id_hist_items"]))
        user_parts.append(u)
        item_parts.append(i)
    return FeatureSpace.build(np.unique(np.concatenate(user_parts)), np.unique(np.concatenate(item_parts)), items, users)


def _check_labels(task: str, shard_urls: list[str]) -> None:
    if task != "ctr":
        return
    for url in shard_urls:
        t = read_shard(url, columns=["sample_id", "label"])
        nulls = t.column("label").is_null().to_numpy(zero_copy_only=False)
        if nulls.any():
            sid = int(t.column("sample_id")[int(np.flatnonzero(nulls)[0])].as_py())
            raise SamplesError(f"{url}: field 'label' is null for sample_id {sid}: CTR training needs labels (is this a next-item dataset?)")


def train_teacher(
    samples_url: str,
    out_url: str,
    cfg: TeacherConfig,
    dataset_url: str | None = None,
    progress: bool | None = None,
    evaluate_test: bool = True,
) -> dict[str, Any]:
    """Train on `{samples_url}/train`, select on `{samples_url}/valid`, commit to `out_url`.
    Returns {"valid": best metrics, "test": metrics (if a test split exists), "history": per epoch, ...}."""
    t0 = time.time()
    cfg.validate()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.set_num_threads(cfg.num_threads)
    device = pick_device(cfg.device)
    show = (not _quiet()) if progress is None else progress

    train_shards = list_shards(samples_url, "train")
    valid_shards = list_shards(samples_url, "valid")
    _check_labels(cfg.task, train_shards)
    items, users, ds_url = side_tables(samples_url, dataset_url)
    space = build_feature_space(train_shards, items, users)
    log.info("feature space: %s", space.summary())
    encoder = Encoder(space, cfg.max_hist, cfg.task)
    valid_stats: Counter = Counter()
    valid = load_encoded(valid_shards, encoder, cfg.max_valid_samples, valid_stats)

    model = build_model(cfg, space).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    key = selection_metric(cfg.task)
    best_value, best_state, best_epoch, bad = -np.inf, None, -1, 0
    history = []
    train_stats: Counter = Counter()
    for epoch in range(cfg.epochs):
        model.train()
        stats: Counter = Counter()
        total, count = 0.0, 0
        bar = tqdm(desc=f"{cfg.model} epoch {epoch + 1}/{cfg.epochs}", unit="sample", disable=not show, file=sys.stderr, mininterval=5)
        for nb in iter_train_batches(train_shards, encoder, cfg.batch_size, cfg.seed, epoch, stats):
            b = to_tensors(nb, device)
            apply_unk_dropout(b, model.unk_dropout_rates(), gen)
            out = model(b)
            loss = model.loss(b, out)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{cfg.model}: non-finite training loss at epoch {epoch + 1} (lr {cfg.lr} too high?)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n = len(nb["sample_id"])
            total += float(loss.detach()) * n
            count += n
            bar.update(n)
            bar.set_postfix(loss=f"{total / count:.4f}")
        bar.close()
        train_stats = stats
        m = evaluate(model, valid, cfg.task, max(cfg.batch_size, 4096), device)
        row = {"epoch": epoch + 1, "train_loss": total / max(count, 1), **{f"valid_{k}": v for k, v in m.items()}}
        history.append(row)
        msg = f"[teacher] {cfg.model} epoch {epoch + 1}: loss {row['train_loss']:.4f} valid " + " ".join(
            f"{k}={v:.4f}" for k, v in m.items() if k != "n")
        if show:
            print(msg, file=sys.stderr, flush=True)
        else:
            log.debug(msg)
        if m[key] > best_value:
            best_value, best_epoch, bad = m[key], epoch + 1, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad > cfg.patience:
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    result: dict[str, Any] = {
        "model": cfg.model,
        "task": cfg.task,
        "best_epoch": best_epoch,
        "selection_metric": key,
        "history": history,
        "train_samples": int(train_stats["samples"]),
        "unknown": {"train": dict(train_stats), "valid": dict(valid_stats)},
    }
    result["valid"] = {k.removeprefix("valid_"): v for k, v in history[best_epoch - 1].items() if k.startswith("valid_")}
    test_shards = list_shards(samples_url, "test", required=False) if evaluate_test else []
    if test_shards:
        test_stats: Counter = Counter()
        test = load_encoded(test_shards, encoder, None, test_stats)
        result["test"] = evaluate(model, test, cfg.task, 4096, device)
        result["unknown"]["test"] = dict(test_stats)
    result["train_seconds"] = round(time.time() - t0, 2)
    save_teacher(out_url, model, cfg, space, {"metrics": result, "samples_url": samples_url, "dataset_url": ds_url})
    return result


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, TeacherConfig]:
    p = argparse.ArgumentParser(prog="python -m teacher.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", required=True, help="samples URL ({samples}/{split}/shard-*.parquet)")
    p.add_argument("--out", required=True, help="model URL to commit to")
    p.add_argument("--model", choices=["din", "sasrec"], required=True)
    p.add_argument("--dataset", default=None, help="canonical dataset URL for item/user attributes")
    for name, typ in (("epochs", int), ("batch-size", int), ("lr", float), ("seed", int), ("max-hist", int),
                      ("embed-dim", int), ("attn-layers", int), ("dropout", float), ("patience", int),
                      ("num-threads", int), ("weight-decay", float)):
        p.add_argument(f"--{name}", type=typ, default=None)
    p.add_argument("--mlp-hidden", default=None, help="comma-separated, e.g. 256,256,256 (DIN)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    a = p.parse_args(argv)
    over: dict[str, Any] = {}
    for name in ("epochs", "batch_size", "lr", "seed", "max_hist", "embed_dim", "attn_layers", "dropout", "patience",
                 "num_threads", "weight_decay", "device"):
        v = getattr(a, name)
        if v is not None:
            over[name] = v
    if a.mlp_hidden:
        over["mlp_hidden"] = [int(x) for x in a.mlp_hidden.split(",")]
        over.setdefault("rep_dim", over["mlp_hidden"][-1])
    if a.model == "sasrec" and "embed_dim" in over:
        over.setdefault("rep_dim", over["embed_dim"])
    return a, TeacherConfig.defaults(a.model, **over)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a, cfg = _parse(argv)
    res = train_teacher(a.samples, a.out, cfg, dataset_url=a.dataset)
    print(json.dumps({"valid": res["valid"], "test": res.get("test"), "best_epoch": res["best_epoch"], "out": a.out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
