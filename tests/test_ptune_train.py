"""`glm-kernels ptune` end to end: THUDM's train.sh / evaluate.sh arguments, checkpoints THUDM's loader reads,
resume after a kill (same loss curve), atomic checkpoints, evaluation by generation, logs and plots."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from glm_kernels import ChatGLMForConditionalGeneration
from glm_kernels.ptuning import main
from ptune_helpers import ADGEN_ROWS, EVALUATE_SH, TRAIN_SH, args_of, make_base_dir, write_jsonl

TESTS = Path(__file__).parent
PREFIX = "transformer.prefix_encoder."


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base_dir(tmp_path_factory.mktemp("ptune-base"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("adgen")
    return write_jsonl(d / "train.json", ADGEN_ROWS * 4), write_jsonl(d / "dev.json", ADGEN_ROWS)


def without(argv, flag, has_value=True):
    i = argv.index(flag)
    return argv[:i] + argv[i + (2 if has_value else 1):]


def thudm_load_prefix(model, checkpoint_dir):
    """What THUDM's main.py does with --ptuning_checkpoint (torch.load, strip the prefix, load_state_dict)."""
    state = torch.load(os.path.join(checkpoint_dir, "pytorch_model.bin"))
    new = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    model.transformer.prefix_encoder.load_state_dict(new)


def test_thudm_train_and_evaluate_scripts_run_unchanged(base, data, tmp_path, capsys):
    train, dev = data
    out = tmp_path / "out"
    argv = args_of(TRAIN_SH, train=train, dev=dev, model=base, out=out)
    argv = without(argv, "--quantization_bit")  # the float base here; with the flag: tests/test_quant_ptune.py
    # THUDM's 3000 steps x 16 accumulated rows, shortened; every other argument as in train.sh
    assert main(argv + ["--max_steps", "4", "--save_steps", "2", "--logging_steps", "1"]) == 0
    for step in (2, 4):
        ckpt = out / f"checkpoint-{step}"
        for name in ("pytorch_model.bin", "config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                     "trainer_state.json", "ice_text.model", "tokenizer_config.json"):
            assert (ckpt / name).is_file(), f"{ckpt} lacks {name}"
        state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
        config = json.loads((ckpt / "config.json").read_text())
        width = 2 * config["num_layers"] * config["hidden_size"]
        assert {k: (tuple(v.shape), v.dtype) for k, v in state.items()} == \
            {PREFIX + "embedding.weight": ((128, width), torch.float32)}
        assert config["pre_seq_len"] == 128
    assert not list(out.glob("tmp-*"))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged if "loss" in e] == [1, 2, 3, 4]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "pytorch_model.bin").is_file()  # the final prefix

    # THUDM's own loader reads the checkpoint into a model built the original way
    model = ChatGLMForConditionalGeneration.from_pretrained(str(base), pre_seq_len=128)
    thudm_load_prefix(model, out / "checkpoint-4")
    trained = torch.load(out / "checkpoint-4" / "pytorch_model.bin", weights_only=True)[PREFIX + "embedding.weight"]
    assert torch.equal(model.transformer.prefix_encoder.embedding.weight, trained)

    predict_out = tmp_path / "predict"
    argv = without(args_of(EVALUATE_SH, dev=dev, model=base, checkpoint=out / "checkpoint-4", out=predict_out),
                   "--quantization_bit")
    assert main(argv + ["--generation_max_length", "48"]) == 0  # the 512 of THUDM's evaluate(): 48 keeps it quick
    lines = [json.loads(line) for line in (predict_out / "generated_predictions.txt").read_text().splitlines()]
    assert [line["labels"] for line in lines] == [r["summary"] for r in ADGEN_ROWS]
    assert all(set(line) == {"labels", "predict"} for line in lines)
    results = json.loads((predict_out / "predict_results.json").read_text())
    for key in ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l"):
        assert 0 <= results[key] <= 100


def test_wrong_pre_seq_len_for_a_checkpoint_is_named(base, data, tmp_path, capsys):
    train, dev = data
    out = tmp_path / "out"
    assert main(["--do_train", "--train_file", train, "--prompt_column", "content", "--response_column", "summary",
                 "--model_name_or_path", str(base), "--output_dir", str(out), "--max_source_length", "32",
                 "--max_target_length", "32", "--pre_seq_len", "8", "--max_steps", "1", "--save_steps", "1"]) == 0
    capsys.readouterr()
    code = main(["--do_predict", "--test_file", dev, "--prompt_column", "content", "--response_column", "summary",
                 "--model_name_or_path", str(base), "--ptuning_checkpoint", str(out / "checkpoint-1"),
                 "--output_dir", str(tmp_path / "p"), "--max_source_length", "32", "--max_target_length", "32",
                 "--pre_seq_len", "16", "--predict_with_generate"])
    assert code == 2
    assert "pre_seq_len=8" in capsys.readouterr().err


def test_existing_checkpoints_need_overwrite_or_resume(base, data, tmp_path, capsys):
    train, _ = data
    out = tmp_path / "out"
    argv = ["--do_train", "--train_file", train, "--prompt_column", "content", "--response_column", "summary",
            "--model_name_or_path", str(base), "--output_dir", str(out), "--max_source_length", "32",
            "--max_target_length", "32", "--pre_seq_len", "4", "--max_steps", "1", "--save_steps", "1"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2 and "--resume_from_checkpoint" in capsys.readouterr().err
    assert main(argv + ["--overwrite_output_dir"]) == 0


def train_argv(base, train, out, steps, **extra):
    argv = ["--do_train", "--train_file", train, "--prompt_column", "content", "--response_column", "summary",
            "--model_name_or_path", str(base), "--output_dir", str(out), "--max_source_length", "32",
            "--max_target_length", "32", "--pre_seq_len", "8", "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "2", "--learning_rate", "2e-2", "--max_steps", str(steps),
            "--logging_steps", "1", "--save_steps", "2", "--seed", "7", "--disable_tqdm", "True"]
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    return argv


def losses_of(out):
    return {e["step"]: e for e in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
            if "loss" in e}


def spawn(mode, argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    return subprocess.Popen([sys.executable, str(TESTS / "ptune_driver.py"), mode, *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_a_run_killed_at_any_point_resumes_to_the_same_loss_curve(tmp_path_factory, data):
    base = make_base_dir(tmp_path_factory.mktemp("ptune-base-128"), hidden=128, layers=2, heads=4)
    train, _ = data
    steps = 10
    straight = tmp_path_factory.mktemp("straight")
    run = spawn("none", train_argv(base, train, straight, steps))
    assert run.wait(timeout=600) == 0, run.stderr.read()[-3000:]
    expected = losses_of(straight)
    assert sorted(expected) == list(range(1, steps + 1))

    # 1. SIGKILL from outside, at whatever point the run is once checkpoint-2 exists
    out = tmp_path_factory.mktemp("killed")
    run = spawn("none", train_argv(base, train, out, steps))
    deadline = time.time() + 300
    while not (out / "checkpoint-2").exists() and time.time() < deadline and run.poll() is None:
        time.sleep(0.005)
    run.send_signal(signal.SIGKILL)
    assert run.wait(timeout=60) == -signal.SIGKILL
    assert not (out / f"checkpoint-{steps}").exists(), "the run finished before it could be killed"
    # 2. SIGKILL in the middle of writing the next checkpoint: the previous one stays intact
    last = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    run = spawn(f"kill-saving:{last + 2}", train_argv(base, train, out, steps,
                                                      resume_from_checkpoint=out / f"checkpoint-{last}"))
    assert run.wait(timeout=600) == -signal.SIGKILL
    assert (out / f"tmp-checkpoint-{last + 2}").is_dir() and not (out / f"checkpoint-{last + 2}").exists()
    # 3. resume from the newest complete checkpoint ("latest") and finish
    run = spawn("none", train_argv(base, train, out, steps, resume_from_checkpoint="latest"))
    assert run.wait(timeout=600) == 0, run.stderr.read()[-3000:]
    assert not list(out.glob("tmp-*"))  # the half-written checkpoint was cleaned up by the next save
    resumed = losses_of(out)
    assert sorted(resumed) == sorted(expected)
    for step, entry in expected.items():
        # same data order, dropout masks and optimizer state: the same numbers (fp32, 1e-6 relative)
        assert resumed[step]["loss"] == pytest.approx(entry["loss"], rel=1e-6), f"loss at step {step}"
        assert resumed[step]["learning_rate"] == pytest.approx(entry["learning_rate"], rel=1e-9)
    final = torch.load(out / "pytorch_model.bin", weights_only=True)
    reference = torch.load(straight / "pytorch_model.bin", weights_only=True)
    for key, value in reference.items():
        assert torch.allclose(final[key], value, rtol=1e-5, atol=1e-6), key


def test_gradient_checkpointing_gives_the_same_training(base, data, tmp_path):
    train, _ = data
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(train_argv(base, train, a, 2, prefix_dropout=0.0)) == 0
    assert main(train_argv(base, train, b, 2, prefix_dropout=0.0, activation_checkpointing=True)) == 0
    for step, entry in losses_of(a).items():
        assert losses_of(b)[step]["loss"] == pytest.approx(entry["loss"], rel=1e-5)


def test_bfloat16_base_with_float32_prefix(base, data, tmp_path):
    train, _ = data
    out = tmp_path / "bf16"
    assert main(train_argv(base, train, out, 2, torch_dtype="bfloat16")) == 0
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert state[PREFIX + "embedding.weight"].dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in losses_of(out).values())


def test_evaluation_without_generation_reports_the_teacher_forced_loss(base, data, tmp_path):
    train, dev = data
    out = tmp_path / "eval"
    argv = ["--do_eval", "--validation_file", dev, "--prompt_column", "content", "--response_column", "summary",
            "--model_name_or_path", str(base), "--output_dir", str(out), "--max_source_length", "32",
            "--max_target_length", "32", "--pre_seq_len", "4"]
    assert main(argv) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_samples"] == 4 and results["eval_loss"] > 0
