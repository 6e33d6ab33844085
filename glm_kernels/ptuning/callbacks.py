"""Trainer callbacks of `glm-kernels ptune`: progress bar with loss and tokens/s, a JSONL log, a loss-curve PNG."""
from __future__ import annotations

import json
import os
import time

from tqdm.auto import tqdm
from transformers.trainer_callback import ProgressCallback, TrainerCallback

from ..fileio import atomic_write_text

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


class PTuneProgressCallback(ProgressCallback):
    """transformers' tqdm bar (steps, ETA) with the last logged loss and the input tokens per second."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            # a resumed run starts where its checkpoint was
            self.training_bar = tqdm(total=state.max_steps, initial=state.global_step, desc="ptune",
                                     dynamic_ncols=True)
        self.current_step = state.global_step
        self._start = (time.perf_counter(), state.num_input_tokens_seen or 0)
        self._loss = None

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if self.training_bar is None:
            return
        elapsed = time.perf_counter() - self._start[0]
        postfix = {}
        if self._loss is not None:
            postfix["loss"] = f"{self._loss:.4f}"
        if state.num_input_tokens_seen and elapsed > 0:
            postfix["tok/s"] = f"{(state.num_input_tokens_seen - self._start[1]) / elapsed:.0f}"
        if postfix:
            self.training_bar.set_postfix(postfix, refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._loss = float(logs["loss"])
        super().on_log(args, state, control, logs=logs, **kwargs)


class JsonlLogCallback(TrainerCallback):
    """Appends every log (loss, learning rate, tokens seen, eval metrics) to `output_dir/metrics.jsonl`.

    A resumed run first drops the lines of steps after its checkpoint (written
    by the run that was killed), so the file reads as one uninterrupted run.
    """

    def __init__(self, path: str):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not os.path.exists(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                if entry.get("step", 0) <= state.global_step:
                    kept.append(json.dumps(entry, ensure_ascii=False))
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        entry = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float, str))}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")


def plot_loss_curve(log_history: list[dict], path: str, title: str = "P-Tuning v2 training loss") -> bool:
    """Write the training loss against the step as a PNG (atomically); False when there is no loss to plot."""
    points = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps, losses = zip(*points)
    ax.plot(steps, losses, marker="o" if len(points) < 30 else None, linewidth=1.5)
    if min(losses) > 0 and max(losses) / min(losses) > 50:
        ax.set_yscale("log")  # a loss that falls by orders of magnitude reads better on a log axis
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return True


class LossCurveCallback(TrainerCallback):
    """At the end of training, plots the logged loss to `output_dir/loss_curve.png`."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_loss_curve(state.log_history, self.path)
