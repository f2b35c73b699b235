"""Few2Many stage 1: train the conventional recommender on the FULL training split.

    python -m teacher.train --samples URL --out URL --model din|sasrec [--dataset URL] [--epochs N] ...
    python -m teacher.train --config NAME_OR_PATH [key=value ...]

Streams the training shards, evaluates on validation every epoch (AUC for CTR, NDCG@10 over the
persisted candidates for next item), early-stops on it, keeps the best epoch, and commits
safetensors + JSON to `--out` (teacher.json written last). Deterministic for a given seed and thread
count. `python -m teacher.train` trains in this process (CPU or one GPU); the pipeline and `reclora teacher`
train on Ray Train workers (cluster.launch; one by default, with a GPU when the Ray cluster has GPUs), and
`--num-workers N` / `teacher.train_workers=N` trains data-parallel on N of them (DistributedDataParallel) over
the same global batches. With --config, the URLs come from `trainer.stages.paths`, the same ones the pipeline uses.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import sys
import time
import uuid
from collections import Counter
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from configs.loader import ConfigError, HelpFormatter, explicit_options, flag_overrides, load_config
from configs.logs import get_logger, progress_enabled, setup_logging
from recdata import metrics as M
from recdata import storage
from recdata.layout import paths
from recdata.runner import Launcher
from recdata.schema import Dataset, DatasetError
from teacher.config import TeacherConfig, TeacherConfigError
from teacher.data import (
    SamplesError,
    iter_train_parts,
    list_shards,
    load_encoded,
    read_shard,
)
from teacher.features import Encoder, FeatureError, FeatureSpace, training_ids
from teacher.model_io import (
    META_FILE,
    apply_unk_dropout,
    build_model,
    pick_device,
    save_teacher,
    to_tensors,
)

log = get_logger("teacher.train")


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
def predict_encoded(
    model: torch.nn.Module, enc: dict[str, np.ndarray], batch_size: int, device: torch.device
) -> dict[str, np.ndarray]:
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


def evaluate(
    model: torch.nn.Module, enc: dict[str, np.ndarray], task: str, batch_size: int, device: torch.device
) -> dict[str, float]:
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
    return FeatureSpace.build(
        np.unique(np.concatenate(user_parts)), np.unique(np.concatenate(item_parts)), items, users
    )


def _check_labels(task: str, shard_urls: list[str]) -> None:
    if task != "ctr":
        return
    for url in shard_urls:
        t = read_shard(url, columns=["sample_id", "label"])
        nulls = t.column("label").is_null().to_numpy(zero_copy_only=False)
        if nulls.any():
            sid = int(t.column("sample_id")[int(np.flatnonzero(nulls)[0])].as_py())
            raise SamplesError(
                f"{url}: field 'label' is null for sample_id {sid}: CTR training needs labels (is this a next-item dataset?)"
            )


# Unknown-id counters the encoder keeps; summed over ranks in data-parallel training.
STAT_KEYS = ("samples", "unknown_users", "unknown_items", "unknown_hist_items", "empty_history", "unknown_candidates")


def train_teacher(
    samples_url: str,
    out_url: str,
    cfg: TeacherConfig,
    dataset_url: str | None = None,
    progress: bool | None = None,
    evaluate_test: bool = True,
    num_workers: int | None = None,
    launch: Launcher | None = None,
    use_gpu: bool | None = None,
) -> dict[str, Any]:
    """Train on `{samples_url}/train`, select on `{samples_url}/valid`, commit to `out_url`.
    Returns {"valid": best metrics, "test": metrics (if a test split exists), "history": per epoch, ...}.

    With `launch` (cluster.launch.run_training: the pipeline and `reclora teacher`) training runs on
    `num_workers` (default `cfg.train_workers`) Ray Train workers, one included, never in this (driver)
    process; more than one trains data-parallel (DistributedDataParallel) on the same global batches as one
    process, each worker computing its slice. `use_gpu` says whether the workers get a GPU (the caller asks
    the cluster: cluster.placement); `cfg.device` cpu/cuda overrides it, auto follows it. Without `launch`,
    one worker trains in this process."""
    workers = cfg.train_workers if num_workers is None else int(num_workers)
    if workers < 1:
        raise TeacherConfigError(f"num_workers: must be >= 1, got {workers}")
    show = (not _quiet()) if progress is None else progress
    if launch is None:
        if workers == 1:
            return _fit(samples_url, out_url, cfg, dataset_url, show, evaluate_test)
        raise TeacherConfigError(
            f"train_workers={workers}: data-parallel training needs a launcher "
            f"(cluster.launch.run_training); run it through `reclora teacher` or the pipeline"
        )
    gpu = cfg.device == "cuda" if cfg.device != "auto" or use_gpu is None else bool(use_gpu)
    return _fit_distributed(samples_url, out_url, cfg, dataset_url, show, evaluate_test, workers, launch, gpu)


def _fit_distributed(
    samples_url: str,
    out_url: str,
    cfg: TeacherConfig,
    dataset_url: str | None,
    show: bool,
    evaluate_test: bool,
    workers: int,
    launch: Launcher,
    use_gpu: bool = False,
) -> dict[str, Any]:
    # Missing input fails here, in seconds, not after Ray Train has started a worker group.
    list_shards(samples_url, "train")
    list_shards(samples_url, "valid")
    # Workers rebuild the config from plain JSON-able values; the S3 endpoint is process state here.
    params = {
        "samples_url": samples_url,
        "out_url": out_url,
        "cfg": {**cfg.to_dict(), "train_workers": workers},
        "dataset_url": dataset_url,
        "progress": show,
        "evaluate_test": evaluate_test,
        "s3_endpoint": storage.s3_endpoint(),
    }
    # The model is committed by rank 0 with its metrics in teacher.json: the driver reads them from
    # storage (rank 0 may run on another node). Remove an old commit first so a stale one is never read.
    storage.rm(storage.join(out_url, META_FILE))
    # Which node and process each rank ran on, one JSON per rank (debugging and the placement tests).
    report = os.environ.get("RECLORA_NODE_REPORT_DIR")
    # No restarts: the teacher keeps no checkpoints, and a data or config error would just repeat.
    launch(
        ddp_worker,
        params,
        num_workers=workers,
        use_gpu=use_gpu,
        cpus_per_worker=float(cfg.num_threads),
        node_report_dir=os.path.join(report, "teacher") if report else None,
        name=f"teacher-{cfg.model}-{uuid.uuid4().hex[:8]}",
        max_failures=0,
    )
    meta_url = storage.join(out_url, META_FILE)
    if not storage.exists(meta_url):
        raise RuntimeError(f"{out_url}: data-parallel teacher training finished without committing {META_FILE}")
    return storage.read_json(meta_url)["metrics"]


def ddp_worker(params: dict[str, Any], rank: int, world: int, report: Any = None) -> dict[str, Any]:
    """One rank of data-parallel training (run by cluster.launch on a Ray Train worker, whose torch
    process group is already initialised). Rank 0 returns the result; the others return {}."""
    if params.get("s3_endpoint"):
        storage.configure(endpoint_url=params["s3_endpoint"])
    if not dist.is_initialized():
        raise RuntimeError(
            "teacher.train.ddp_worker: no torch.distributed process group (run it through cluster.launch)"
        )
    cfg = TeacherConfig.from_dict(params["cfg"])
    res = _fit(
        params["samples_url"],
        params["out_url"],
        cfg,
        params["dataset_url"],
        bool(params["progress"]) and rank == 0,
        bool(params["evaluate_test"]),
        rank=rank,
        world=world,
    )
    return res if rank == 0 else {}


def _sum_over_ranks(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _fit(
    samples_url: str,
    out_url: str,
    cfg: TeacherConfig,
    dataset_url: str | None,
    show: bool,
    evaluate_test: bool,
    rank: int = 0,
    world: int = 1,
) -> dict[str, Any]:
    """The training loop. world == 1: this process alone. world > 1: one rank of a torch.distributed group;
    every rank builds the same feature space and model, trains on its slice of each global batch (DDP
    averages the gradients), and rank 0 alone evaluates, early-stops (the decision is broadcast so no rank
    waits in a collective the others have left), tests and commits the model."""
    t0 = time.time()
    lead = rank == 0
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.set_num_threads(cfg.num_threads)
    device = pick_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # the GPU Ray Train gave this worker

    train_shards = list_shards(samples_url, "train")
    valid_shards = list_shards(samples_url, "valid")
    _check_labels(cfg.task, train_shards)
    items, users, ds_url = side_tables(samples_url, dataset_url)
    space = build_feature_space(train_shards, items, users)
    if lead:
        log.info("feature space: %s", space.summary())
    encoder = Encoder(space, cfg.max_hist, cfg.task)
    valid_stats: Counter = Counter()
    valid = load_encoded(valid_shards, encoder, cfg.max_valid_samples, valid_stats) if lead else None

    model = build_model(cfg, space).to(device)
    net: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # Buffers are lookup tables built identically on every rank from the same feature space: no need
        # to broadcast them every step. The wrapper broadcasts rank 0's initial weights once.
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False
        )
        if rank:
            # Distinct dropout masks per rank (rank 0 keeps the single-process stream).
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, rank]).generate_state(1)[0]))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    key = selection_metric(cfg.task)
    best_value, best_state, best_epoch, bad = -np.inf, None, -1, 0
    history = []
    train_stats: dict[str, int] = {}
    for epoch in range(cfg.epochs):
        net.train()
        stats: Counter = Counter()
        total, count = 0.0, 0
        bar = tqdm(
            desc=f"{cfg.model} epoch {epoch + 1}/{cfg.epochs}",
            unit="sample",
            disable=not show or not progress_enabled(),
            file=sys.stderr,
            mininterval=5,
        )
        for nb, offset, size in iter_train_parts(
            train_shards, encoder, cfg.batch_size, cfg.seed, epoch, stats, rank, world
        ):
            b = to_tensors(nb, device)
            apply_unk_dropout(b, model.unk_dropout_rates(), gen, part=(offset, size))
            n = len(nb["sample_id"])
            out = net(b)
            if n:
                loss = model.loss(b, out)
            else:  # this rank has no rows of a short last batch: zero gradients, but still in the all-reduce
                loss = sum(v.sum() for v in out.values()) * 0.0
            if world == 1:
                batch_loss = float(loss.detach())
            else:
                # The batch's mean loss over all ranks: what a single process would log and check.
                s, c = _sum_over_ranks([float(loss.detach()) * n, n], world)
                batch_loss = s / c
            if not np.isfinite(batch_loss):
                raise FloatingPointError(
                    f"{cfg.model}: non-finite training loss at epoch {epoch + 1} (lr {cfg.lr} too high?)"
                )
            opt.zero_grad(set_to_none=True)
            scale = n * world / size
            if scale != 1.0:
                # DDP averages per-rank gradients; weighting each rank's mean by its share of the batch makes
                # that average the gradient of the global batch mean when the shares are unequal.
                loss = loss * scale
            loss.backward()
            opt.step()
            total += batch_loss * size
            count += size
            bar.update(size)
            bar.set_postfix(loss=f"{total / count:.4f}")
        bar.close()
        summed = _sum_over_ranks([float(stats[k]) for k in STAT_KEYS], world)
        train_stats = {k: int(v) for k, v in zip(STAT_KEYS, summed) if k in stats or v}
        stop = False
        if lead:
            m = evaluate(model, valid, cfg.task, max(cfg.batch_size, 4096), device)
            row = {"epoch": epoch + 1, "train_loss": total / max(count, 1), **{f"valid_{k}": v for k, v in m.items()}}
            history.append(row)
            msg = f"[teacher] {cfg.model} epoch {epoch + 1}: loss {row['train_loss']:.4f} valid " + " ".join(
                f"{k}={v:.4f}" for k, v in m.items() if k != "n"
            )
            log.log(logging.INFO if show else logging.DEBUG, "%s", msg)
            if m[key] > best_value:
                best_value, best_epoch, bad = m[key], epoch + 1, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
                stop = bad > cfg.patience
        if world > 1:
            flag = torch.tensor([int(stop)])
            dist.broadcast(flag, src=0)
            stop = bool(flag.item())
        if stop:
            break
    if not lead:
        return {}
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    result: dict[str, Any] = {
        "model": cfg.model,
        "task": cfg.task,
        "best_epoch": best_epoch,
        "selection_metric": key,
        "history": history,
        "train_samples": int(train_stats.get("samples", 0)),
        "train_workers": world,
        "unknown": {"train": train_stats, "valid": dict(valid_stats)},
    }
    result["valid"] = {
        k.removeprefix("valid_"): v for k, v in history[best_epoch - 1].items() if k.startswith("valid_")
    }
    test_shards = list_shards(samples_url, "test", required=False) if evaluate_test else []
    if test_shards:
        test_stats: Counter = Counter()
        test = load_encoded(test_shards, encoder, None, test_stats)
        result["test"] = evaluate(model, test, cfg.task, 4096, device)
        result["unknown"]["test"] = dict(test_stats)
    result["train_seconds"] = round(time.time() - t0, 2)
    save_teacher(out_url, model, cfg, space, {"metrics": result, "samples_url": samples_url, "dataset_url": ds_url})
    return result


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m teacher.train", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument(
        "--config",
        help="preset name or YAML: samples, dataset, model URL and teacher settings from it "
        "(recdata.layout.paths); an option below given explicitly overrides the config's value "
        "(--epochs 3 == teacher.epochs=3)",
    )
    p.add_argument("overrides", nargs="*", help="key.path=value overrides for --config")
    p.add_argument("--samples", help="samples URL ({samples}/{split}/shard-*.parquet)")
    p.add_argument("--out", help="model URL to commit to")
    p.add_argument("--model", choices=["din", "sasrec"], help="the teacher (default: teacher.model with --config)")
    p.add_argument("--dataset", default=None, help="canonical dataset URL for item/user attributes")
    for name, typ in (
        ("epochs", int),
        ("batch-size", int),
        ("lr", float),
        ("seed", int),
        ("max-hist", int),
        ("embed-dim", int),
        ("attn-layers", int),
        ("dropout", float),
        ("patience", int),
        ("num-threads", int),
        ("weight-decay", float),
    ):
        p.add_argument(
            f"--{name}", type=typ, default=None, help="default: the config's value with --config, else the model's"
        )
    p.add_argument("--mlp-hidden", default=None, help="comma-separated, e.g. 256,256,256 (DIN); default: as --epochs")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="default: auto")
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="data-parallel Ray Train workers (each takes --num-threads CPUs); default: teacher.train_workers with "
        "--config, else 1 (this process)",
    )
    a = p.parse_args(argv)
    a.given = explicit_options(p, argv)
    return a


def _config_from_args(a: argparse.Namespace) -> TeacherConfig:
    over: dict[str, Any] = {}
    for name in (
        "epochs",
        "batch_size",
        "lr",
        "seed",
        "max_hist",
        "embed_dim",
        "attn_layers",
        "dropout",
        "patience",
        "num_threads",
        "weight_decay",
        "device",
    ):
        v = getattr(a, name)
        if v is not None:
            over[name] = v
    if a.num_workers is not None:
        over["train_workers"] = a.num_workers
    if a.mlp_hidden:
        try:
            over["mlp_hidden"] = [int(x) for x in a.mlp_hidden.split(",")]
        except ValueError:
            raise TeacherConfigError(
                f"--mlp-hidden: expected comma-separated layer widths like 256,256,256, got {a.mlp_hidden!r}"
            ) from None
        over.setdefault("rep_dim", over["mlp_hidden"][-1])
    if a.model == "sasrec" and "embed_dim" in over:
        over.setdefault("rep_dim", over["embed_dim"])
    try:
        return TeacherConfig.defaults(a.model, **over)
    except TeacherConfigError as e:  # name the command-line option the value came from: "lr: ..." -> "--lr: ..."
        raise TeacherConfigError(
            re.sub(r"(^|; )(\w+):", lambda m: f"{m[1]}--{m[2].replace('_', '-')}:", str(e)) + "; pass a valid value"
        ) from None


def _resolve(a: argparse.Namespace) -> tuple[str, str, str | None, TeacherConfig]:
    """(samples URL, model URL, dataset URL, teacher config) from --config or the explicit options."""
    if not a.config:
        missing = [f"--{n}" for n in ("samples", "out", "model") if not getattr(a, n)]
        if missing:
            raise TeacherConfigError(f"{', '.join(missing)} required (or use --config)")
        if a.overrides:
            raise TeacherConfigError(f"key=value overrides {a.overrides} need --config")
        return a.samples, a.out, a.dataset, _config_from_args(a)

    cfg = load_config(a.config, a.overrides + config_overrides(a))
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region, cfg.storage.anon or None)
    p = paths(cfg)
    # Not config keys (how the teacher runs, not what it learns): straight into the teacher's settings.
    runtime = {k: getattr(a, k) for k in ("num_threads", "device") if k in a.given}
    samples = a.samples if "samples" in a.given else p.samples
    out = a.out if "out" in a.given else p.teacher
    dataset = a.dataset if "dataset" in a.given else p.dataset
    return samples, out, dataset, TeacherConfig.from_run_config(cfg, **runtime)


# With --config: option dest -> the config key it overrides (the history length is the samples' K_id).
CONFIG_KEYS = {
    "model": "teacher.model",
    **{
        k: f"teacher.{k}"
        for k in ("epochs", "batch_size", "lr", "embed_dim", "attn_layers", "dropout", "patience", "weight_decay")
    },
    "mlp_hidden": "teacher.mlp_hidden",
    "num_workers": "teacher.train_workers",
    "seed": "run.seed",
    "max_hist": "retrieval.k_id",
}


def config_overrides(a: argparse.Namespace) -> list[str]:
    """The explicit options as key=value overrides of the run config (applied after the user's own)."""
    given = set(a.given)
    if "mlp_hidden" in given and isinstance(a.mlp_hidden, str):
        try:
            a.mlp_hidden = [int(x) for x in a.mlp_hidden.split(",")]
        except ValueError:
            raise TeacherConfigError(
                f"--mlp-hidden: expected comma-separated layer widths like 256,256,256, got {a.mlp_hidden!r}"
            ) from None
    over = flag_overrides(a, given, CONFIG_KEYS)
    if given & {"model", "mlp_hidden", "embed_dim"}:
        # As without --config: the representation is the last MLP layer (DIN) or the embedding (SASRec).
        t = load_config(a.config, a.overrides).teacher
        model = a.model if "model" in given else t.model
        if model == "sasrec":
            over.append(f"teacher.rep_dim={a.embed_dim if 'embed_dim' in given else t.embed_dim}")
        else:
            over.append(f"teacher.rep_dim={(a.mlp_hidden if 'mlp_hidden' in given else t.mlp_hidden)[-1]}")
    return over


def main(argv: list[str] | None = None, launch: Launcher | None = None, place: Callable[[], bool] | None = None) -> int:
    """Data-parallel training (train_workers > 1) needs `launch` (the `reclora` command passes
    cluster.launch.run_training, and `place`: whether its workers get a GPU, asked from the Ray cluster)."""

    setup_logging()
    a = _parse(argv)
    try:
        samples, out, dataset, cfg = _resolve(a)
        # A samples folder without its manifest was never completely built (retrieval.build writes it last).
        if a.config and not storage.exists(storage.join(samples, "manifest.json")):
            samples_keys = [o for o in config_overrides(a) if o.startswith(("retrieval.", "run."))]
            cmd = " ".join(["python -m retrieval.build --config", a.config, *a.overrides, *samples_keys])
            raise SamplesError(f"{samples}: no manifest.json: the samples are not built; run `{cmd}` first")
        use_gpu = place() if launch is not None and place is not None and cfg.device == "auto" else None
        res = train_teacher(samples, out, cfg, dataset_url=dataset, launch=launch, use_gpu=use_gpu)
    except (ConfigError, TeacherConfigError, SamplesError, FeatureError, DatasetError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "valid": res["valid"],
                "test": res.get("test"),
                "best_epoch": res["best_epoch"],
                "train_workers": res["train_workers"],
                "out": out,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
