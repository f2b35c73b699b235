"""Per-user export: fold one user's gate into a standard PEFT LoRA adapter folder.

ilora  -> rank N*r LoRA, lora_A = A, lora_B = B * diag(s * (g (x) 1_r)) / (alpha / (N*r))
reclora -> rank r LoRA, lora_A = A_u = sum_k g_k A_k, lora_B = B_u = sum_k g_k B_k (stock scale alpha/r = s)
plain  -> the bank itself.
Stock `PeftModel.from_pretrained(base, out_dir)` then reproduces the personalized model for that user.
Only the adapter folder and the conditioning vector are needed; the base model only for --check.

    python -m trainer.export --adapter runs/x/adapter --cond user.npy --out exports/u42 [--base MODEL --check]
    python -m trainer.export --adapter DIR --cond-parquet s3://b/cond.parquet --user-id 42 --out DIR
    python -m trainer.export --run RUN --users users.parquet|ID,ID,... --out DIR [--recent 10] [--before TS]
    python -m trainer.export --run RUN --gap [--recent 10]        # test AUC: per-request vs user-level adapters

Per request (exact): the gate input is the teacher's representation of (user, target item, time), so each request
has its own adapter (`predict --return-cond` gives the vector). Per user (`--run --users`): the conditioning vector
is the mean of the teacher representations of the user's `--recent` latest interactions (each as a request at its
own time, the target being the interacted item), one adapter per user; `--gap` measures what that costs.
Every folder gets README.md (an adapter card: base model, mode, user, conditioning, metrics when known).
--adapter and --out may be s3:// URLs: the adapter is read into a local temporary folder, the export is written
locally and uploaded file by file with storage's atomic upload (adapter_config.json last).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import posixpath
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from configs.errors import RecloraError
from configs.loader import HelpFormatter
from recdata import storage
from recdata.model_source import load_kwargs, resolve_model
from trainer.gates import MixtureGates
from trainer.lora import (
    GATES_FILE,
    MIXTURE_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    MixtureLoraConfig,
    PersonalizedLM,
    is_main_process,
    load_personalized,
    mark_personalized,
    read_mixture_config,
)

USER_META_FILE = "user_export.json"
CARD_FILE = "README.md"
USERS_INDEX = "users.parquet"  # --run --users: one row per user (id, key, folder, targets used, cond)
DEFAULT_RECENT = 10
# Upload order: the weights first, adapter_config.json (what loaders look for) last.
_PUBLISH_ORDER = (PEFT_WEIGHTS_FILE, USER_META_FILE, CARD_FILE, "adapter_config.json")
_HF_CACHE = re.compile(r"models--(?P<org>[^/]+)--(?P<name>[^/]+)/snapshots/(?P<rev>[0-9a-f]{40})")
PEFT_MODULE_PREFIX = "base_model.model."  # PEFT's key prefix in front of the HF module name


def compute_user_gates(
    config: MixtureLoraConfig, module_names: list[str], gate_state: dict[str, torch.Tensor], cond: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Gate values (N,) per adapted module for one conditioning vector, with gate dropout off."""
    gates = MixtureGates(
        config.mode,
        module_names,
        config.cond_dim,
        config.num_experts,
        hidden=config.gate_hidden,
        dropout=config.gate_dropout,
        temperature=config.temperature,
    )
    gates.load_state_dict({k: v.float() for k, v in gate_state.items()}, strict=True)
    gates.eval()
    cond = torch.as_tensor(cond, dtype=torch.float32).reshape(1, -1)
    with torch.no_grad():
        return {name: g[0] for name, g in gates(cond).items()}


def personalize_bank(
    config: MixtureLoraConfig, bank: dict[str, torch.Tensor], user_gates: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Map the PEFT-keyed bank (rank N*r) to a stock PEFT LoRA state dict for one user (computed in float64)."""
    n, r = config.num_experts, config.rank_per_expert
    out: dict[str, torch.Tensor] = {}
    seen = set()
    for key in bank:
        if not key.endswith(".lora_A.weight"):
            continue
        module_key = key.removesuffix(".lora_A.weight")
        name = module_key.removeprefix(PEFT_MODULE_PREFIX)
        if name not in user_gates:
            raise KeyError(f"bank module {name!r} has no gate (gates cover {sorted(user_gates)[:3]}...)")
        seen.add(name)
        a, b = bank[key], bank[f"{module_key}.lora_B.weight"]
        g = user_gates[name].double()
        a64, b64 = a.double(), b.double()
        if config.mode == "ilora":
            stock_scale = config.alpha / config.total_rank
            col_scale = (config.scaling / stock_scale) * g.repeat_interleave(r)
            new_a, new_b = a64, b64 * col_scale
        else:
            new_a = torch.einsum("n,nri->ri", g, a64.view(n, r, -1))
            new_b = torch.einsum("n,onr->or", g, b64.view(b.shape[0], n, r))
        out[key] = new_a.to(a.dtype).contiguous()
        out[f"{module_key}.lora_B.weight"] = new_b.to(b.dtype).contiguous()
    if missing := set(user_gates) - seen:
        raise KeyError(f"gated modules without bank tensors: {sorted(missing)[:3]}")
    return out


def portable_base_ref(ref: str | None, revision: str | None = None) -> tuple[str | None, str | None]:
    """(base_model_name_or_path, revision) for an exported adapter_config.json: a hub id rather than the local
    cache folder it was loaded from (`.../models--org--name/snapshots/<sha>` -> `org/name` at `<sha>`), a pinned
    `org/name@<sha>` split in two; storage URLs, `pypi:` references and other paths as given."""
    if not ref:
        return None, revision
    match = _HF_CACHE.search(ref)
    if match:
        return f"{match['org']}/{match['name']}", revision or match["rev"]
    if "@" in ref and "://" not in ref and not ref.startswith(("/", ".", "pypi:")):
        name, _, rev = ref.partition("@")
        return name, revision or rev
    return ref, revision


def _file_mode() -> int:
    """rw for the owner, r for group/others as the umask allows: safetensors' save_file creates 0600 files."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def adapter_card(meta: dict[str, Any]) -> str:
    """README.md of an exported adapter: what it is, for whom, from which conditioning vector, how well."""
    cond = meta.get("conditioning") or {}
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {meta.get('base_model_name_or_path') or 'unknown'}",
        "tags: [lora, reclora, personalized]",
        "---",
        f"# Personalized LoRA ({meta['mode']}) for user {meta.get('user_key') or meta.get('user_id') or '(unnamed)'}",
        "",
        "A standard PEFT LoRA adapter folded from a reclora mixture-LoRA bank for one value of its gate (trainer/"
        "export.py): `peft.PeftModel.from_pretrained(base, this_folder)` reproduces the gated model for that gate.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{meta.get('base_model_name_or_path')}`"
        + (f" at revision `{meta['revision']}`" if meta.get("revision") else "")
        + " |",
        f"| mode | {meta['mode']} |",
        f"| user | id {meta.get('user_id')}" + (f", key {meta['user_key']}" if meta.get("user_key") else "") + " |",
        f"| conditioning | {cond.get('kind', 'given vector')}: {cond.get('how', 'supplied by the caller (--cond)')} |",
    ]
    if cond.get("targets") is not None:
        lines.append(f"| targets averaged | {cond['targets']} |")
    if meta.get("source_adapter"):
        lines.append(f"| source | `{meta['source_adapter']}` |")
    for name, value in sorted((meta.get("metrics") or {}).items()):
        lines.append(f"| {name} | {value} |")
    lines += [
        "",
        "Per-request adapters (conditioning = the teacher representation of one (user, target, time)) are exact;",
        "per-user adapters average the user's recent targets' vectors and lose some accuracy (`--gap` measures it).",
        "Gate values per adapted module are in user_export.json.",
        "",
    ]
    return "\n".join(lines)


def write_user_adapter(
    config: MixtureLoraConfig,
    module_names: list[str],
    bank: dict[str, torch.Tensor],
    gate_state: dict[str, torch.Tensor],
    cond: torch.Tensor | np.ndarray,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    user_id: str | None = None,
    revision: str | None = None,
    card: dict[str, Any] | None = None,
) -> Path | str:
    """Write a stock PEFT LoRA folder (adapter_config.json + adapter_model.safetensors, README.md card,
    user_export.json) for one conditioning vector. `out_dir`: a local folder or an s3:// URL (written locally, then
    uploaded). Returns the folder (a Path when local)."""
    base, revision = portable_base_ref(base_model_name_or_path, revision)
    meta: dict = {"user_id": user_id, "mode": config.mode, "base_model_name_or_path": base, "revision": revision}
    meta.update(card or {})
    with tempfile.TemporaryDirectory(prefix="reclora-export-") as tmp:
        out = Path(tmp)
        if config.mode == "plain":
            weights, rank = dict(bank), config.r
        else:
            gates = compute_user_gates(config, module_names, gate_state, torch.as_tensor(cond))
            weights = personalize_bank(config, bank, gates)
            rank = config.total_rank if config.mode == "ilora" else config.rank_per_expert
            meta["gates"] = {name: g.tolist() for name, g in sorted(gates.items())}
        save_file(weights, str(out / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        LoraConfig(
            r=rank,
            lora_alpha=config.alpha,
            lora_dropout=0.0,
            target_modules=list(config.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=base,
            revision=revision,
        ).save_pretrained(str(out))
        (out / USER_META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        (out / CARD_FILE).write_text(adapter_card(meta))
        return publish(out, out_dir)


def publish(local_dir: Path, out_url: str | Path) -> Path | str:
    """Copy the files of `local_dir` to `out_url` (local folder or object store) with storage's atomic upload,
    adapter_config.json last; local files readable as the umask allows (never safetensors' 0600)."""
    url = str(out_url)
    names = sorted(p.name for p in local_dir.iterdir() if p.is_file())
    names.sort(key=lambda n: _PUBLISH_ORDER.index(n) if n in _PUBLISH_ORDER else -1)
    for name in names:
        target = storage.join(url, name)
        storage.upload_file_atomic(str(local_dir / name), target)
        if storage.is_local(url):
            os.chmod(storage.get_fs(target)[1], _file_mode())
    return Path(storage.get_fs(url)[1]) if storage.is_local(url) else url


@contextlib.contextmanager
def local_adapter(url: str | Path) -> Iterator[Path]:
    """A save_adapter folder as a local path: itself when local, else its files copied to a temporary folder."""
    url = str(url)
    if storage.is_local(url):
        yield Path(storage.get_fs(url)[1])
        return
    fs, path = storage.get_fs(url)
    with tempfile.TemporaryDirectory(prefix="reclora-adapter-") as tmp, storage.storage_errors(url):
        for f in fs.ls(path, detail=False):
            name = posixpath.basename(f.rstrip("/"))
            if name and not name.startswith((".", "_")) and fs.isfile(f):
                fs.get_file(f, str(Path(tmp) / name))
        yield Path(tmp)


class _Adapter:
    """A save_adapter folder read once: config, module names, bank and gate tensors."""

    def __init__(self, adapter_dir: str | Path) -> None:
        self.url = str(adapter_dir)
        with local_adapter(adapter_dir) as local:
            self.config = read_mixture_config(local)
            self.meta = json.loads((local / MIXTURE_CONFIG_FILE).read_text())
            self.bank = load_file(str(local / PEFT_WEIGHTS_FILE))
            self.gate_state = load_file(str(local / GATES_FILE)) if self.config.mode != "plain" else {}

    def write(self, cond, out_dir, **kwargs: Any) -> Path | str:
        kwargs["base_model_name_or_path"] = kwargs.get("base_model_name_or_path") or self.meta.get(
            "base_model_name_or_path"
        )
        card = {"source_adapter": self.url, **(kwargs.pop("card", None) or {})}
        return write_user_adapter(
            self.config, self.meta["module_names"], self.bank, self.gate_state, cond, out_dir, card=card, **kwargs
        )


def export_user_adapter(
    adapter_dir: str | Path,
    cond: torch.Tensor | np.ndarray,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    user_id: str | None = None,
    revision: str | None = None,
    card: dict[str, Any] | None = None,
) -> Path | str:
    """Per-user (or per-request) export from a PersonalizedLM.save_adapter folder; both may be s3:// URLs."""
    return _Adapter(adapter_dir).write(
        cond, out_dir, base_model_name_or_path=base_model_name_or_path, user_id=user_id, revision=revision, card=card
    )


def export_user_adapter_from_model(
    model: PersonalizedLM,
    cond: torch.Tensor | np.ndarray,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    user_id: str | None = None,
) -> Path | None:
    """Per-user export from a live model (collective under ZeRO-3; rank 0 writes and gets the path)."""
    state = model.trainable_state_dict()
    if not is_main_process():
        return None
    bank = {n.removeprefix("lm."): t for n, t in state.items() if n.startswith("lm.")}
    bank = get_peft_model_state_dict(
        model.lm, state_dict=bank, adapter_name=model.adapter_name, save_embedding_layers=False
    )
    gate_state = {n.removeprefix("gates."): t for n, t in state.items() if n.startswith("gates.")}
    module_names = model.gates.module_names if model.gates is not None else []
    return write_user_adapter(
        model.config,
        module_names,
        bank,
        gate_state,
        cond,
        out_dir,
        base_model_name_or_path=base_model_name_or_path,
        user_id=user_id,
    )


# ---- user-level conditioning from a trained run ---------------------------------------------------------------------
def run_base_ref(cfg: Any, run_url: str) -> tuple[str, str | None]:
    """The run's base model as a portable reference: `model.name_or_path` (hub id, storage URL, pypi:...) and its
    revision; the tiny preset's random base lives with the run (`{run}/base_model`)."""
    if cfg.model.tiny is not None:
        return storage.join(run_url, "base_model"), None
    return portable_base_ref(cfg.model.name_or_path, cfg.model.revision)  # type: ignore[return-value]


def _open_run(run_url: str) -> tuple[Any, dict[str, Any]]:
    from trainer.predict import load_run_config, run_inputs

    cfg = load_run_config(run_url)
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region, cfg.storage.anon or None)
    return cfg, run_inputs(cfg, run_url)


def user_conditions(
    run_url: str,
    user_ids: np.ndarray | list[int],
    *,
    recent: int = DEFAULT_RECENT,
    before: int | None = None,
    device: str = "cpu",
    run: tuple[Any, dict[str, Any]] | None = None,
) -> dict[int, tuple[np.ndarray, int]]:
    """user id -> (user-level conditioning vector, number of targets averaged).

    The vector is the mean of the frozen teacher's representations (the gate input the run trained on) of the
    user's `recent` latest interactions with a timestamp < `before` (all when None), each taken as a request
    (user, interacted item, its time): history strictly before it, the same retrieval as the samples. Targets
    that training would not score (no_history, ...) are left out; a user with none is absent from the result."""
    from trainer.predict_worker import load_teacher_side, teacher_outputs

    if recent < 1:
        raise ExportError(f"--recent must be >= 1, got {recent}")
    cfg, inputs = run or _open_run(run_url)
    dev = torch.device(device)
    retriever, teacher, encoder = load_teacher_side(cfg, inputs, dev)
    users = np.unique(np.asarray(user_ids, dtype=np.int64))
    shards = retriever.shard_of(users)
    out: dict[int, tuple[np.ndarray, int]] = {}
    for shard in np.unique(shards):
        mine = users[shards == shard]
        rows, _ = retriever.read_users(int(shard), mine)
        r_user = rows["user_id"].to_numpy().astype(np.int64)
        r_item = rows["item_id"].to_numpy().astype(np.int64)
        r_ts = rows["timestamp"].to_numpy().astype(np.int64)
        keep = np.ones(len(r_user), bool) if before is None else r_ts < int(before)
        req_u, req_i, req_t = [], [], []
        for user in mine:
            idx = np.flatnonzero((r_user == user) & keep)
            idx = idx[np.argsort(r_ts[idx], kind="stable")][-recent:]
            req_u += [int(user)] * len(idx)
            req_i += r_item[idx].tolist()
            req_t += r_ts[idx].tolist()
        if not req_u:
            continue
        rec = retriever.records(int(shard), req_u, req_i, req_t, None)
        if not len(rec.rows):
            continue
        reps, _, _ = teacher_outputs(teacher, encoder, rec.table, cfg.data.task, dev)
        owners = np.asarray(req_u, dtype=np.int64)[np.asarray(rec.rows, dtype=np.int64)]
        for user in np.unique(owners):
            m = owners == user
            out[int(user)] = (reps[m].mean(axis=0).astype(np.float32), int(m.sum()))
    return out


def user_level_gap(
    run_url: str,
    *,
    recent: int = DEFAULT_RECENT,
    device: str = "cpu",
    batch_size: int = 16,
    max_samples: int | None = None,
) -> dict[str, Any]:
    """CTR: test AUC of per-request scoring (each sample's own gate input, the run's evaluation) vs user-level
    adapters (every test sample of a user scored with that user's vector from `user_conditions`, built from the
    interactions before the test period: timestamp < the earliest test sample's). Both AUCs are on the test samples
    whose user has a vector; `auc_per_request_all` on all of them. The gated model with the user vector equals
    the exported user adapter in stock PEFT (export's --check, to 1e-4 in logits)."""
    from transformers import AutoTokenizer

    from recdata.layout import paths
    from recdata.metrics import auc
    from recdata.model_source import tokenizer_dir
    from recdata.samples import SampleSet
    from recdata.streams import StreamReader, collate
    from retrieval.encoding import answer_token_ids
    from trainer.hybrid import CANDIDATE_TOKEN, HISTORY_TOKEN, TEXT_FALLBACK
    from trainer.objective import answer_loss, p_yes_from_logits
    from trainer.predict_worker import load_model

    cfg, inputs = _open_run(run_url)
    if cfg.data.task != "ctr":
        raise ExportError(f"--gap measures CTR AUC; {run_url} is a {cfg.data.task!r} run")
    if cfg.trainer.lora.mode == "plain":
        raise ExportError(f"{run_url}: a plain LoRA run has no gate: per-request and per-user scoring are the same")
    reader = StreamReader(storage.join(run_url, "data", "test"))
    try:
        n = reader.rows if max_samples is None else min(reader.rows, max_samples)
        rows = reader.rows_at(np.arange(n))
    finally:
        reader.close()
    ids = np.asarray([r["sample_id"] for r in rows], dtype=np.int64)
    meta = SampleSet.open(paths(cfg).samples).read(
        "test", columns=["sample_id", "user_id", "timestamp"], sample_ids=ids
    )
    users = meta["user_id"].to_numpy().astype(np.int64)
    cutoff = int(meta["timestamp"].to_numpy().min())
    conds = user_conditions(run_url, users, recent=recent, before=cutoff, device=device, run=(cfg, inputs))

    tok = AutoTokenizer.from_pretrained(
        tokenizer_dir(inputs["model_dir"], tiny=cfg.model.tiny is not None, model_cfg=cfg.model),
        trust_remote_code=cfg.model.trust_remote_code,
    )
    slot_ids: tuple[int, ...] = ()
    fallback = None
    if cfg.trainer.hybrid_item_emb:
        tok.add_special_tokens({"additional_special_tokens": [HISTORY_TOKEN, CANDIDATE_TOKEN]})
        slot_ids = tuple(tok.convert_tokens_to_ids([HISTORY_TOKEN, CANDIDATE_TOKEN]))
        fallback = tok(TEXT_FALLBACK, add_special_tokens=False)["input_ids"][0]
    answer = answer_token_ids(tok, "ctr")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = load_model(cfg, inputs, torch.device(device), slot_ids=slot_ids, fallback_id=fallback)
    p_req, p_user = np.zeros(n), np.full(n, np.nan)
    with torch.no_grad():
        for s in range(0, n, batch_size):
            idx = np.arange(s, min(s + batch_size, n))
            batch = {k: v.to(device) for k, v in collate([rows[i] for i in idx], pad).items()}
            _, _, logits = answer_loss(model, batch)
            p_req[idx] = p_yes_from_logits(logits, batch["answer_len"], answer["Yes"], answer["No"]).double().cpu()
            cover = np.array([int(users[i]) in conds for i in idx])
            if cover.any():
                cond = batch["cond"].clone()
                for q, i in enumerate(idx):
                    if cover[q]:
                        cond[q] = torch.as_tensor(conds[int(users[i])][0], device=cond.device, dtype=cond.dtype)
                _, _, logits = answer_loss(model, {**batch, "cond": cond})
                p = p_yes_from_logits(logits, batch["answer_len"], answer["Yes"], answer["No"]).double().cpu().numpy()
                p_user[idx[cover]] = p[cover]
    labels = np.asarray([r["label"] for r in rows], dtype=np.int64)
    covered = ~np.isnan(p_user)
    result = {
        "test_samples": int(n),
        "covered_samples": int(covered.sum()),
        "users": int(len(np.unique(users))),
        "users_with_vector": int(len(set(users.tolist()) & set(conds))),
        "recent": int(recent),
        "cutoff_timestamp": cutoff,
        "auc_per_request_all": auc(labels, p_req),
        "auc_per_request": auc(labels[covered], p_req[covered]) if covered.any() else None,
        "auc_user_level": auc(labels[covered], p_user[covered]) if covered.any() else None,
        "mean_abs_p_diff": float(np.abs(p_user[covered] - p_req[covered]).mean()) if covered.any() else None,
    }
    if result["auc_user_level"] is not None:
        result["auc_gap"] = result["auc_per_request"] - result["auc_user_level"]
    return result


def read_user_list(spec: str, id_map: Any = None) -> tuple[np.ndarray, list[str | None]]:
    """--users: a Parquet file/URL with a `user_id` column, or a comma-separated list. With an id map (a dataset
    ingested from string ids), text values are the source's own keys and integers the dataset's ids, as in
    predict requests; without one, integers. Returns (dataset ids, source keys or None)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainer.requests_io import ids_from_column

    if spec.endswith(".parquet") or "://" in spec or os.path.exists(spec):
        fs, path = storage.get_fs(spec)
        with storage.storage_errors(spec):
            column = pq.read_table(path, columns=["user_id"], filesystem=storage.arrow_fs(fs))["user_id"]
    else:
        values = [v.strip() for v in spec.split(",") if v.strip()]
        column = pa.chunked_array([pa.array(values, pa.string())])
    ids, ok, present = ids_from_column(column, spec, "user_id", id_map)
    if not (ok & present).all():
        bad = [v for v, good in zip(column.to_pylist(), ok & present) if not good][:5]
        raise ExportError(f"--users {spec}: unknown or malformed user ids {bad}")
    keys: list[str | None] = [None] * len(ids)
    if id_map is not None:
        lookup = dict(zip(id_map["user_id"].to_pylist(), id_map["key"].to_pylist()))
        keys = [lookup.get(int(i)) for i in ids]
    return ids, keys


def export_users(
    run_url: str,
    users: str,
    out_url: str,
    *,
    recent: int = DEFAULT_RECENT,
    before: int | None = None,
    device: str = "cpu",
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One standard PEFT adapter per user of `users` under `{out}/user-<id>/`, from the user-level conditioning
    vector (user_conditions), plus `{out}/users.parquet` (user_id, user_key, path, targets, cond). Users without a
    usable interaction get no folder and are listed in the result."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from recdata.schema import Dataset

    cfg, inputs = _open_run(run_url)
    dataset = Dataset.open(inputs["dataset"])
    ids, keys = read_user_list(users, dataset.id_map("user_id"))
    conds = user_conditions(run_url, ids, recent=recent, before=before, device=device, run=(cfg, inputs))
    adapter = _Adapter(inputs["adapter"])
    base, revision = run_base_ref(cfg, run_url)
    when = f"with a timestamp < {before}" if before is not None else "in the dataset"
    index: dict[str, list] = {"user_id": [], "user_key": [], "path": [], "targets": [], "cond": []}
    missing = []
    for uid, key in dict(zip(ids.tolist(), keys)).items():
        if uid not in conds:
            missing.append(key or uid)
            continue
        vec, count = conds[uid]
        folder = f"user-{uid}"
        card = {
            "user_key": key,
            "conditioning": {
                "kind": "user-level: mean over the user's recent targets",
                "how": f"mean of the frozen teacher's representations of the user's {count} latest interactions "
                f"{when} (each a request at its own time; at most {recent})",
                "targets": count,
            },
            "metrics": metrics or {},
        }
        adapter.write(
            vec,
            storage.join(out_url, folder),
            base_model_name_or_path=base,
            revision=revision,
            user_id=str(uid),
            card=card,
        )
        for name, value in (("user_id", uid), ("user_key", key), ("path", folder), ("targets", count)):
            index[name].append(value)
        index["cond"].append(vec.tolist())
    table = pa.table(
        {
            "user_id": pa.array(index["user_id"], pa.int64()),
            "user_key": pa.array(index["user_key"], pa.string()),
            "path": pa.array(index["path"], pa.string()),
            "targets": pa.array(index["targets"], pa.int32()),
            "cond": pa.array(index["cond"], pa.list_(pa.float32())),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(storage.join(out_url, USERS_INDEX), buf.getvalue())
    return {"written": table.num_rows, "without_history": missing, "out": out_url}


# ---- CLI ----------------------------------------------------------------------------------------------------------
class ExportError(RecloraError, ValueError):
    """An export input that cannot be used (adapter folder, conditioning file, --out); the message says which."""


def read_cond_npy(path: str, row: int | None) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)  # never unpickle
    except FileNotFoundError:
        raise ExportError(f"--cond {path}: file not found") from None
    except (OSError, ValueError) as e:
        raise ExportError(
            f"--cond {path}: not a numeric .npy array ({str(e).splitlines()[0][:120]}); write it with numpy.save"
        ) from None
    if array.ndim == 2:
        if row is None:
            raise SystemExit(f"{path} holds {array.shape[0]} vectors: pass --row to pick one")
        array = array[row]
    if array.ndim != 1:
        raise SystemExit(f"{path}: expected a (cond_dim,) or (n, cond_dim) array, got shape {array.shape}")
    return array.astype(np.float32)


def read_cond_parquet(url: str, user_id: str, id_column: str, cond_column: str) -> np.ndarray:
    import fsspec
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb") as handle:
        table = pq.read_table(handle, columns=[id_column, cond_column])
    id_type = table.schema.field(id_column).type
    key = int(user_id) if pa.types.is_integer(id_type) else user_id
    rows = table.filter(pc.equal(table[id_column], pa.scalar(key, type=id_type)))
    if rows.num_rows != 1:
        raise SystemExit(f"{url}: expected exactly one row with {id_column} == {user_id!r}, found {rows.num_rows}")
    return np.asarray(rows[cond_column][0].as_py(), dtype=np.float32)


def check_against_stock_peft(adapter_dir: str, user_dir: str, base: str, cond: np.ndarray) -> float:
    """Max |logits| difference between the personalized model and stock PEFT loading the user export."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def fresh_base() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(resolve_model(base), dtype=torch.float32, **load_kwargs()).eval()

    personalized = load_personalized(fresh_base(), adapter_dir)
    stock = PeftModel.from_pretrained(fresh_base(), user_dir).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, stock.config.vocab_size, (1, 16), generator=generator)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = personalized(ids, mask, torch.as_tensor(cond).reshape(1, -1)).logits
        theirs = stock(input_ids=ids, attention_mask=mask).logits
    return (ours - theirs).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.export",
        description="Write standard PEFT LoRA adapters from a mixture-LoRA adapter folder (PersonalizedLM.save_adapter "
        "output): one per conditioning vector (--adapter --cond ...) or one per user of a trained run (--run --users). "
        "safetensors + JSON only.",
        epilog="examples:\n"
        "  python -m trainer.export --adapter runs/x/adapter --cond user.npy --out exports/u42\n"
        "  python -m trainer.export --adapter s3://b/run/adapter --cond-parquet s3://b/cond.parquet --user-id 42 "
        "--out s3://b/exports/u42\n"
        "  python -m trainer.export --run runs/x --users users.parquet --out exports/ --recent 10\n"
        "  python -m trainer.export --run runs/x --gap\n"
        "  python -m trainer.export --adapter OLD_ADAPTER --mark-personalized\n"
        "load a result with peft.PeftModel.from_pretrained(base_model, OUT).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--adapter", help="mixture adapter folder or URL (has mixture_config.json)")
    parser.add_argument("--run", help="trained run folder or URL: its adapter, teacher and data (--users, --gap)")
    parser.add_argument("--out", help="output folder or s3:// URL")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--cond", help=".npy file with the conditioning vector (cond_dim,) or (n, cond_dim)")
    source.add_argument("--cond-parquet", help="parquet file or fsspec URL with one row per user")
    source.add_argument("--users", help="with --run: Parquet with a user_id column, or a comma-separated id list")
    parser.add_argument("--row", type=int, help="row of a 2-D --cond array")
    parser.add_argument("--user-id", help="user to pick from --cond-parquet (also recorded in user_export.json)")
    parser.add_argument("--id-column", default="user_id", help="parquet id column (default: user_id)")
    parser.add_argument("--cond-column", default="cond", help="parquet list<float> column (default: cond)")
    parser.add_argument("--recent", type=int, default=DEFAULT_RECENT, help="--users/--gap: targets averaged per user")
    parser.add_argument("--before", type=int, help="--users: only interactions with a timestamp < this (seconds)")
    parser.add_argument("--gap", action="store_true", help="with --run (CTR): test AUC per request vs user-level")
    parser.add_argument("--device", default="cpu", help="--users/--gap: torch device (default cpu)")
    parser.add_argument("--mark-personalized", action="store_true", help="mark an older --adapter folder in place")
    parser.add_argument("--base", help="base model reference recorded in adapter_config.json; a folder for --check")
    parser.add_argument(
        "--check", action="store_true", help="load --base, compare personalized logits with stock PEFT on the export"
    )
    parser.add_argument("--tol", type=float, default=1e-4, help="max abs logit difference allowed by --check")
    args = parser.parse_args(argv)
    try:
        return _run(parser, args)
    except (RecloraError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.mark_personalized:
        if not args.adapter or not storage.is_local(args.adapter):
            parser.error("--mark-personalized needs a local --adapter folder")
        config = read_mixture_config(args.adapter)
        if config.mode == "plain":
            print(f"{args.adapter}: a plain LoRA is a stock adapter; nothing to mark")
            return 0
        mark_personalized(args.adapter, config)
        print(f"marked {args.adapter}: stock PEFT now refuses it; load it with trainer.lora.load_personalized")
        return 0
    if args.run:
        return _run_users(parser, args)
    if not args.adapter or not args.out:
        parser.error("give --adapter and --out (or --run)")
    storage.check_writable(args.out, "--out")  # a file on the way or a read-only folder, before any reading
    try:
        adapter = _Adapter(args.adapter)
    except FileNotFoundError as e:
        raise ExportError(f"--adapter {args.adapter}: {e}; pass the run's adapter folder (RUN/adapter)") from None
    config = adapter.config
    if config.mode == "plain":
        cond = np.zeros(0, dtype=np.float32)
    elif args.cond:
        cond = read_cond_npy(args.cond, args.row)
    elif args.cond_parquet:
        if args.user_id is None:
            parser.error("--cond-parquet needs --user-id")
        cond = read_cond_parquet(args.cond_parquet, args.user_id, args.id_column, args.cond_column)
    else:
        parser.error(f"mode {config.mode!r} needs --cond or --cond-parquet")
    if config.mode != "plain" and cond.shape != (config.cond_dim,):
        parser.error(f"conditioning vector has shape {cond.shape}, the adapter expects ({config.cond_dim},)")
    card = {"conditioning": {"kind": "given vector", "how": f"--cond {args.cond}" if args.cond else "--cond-parquet"}}
    out = adapter.write(cond, args.out, base_model_name_or_path=args.base, user_id=args.user_id, card=card)
    print(f"wrote {out}")
    if args.check:
        if not args.base:
            parser.error("--check needs --base")
        with local_adapter(args.adapter) as src, local_adapter(out) as user:
            diff = check_against_stock_peft(str(src), str(user), args.base, cond)
        print(f"max |logit diff| personalized vs stock PEFT: {diff:.3e} (tol {args.tol:g})")
        if not diff <= args.tol:
            return 1
    return 0


def _run_users(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.adapter or args.cond or args.cond_parquet:
        parser.error("--run takes the run's own adapter and builds the vectors: no --adapter/--cond/--cond-parquet")
    if not args.users and not args.gap:
        parser.error("--run needs --users (with --out) or --gap")
    metrics: dict[str, Any] = {}
    if args.gap:
        gap = user_level_gap(args.run, recent=args.recent, device=args.device)
        print(json.dumps(gap))
        metrics = {
            "test AUC, per-request scoring": f"{gap['auc_per_request']:.4f}",
            f"test AUC, user-level adapters (recent={args.recent})": f"{gap['auc_user_level']:.4f}",
            "test samples compared": gap["covered_samples"],
        }
    if args.users:
        if not args.out:
            parser.error("--users needs --out")
        storage.check_writable(args.out, "--out")
        done = export_users(
            args.run, args.users, args.out, recent=args.recent, before=args.before, device=args.device, metrics=metrics
        )
        print(f"wrote {done['written']} user adapter(s) under {args.out} ({USERS_INDEX} lists them)")
        if done["without_history"]:
            print(f"no usable interaction, no adapter: {done['without_history'][:10]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
