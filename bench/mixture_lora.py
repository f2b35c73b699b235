"""Mixture-LoRA benchmark: forward+backward step time and peak memory on a Llama-shaped decoder stack.

    python bench/mixture_lora.py [--quick] [--device cuda --shape 7b]

Variants, side by side in one run (same base shape, random data, dropout 0 everywhere):
  plain_qv     stock PEFT LoRA r=8 on q,v                 (baseline for reclora)
  plain_all7   stock PEFT LoRA r=8 on the 7 linears       (baseline for ilora)
  ours_ilora   trainer.lora, 7 linears, rank 8 = 4 experts x rank 2, one shared gate
  ours_reclora trainer.lora, q,v, 16 experts x rank 8, one gate MLP per module
  ref_ilora    iLoRA-style reference: Python loop over experts summing g_k B_k A_k x (the tests' reference)
  ref_reclora  RecLoRA-style reference as its authors wrote it: forward hooks on q,v adding a per-sample bmm with
               A_u, B_u produced by Linear(N, d*r) layers (returned from the hook, not copied in place)

Step time: median over repeats after warmup. On CPU all variants stay alive and run round-robin (order reversed
every other round); each ratio is the median of per-round ratios, which cancels a shared machine's load drift.
On a shared CPU box each timed step is retried (up to --retries) while other processes took more than
--max-interference of the machine's CPU time during it (from /proc/stat), and the share is printed.
Peak memory: GPU torch.cuda.max_memory_allocated; CPU an estimate = parameter bytes + gradient bytes of the
trainable parameters + bytes of the distinct storages autograd saves for backward (counted with
torch.autograd.graph.saved_tensors_hooks, parameter storages excluded). Optimizer state is not included.
The last line printed is one JSON object with the headline ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from trainer.gates import ILoraGate, RecLoraGate  # noqa: E402
from trainer.lora import MixtureLoraConfig, build_personalized_model  # noqa: E402

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QV = ["q_proj", "v_proj"]
ILORA_COND, RECLORA_COND = 64, 256  # SASRec state (iLoRA) and DIN feature vector (RecLoRA) sizes
SHAPES = {
    "cpu": dict(hidden=1024, intermediate=2752, layers=4, heads=16, seq=256, batch=4),
    "quick": dict(hidden=1024, intermediate=2752, layers=2, heads=16, seq=128, batch=2),
    "7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, seq=256, batch=4),
}
VOCAB = 1024  # a small head keeps the measurement on the decoder stack


def base_model(shape: dict, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        vocab_size=VOCAB,
        max_position_embeddings=max(shape["seq"], 128),
        attention_dropout=0.0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.train()


def freeze_all_but(model: nn.Module, trainable: list[nn.Parameter]) -> None:
    keep = {id(p) for p in trainable}
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)


def _replace(model: nn.Module, targets: list[str], factory: Callable[[str, nn.Linear], nn.Module]) -> None:
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear):
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], factory(name, module))


# ---- reference formulations -----------------------------------------------------------------------------------------
class LoopILoraLinear(nn.Module):
    """iLoRA-style: y = W0 x + s * sum_k g_k B_k A_k x, one expert per loop iteration, gate from a shared holder."""

    def __init__(self, base: nn.Linear, rank: int, experts: int, alpha: float, holder: dict) -> None:
        super().__init__()
        self.base, self.experts, self.holder = base, experts, holder
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / (rank // experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        gate = self.holder["gate"].to(x.dtype)
        r = self.lora_A.out_features // self.experts
        x = x.to(self.lora_A.weight.dtype)
        for k in range(self.experts):
            a_k = self.lora_A.weight[k * r : (k + 1) * r]
            b_k = self.lora_B.weight[:, k * r : (k + 1) * r]
            y = y + (self.scaling * gate[:, k, None, None] * F.linear(F.linear(x, a_k), b_k)).to(y.dtype)
        return y


class RecLoraHookAdapter(nn.Module):
    """RecLoRA-style: Linear(N, d_in*r) / Linear(N, r*d_out) turn the gate into A_u, B_u; a hook adds the bmm."""

    def __init__(
        self, d_in: int, d_out: int, experts: int, rank: int, alpha: float, cond_dim: int, device: torch.device
    ) -> None:
        super().__init__()
        self.d_in, self.d_out, self.rank = d_in, d_out, rank
        self.lora_A_adapter = nn.Linear(experts, d_in * rank, bias=False, device=device)
        self.lora_B_adapter = nn.Linear(experts, rank * d_out, bias=False, device=device)
        nn.init.zeros_(self.lora_B_adapter.weight)
        self.gate = RecLoraGate(cond_dim, experts, dropout=0.0).to(device)
        self.scaling = alpha / rank

    def hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        batch = x.shape[0]
        alpha = self.gate(module.ctr_hidden_states)  # the authors' per-module attribute (global state)
        a_u = self.lora_A_adapter(alpha).view(batch, self.d_in, self.rank)
        b_u = self.lora_B_adapter(alpha).view(batch, self.rank, self.d_out)
        delta = torch.bmm(torch.bmm(x.to(a_u.dtype), a_u), b_u) * self.scaling
        return output + delta.to(output.dtype)


# ---- variants -------------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    targets: str
    model: nn.Module
    step: Callable[[], torch.Tensor]  # forward, returns the loss

    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def build_variant(name: str, shape: dict, device: str, dtype: torch.dtype, data: dict) -> Variant:
    model = base_model(shape, device, dtype)
    ids, mask = data["ids"], data["mask"]
    if name.startswith("plain"):
        targets = QV if name == "plain_qv" else ALL7
        peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
        return Variant(
            name,
            ",".join(t[0] for t in targets),
            peft,
            lambda: peft(input_ids=ids, attention_mask=mask, labels=ids).loss,
        )
    if name.startswith("ours"):
        if name == "ours_ilora":
            cfg = MixtureLoraConfig(
                mode="ilora", target_modules=ALL7, r=8, alpha=32, num_experts=4, cond_dim=ILORA_COND
            )
            cond = data["cond_ilora"]
        else:
            cfg = MixtureLoraConfig(
                mode="reclora",
                target_modules=QV,
                r=8,
                alpha=16,
                num_experts=16,
                cond_dim=RECLORA_COND,
                gate_dropout=0.0,
            )
            cond = data["cond_reclora"]
        ours = build_personalized_model(model, cfg).train().to(device)
        return Variant(
            name, ",".join(t[0] for t in cfg.target_modules), ours, lambda: ours(ids, mask, cond, labels=ids).loss
        )
    if name == "ref_ilora":
        holder: dict = {}
        _replace(model, ALL7, lambda _, lin: LoopILoraLinear(lin, 8, 4, 32, holder))
        model.router = ILoraGate(ILORA_COND, 4).to(device)
        freeze_all_but(model, [p for n, p in model.named_parameters() if "lora_" in n or n.startswith("router.")])

        def step_loop() -> torch.Tensor:
            holder["gate"] = model.router(data["cond_ilora"])  # the authors' shared gate list
            return model(input_ids=ids, attention_mask=mask, labels=ids).loss

        return Variant(name, "q,k,v,o,g,u,d", model, step_loop)
    if name == "ref_reclora":
        adapters = nn.ModuleDict()
        hooked = []
        for mod_name, module in list(model.named_modules()):
            if mod_name.rsplit(".", 1)[-1] in QV and isinstance(module, nn.Linear):
                adapter = RecLoraHookAdapter(
                    module.in_features, module.out_features, 16, 8, 16, RECLORA_COND, module.weight.device
                )
                adapters[mod_name.replace(".", "__")] = adapter
                module.register_forward_hook(adapter.hook)
                hooked.append(module)
        model.reclora_adapters = adapters
        freeze_all_but(model, list(adapters.parameters()))

        def step_hooks() -> torch.Tensor:
            for module in hooked:
                module.ctr_hidden_states = data["cond_reclora"]
            return model(input_ids=ids, attention_mask=mask, labels=ids).loss

        return Variant(name, "q,v", model, step_hooks)
    raise ValueError(f"unknown variant {name!r}")


# Ordered so each variant runs next to its baseline: ratios are taken within a round (paired), which cancels
# the slow drift of a shared machine's load.
VARIANTS = ["plain_all7", "ours_ilora", "ref_ilora", "plain_qv", "ours_reclora", "ref_reclora"]
BASELINE = {
    "ours_ilora": "plain_all7",
    "ref_ilora": "plain_all7",
    "ours_reclora": "plain_qv",
    "ref_reclora": "plain_qv",
    "plain_qv": "plain_qv",
    "plain_all7": "plain_all7",
}


# ---- measurement ----------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _cpu_ticks() -> tuple[int, int, int] | None:
    """(busy ticks of all CPUs, ticks of this process, total ticks) from /proc; None where /proc is missing."""
    try:
        with open("/proc/stat") as handle:
            ticks = [int(v) for v in handle.readline().split()[1:9]]
        with open("/proc/self/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    total = sum(ticks)
    return total - ticks[3] - ticks[4], int(fields[11]) + int(fields[12]), total


def timed_step(variant: Variant, device: str) -> tuple[float, float, float]:
    """(wall s, process CPU s, interference) of one forward+backward; interference = share of all CPU time that
    other processes used meanwhile (NaN when unknown)."""
    variant.model.zero_grad(set_to_none=True)
    sync(device)
    before = _cpu_ticks()
    start, start_cpu = time.perf_counter(), time.process_time()
    variant.step().backward()
    sync(device)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    after = _cpu_ticks()
    if before is None or after is None or after[2] == before[2]:
        return wall, cpu, float("nan")
    others = (after[0] - before[0]) - (after[1] - before[1])
    return wall, cpu, max(others, 0) / (after[2] - before[2])


def quiet_step(variant: Variant, device: str, max_interference: float, retries: int) -> tuple[float, float, float]:
    """A timed step that other jobs on a shared machine barely touched: retried up to `retries` times while
    their CPU share exceeds `max_interference`; the least disturbed attempt is kept."""
    best = timed_step(variant, device)
    for _ in range(retries):
        if not best[2] > max_interference:  # also stops on NaN (no /proc)
            break
        attempt = timed_step(variant, device)
        best = min(best, attempt, key=lambda result: result[2])
    return best


def peak_memory(variant: Variant, device: str) -> dict[str, float]:
    variant.model.zero_grad(set_to_none=True)
    params = list(variant.model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    grad_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        variant.step().backward()
        torch.cuda.synchronize()
        return {"peak": torch.cuda.max_memory_allocated(), "act": float("nan"), "params": param_bytes}
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = variant.step()
    loss.backward()
    act = sum(saved.values())
    return {"peak": param_bytes + grad_bytes + act, "act": act, "params": param_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller shape and fewer repeats (< ~1 min on CPU)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", choices=sorted(SHAPES), help="cpu (default on CPU), 7b (default on cuda), quick")
    parser.add_argument("--seq", type=int, help="override tokens per sample")
    parser.add_argument("--batch", type=int, help="override batch size")
    parser.add_argument("--repeats", type=int, help="timed repeats per variant (default 7, quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed warmup steps per variant (default 2, quick 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: cores)")
    parser.add_argument(
        "--max-interference",
        type=float,
        default=0.05,
        help="CPU: retry a timed step while other processes used more than this share of the "
        "machine's CPU time during it (default 0.05)",
    )
    parser.add_argument("--retries", type=int, help="CPU: retries per timed step (default 3, quick 1)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="series behind the JSON time ratios: wall clock (default) or process CPU time, "
        "which other jobs on a shared machine disturb much less (best with --threads 1)",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    shape_name = args.shape or ("quick" if args.quick else ("7b" if args.device == "cuda" else "cpu"))
    shape = dict(SHAPES[shape_name])
    shape["seq"] = args.seq or shape["seq"]
    shape["batch"] = args.batch or shape["batch"]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    repeats = args.repeats or (3 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (shape["batch"], shape["seq"]), generator=generator).to(args.device)
    data = {
        "ids": ids,
        "mask": torch.ones_like(ids),
        "cond_ilora": torch.randn(shape["batch"], ILORA_COND, generator=generator).to(args.device),
        "cond_reclora": torch.randn(shape["batch"], RECLORA_COND, generator=generator).to(args.device),
    }

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu_times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    interference: dict[str, list[float]] = {name: [] for name in VARIANTS}
    retries = args.retries if args.retries is not None else (1 if args.quick else 3)
    load_before = os.getloadavg()[0]
    memory: dict[str, dict] = {}
    trainable: dict[str, int] = {}
    targets: dict[str, str] = {}
    if args.device == "cpu":  # all variants alive, interleaved
        variants = {name: build_variant(name, shape, args.device, dtype, data) for name in VARIANTS}
        for name, variant in variants.items():
            memory[name] = peak_memory(variant, args.device)
        for rep in range(warmup + repeats):
            order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]  # alternate so no variant always runs first
            for name in order:
                if rep < warmup:
                    timed_step(variants[name], args.device)
                    continue
                elapsed, cpu, noise = quiet_step(variants[name], args.device, args.max_interference, retries)
                times[name].append(elapsed)
                cpu_times[name].append(cpu)
                interference[name].append(noise)
        for name, variant in variants.items():
            trainable[name], targets[name] = variant.trainable(), variant.targets
    else:  # one model at a time: six 7B copies do not fit on one GPU
        for name in VARIANTS:
            variant = build_variant(name, shape, args.device, dtype, data)
            for _ in range(warmup):
                timed_step(variant, args.device)
            samples = [timed_step(variant, args.device) for _ in range(repeats)]
            times[name], cpu_times[name] = [w for w, _, _ in samples], [c for _, c, _ in samples]
            memory[name] = peak_memory(variant, args.device)
            trainable[name], targets[name] = variant.trainable(), variant.targets
            del variant
            torch.cuda.empty_cache()

    median = {name: statistics.median(values) for name, values in times.items()}

    def ratio(name: str, base: str, series: dict[str, list[float]] = times) -> float:
        """Median over repeats of the per-round time ratio (rounds are paired on CPU; sequential on GPU)."""
        return statistics.median(t / b for t, b in zip(series[name], series[base]))

    mib = 1024**2
    print(
        f"shape={shape_name} {shape} device={args.device} dtype={str(dtype).removeprefix('torch.')} "
        f"threads={torch.get_num_threads()} warmup={warmup} repeats={repeats} torch={torch.__version__} "
        f"loadavg(1 min) before/after={load_before:.1f}/{os.getloadavg()[0]:.1f} json clock={args.clock}"
    )
    header = (
        f"{'variant':<13} {'targets':<14} {'trainable':>11} {'step ms':>9} {'min ms':>8} {'vs plain':>8} "
        f"{'cpu vs plain':>12} {'act MiB':>9} {'peak MiB':>9} {'mem vs plain':>12}"
    )
    print(header)
    print("-" * len(header))
    for name in VARIANTS:
        base = BASELINE[name]
        mem = memory[name]
        print(
            f"{name:<13} {targets[name]:<14} {trainable[name]:>11,} {median[name] * 1e3:>9.1f} "
            f"{min(times[name]) * 1e3:>8.1f} {ratio(name, base):>8.3f} {ratio(name, base, cpu_times):>12.3f} "
            f"{mem['act'] / mib:>9.1f} "
            f"{mem['peak'] / mib:>9.1f} {mem['peak'] / memory[base]['peak']:>12.3f}"
        )
    if args.device == "cpu":
        noisy = {n: statistics.median(v) for n, v in interference.items() if v}
        print(
            "median share of CPU used by other processes during kept steps: "
            + ", ".join(f"{n} {v:.1%}" for n, v in noisy.items())
        )
    print(
        "vs plain: median per-round wall-time ratio to plain LoRA r=8 on the same target modules; cpu vs plain: "
        "the same with process CPU time (less sensitive to other load on a shared machine); "
        "peak on CPU = params + trainable grads + saved activations"
    )
    print(
        f"cross pairs: ours_ilora vs plain_qv {ratio('ours_ilora', 'plain_qv'):.3f}, "
        f"ours_reclora vs plain_all7 {ratio('ours_reclora', 'plain_all7'):.3f}"
    )
    headline = times if args.clock == "wall" else cpu_times
    summary = {
        "ilora_vs_plain_time": round(ratio("ours_ilora", "plain_all7", headline), 4),
        "reclora_vs_plain_time": round(ratio("ours_reclora", "plain_qv", headline), 4),
        "ilora_vs_plain_mem": round(memory["ours_ilora"]["peak"] / memory["plain_all7"]["peak"], 4),
        "reclora_vs_plain_mem": round(memory["ours_reclora"]["peak"] / memory["plain_qv"]["peak"], 4),
        "loop_vs_ours_time": round(ratio("ref_ilora", "ours_ilora", headline), 4),
        "reference_vs_ours_time": round(ratio("ref_reclora", "ours_reclora", headline), 4),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
