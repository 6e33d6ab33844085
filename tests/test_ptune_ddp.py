"""`torchrun --nproc_per_node 2` (gloo DDP on the CPU) trains the same prefix as one process with twice the
gradient accumulation, and predicts the same text."""
import json
import os
import subprocess
import sys

import torch

from ptune_helpers import ADGEN_ROWS, make_base_dir, write_jsonl


def test_two_processes_equal_one_with_twice_the_accumulation(tmp_path):
    base = make_base_dir(tmp_path / "base")
    train = write_jsonl(tmp_path / "train.json", ADGEN_ROWS * 4)
    dev = write_jsonl(tmp_path / "dev.json", ADGEN_ROWS + ADGEN_ROWS[:1])  # 5 rows: uneven across 2 processes
    common = ["--do_train", "--do_predict", "--train_file", train, "--test_file", dev, "--prompt_column", "content",
              "--response_column", "summary", "--model_name_or_path", str(base), "--max_source_length", "32",
              "--max_target_length", "32", "--pre_seq_len", "4", "--per_device_train_batch_size", "2",
              "--per_device_eval_batch_size", "2", "--learning_rate", "2e-2", "--max_steps", "3",
              "--logging_steps", "1", "--save_steps", "100", "--seed", "3", "--predict_with_generate",
              "--do_sample", "False", "--generation_max_length", "40", "--disable_tqdm", "True",
              # prefix dropout draws different masks per process: off, so that the two runs can be compared
              "--prefix_dropout", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "glm_kernels.ptuning", *common, "--output_dir", str(tmp_path / "ddp"),
                          "--gradient_accumulation_steps", "1"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "glm_kernels.ptuning", *common, "--output_dir",
                          str(tmp_path / "one"), "--gradient_accumulation_steps", "2"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]

    def losses(out):
        lines = (tmp_path / out / "metrics.jsonl").read_text().splitlines()
        return [e["loss"] for e in map(json.loads, lines) if "loss" in e]

    assert len(losses("ddp")) == 3, "each step is logged once (by process 0 only)"
    for a, b in zip(losses("ddp"), losses("one")):
        assert abs(a - b) <= 1e-5 * abs(b)  # fp32: the same tokens, the same token-weighted mean
    a = torch.load(tmp_path / "ddp" / "pytorch_model.bin", weights_only=True)
    b = torch.load(tmp_path / "one" / "pytorch_model.bin", weights_only=True)
    for key in b:
        scale = float(b[key].abs().max())
        assert float((a[key] - b[key]).abs().max()) <= 1e-5 * scale, key  # fp32 tolerance
    # prediction: the 5 rows split over 2 processes are gathered back in order, once
    preds = [(tmp_path / out / "generated_predictions.txt").read_text().splitlines() for out in ("ddp", "one")]
    assert len(preds[0]) == 5 and preds[0] == preds[1]
