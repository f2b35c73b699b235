"""One GPU script (issue #12): first contact with a GPU, then throughput, in priority order, in one run.

    python bench/gpu_check.py                              # the GPU run (the device when CUDA is there)
    python bench/gpu_check.py --device cpu --quick         # the same phases on tiny shapes: a CPU code-path check
    python bench/gpu_check.py --device cpu --quick --bf16  # ... with DeepSpeed's bf16 engine: the GPU's dtype path

On the project's device machine (torch, transformers and peft, but no DeepSpeed and no package registry), build
the wheels here first, carry them along and install them there before anything imports DeepSpeed:

    bash scripts/gpu_wheels.sh                             # here: .gpu_wheels/ (DeepSpeed + small deps; git-ignored)
    # device run, carry [".gpu_wheels"], timeout_s 600:
    python bench/gpu_check.py --install-wheels .gpu_wheels --out $OUT

The run fits a 9-minute budget (`--budget`, seconds from start; an item that would not fit is skipped and
recorded as such). Phases, each appending JSON lines to `{--out}/{timestamp}.jsonl` (default folder
bench/results/gpu_check/) and flushing after every item, so a run killed by a timeout keeps what it had measured:

  1 first_contact  on a tiny random Llama on the device: the environment (versions, device, spec and measured
                   peaks), collectives (all_reduce / all_gather of device tensors over the process group: world
                   size 1, nccl on CUDA, gloo on CPU), ZeRO-3 forward/backward through trainer.engine for the
                   hybrid model (trainer.hybrid), RecLoRA and iLoRA with activation checkpointing, and the dtypes
                   and devices of gates, bank and buffers after deepspeed.initialize (gates are meant to compute in
                   fp32 and return fp32 gates under bf16, whatever their storage dtype). Every check records
                   pass/fail and the error; the run goes on after a failure.
  2 throughput     a 7B-shaped Llama (hidden 4096, 32 heads, intermediate 11008, vocab 32000, `--layers`, default
                   32; random bf16 weights built directly on the GPU by trainer.engine.build_model, no CPU copy)
                   with plain LoRA on q,v; RecLoRA 16 experts (q,v); plain LoRA on all 7 linears; iLoRA 4 experts
                   (all 7), activation checkpointing on, DeepSpeed ZeRO-2 at world size 1 (the bf16 engine without
                   ZeRO-3's gather hooks, which phase 4 measures), at two micro-batch sizes: step time, tokens/s,
                   MFU against the spec peak and against the measured matmul peak (trainer.telemetry), peak
                   memory, step time over plain LoRA with the same targets.
  3 eval           evaluation throughput on the RecLoRA-16 engine of phase 2: CTR scoring (answer logits, p(yes)
                   from the Yes/No logits) and next-item candidate scoring (trainer.objective.candidate_scores,
                   KV-cached prompts, 20 candidates) in rows/s.
  4 zero3          ZeRO-3 at world size 1 on a 7B-width model with `--zero3-layers` layers (default 4), RecLoRA 16:
                   step time with the trainer's generated config (trainer.engine.ds_config), with a tuned one
                   (larger persistence threshold and prefetch bucket), and with ZeRO-2 (no hooks) as the
                   reference; then the trainer's checkpoint save (trainer.engine.full_state + trainer.checkpoint).

At the end: a table, a markdown summary next to the JSONL, and as the last line one JSON object (first-contact
failures, RecLoRA-16 MFU, ratios, eval rows/s, ZeRO-3 overhead, checkpoint seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere (bench/ would otherwise shadow packages)

PHASES = ("first_contact", "throughput", "eval", "zero3")
QV = ["q_proj", "v_proj"]
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name: trainer.lora settings, and the plain-LoRA baseline with the same targets
    "plain_qv": dict(mode="plain", target_modules=QV, r=8, num_experts=1, baseline="plain_qv"),
    "reclora16": dict(mode="reclora", target_modules=QV, r=8, num_experts=16, baseline="plain_qv"),
    "plain_all7": dict(mode="plain", target_modules=ALL7, r=8, num_experts=1, baseline="plain_all7"),
    "ilora4": dict(mode="ilora", target_modules=ALL7, r=8, num_experts=4, baseline="plain_all7"),
}
RECLORA_COND, ILORA_COND = 256, 64  # DIN feature vector (RecLoRA) and SASRec state (iLoRA) sizes
ANSWER_LEN = 2  # "Yes"/"No" + end of turn
# The shapes: GPU (default) and --quick (tiny, any device).
SHAPES = {
    "full": dict(
        hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000, seq=512,
        micros=(4, 16), warmup=2, timed=3, eval_rows=16, candidates=20, title_len=8, eval_reps=3,
        zero3_layers=4, zero3_micro=8,
    ),
    "quick": dict(
        hidden=128, layers=2, heads=4, kv_heads=4, intermediate=344, vocab=1024, seq=64,
        micros=(2, 4), warmup=1, timed=2, eval_rows=4, candidates=5, title_len=4, eval_reps=2,
        zero3_layers=2, zero3_micro=2,
    ),
}  # fmt: skip
# ZeRO-3 tuned for a frozen base at world size 1..N: small tensors (LoRA banks, gate MLPs, norms) resident rather
# than gathered per use, a larger prefetch bucket, more live parameters.
ZERO3_TUNED = {
    "zero_optimization": {
        "stage3_param_persistence_threshold": 1e6,
        "stage3_prefetch_bucket_size": 2e8,
        "stage3_max_live_parameters": 2e9,
        "stage3_max_reuse_distance": 2e9,
    }
}
# DeepSpeed's requirements that a torch + transformers + peft machine may lack, and the pydantic the project's
# typed config needs: installed from --install-wheels when their module is missing.
WHEEL_MODULES = {
    "deepspeed": "deepspeed",
    "hjson": "hjson",
    "py-cpuinfo": "cpuinfo",
    "ninja": "ninja",
    "msgpack": "msgpack",
    "einops": "einops",
    "pydantic": "pydantic",
    "pyarrow": "pyarrow",
}


# --------------------------------------------------------------------------------------------------- output
class Results:
    """JSON lines appended and flushed (and fsynced) one at a time."""

    def __init__(self, folder: Path, stamp: str):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{stamp}.jsonl"
        self.records: list[dict] = []

    def write(self, rec: dict) -> dict:
        self.records.append(rec)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return rec


def err_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:800]


def median(xs: list[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def rnd(x: float | None, n: int = 4) -> float | None:
    return None if x is None else round(float(x), n)


# --------------------------------------------------------------------------------------------------- wheels
def install_wheels(folder: str) -> dict[str, Any]:
    """pip install (from `folder` only, no index) every package of WHEEL_MODULES whose module is missing;
    where pip itself is missing or fails, a wheel of the folder is unpacked onto sys.path instead."""
    have = {w.name.split("-")[0].lower().replace("_", "-") for w in Path(folder).glob("*.whl")}
    absent = [pkg for pkg, mod in WHEEL_MODULES.items() if importlib.util.find_spec(mod) is None]
    missing = [pkg for pkg in absent if pkg in have]
    out: dict[str, Any] = {"folder": folder, "missing_before": absent, "not_in_folder": sorted(set(absent) - have)}
    if not missing:
        return out
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", folder, *missing]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out["pip_rc"] = proc.returncode
    out["pip_tail"] = (proc.stdout + proc.stderr)[-1500:]
    if proc.returncode != 0:  # one at a time, without dependency resolution
        for pkg in missing:
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links", folder, pkg],
                capture_output=True,
                text=True,
            )
    importlib.invalidate_caches()
    still = [pkg for pkg in missing if importlib.util.find_spec(WHEEL_MODULES[pkg]) is None]
    if still:  # no usable pip: unpack the wheels (pure-Python ones, and binary ones built for this Python)
        target = Path(tempfile.mkdtemp(prefix="gpu-check-wheels-"))
        for whl in sorted(Path(folder).glob("*.whl")):
            with zipfile.ZipFile(whl) as z:
                z.extractall(target)
        sys.path.insert(0, str(target))
        importlib.invalidate_caches()
        out["unpacked_to"] = str(target)
    out["missing_after"] = [pkg for pkg in missing if importlib.util.find_spec(WHEEL_MODULES[pkg]) is None]
    return out


class _Stub:
    """Stands in for every attribute of a missing module: callable, indexable, iterable (empty)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> "_Stub":
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Stub(f"{self._name}.{attr}")

    def __call__(self, *args: Any, **kwargs: Any) -> "_Stub":
        return _Stub(f"{self._name}()")

    def __getitem__(self, key: Any) -> "_Stub":
        return _Stub(f"{self._name}[]")

    def __iter__(self):
        return iter(())


def stub_if_missing(package: str, submodules: tuple[str, ...]) -> bool:
    """Make `import package[.sub]` succeed with stubs when the package is absent. recdata's storage and streams
    import pyarrow (and build Arrow schemas) at import time; gpu_check reads no Parquet, so on a machine without
    pyarrow the trainer's modules still import. Returns whether stubs were installed."""
    import types

    if importlib.util.find_spec(package) is not None:
        return False
    for name in (package, *(f"{package}.{s}" for s in submodules)):
        mod = types.ModuleType(name)
        mod.__getattr__ = lambda attr, _n=name: getattr(_Stub(_n), attr)  # type: ignore[method-assign]
        sys.modules[name] = mod
    return True


# --------------------------------------------------------------------------------------------------- runner
class Check:
    """Runs the phases: one device, one process group, a time budget."""

    def __init__(self, args, results: Results):
        import torch

        self.args, self.results, self.torch = args, results, torch
        self.t_start = time.perf_counter() - getattr(args, "_elapsed_before", 0.0)
        self.gpu = args.device == "cuda"
        self.shape = dict(SHAPES["quick" if args.quick else "full"])
        if args.layers:
            self.shape["layers"] = args.layers
        if args.zero3_layers:
            self.shape["zero3_layers"] = args.zero3_layers
        self.device = None
        self.peaks: dict[str, float | None] = {"spec": None, "measured": None}
        self.kept: dict[str, Any] = {}  # phase 2's RecLoRA-16 engine, for phase 3
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))

    def ensure_peaks(self, spec: float | None = None) -> float:
        """The measured matmul peak (trainer.telemetry.measured_peak_flops), once per run."""
        from trainer.telemetry import measured_peak_flops, spec_peak_flops

        if self.peaks["measured"] is None:
            if spec is None and self.gpu:
                spec = spec_peak_flops(self.torch.cuda.get_device_name(0))
            if self.args.peak_tflops:
                spec = self.args.peak_tflops * 1e12
            dev = "cuda" if self.gpu else "cpu"
            self.peaks = {"spec": spec, "measured": measured_peak_flops(dev, None, 20 if self.gpu else 3)}
        return self.peaks["measured"]

    # ---- time
    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def fits(self, seconds: float) -> bool:
        return self.elapsed() + seconds <= self.args.budget

    def sync(self) -> None:
        if self.gpu:
            self.torch.cuda.synchronize()

    # ---- one item: pass/fail + error, never raises
    def item(self, phase: str, name: str, fn: Callable[[], dict], estimate: float = 0.0) -> dict:
        rec: dict[str, Any] = {"phase": phase, "kind": "item", "name": name}
        if not self.fits(estimate):
            rec.update(ok=None, skipped=f"time budget: {self.elapsed():.0f}s of {self.args.budget}s used")
            return self.results.write(rec)
        t0 = time.perf_counter()
        try:
            detail = fn() or {}
            ok = detail.pop("ok", True)
            rec.update(ok=bool(ok), **detail)
        except Exception as e:  # a failed check is a result, not the end of the run
            rec.update(ok=False, error=err_text(e), traceback=traceback.format_exc()[-2500:])
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        # The item's frames are gone: collect the engines' reference cycles and report what stays allocated
        # (phase 2 keeps one engine for phase 3; anything else is a leak into the next item).
        gc.collect()
        if self.gpu:
            with contextlib.suppress(Exception):
                self.torch.cuda.empty_cache()
                rec["allocated_after_gib"] = round(self.torch.cuda.memory_allocated() / 2**30, 2)
        print(f"[{phase}] {name}: {'ok' if rec['ok'] else 'FAILED'} ({rec['seconds']}s)"
              + (f" {rec['error'].splitlines()[0][:200]}" if rec.get("error") else ""), flush=True)  # fmt: skip
        return self.results.write(rec)

    def phase_done(self, phase: str, t0: float, extra: dict | None = None) -> dict:
        items = [r for r in self.results.records if r.get("phase") == phase and r.get("kind") == "item"]
        rec = {
            "phase": phase,
            "kind": "phase",
            "items": len(items),
            "passed": sum(1 for r in items if r.get("ok") is True),
            "failed": [r["name"] for r in items if r.get("ok") is False],
            "skipped": [r["name"] for r in items if r.get("ok") is None],
            "seconds": round(time.perf_counter() - t0, 2),
            **(extra or {}),
        }
        return self.results.write(rec)

    # ---- building blocks (the trainer's own functions)
    def llama(self, layers: int | None = None, tiny: bool = False):
        from transformers import LlamaConfig

        if tiny:
            from trainer.tiny import tiny_llama_config

            return tiny_llama_config(num_layers=2, hidden=64, intermediate=128, num_heads=4, num_kv_heads=2,
                                     vocab_size=1024)  # fmt: skip
        s = self.shape
        return LlamaConfig(
            hidden_size=s["hidden"],
            intermediate_size=s["intermediate"],
            num_hidden_layers=layers or s["layers"],
            num_attention_heads=s["heads"],
            num_key_value_heads=s["kv_heads"],
            vocab_size=s["vocab"],
            max_position_embeddings=max(4096, s["seq"] + 64),
            tie_word_embeddings=False,
            use_cache=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )

    def run_config(self, adapter: str, stage: int, micro: int, activation_checkpointing: bool = True):
        from configs.loader import load_config

        a = ADAPTERS[adapter]
        if a["mode"] == "ilora":
            teacher = ["data.task=next_item", "teacher.model=sasrec", f"teacher.embed_dim={ILORA_COND}",
                       f"teacher.rep_dim={ILORA_COND}"]  # fmt: skip
        else:
            teacher = ["teacher.model=din", f"teacher.mlp_hidden=[{RECLORA_COND}]", f"teacher.rep_dim={RECLORA_COND}"]
        return load_config(
            "tiny",
            [
                "run.seed=0",
                f"model.dtype={'bfloat16' if self.gpu else 'float32'}",
                *teacher,
                "trainer.num_workers=1",
                f"trainer.use_gpu={'true' if self.gpu else 'false'}",
                f"trainer.zero_stage={stage}",
                f"trainer.batch_size={micro}",
                f"trainer.micro_batch_size={micro}",
                "trainer.lr=1e-4",
                "trainer.schedule=constant",
                f"trainer.activation_checkpointing={'true' if activation_checkpointing else 'false'}",
                f"trainer.lora.mode={a['mode']}",
                f"trainer.lora.target_modules=[{','.join(a['target_modules'])}]",
                f"trainer.lora.r={a['r']}",
                f"trainer.lora.num_experts={a['num_experts']}",
                "trainer.lora.alpha=16",
                "trainer.lora.dropout=0.0",
            ],
        )

    def build(self, adapter: str, stage: int, micro: int, lcfg, ds_override: dict | None = None, hybrid=None):
        """trainer.engine: ds_config -> build_model (random base from `lcfg`) -> build_engine."""
        from trainer.engine import build_engine, build_model, ds_config, merge_config

        cfg = self.run_config(adapter, stage, micro)
        ds_cfg = ds_config(cfg.trainer, self.gpu, cfg.model.dtype, 1)
        if self.args.bf16 and not self.gpu:  # the GPU's dtype path on a CPU: DeepSpeed's bf16 engine, gloo
            ds_cfg = merge_config(ds_cfg, {"bf16": {"enabled": True}})
        if ds_override:
            ds_cfg = merge_config(ds_cfg, ds_override)
        t0 = time.perf_counter()
        pm, hf_ds = build_model(cfg, None, ds_cfg, self.gpu, hybrid, base_config=lcfg)
        engine, _, _ = build_engine(pm, ds_cfg, cfg.trainer, 1000)
        engine.train()
        self.sync()
        return {"engine": engine, "pm": pm, "hf_ds": hf_ds, "cfg": cfg, "ds_cfg": ds_cfg,
                "build_s": time.perf_counter() - t0, "cond_dim": cfg.teacher.rep_dim}  # fmt: skip

    def release(self, ctx: dict | None) -> None:
        if not ctx:
            return
        engine = ctx.get("engine")
        if engine is not None and hasattr(engine, "destroy"):
            with contextlib.suppress(Exception):
                engine.destroy()
        ctx.clear()
        gc.collect()
        if self.gpu:
            self.torch.cuda.empty_cache()

    def rows(self, n: int, seq: int, vocab: int, cond_dim: int, seed: int, vary: bool = False, slots=None):
        import numpy as np

        rng = np.random.default_rng(seed)
        out = []
        for i in range(n):
            length = int(seq - (rng.integers(0, seq // 2) if vary else 0))
            ids = rng.integers(3, vocab, length).tolist()
            row = {"input_ids": ids, "prompt_len": length - ANSWER_LEN, "label": int(i % 2),
                   "rep": rng.standard_normal(cond_dim).astype(np.float32), "sample_id": seed * 1000 + i}  # fmt: skip
            if slots:
                token_ids, item_ids = slots
                pos = sorted(rng.choice(np.arange(1, length - ANSWER_LEN - 1), 3, replace=False).tolist())
                for j, p in enumerate(pos):
                    ids[p] = token_ids[j % len(token_ids)]
                row["item_slots"] = rng.choice(item_ids, 3).tolist()
            out.append(row)
        return out

    def batch(self, rows: list[dict]) -> dict:
        from recdata.streams import collate

        return {k: v.to(self.device) for k, v in collate(rows, 0).items()}

    def train_steps(self, engine, batch: dict, steps: int) -> tuple[list[float], float]:
        """The trainer's step on one micro-batch per optimizer step (trainer.loop.train_step's calls)."""
        from trainer.objective import answer_loss

        times, loss = [], float("nan")
        for _ in range(steps):
            self.sync()
            t0 = time.perf_counter()
            out, _, _ = answer_loss(engine, batch)
            engine.backward(out)
            engine.step()
            self.sync()
            times.append(time.perf_counter() - t0)
            loss = float(out.detach().float().cpu())
        return times, loss

    def flops(self, lcfg, batch: dict, trainable: int) -> float:
        from trainer.telemetry import step_flops

        mask = batch["attention_mask"]
        head = (int(batch["answer_len"].max()) + 1) * mask.shape[0]
        return step_flops(lcfg, int(mask.sum()), int((mask.sum(1) ** 2).sum()), head, trainable)

    # ================================================================================================ phase 1
    def phase_first_contact(self) -> None:
        t0, p = time.perf_counter(), "first_contact"
        self.item(p, "environment", self.check_environment)
        self.item(p, "process_group", self.check_process_group)
        if self.device is None:
            self.phase_done(p, t0)
            return
        self.item(p, "collectives", self.check_collectives)
        self.item(p, "zero3_hybrid_ilora", lambda: self.check_zero3("ilora4", hybrid=True), 30)
        self.item(p, "zero3_reclora_activation_checkpointing", lambda: self.check_zero3("reclora16"), 30)
        self.item(p, "zero3_ilora_activation_checkpointing", lambda: self.check_zero3("ilora4"), 30)
        self.phase_done(p, t0)

    def check_environment(self) -> dict:
        import peft
        import transformers

        from trainer.telemetry import device_name, spec_peak_flops

        torch = self.torch
        info: dict[str, Any] = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "cuda_available": torch.cuda.is_available(),
            "device_requested": self.args.device,
            "quick": bool(self.args.quick),
            "bf16_engine": bool(self.gpu or self.args.bf16),
            "stubbed_modules": getattr(self, "stubbed", []),  # absent here; gpu_check does not need them
        }
        try:
            import deepspeed

            info["deepspeed"] = deepspeed.__version__
        except Exception as e:
            info["deepspeed"] = None
            info["ok"] = False
            info["error"] = f"deepspeed does not import: {err_text(e)}"
        if self.gpu:
            info.update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                        gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                        nccl=str(torch.cuda.nccl.version()))  # fmt: skip
        dev = "cuda" if self.gpu else "cpu"
        spec = spec_peak_flops(torch.cuda.get_device_name(0)) if self.gpu else None
        if self.args.peak_tflops:
            spec = self.args.peak_tflops * 1e12
        measured = self.ensure_peaks(spec)
        info.update(device_name=device_name(dev), spec_peak_tflops=rnd(spec and spec / 1e12, 1),
                    measured_peak_tflops=rnd(measured / 1e12, 2),
                    measured_peak_dtype="bfloat16" if self.gpu else "float32")  # fmt: skip
        return info

    def check_process_group(self) -> dict:
        import torch.distributed as dist

        from trainer.engine import setup_distributed

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})  # fmt: skip
        if self.gpu:
            self.torch.cuda.set_device(0)
        self.device = setup_distributed(self.gpu)
        return {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "device": str(self.device),
                "ok": dist.get_backend() == ("nccl" if self.gpu else "gloo")}  # fmt: skip

    def check_collectives(self) -> dict:
        import torch.distributed as dist

        torch = self.torch
        x = torch.arange(8, dtype=torch.float32, device=self.device)
        dist.all_reduce(x)
        y = torch.arange(4, dtype=torch.float64, device=self.device)
        gathered = [torch.empty_like(y) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, y)
        self.sync()
        ok = bool(torch.equal(x.cpu(), torch.arange(8, dtype=torch.float32)))
        ok &= all(torch.equal(g.cpu(), torch.arange(4, dtype=torch.float64)) for g in gathered)
        ok &= x.device == self.device and gathered[0].device == self.device
        return {"ok": ok, "all_reduce_device": str(x.device), "all_gather_device": str(gathered[0].device)}

    def check_zero3(self, adapter: str, hybrid: bool = False) -> dict:
        """ZeRO-3 forward/backward of the tiny model (activation checkpointing on) and what deepspeed.initialize
        left: gate/bank/base dtypes, devices of partitions and buffers."""
        torch = self.torch
        lcfg = self.llama(tiny=True)
        hyb, slots = None, None
        if hybrid:
            from safetensors.torch import save_file

            url = str(self.tmp / "item_emb.safetensors")
            save_file({"item_ids": torch.arange(50, dtype=torch.long), "emb": torch.randn(50, 16)}, url)
            slot_ids = [lcfg.vocab_size, lcfg.vocab_size + 1]  # placeholder ids past the vocabulary
            hyb = {"item_emb_url": url, "slot_token_ids": slot_ids, "text_token_id": 5}
            slots = (slot_ids, list(range(50)))
        ctx = self.build(adapter, 3, 2, lcfg, hybrid=hyb)
        try:
            engine, pm = ctx["engine"], ctx["pm"]
            batch = self.batch(self.rows(2, 32, lcfg.vocab_size, ctx["cond_dim"], 1, vary=True, slots=slots))
            _, loss = self.train_steps(engine, batch, 2)
            grad_norm = float(engine.get_global_grad_norm() or 0.0)
            inner = pm.pm if hybrid else pm

            def where(p):
                t = getattr(p, "ds_tensor", None)
                return str((t if t is not None else p).device), str(p.dtype)

            gate_p = [where(q) for q in inner.gates.parameters()]
            bank_p = [where(q) for n, q in inner.trainable_parameters().items() if not n.startswith("gates.")]
            base_p = [where(q) for q in inner.lm.get_base_model().parameters() if not q.requires_grad]
            bufs = {n: str(b.device) for n, b in pm.named_buffers()}
            want_dev = str(engine.device)
            # Gates compute and return float32 whatever their parameters' storage (bf16 after deepspeed.initialize
            # casts the module): the check is on the gates' output, the storage dtype is reported beside it.
            was_training = inner.gates.training
            inner.gates.eval()
            with torch.no_grad():
                gate_out = inner.compute_gates(batch["cond"])
            inner.gates.train(was_training)
            gate_dtypes = sorted({str(v.dtype) for v in gate_out.values()})
            checks = {
                "loss_finite": bool(torch.isfinite(torch.tensor(loss))),
                "grad_norm_positive": grad_norm > 0,
                "gates_fp32": gate_dtypes == ["torch.float32"],
                "partitions_on_device": all(dev.split(":")[0] == want_dev.split(":")[0] for dev, _ in gate_p + bank_p + base_p),
                "buffers_on_device": all(d.split(":")[0] == want_dev.split(":")[0] for d in bufs.values()),
            }  # fmt: skip
            return {
                "ok": all(checks.values()),
                "checks": checks,
                "failed_checks": [k for k, v in checks.items() if not v],
                "loss": loss,
                "grad_norm": grad_norm,
                "gate_dtypes": gate_dtypes,
                "gate_param_dtypes": sorted({d for _, d in gate_p}),
                "bank_dtypes": sorted({d for _, d in bank_p}),
                "base_dtypes": sorted({d for _, d in base_p}),
                "engine_device": want_dev,
                "buffer_devices": sorted(set(bufs.values())),
                "activation_checkpointing": True,
                "build_s": round(ctx["build_s"], 2),
            }
        finally:
            self.release(ctx)

    # ================================================================================================ phase 2
    def phase_throughput(self) -> None:
        t0, p, s = time.perf_counter(), "throughput", self.shape
        self.ensure_peaks()
        lcfg = self.llama()
        est = 60 if not self.args.quick else 5
        for adapter in ADAPTERS:
            self.item(p, adapter, lambda a=adapter: self.throughput_one(a, lcfg), est)
        by = {r["name"]: r for r in self.results.records if r.get("phase") == p and r.get("ok")}
        ratios = {}
        for name, r in by.items():
            base = by.get(ADAPTERS[name]["baseline"])
            for m in r.get("micro", {}):
                if base and m in base.get("micro", {}):
                    ratios[f"{name}_over_{ADAPTERS[name]['baseline']}_micro{m}"] = rnd(
                        r["micro"][m]["step_s"] / base["micro"][m]["step_s"]
                    )
        self.phase_done(p, t0, {"layers": lcfg.num_hidden_layers, "step_ratios": ratios,
                                "shape": {k: s[k] for k in ("hidden", "heads", "intermediate", "vocab", "seq")}})  # fmt: skip

    def throughput_one(self, adapter: str, lcfg) -> dict:
        from trainer.telemetry import mfu, trainable_count

        torch, s = self.torch, self.shape
        micros = s["micros"]
        # One engine for both micro-batch sizes (accumulation 1: every engine.step is an optimizer step).
        ctx = self.build(adapter, 2, max(micros), lcfg)
        keep = adapter == "reclora16"  # phase 3 evaluates on this engine
        try:
            engine, pm = ctx["engine"], ctx["pm"]
            trainable = trainable_count(pm)
            res: dict[str, Any] = {}
            for i, micro in enumerate(micros):
                batch = self.batch(self.rows(micro, s["seq"], lcfg.vocab_size, ctx["cond_dim"], 10 + i))
                if self.gpu:
                    torch.cuda.reset_peak_memory_stats()
                times, loss = self.train_steps(engine, batch, s["warmup"] + s["timed"])
                step_s = median(times[s["warmup"] :])
                flops = self.flops(lcfg, batch, trainable)
                tokens = int(batch["attention_mask"].sum())
                res[str(micro)] = {
                    "step_s": rnd(step_s, 5),
                    "tokens_per_s": rnd(tokens / step_s, 1),
                    "mfu_spec": rnd(mfu(flops / step_s, self.peaks["spec"])),
                    "mfu_measured": rnd(mfu(flops / step_s, self.peaks["measured"])),
                    "model_gflop_per_token": rnd(flops / tokens / 1e9, 3),
                    "peak_mem_gib": rnd(torch.cuda.max_memory_allocated() / 2**30, 2) if self.gpu else None,
                    "loss": rnd(loss),
                    "times": [rnd(t, 4) for t in times],
                }
            out = {"micro": res, "trainable": trainable, "layers": lcfg.num_hidden_layers, "seq": s["seq"],
                   "engine": "ZeRO-2, world size 1, activation checkpointing", "build_s": round(ctx["build_s"], 2),
                   "targets": ",".join(ADAPTERS[adapter]["target_modules"])}  # fmt: skip
            if keep:
                self.kept = ctx
            return out
        finally:
            if self.kept is not ctx:  # kept only after a successful run
                self.release(ctx)

    # ================================================================================================ phase 3
    def phase_eval(self) -> None:
        t0, p = time.perf_counter(), "eval"
        self.ensure_peaks()
        if not self.kept:
            est = 60 if not self.args.quick else 5
            self.item(p, "build_reclora16", lambda: self.build_for_eval(), est)
        if self.kept:
            self.item(p, "ctr_scoring", self.eval_ctr, 30)
            self.item(p, "next_item_candidates", self.eval_next_item, 60)
        self.release(self.kept)
        self.kept = {}
        self.phase_done(p, t0)

    def build_for_eval(self) -> dict:
        self.kept = self.build("reclora16", 2, self.shape["eval_rows"], self.llama())
        return {"build_s": round(self.kept["build_s"], 2)}

    def eval_ctr(self) -> dict:
        from trainer.objective import answer_loss, p_yes_from_logits

        torch, s, ctx = self.torch, self.shape, self.kept
        engine = ctx["engine"]
        engine.eval()
        lcfg = ctx["pm"].lm.get_base_model().config
        batch = self.batch(self.rows(s["eval_rows"], s["seq"], lcfg.vocab_size, ctx["cond_dim"], 30))
        times = []
        with torch.no_grad():
            for _ in range(1 + s["eval_reps"]):
                self.sync()
                t0 = time.perf_counter()
                _, _, logits = answer_loss(engine, batch)
                p = p_yes_from_logits(logits, batch["answer_len"], yes_id=3, no_id=4)
                self.sync()
                times.append(time.perf_counter() - t0)
        dt = median(times[1:])
        return {"rows_per_s": rnd(s["eval_rows"] / dt, 2), "batch": s["eval_rows"], "seq": s["seq"],
                "seconds_per_batch": rnd(dt, 5), "p_yes_finite": bool(torch.isfinite(p).all()),
                "ok": bool(torch.isfinite(p).all())}  # fmt: skip

    def eval_next_item(self) -> dict:
        import numpy as np

        from trainer.objective import candidate_scores

        torch, s, ctx = self.torch, self.shape, self.kept
        engine = ctx["engine"]
        engine.eval()
        vocab = ctx["pm"].lm.get_base_model().config.vocab_size
        rng = np.random.default_rng(40)
        titles = {c: rng.integers(3, vocab, int(rng.integers(2, s["title_len"] + 1))).tolist() for c in range(200)}
        rows = self.rows(s["eval_rows"], s["seq"], vocab, ctx["cond_dim"], 41)
        for r in rows:
            r["candidates"] = rng.choice(200, s["candidates"], replace=False).tolist()
        cond = torch.tensor(np.stack([r["rep"] for r in rows]))
        times, scores = [], None
        for _ in range(1 + max(1, s["eval_reps"] - 1)):
            self.sync()
            t0 = time.perf_counter()
            scores = candidate_scores(engine, rows, 0, lambda c: titles[c], cond, self.device)
            self.sync()
            times.append(time.perf_counter() - t0)
        dt = median(times[1:])
        ok = tuple(scores.shape) == (len(rows), s["candidates"]) and bool(torch.isfinite(scores).all())
        return {"rows_per_s": rnd(len(rows) / dt, 2), "rows": len(rows), "candidates": s["candidates"],
                "prompt_len": s["seq"] - ANSWER_LEN, "seconds_per_call": rnd(dt, 5), "ok": ok}  # fmt: skip

    # ================================================================================================ phase 4
    def phase_zero3(self) -> None:
        t0, p, s = time.perf_counter(), "zero3", self.shape
        self.ensure_peaks()
        lcfg = self.llama(layers=s["zero3_layers"])
        est = 40 if not self.args.quick else 5
        variants = [("zero3_trainer_config", 3, None), ("zero3_tuned", 3, ZERO3_TUNED), ("zero2_reference", 2, None)]
        for name, stage, over in variants:
            self.item(p, name, lambda st=stage, o=over, n=name: self.zero3_one(lcfg, st, o, n == variants[0][0]), est)
        by = {r["name"]: r for r in self.results.records if r.get("phase") == p and r.get("ok")}

        def ratio(a, b):
            return rnd(by[a]["step_s"] / by[b]["step_s"]) if a in by and b in by else None

        self.phase_done(p, t0, {"layers": s["zero3_layers"],
                                "trainer_over_zero2_step": ratio("zero3_trainer_config", "zero2_reference"),
                                "tuned_over_trainer_step": ratio("zero3_tuned", "zero3_trainer_config")})  # fmt: skip

    def zero3_one(self, lcfg, stage: int, override: dict | None, with_checkpoint: bool) -> dict:
        from trainer.telemetry import mfu, trainable_count

        torch, s = self.torch, self.shape
        ctx = self.build("reclora16", stage, s["zero3_micro"], lcfg, ds_override=override)
        try:
            engine, pm = ctx["engine"], ctx["pm"]
            batch = self.batch(self.rows(s["zero3_micro"], s["seq"], lcfg.vocab_size, ctx["cond_dim"], 50))
            if self.gpu:
                torch.cuda.reset_peak_memory_stats()
            times, loss = self.train_steps(engine, batch, s["warmup"] + s["timed"])
            step_s = median(times[s["warmup"] :])
            flops = self.flops(lcfg, batch, trainable_count(pm))
            z = ctx["ds_cfg"]["zero_optimization"]
            out = {
                "stage": stage,
                "zero_optimization": {k: v for k, v in z.items() if k != "stage"},
                "step_s": rnd(step_s, 5),
                "tokens_per_s": rnd(int(batch["attention_mask"].sum()) / step_s, 1),
                "mfu_spec": rnd(mfu(flops / step_s, self.peaks["spec"])),
                "mfu_measured": rnd(mfu(flops / step_s, self.peaks["measured"])),
                "peak_mem_gib": rnd(torch.cuda.max_memory_allocated() / 2**30, 2) if self.gpu else None,
                "loss": rnd(loss),
                "build_s": round(ctx["build_s"], 2),
                "times": [rnd(t, 4) for t in times],
            }
            if with_checkpoint:
                out["checkpoint"] = self.checkpoint_save(engine, pm)
            return out
        finally:
            self.release(ctx)

    def checkpoint_save(self, engine, pm) -> dict:
        """The trainer's save path (trainer/loop.py Saver): gather full fp32 values + Adam moments, write."""
        from trainer import checkpoint as ckpt
        from trainer.engine import barrier, full_state

        names = pm.trainable_parameter_names()
        run_url = str(self.tmp / "run")
        t0 = time.perf_counter()
        full = full_state(engine, pm, names)
        t1 = time.perf_counter()
        meta = {"fingerprint": "gpu-check", "fingerprint_parts": {}, "optimizer_step": 0, "metrics": {},
                "trainable_names": names, "last_log": None}  # fmt: skip
        url = ckpt.save(run_url, 1, 0, 1, full, {"rng": ckpt.rng_state(), "cursor": {}}, meta, barrier)
        t2 = time.perf_counter()
        size = sum(f.stat().st_size for f in Path(url).iterdir() if f.is_file())
        n = sum(int(t.numel()) for k, t in full.items() if k.endswith("::param"))
        return {"gather_s": rnd(t1 - t0, 3), "write_s": rnd(t2 - t1, 3), "save_s": rnd(t2 - t0, 3),
                "bytes": size, "bytes_per_trainable_param": rnd(size / max(1, n), 3), "trainable": n}  # fmt: skip


# --------------------------------------------------------------------------------------------------- report
def summary(records: list[dict], wall: float, path: Path) -> dict:
    items = {(r["phase"], r["name"]): r for r in records if r.get("kind") == "item"}
    phases = {r["phase"]: r for r in records if r.get("kind") == "phase"}
    fc = [r for (ph, _), r in items.items() if ph == "first_contact"]
    env = items.get(("first_contact", "environment"), {})
    tp = {n: r for (ph, n), r in items.items() if ph == "throughput" and r.get("ok")}
    big = None
    if tp:
        big = str(max(int(m) for r in tp.values() for m in r.get("micro", {})))

    def tput(name, key):
        return (tp.get(name, {}).get("micro", {}).get(big) or {}).get(key)

    def over(name, base):
        a, b = tput(name, "step_s"), tput(base, "step_s")
        return rnd(a / b) if a and b else None

    zero3 = phases.get("zero3", {})
    ck = items.get(("zero3", "zero3_trainer_config"), {}).get("checkpoint") or {}
    return {
        "device": env.get("device_name"),
        "deepspeed": env.get("deepspeed"),
        "first_contact_checks": len(fc),
        "first_contact_failures": sum(1 for r in fc if r.get("ok") is False),
        "first_contact_failed": [r["name"] for r in fc if r.get("ok") is False],
        "gates_fp32": [
            items.get(("first_contact", n), {}).get("checks", {}).get("gates_fp32")
            for n in (
                "zero3_hybrid_ilora",
                "zero3_reclora_activation_checkpointing",
                "zero3_ilora_activation_checkpointing",
            )
        ],  # fmt: skip
        "spec_peak_tflops": env.get("spec_peak_tflops"),
        "measured_peak_tflops": env.get("measured_peak_tflops"),
        "throughput_layers": phases.get("throughput", {}).get("layers"),
        "micro": int(big) if big else None,
        "plain_qv_tokens_per_s": tput("plain_qv", "tokens_per_s"),
        "reclora16_tokens_per_s": tput("reclora16", "tokens_per_s"),
        "reclora16_mfu_spec": tput("reclora16", "mfu_spec"),
        "reclora16_mfu_measured": tput("reclora16", "mfu_measured"),
        "reclora16_peak_mem_gib": tput("reclora16", "peak_mem_gib"),
        "reclora16_over_plain_step": over("reclora16", "plain_qv"),
        "ilora4_over_plain_all7_step": over("ilora4", "plain_all7"),
        "ctr_rows_per_s": items.get(("eval", "ctr_scoring"), {}).get("rows_per_s"),
        "next_item_rows_per_s": items.get(("eval", "next_item_candidates"), {}).get("rows_per_s"),
        "zero3_trainer_over_zero2_step": zero3.get("trainer_over_zero2_step"),
        "zero3_tuned_over_trainer_step": zero3.get("tuned_over_trainer_step"),
        "checkpoint_save_s": ck.get("save_s"),
        "phases_done": [p for p in PHASES if p in phases],
        "wall_s": round(wall, 1),
        "results": str(path),
    }


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table(records: list[dict]) -> list[str]:
    lines = ["| phase | item | ok | figures |", "|---|---|---|---|"]
    for r in records:
        if r.get("kind") != "item":
            continue
        ok = {True: "pass", False: "FAIL", None: "skipped"}[r.get("ok")]
        if r["phase"] == "throughput" and r.get("micro"):
            figs = "; ".join(
                f"micro {m}: {v['step_s']:.4g}s/step, {v['tokens_per_s']:.0f} tok/s, MFU spec {pct(v['mfu_spec'])}"
                f" / measured {pct(v['mfu_measured'])}"
                + ("" if v["peak_mem_gib"] is None else f", {v['peak_mem_gib']} GiB")
                for m, v in r["micro"].items()
            )
        elif r["phase"] == "eval" and r.get("rows_per_s") is not None:
            figs = f"{r['rows_per_s']} rows/s"
        elif r["phase"] == "zero3" and r.get("step_s") is not None:
            figs = f"{r['step_s']:.4g}s/step, {r['tokens_per_s']:.0f} tok/s"
            if r.get("checkpoint"):
                figs += f"; checkpoint save {r['checkpoint']['save_s']}s ({r['checkpoint']['bytes']:,} B)"
        elif r["phase"] == "first_contact" and r.get("checks"):
            figs = ", ".join(f"{k}={v}" for k, v in r["checks"].items())
            figs += f"; gate output {r.get('gate_dtypes')}, gate params {r.get('gate_param_dtypes')}"
        elif r["name"] == "environment":
            figs = (f"{r.get('device_name')}, torch {r.get('torch')}, deepspeed {r.get('deepspeed')}, spec "
                    f"{r.get('spec_peak_tflops')} / measured {r.get('measured_peak_tflops')} TFLOP/s")  # fmt: skip
        else:
            figs = ""
        if r.get("error"):
            figs = (figs + " " if figs else "") + "error: " + r["error"].splitlines()[0][:160]
        if r.get("skipped"):
            figs = r["skipped"]
        lines.append(f"| {r['phase']} | {r['name']} | {ok} | {figs.replace('|', '/')} |")
    return lines


def write_markdown(path: Path, records: list[dict], summ: dict, argv: list[str]) -> Path:
    md = path.with_suffix(".md")
    text = [
        f"# bench/gpu_check.py: {summ.get('device')}",
        "",
        f"Command: `python bench/gpu_check.py {' '.join(argv)}`; wall {summ['wall_s']} s; JSON lines: `{path.name}`.",
        "",
        "MFU = model FLOPs (trainer.telemetry.step_flops: 4N frozen + 6N trainable + attention over real lengths + "
        'LM head) / s over the spec dense bf16 peak ("spec") and over the measured matmul peak ("measured").',
        "",
        *table(records),
        "",
        "Summary:",
        "",
        "```",
        json.dumps(summ, indent=1),
        "```",
        "",
    ]
    md.write_text("\n".join(text))
    return md


# --------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="tiny shapes for every phase (the CPU code-path check)")
    ap.add_argument("--out", help="results folder (default bench/results/gpu_check/)")
    ap.add_argument("--install-wheels", metavar="DIR", help="pip install DeepSpeed (+ missing deps) from DIR first")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run (default 540)")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {','.join(PHASES)}")
    ap.add_argument("--layers", type=int, help="layers of the 7B-shaped model in phases 2-3 (default 32)")
    ap.add_argument("--zero3-layers", type=int, help="layers of the ZeRO-3 model in phase 4 (default 4)")
    ap.add_argument("--peak-tflops", type=float, help="spec peak override (TFLOP/s), as trainer.peak_tflops")
    ap.add_argument("--bf16", action="store_true", help="CPU: DeepSpeed's bf16 engine, as on a GPU (dtype path check)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations of torch/transformers: noise here
    wheels = install_wheels(args.install_wheels) if args.install_wheels else None
    stubbed = [p for p in ("pyarrow",) if stub_if_missing(p, ("fs", "parquet", "compute", "csv", "ipc"))]

    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # One thread for the quick code-path check: on a shared box, OpenMP barriers of several threads stall.
        torch.set_num_threads(1 if args.quick else max(1, min(4, os.cpu_count() or 1)))
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    results = Results(Path(args.out) if args.out else REPO / "bench" / "results" / "gpu_check", stamp)
    print(f"results: {results.path}", flush=True)
    args._elapsed_before = time.perf_counter() - t_start
    check = Check(args, results)
    check.stubbed = stubbed
    if wheels is not None:
        results.write({"phase": "first_contact", "kind": "item", "name": "install_wheels",
                       "ok": not wheels.get("missing_after"), **wheels})  # fmt: skip
    wanted = [p.strip() for p in args.phases.split(",") if p.strip()]
    for phase in PHASES:
        if phase not in wanted:
            continue
        if phase != "first_contact" and check.device is None:
            check.item("first_contact", "process_group", check.check_process_group)
            if check.device is None:
                break
        try:
            getattr(check, f"phase_{phase}")()
        except Exception as e:  # a phase that breaks outside its items still leaves its line
            results.write(
                {"phase": phase, "kind": "phase", "error": err_text(e), "traceback": traceback.format_exc()[-2500:]}
            )
    wall = time.perf_counter() - t_start
    summ = summary(results.records, wall, results.path)
    md = write_markdown(results.path, results.records, summ, argv)
    print()
    print("\n".join(table(results.records)))
    print(f"\nJSON lines: {results.path}\nmarkdown:   {md}")
    print(json.dumps(summ), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
