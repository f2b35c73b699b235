"""The run report: `report.md` plus PNG plots in the run's output prefix.

Reads only what the run wrote (config.yaml, logs/train.jsonl, metrics.json, stage_seconds.json), so it can
be regenerated for any finished or partial run: `python -m trainer.report RUN_URL`.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from typing import Any

from recdata import storage


def _plot(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _read(url: str, default=None):
    return storage.read_json(url) if storage.exists(url) else default


def write_report(run_url: str, extra_metrics: dict[str, dict[str, float]] | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history: list[dict[str, Any]] = _read(storage.join(run_url, "logs", "train.jsonl.json"), [])
    metrics = _read(storage.join(run_url, "metrics.json"), {}) or {}
    stages = _read(storage.join(run_url, "stage_seconds.json"), {}) or {}
    cfg_url = storage.join(run_url, "config.yaml")
    config = ""
    if storage.exists(cfg_url):
        fs, path = storage.get_fs(cfg_url)
        with fs.open(path, "rb") as f:
            config = f.read().decode()
    images = []
    if history:
        steps = [h["step"] for h in history]
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
        ax[0].plot(steps, [h["loss"] for h in history])
        ax[0].set(title="training loss (answer tokens)", xlabel="step")
        ax[1].plot(steps, [h["tokens_per_s"] for h in history], label="tokens/s")
        ax[1].set(title="throughput", xlabel="step", ylabel="tokens/s")
        images.append(("loss_throughput.png", _plot(fig), "Training loss and throughput"))
        plt.close(fig)
        loads = sorted(
            {k for h in history for k in h if k.startswith("expert_load_")}, key=lambda k: int(k.rsplit("_", 1)[1])
        )
        if loads:
            fig, ax = plt.subplots(1, 2, figsize=(11, 3.4), layout="constrained")  # room for the twin axis
            ent = [(h["step"], h["gate_entropy"]) for h in history if "gate_entropy" in h]
            ax[0].plot([s for s, _ in ent], [e for _, e in ent], label="gate entropy")
            # Uniform gates over N experts have entropy ln N: a curve on this line means the gates never moved.
            ax[0].axhline(math.log(len(loads)), color="gray", linestyle="--", label=f"ln {len(loads)} (uniform)")
            spread = [(h["step"], h["gate_spread"]) for h in history if "gate_spread" in h]
            if spread:  # entropy cannot say whether users differ; spread can (0 = one mixture for everyone)
                twin = ax[0].twinx()
                twin.plot([s for s, _ in spread], [v for _, v in spread], color="tab:orange", label="gate spread")
                twin.set_ylabel("gate spread (TV distance)", fontsize=8)
                twin.legend(loc="upper right", fontsize=8)
            ax[0].legend(loc="lower left", fontsize=8)
            ax[0].set(title="gate entropy (nats, mean over samples and layers)", xlabel="step")
            last = next(h for h in reversed(history) if loads[0] in h)
            ax[1].bar(range(len(loads)), [last[k] for k in loads])
            ax[1].set_xticks(range(len(loads)))
            ax[1].set(title=f"expert load at step {last['step']}", xlabel="expert", ylabel="mean gate weight")
            images.append(("gate_usage.png", _plot(fig), "Gate usage"))
            plt.close(fig)
        curves = sorted({k for h in history for k in h if k.startswith("valid_") and k != "valid_n"})
        if curves:  # trainer.eval_every > 0: validation metrics over training
            fig, ax = plt.subplots(1, len(curves), figsize=(3.4 * len(curves), 3.2), squeeze=False)
            for a, k in zip(ax[0], curves):
                pts = [(h["step"], h[k]) for h in history if k in h]
                a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
                a.set(title=k, xlabel="step")
            images.append(("eval_curves.png", _plot(fig), "Validation metrics during training"))
            plt.close(fig)
    evals = {k: v for k, v in (metrics.get("final") or {}).items()}
    lines = [f"# Run report: {run_url.rstrip('/').rsplit('/', 1)[-1]}", ""]
    if evals or extra_metrics:
        lines += ["## Final metrics", "", "| model | split | metric | value |", "|---|---|---|---|"]
        for key, v in sorted(evals.items(), key=lambda kv: (kv[0].startswith("zeroshot_"), kv[0])):
            model = "zero-shot LLM" if key.startswith("zeroshot_") else "trained LLM"
            split, _, name = key.removeprefix("zeroshot_").partition("_")
            lines.append(f"| {model} | {split} | {name} | {v:.4f} |")
        for model, ms in (extra_metrics or {}).items():
            for key, v in sorted(ms.items()):
                split, _, name = key.partition("_")
                lines.append(f"| {model} | {split} | {name} | {v:.4f} |")
        lines.append("")
    if history:
        h = history[-1]
        lines += [
            "## Training",
            "",
            f"{len(history)} steps; last step: loss {h['loss']:.4f}, "
            f"{h['tokens_per_s']:.0f} tokens/s, {h['samples_per_s']:.1f} samples/s, "
            f"data wait {100 * h['data_wait_fraction']:.2f}% of step time"
            + (f", padding {100 * h['padding_fraction']:.1f}% of tokens" if "padding_fraction" in h else "")
            + (f", MFU {100 * h['mfu']:.1f}%" if "mfu" in h else "")
            + ".",
            "",
        ]
        ent = [x["gate_entropy"] for x in history if "gate_entropy" in x]
        spread = [x["gate_spread"] for x in history if "gate_spread" in x]
        loads = [k for k in h if k.startswith("expert_load_")]
        if ent and loads:
            lines += [
                f"Gate entropy {ent[0]:.4f} -> {ent[-1]:.4f} nats (uniform over {len(loads)} experts: "
                f"ln {len(loads)} = {math.log(len(loads)):.4f})"
                + (
                    f"; gate spread {spread[0]:.4f} -> {spread[-1]:.4f} (mean total-variation distance of a sample's "
                    "gate from the batch mean: 0 = every sample gets the same mixture)."
                    if spread
                    else "."
                ),
                "",
            ]
        timing = metrics.get("timing")
        if timing:
            lines += [
                (f"Rank 0 on {timing['device']}. " if timing.get("device") else "")
                + f"Worker setup (model load, ZeRO-3 init, zero-shot evaluation) {timing['setup_seconds']:.1f}s; "
                f"{timing['steps_run']} steps in {timing['train_seconds']:.1f}s, of which "
                f"{timing['data_wait_seconds']:.2f}s ({100 * timing['data_wait_fraction']:.2f}%) waiting for data.",
                "",
            ]
    if stages:
        lines += ["## Stage wall time", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in stages.items()] + [""]
    for name, data, title in images:
        storage.write_bytes_atomic(storage.join(run_url, name), data)
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    if config:
        lines += ["## Configuration", "", "```yaml", config.rstrip(), "```", ""]
    url = storage.join(run_url, "report.md")
    storage.write_bytes_atomic(url, "\n".join(lines).encode())
    return url


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.report", description="Write report.md and plots for a run.")
    p.add_argument("run_url")
    a = p.parse_args(argv)
    print(write_report(a.run_url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
