"""Per-user export: fold one user's gate into a standard PEFT LoRA adapter folder.

ilora  -> rank N*r LoRA, lora_A = A, lora_B = B * diag(s * (g (x) 1_r)) / (alpha / (N*r))
reclora -> rank r LoRA, lora_A = A_u = sum_k g_k A_k, lora_B = B_u = sum_k g_k B_k (stock scale alpha/r = s)
plain  -> the bank itself.
Stock `PeftModel.from_pretrained(base, out_dir)` then reproduces the personalized model for that user.
Only the adapter folder and the conditioning vector are needed; the base model only for --check.

    python -m trainer.export --adapter runs/x/adapter --cond user.npy --out exports/u42 [--base MODEL --check]
    python -m trainer.export --adapter DIR --cond-parquet s3://b/cond.parquet --user-id 42 --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from configs.errors import RecloraError
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
    read_mixture_config,
)

USER_META_FILE = "user_export.json"
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
) -> Path:
    """Write a stock PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) for one user."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict = {"user_id": user_id, "mode": config.mode}
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
        base_model_name_or_path=base_model_name_or_path,
    ).save_pretrained(str(out))
    (out / USER_META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return out


def export_user_adapter(
    adapter_dir: str | Path,
    cond: torch.Tensor | np.ndarray,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    user_id: str | None = None,
) -> Path:
    """Per-user export from a PersonalizedLM.save_adapter folder."""
    adapter_dir = Path(adapter_dir)
    config = read_mixture_config(adapter_dir)
    meta = json.loads((adapter_dir / MIXTURE_CONFIG_FILE).read_text())
    bank = load_file(str(adapter_dir / PEFT_WEIGHTS_FILE))
    gate_state = load_file(str(adapter_dir / GATES_FILE)) if config.mode != "plain" else {}
    base = base_model_name_or_path or meta.get("base_model_name_or_path")
    return write_user_adapter(
        config, meta["module_names"], bank, gate_state, cond, out_dir, base_model_name_or_path=base, user_id=user_id
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
        description="Write a standard PEFT LoRA adapter for one user from a mixture-LoRA adapter folder "
        "(PersonalizedLM.save_adapter output). safetensors + JSON only.",
        epilog="examples:\n"
        "  python -m trainer.export --adapter runs/x/adapter --cond user.npy --out exports/u42\n"
        "  python -m trainer.export --adapter DIR --cond-parquet s3://bucket/cond.parquet --user-id 42 "
        "--out DIR --base MODEL_DIR --check\n"
        "load the result with peft.PeftModel.from_pretrained(base_model, OUT).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--adapter", required=True, help="mixture adapter folder (has mixture_config.json)")
    parser.add_argument("--out", required=True, help="output folder for the user's PEFT LoRA adapter")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--cond", help=".npy file with the conditioning vector (cond_dim,) or (n, cond_dim)")
    source.add_argument("--cond-parquet", help="parquet file or fsspec URL with one row per user")
    parser.add_argument("--row", type=int, help="row of a 2-D --cond array")
    parser.add_argument("--user-id", help="user to pick from --cond-parquet (also recorded in user_export.json)")
    parser.add_argument("--id-column", default="user_id", help="parquet id column (default: user_id)")
    parser.add_argument("--cond-column", default="cond", help="parquet list<float> column (default: cond)")
    parser.add_argument("--base", help="base model folder: recorded in adapter_config.json; needed by --check")
    parser.add_argument(
        "--check", action="store_true", help="load --base, compare personalized logits with stock PEFT on the export"
    )
    parser.add_argument("--tol", type=float, default=1e-4, help="max abs logit difference allowed by --check")
    args = parser.parse_args(argv)
    try:
        return _run(parser, args)
    except RecloraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    storage.check_writable(args.out, "--out")  # a file on the way or a read-only folder, before any reading
    try:
        config = read_mixture_config(args.adapter)
    except FileNotFoundError as e:
        raise ExportError(f"--adapter {args.adapter}: {e}; pass the run's adapter folder (RUN/adapter)") from None
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
    out = export_user_adapter(args.adapter, cond, args.out, base_model_name_or_path=args.base, user_id=args.user_id)
    print(f"wrote {out}")
    if args.check:
        if not args.base:
            parser.error("--check needs --base")
        diff = check_against_stock_peft(args.adapter, str(out), args.base, cond)
        print(f"max |logit diff| personalized vs stock PEFT: {diff:.3e} (tol {args.tol:g})")
        if not diff <= args.tol:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
