"""`glm-kernels demo` (`make demo`): a real P-Tuning v2 job on the small model and data shipped with the package.

    glm-kernels demo [--output-dir demo-output] [--max-steps N] [--seed S]

The assets (`glm_kernels/ptuning/assets/`, built by `python -m glm_kernels.tools.build_demo_assets`): a small
ChatGLM pre-trained to write AdvertiseGen-style ad copy in several styles, and AdvertiseGen-style data
(`content` -> `summary`) in a style the base model writes only when told to. The job is the one users run,
through `glm-kernels ptune` with THUDM's arguments:

1. the base model answers the training prompts (greedy): exact match, BLEU-4, ROUGE before tuning;
2. P-Tuning trains only the prefix encoder (progress bar with loss and tokens/s; `metrics.jsonl`,
   `loss_curve.png`, checkpoints in the output directory);
3. the trained prefix answers the same prompts and the unseen dev prompts;
4. `chat()` with the trained prefix answers one dev prompt.

Exits with status 1 if exact match on the training prompts stays below 90% (the job did not learn).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
BASE_DIR = ASSETS / "base"
TRAIN_FILE = ASSETS / "data" / "train.json"
DEV_FILE = ASSETS / "data" / "dev.json"

# The recipe (see glm_kernels/tools/build_demo_assets.py for how it was found on a 2-core CPU).
RECIPE = dict(pre_seq_len=32, learning_rate=2e-2, max_steps=400, per_device_train_batch_size=16,
              max_source_length=32, max_target_length=40, generation_max_length=80, eval_batch_size=64)
PASS_EXACT_MATCH = 90.0


def _ptune(argv: list[str], log) -> dict:
    """Run `glm-kernels ptune ARGV` in this process; its printed metric tables go to `log`."""
    from .arguments import parse_args
    from .main import run

    with contextlib.redirect_stdout(log):
        return run(*parse_args(argv))


def _common(recipe: dict) -> list[str]:
    return ["--prompt_column", "content", "--response_column", "summary", "--model_name_or_path", str(BASE_DIR),
            "--max_source_length", str(recipe["max_source_length"]),
            "--max_target_length", str(recipe["max_target_length"]), "--log_level", "warning"]


def _predict(recipe: dict, data_file: Path, out: Path, log, prefix_dir: Path | None) -> dict:
    argv = ["--do_predict", "--test_file", str(data_file), "--output_dir", str(out), "--predict_with_generate",
            "--do_sample", "False", "--generation_max_length", str(recipe["generation_max_length"]),
            "--per_device_eval_batch_size", str(recipe["eval_batch_size"]), "--disable_tqdm", "True",
            *_common(recipe)]
    if prefix_dir is not None:
        argv += ["--pre_seq_len", str(recipe["pre_seq_len"]), "--ptuning_checkpoint", str(prefix_dir)]
    return _ptune(argv, log)["predict"]


def _row(name: str, metrics: dict) -> str:
    keys = ("predict_exact_match", "predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l")
    return f"| {name} | {metrics['predict_samples']} | " + " | ".join(f"{metrics[k]:.1f}" for k in keys) + " |"


def run_demo(output_dir: str = "demo-output", max_steps: int | None = None, seed: int = 42, out=sys.stdout) -> dict:
    """The `make demo` job; returns the before/after metrics, the first and last loss and the chat answer."""
    import torch

    from ..modeling import ChatGLMForConditionalGeneration
    from ..tokenization import ChatGLMTokenizer

    import datasets

    datasets.disable_progress_bars()  # the tokenization bars of the small files would crowd the job's output
    recipe = dict(RECIPE, max_steps=max_steps or RECIPE["max_steps"])
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    train_rows = sum(1 for line in TRAIN_FILE.read_text(encoding="utf-8").splitlines() if line.strip())
    dev_rows = [json.loads(line) for line in DEV_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    config = json.loads((BASE_DIR / "config.json").read_text())
    say = lambda text="": print(text, file=out, flush=True)  # noqa: E731
    say("glm-kernels demo: P-Tuning v2 of a small ChatGLM on AdvertiseGen-style ad copy, on this machine's CPU")
    say(f"base model: {BASE_DIR} (hidden {config['hidden_size']}, {config['num_layers']} layers, vocabulary "
        f"{config['vocab_size']}); data: {train_rows} training rows, {len(dev_rows)} dev rows (unseen prompts)")
    started = time.perf_counter()
    with open(root / "demo.log", "w", encoding="utf-8") as log:
        say("\n[1/4] before tuning: the base model answers the prompts (greedy)")
        before_train = _predict(recipe, TRAIN_FILE, root / "before-train", log, None)
        before_dev = _predict(recipe, DEV_FILE, root / "before-dev", log, None)
        say(f"      exact match on the training prompts: {before_train['predict_exact_match']:.1f}%")

        say(f"\n[2/4] P-Tuning v2: only the prefix encoder trains (pre_seq_len {recipe['pre_seq_len']}, "
            f"lr {recipe['learning_rate']}, {recipe['max_steps']} steps of {recipe['per_device_train_batch_size']} "
            "rows)")
        train_argv = ["--do_train", "--train_file", str(TRAIN_FILE), "--output_dir", str(root / "ptune"),
                      "--overwrite_output_dir", "--pre_seq_len", str(recipe["pre_seq_len"]),
                      "--learning_rate", str(recipe["learning_rate"]), "--max_steps", str(recipe["max_steps"]),
                      "--per_device_train_batch_size", str(recipe["per_device_train_batch_size"]),
                      "--logging_steps", "10", "--save_steps", str(recipe["max_steps"]), "--seed", str(seed),
                      *_common(recipe)]
        _ptune(train_argv, log)
        history = [json.loads(line) for line in (root / "ptune" / "metrics.jsonl").read_text().splitlines()]
        losses = [(e["step"], e["loss"]) for e in history if "loss" in e]
        shown = losses[::max(1, len(losses) // 8)][:8] + losses[-1:]
        say("      loss by step: " + "  ".join(f"{step}: {loss:.3f}" for step, loss in shown))

        say("\n[3/4] after tuning: the trained prefix answers the same prompts and the unseen dev prompts")
        after_train = _predict(recipe, TRAIN_FILE, root / "after-train", log, root / "ptune")
        after_dev = _predict(recipe, DEV_FILE, root / "after-dev", log, root / "ptune")

    say("\n[4/4] chat() with the trained prefix, on a dev prompt it never saw")
    model = ChatGLMForConditionalGeneration.from_pretrained(
        str(BASE_DIR), pre_seq_len=recipe["pre_seq_len"], ptuning_checkpoint=str(root / "ptune"),
        torch_dtype=torch.float32)
    tokenizer = ChatGLMTokenizer.from_pretrained(str(BASE_DIR))
    query = dev_rows[0]["content"]
    answer, _ = model.chat(tokenizer, query, history=[], do_sample=False,
                           max_length=recipe["generation_max_length"])
    say(f"      问：{query}\n      答：{answer}\n      (reference: {dev_rows[0]['summary']})")

    say("\n| prompts | rows | exact match % | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L |")
    say("|---|---|---|---|---|---|---|")
    for name, metrics in (("training, before", before_train), ("training, after", after_train),
                          ("dev (unseen), before", before_dev), ("dev (unseen), after", after_dev)):
        say(_row(name, metrics))
    say(f"\nloss {losses[0][1]:.3f} (step {losses[0][0]}) -> {losses[-1][1]:.3f} (step {losses[-1][0]}); "
        f"{time.perf_counter() - started:.0f} s in all")
    say(f"outputs in {root}/: ptune/ (checkpoint, prefix pytorch_model.bin, metrics.jsonl, loss_curve.png), "
        "*/generated_predictions.txt, demo.log")
    say(f"serve the trained prefix beside the base model (web chat at http://127.0.0.1:8000/):\n"
        f"  glm-kernels serve --model {BASE_DIR} --ptuning demo={root / 'ptune'}")
    return {"before_train": before_train, "after_train": after_train, "before_dev": before_dev,
            "after_dev": after_dev, "losses": losses, "chat": (query, answer)}


def add_parser(sub) -> None:
    demo = sub.add_parser("demo", help="the main job: P-Tuning v2 of the shipped small model on AdvertiseGen-style "
                                       "data, evaluated before and after, then chat() with the prefix")
    demo.add_argument("--output-dir", default="demo-output", help="where the job writes (default: demo-output)")
    demo.add_argument("--max-steps", type=int, default=None, help=f"training steps (default {RECIPE['max_steps']})")
    demo.add_argument("--seed", type=int, default=42)
    demo.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run_demo(args.output_dir, args.max_steps, args.seed)
    learned = result["after_train"]["predict_exact_match"]
    if learned < PASS_EXACT_MATCH:
        print(f"demo: exact match after tuning is {learned:.1f}% < {PASS_EXACT_MATCH}%: the job did not learn",
              file=sys.stderr)
        return 1
    return 0
