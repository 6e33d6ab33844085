"""P-Tuning v2 over a weight-only quantized base: `glm-kernels ptune --quantization_bit 4|8` end to end, and the
prefix encoder's gradients through the quantized layers against a model holding the dequantized weights."""
import json

import pytest
import torch

from conftest import make_model
from glm_kernels.ptuning import main
from glm_kernels.quant import QuantizedLinear
from helpers import assert_fp32_close
from ptune_helpers import ADGEN_ROWS, EVALUATE_SH, TRAIN_SH, args_of, make_base_dir, write_jsonl
from test_quant_model import IDS, dequantized_twin

PREFIX = "transformer.prefix_encoder."


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base_dir(tmp_path_factory.mktemp("ptune-quant-base"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("adgen")
    return write_jsonl(d / "train.json", ADGEN_ROWS * 4), write_jsonl(d / "dev.json", ADGEN_ROWS)


def with_bits(argv, bits):
    i = argv.index("--quantization_bit")
    return argv[:i + 1] + [str(bits)] + argv[i + 2:]


@pytest.mark.parametrize("bits", [4, 8])
def test_thudm_scripts_with_quantization_bit_run(base, data, tmp_path, bits):
    train, dev = data
    out = tmp_path / "out"
    argv = with_bits(args_of(TRAIN_SH, train=train, dev=dev, model=base, out=out), bits)  # train.sh as THUDM has it
    assert main(argv + ["--max_steps", "2", "--save_steps", "2", "--logging_steps", "1"]) == 0
    state = torch.load(out / "checkpoint-2" / "pytorch_model.bin", weights_only=True)
    assert set(state) == {PREFIX + "embedding.weight"}  # only the prefix trained and saved
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in logged if "loss" in e]
    assert len(losses) == 2 and all(0 < loss < 100 for loss in losses)

    predict_out = tmp_path / "predict"
    argv = with_bits(args_of(EVALUATE_SH, dev=dev, model=base, checkpoint=out / "checkpoint-2", out=predict_out),
                     bits)
    assert main(argv + ["--generation_max_length", "40"]) == 0
    lines = (predict_out / "generated_predictions.txt").read_text().splitlines()
    assert len(lines) == len(ADGEN_ROWS)


def test_the_job_trains_over_a_quantized_model(base, data, tmp_path, monkeypatch):
    """The model the job trains holds QuantizedLinear blocks (quantized while loading), frozen."""
    import importlib

    main_module = importlib.import_module("glm_kernels.ptuning.main")

    seen = {}
    load_model = main_module.load_model

    def spy(model_args, training_args, config_dir):
        model = load_model(model_args, training_args, config_dir)
        seen["model"] = model
        return model

    monkeypatch.setattr(main_module, "load_model", spy)
    train, dev = data
    argv = with_bits(args_of(TRAIN_SH, train=train, dev=dev, model=base, out=tmp_path / "out"), 4)
    assert main(argv + ["--max_steps", "1", "--save_steps", "1"]) == 0
    model = seen["model"]
    assert model.config.quantization_bit == 4
    assert isinstance(model.transformer.layers[0].mlp.dense_h_to_4h, QuantizedLinear)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {PREFIX + "embedding.weight"}


def test_bad_quantization_bit_is_named(base, data, tmp_path, capsys):
    train, dev = data
    argv = with_bits(args_of(TRAIN_SH, train=train, dev=dev, model=base, out=tmp_path / "out"), 3)
    assert main(argv) == 2
    assert "--quantization_bit 3: weight-only quantization takes 4 or 8" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("projection", [False, True])
def test_prefix_gradients_match_the_dequantized_model(bits, projection):
    """The prefix encoder's gradient through the quantized layers (dX = dY @ W of every linear) equals the one
    through a model whose Linear weights are the dequantized quantized weights (fp32 rule)."""
    model = make_model(vocab_size=1008, pre_seq_len=4, prefix_projection=projection).quantize(bits)
    twin = dequantized_twin(model, bits)
    assert twin.config.pre_seq_len == 4
    labels = IDS.clone()
    labels[:, :5] = -100
    model(IDS, labels=labels).loss.backward()
    twin(IDS, labels=labels).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    ref = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert grads.keys() == ref.keys() and grads
    for name, grad in grads.items():
        assert ref[name].abs().max() > 0
        assert_fp32_close(grad, ref[name], 1e-4, f"grad of {name}")  # model rule, against the gradient's scale


def test_training_step_with_the_fused_head_over_a_quantized_base():
    """Training mode (the fused LM head + loss) through a quantized base: loss and prefix gradient as the twin's."""
    model = make_model(vocab_size=1008, pre_seq_len=4).quantize(4)
    twin = dequantized_twin(model, 4)
    for m in (model, twin):
        m.train()
        m.transformer.dropout.p = 0.0
    labels = IDS.clone()
    labels[:, :5] = -100
    loss, ref = model(IDS, labels=labels).loss, twin(IDS, labels=labels).loss
    assert_fp32_close(loss, ref, 1e-4, "loss")  # model rule
    loss.backward()
    ref.backward()
    grad = model.transformer.prefix_encoder.embedding.weight.grad
    assert_fp32_close(grad, twin.transformer.prefix_encoder.embedding.weight.grad, 1e-4, "prefix grad")

