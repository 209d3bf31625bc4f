"""The run report: `report.json` + `report.md` + `loss.png` in --output_dir at the end of a run.

One place that answers "what did this run do?": the data, the vocabulary mode, what was trained,
how fast, and how the loss went. Built from the Trainer's own `log_history`, so it covers resumed
runs too. The plot needs matplotlib; without it the report says so and skips the picture.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Optional

from transformers import TrainerCallback

from zhtrain.files import write_aside


class ThroughputCallback(TrainerCallback):
    """Steps, tokens and seconds of this session's training loop (after any resume, without set-up).

    Tokens come from the Trainer's count when `--include_num_input_tokens_seen` is on (variable-length
    SFT batches), else from steps x tokens_per_step (fixed-length pre-training blocks).
    """

    def __init__(self):
        self.first_step: Optional[int] = None
        self.first_tokens = 0
        self.start = 0.0
        self.steps = 0
        self.tokens_seen = 0
        self.seconds = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if self.first_step is None:
            self.first_step, self.first_tokens, self.start = (
                state.global_step,
                state.num_input_tokens_seen,
                time.perf_counter(),
            )

    def on_step_end(self, args, state, control, **kwargs):
        self.steps = state.global_step - (self.first_step or 0)
        self.tokens_seen = state.num_input_tokens_seen - self.first_tokens
        self.seconds = time.perf_counter() - self.start

    def tokens_per_second(self, tokens_per_step: Optional[int]) -> Optional[float]:
        tokens = self.tokens_seen or (self.steps * tokens_per_step if tokens_per_step else 0)
        return round(tokens / self.seconds, 1) if tokens and self.seconds > 0 else None


def curves(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of train loss, eval loss and learning rate from the Trainer's log."""
    series: dict[str, list[tuple[int, float]]] = {"loss": [], "eval_loss": [], "learning_rate": []}
    for entry in log_history:
        for key in series:
            if key in entry and isinstance(entry[key], (int, float)) and "step" in entry:
                series[key].append((int(entry["step"]), float(entry[key])))
    return series


def perplexity(loss: Optional[float]) -> Optional[float]:
    return math.exp(min(loss, 700.0)) if loss is not None and math.isfinite(loss) else None


def build_report(
    command: str,
    trainer,
    data_stats=None,
    vocabulary: Optional[dict] = None,
    parameters: Optional[tuple[int, int]] = None,
    throughput: Optional[ThroughputCallback] = None,
    tokens_per_step: Optional[int] = None,
    extra: Optional[dict] = None,
) -> dict:
    """Everything the report shows, as plain JSON-able data."""
    args, state = trainer.args, trainer.state
    series = curves(state.log_history)
    eval_losses = series["eval_loss"]
    best = min(eval_losses, key=lambda item: item[1]) if eval_losses else None
    report: dict = {"command": command, "output_dir": str(args.output_dir), "global_step": state.global_step}
    if data_stats is not None:
        report["data"] = asdict(data_stats) if is_dataclass(data_stats) else dict(data_stats)
        if "seconds" in report["data"]:  # TextDataStats: the tokenizing time of this run
            report["data"]["tokenizing_seconds"] = round(report["data"].pop("seconds"), 3)
    if vocabulary:
        report["vocabulary"] = vocabulary
    if parameters:
        trainable, total = parameters
        report["parameters"] = {
            "trainable": trainable,
            "total": total,
            "trainable_percent": round(100 * trainable / max(total, 1), 4),
        }
    training: dict = {"final_train_loss": series["loss"][-1][1] if series["loss"] else None}
    if throughput is not None and throughput.steps and throughput.seconds > 0:
        training.update(session_steps=throughput.steps, session_seconds=round(throughput.seconds, 3))
        if tokens_per_step:
            training["tokens_per_step"] = tokens_per_step
        training["tokens_per_second"] = throughput.tokens_per_second(tokens_per_step)
    report["training"] = training
    report["evaluation"] = {
        "final_eval_loss": eval_losses[-1][1] if eval_losses else None,
        "final_eval_perplexity": perplexity(eval_losses[-1][1]) if eval_losses else None,
        "best_eval_perplexity": perplexity(best[1]) if best else None,
        "best_eval_step": best[0] if best else None,
    }
    report.update(extra or {})
    return report


def summary_line(report: dict) -> str:
    """`40 steps, 12,345 tokens/s, train loss 4.21, eval perplexity 80.1 (best 79.5); adapter in ...`"""
    training, evaluation = report.get("training", {}), report.get("evaluation", {})
    parts = [f"{report['global_step']} steps"]
    if training.get("tokens_per_second"):
        parts.append(f"{training['tokens_per_second']:,.0f} tokens/s")
    if training.get("final_train_loss") is not None:
        parts.append(f"train loss {training['final_train_loss']:.4g}")
    if evaluation.get("final_eval_perplexity") is not None:
        parts.append(
            f"eval perplexity {evaluation['final_eval_perplexity']:.4g} (best {evaluation['best_eval_perplexity']:.4g})"
        )
    line = ", ".join(parts)
    for kind in ("adapter", "model"):
        if report.get(kind):
            return f"{line}; {kind} in {report[kind]}"
    return line


def plot_curves(series: dict, path: Path) -> Optional[str]:
    """Draw loss.png; returns None, or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no loss.png"
    if not series["loss"] and not series["eval_loss"]:
        return "no losses were logged: no loss.png"
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")):
        if series[key]:
            steps, values = zip(*series[key])
            top.plot(steps, values, style, label=label, markersize=3)
    top.set_ylabel("loss")
    top.legend()
    top.grid(alpha=0.3)
    if series["learning_rate"]:
        steps, values = zip(*series["learning_rate"])
        bottom.plot(steps, values, color="tab:green")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    with write_aside(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return None


def markdown(report: dict) -> str:
    def fmt(value):
        if isinstance(value, float):
            return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return "—" if value is None else str(value)

    lines = [
        f"# zhtrain {report['command']} — run report",
        "",
        f"Output folder: `{report['output_dir']}`, {fmt(report['global_step'])} steps.",
        "",
    ]
    for section in ("data", "vocabulary", "parameters", "training", "evaluation"):
        if section not in report:
            continue
        lines += [f"## {section.capitalize()}", "", "| | |", "|---|---|"]
        rows = []
        for key, value in report[section].items():  # nested groups (sft's train/eval data) flattened
            rows += [(f"{key} {k}", v) for k, v in value.items()] if isinstance(value, dict) else [(key, value)]
        for key, value in rows:
            if isinstance(value, list):
                value = ", ".join(map(str, value)) or "none"
            lines.append(f"| {key.replace('_', ' ')} | {fmt(value)} |")
        lines.append("")
    if report.get("plot"):
        lines += ["## Curves", "", f"![train/eval loss and learning rate]({report['plot']})", ""]
    elif report.get("plot_note"):
        lines += [f"_{report['plot_note']}_", ""]
    return "\n".join(lines)


def write_report(output_dir: str, report: dict, log_history: list[dict]) -> Path:
    """report.json, report.md and loss.png, each written to a temp name and renamed."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    note = plot_curves(curves(log_history), out / "loss.png")
    report = dict(report, plot=None if note else "loss.png", plot_note=note)
    for name, text in (
        ("report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n"),
        ("report.md", markdown(report)),
    ):
        with write_aside(out / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return out / "report.md"
