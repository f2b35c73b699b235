"""Build, save and load teachers. No pickle anywhere: weights and vocabularies are safetensors, the
rest is JSON.

    {model_url}/model.safetensors      state dict
    {model_url}/features.safetensors   vocabularies and attribute tables (FeatureSpace.arrays)
    {model_url}/teacher.json           config, sizes, metrics, sha256 of both files; written LAST,
                                       so its presence means the model is committed
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch
from torch import nn

from configs.errors import RecloraError
from recdata import storage
from teacher.config import TeacherConfig
from teacher.din import DIN
from teacher.features import UNK, FeatureSpace
from teacher.sasrec import SASRec

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
FEATURES_FILE = "features.safetensors"
META_FILE = "teacher.json"


class TeacherLoadError(RecloraError, RuntimeError):
    pass


def build_model(cfg: TeacherConfig, space: FeatureSpace) -> nn.Module:
    return DIN(cfg, space) if cfg.model == "din" else SASRec(cfg, space)


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def to_tensors(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        out[k] = t.to(device, non_blocking=True) if device.type != "cpu" else t
    return out


def apply_unk_dropout(
    b: dict[str, torch.Tensor], rates: dict[str, float], gen: torch.Generator, part: tuple[int, int] | None = None
) -> None:
    """Replace a share of known ids by UNK during training (rates per input field) so the reserved
    unknown embedding is trained and means 'an id not seen in training' at inference.

    `part=(offset, global_batch_size)`: `b` holds rows [offset, offset + len) of a global batch (data-
    parallel training). The draws are made for the whole global batch and sliced, so every rank consumes
    the same generator stream and each row gets the draw it would get in a single process."""
    for name, p in rates.items():
        if p <= 0 or name not in b:
            continue
        t = b[name]
        if part is None:
            u = torch.rand(t.shape, generator=gen)
        else:
            off, total = part
            u = torch.rand((total, *t.shape[1:]), generator=gen)[off : off + t.shape[0]]
        drop = (u < p).to(t.device) & (t > UNK)
        b[name] = torch.where(drop, torch.full_like(t, UNK), t)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_teacher(
    model_url: str, model: nn.Module, cfg: TeacherConfig, space: FeatureSpace, extra: dict[str, Any]
) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    model_bytes = safetensors.torch.save(state)
    feat_bytes = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in space.arrays().items()})
    # A rerun over an existing model first removes the commit marker, so a crash mid-save never leaves
    # a teacher.json that vouches for half-written weights.
    storage.rm(storage.join(model_url, META_FILE))
    storage.write_bytes_atomic(storage.join(model_url, MODEL_FILE), model_bytes)
    storage.write_bytes_atomic(storage.join(model_url, FEATURES_FILE), feat_bytes)
    meta = {
        "format_version": FORMAT_VERSION,
        "model": cfg.model,
        "task": cfg.task,
        "rep_dim": int(model.rep_dim),
        "config": cfg.to_dict(),
        "features": space.meta(),
        "sha256": {MODEL_FILE: _sha256(model_bytes), FEATURES_FILE: _sha256(feat_bytes)},
        **extra,
    }
    storage.write_json_atomic(storage.join(model_url, META_FILE), meta)


@dataclass
class LoadedTeacher:
    model: nn.Module
    cfg: TeacherConfig
    space: FeatureSpace
    meta: dict[str, Any]

    @property
    def rep_dim(self) -> int:
        return int(self.meta["rep_dim"])


def load_teacher(model_url: str, device: str | torch.device = "cpu") -> LoadedTeacher:
    """Load a committed teacher in eval mode (dropout off), weights frozen."""
    # One filesystem handle for the three reads (an S3 client per call is slow to create).
    fs, root = storage.get_fs(model_url)
    meta_url = storage.join(model_url, META_FILE)
    with storage.storage_errors(model_url):
        if not fs.exists(posixpath.join(root, META_FILE)):
            raise TeacherLoadError(
                f"{model_url}: no {META_FILE}: not a committed teacher (training crashed or still running?)"
            )
        meta = json.loads(fs.cat_file(posixpath.join(root, META_FILE)).decode("utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise TeacherLoadError(
            f"{meta_url}: format_version {meta.get('format_version')}, this code reads {FORMAT_VERSION}"
        )
    blobs = {}
    for name in (MODEL_FILE, FEATURES_FILE):
        with storage.storage_errors(model_url):
            data = fs.cat_file(posixpath.join(root, name))
        if _sha256(data) != meta["sha256"][name]:
            raise TeacherLoadError(
                f"{storage.join(model_url, name)}: sha256 does not match {META_FILE} (partial or foreign file)"
            )
        blobs[name] = data
    cfg = TeacherConfig.from_dict(meta["config"])
    space = FeatureSpace.from_saved(safetensors.numpy.load(blobs[FEATURES_FILE]), meta["features"])
    model = build_model(cfg, space)
    model.load_state_dict(safetensors.torch.load(blobs[MODEL_FILE]), strict=True)
    model.eval().requires_grad_(False)
    model.to(torch.device(device) if not isinstance(device, torch.device) else device)
    return LoadedTeacher(model, cfg, space, meta)
