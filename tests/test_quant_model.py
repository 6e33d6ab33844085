"""Quantized models: `model.quantize(bits)`, `config.quantization_bit`, THUDM-layout checkpoints written by an
independent writer, save/load round trips, quantization while loading (and its memory), errors, device moves.

The reference for every quantized model is its "dequantized twin": the unquantized model whose Linear weights
are q * scale decoded by the test's own reader from the state dict (GLM_SPEC, weight-only INT8/INT4)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import make_model
from glm_kernels import ChatGLMForConditionalGeneration, ChatGLMModel
from glm_kernels import cpu_ext
from glm_kernels.quant import QuantizedEmbedding, QuantizedLinear
from helpers import assert_fp32_close, assert_lowp_close
from test_loading import tree_digest
from test_quant_layout import oracle_decode4, oracle_pack4, oracle_quantize

BOS, GMASK = 994, 991
IDS = torch.tensor([[5, 17, 42, GMASK, BOS, 8, 9], [6, 300, 7, GMASK, BOS, 11, 12]])
LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
VOCAB = 1008  # a multiple of 16: the 4-bit LM head can take the CPU int4 form


def fp_model(**overrides):
    return make_model(**{"vocab_size": VOCAB, **overrides})


def quantized_keys(config, embeddings=False):
    prefixes = [f"transformer.layers.{i}.{name}" for i in range(config.num_layers) for name in LINEARS]
    if embeddings:
        prefixes += ["transformer.word_embeddings", "lm_head"]
    return prefixes


def oracle_weight(state, prefix, bits) -> torch.Tensor:
    """W = q * scale from the THUDM tensors of a state dict, by the test's reader (float64)."""
    q = state[prefix + ".weight"].numpy()
    values = q if bits == 8 else oracle_decode4(q)
    return torch.from_numpy(values.astype(np.float64)) * state[prefix + ".weight_scale"].double()[:, None]


def dequantized_twin(model, bits, embeddings=False, dtype=torch.float32):
    """The unquantized model holding the dequantized weights of `model` (read from its state dict)."""
    state = model.state_dict()
    config = model.config.__class__.from_dict({**model.config.to_dict(), "quantization_bit": 0,
                                               "quantization_embeddings": False})
    twin = ChatGLMForConditionalGeneration(config)
    plain = {k: v for k, v in state.items() if not k.endswith(".weight_scale")}
    for prefix in quantized_keys(config, embeddings):
        plain[prefix + ".weight"] = oracle_weight(state, prefix, bits).float()
    twin.load_state_dict({k: v.float() for k, v in plain.items()}, strict=True)
    return twin.to(dtype).eval()


# ----------------------------------------------------------------------------- model.quantize


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("embeddings", [False, True])
def test_quantized_model_matches_its_dequantized_twin(bits, embeddings, cpu_path):
    model = fp_model().quantize(bits, quantize_embeddings=embeddings)
    twin = dequantized_twin(model, bits, embeddings)
    with torch.no_grad():
        out, ref = model(IDS).logits, twin(IDS).logits
    assert_fp32_close(out, ref, 1e-4, f"{bits}-bit logits")  # fp32 model rule against the dequantized twin
    tokens = model.generate(IDS[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens, twin.generate(IDS[:1], max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("bits", [8, 4])
def test_bf16_quantized_model_follows_the_low_precision_rule(bits, cpu_path):
    base = fp_model()
    model = base.quantize(bits).to(torch.bfloat16)
    twin32 = dequantized_twin(model, bits)
    twin16 = dequantized_twin(model, bits, dtype=torch.bfloat16)
    with torch.no_grad():
        out, ref32, ref_lowp = model(IDS).logits, twin32(IDS).logits, twin16(IDS).logits
    if cpu_path == "pytorch":
        # PyTorch's bf16 int-weight kernels round x @ q^T before the fp32 scale (tests/test_quant_op.py): one more
        # bf16 rounding per product, 2^-8 relative, through the layers
        err, scale = float((out.double() - ref32.double()).abs().max()), float(ref32.abs().max())
        assert err <= 2 * float((ref_lowp.double() - ref32.double()).abs().max()) + 1e-3 * scale + 2**-7 * scale
    else:
        assert_lowp_close(out, ref_lowp, ref32, f"{bits}-bit bf16 logits")  # 2 x ref error + 1e-3 x scale


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_writes_thudms_layout(bits):
    base = fp_model()
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = base.quantize(bits)
    assert model.config.quantization_bit == bits
    state = model.state_dict()
    prefixes = quantized_keys(model.config)
    scale_keys = {k for k in state if k.endswith("weight_scale")}
    assert scale_keys == {p + ".weight_scale" for p in prefixes}  # the four linears of every block, nothing else
    for prefix in prefixes:
        q, scale = state[prefix + ".weight"], state[prefix + ".weight_scale"]
        oq, oscale = oracle_quantize(weights[prefix + ".weight"].numpy(), bits)
        assert q.dtype == torch.int8 and scale.dtype == torch.float16
        assert np.array_equal(scale.numpy(), oscale)
        assert np.array_equal(q.numpy(), oq if bits == 8 else oracle_pack4(oq))
        assert torch.equal(state[prefix + ".bias"], weights[prefix + ".bias"])
    for key, value in weights.items():
        if not any(key.startswith(p + ".weight") for p in prefixes):
            assert torch.equal(state[key], value), key


def test_quantize_embeddings_share_one_matrix_with_the_tied_head():
    model = fp_model().quantize(4, quantize_embeddings=True)
    embedding, head = model.transformer.word_embeddings, model.lm_head
    assert isinstance(embedding, QuantizedEmbedding) and isinstance(head, QuantizedLinear)
    assert embedding.weight is head.weight and embedding.weight_scale is head.weight_scale
    assert model.config.quantization_embeddings
    state = model.state_dict()
    assert torch.equal(state["lm_head.weight"], state["transformer.word_embeddings.weight"])


def test_quantize_arguments():
    model = fp_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.quantize(0) is model and model.config.quantization_bit == 0  # as the original: nothing to do
    for bad in (3, 16, True, "4"):
        with pytest.raises(ValueError, match="quantize\\(bits\\) must be 4 or 8"):
            model.quantize(bad)
    with pytest.raises(TypeError, match="unexpected arguments \\['group'\\]"):
        model.quantize(4, group=64)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    assert model.quantize(8, use_quantization_cache=True) is model  # THUDM's CPU-kernel options: accepted
    quantized = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="already quantized \\(config.quantization_bit=8\\)"):
        model.quantize(4)
    after = model.state_dict()
    assert quantized.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in quantized.items())
    with pytest.raises(ValueError, match="inner_hidden_size=129 must be even"):
        make_model(inner_hidden_size=129).quantize(4)


def test_config_builds_quantized_modules():
    from glm_kernels.selfcheck import tiny_config

    model = ChatGLMForConditionalGeneration(tiny_config(quantization_bit=4, quantization_embeddings=True))
    for prefix in quantized_keys(model.config, embeddings=True):
        assert isinstance(model.get_submodule(prefix), (QuantizedLinear, QuantizedEmbedding)), prefix
    with pytest.raises(ValueError, match="quantization_bit=3 is not supported"):
        make_model(quantization_bit=3)
    with pytest.raises(ValueError, match="quantization_embeddings=True needs quantization_bit"):
        make_model(quantization_embeddings=True)


def test_dtype_moves_keep_scales_and_bytes():
    model = fp_model().quantize(4, quantize_embeddings=True)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("weight", "weight_scale"))
              and v.dtype in (torch.int8, torch.float16)}
    model.to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    for name, module in model.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
            assert module.weight_scale.dtype == torch.float16, name  # never rounded to bf16
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert model.transformer.layers[0].attention.dense.bias.dtype == torch.bfloat16


def test_cpu_form_is_held_instead_of_thudms_and_converted_on_moves(monkeypatch):
    monkeypatch.setattr(cpu_ext, "extension", lambda: None)  # PyTorch's int4 kernel needs the repacked form
    model = fp_model().quantize(4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    module = model.transformer.layers[0].mlp.dense_h_to_4h
    assert module.weight.dtype == torch.uint8  # the CPU kernel's order
    thudm_bytes = state["transformer.layers.0.mlp.dense_h_to_4h.weight"].numel()
    held = sum(t.numel() * t.element_size() for t in (module.weight, module.weight_scale))
    with torch.no_grad():
        model(IDS)  # builds the kernel's scales_and_zeros
    held += module._sz_cache.numel() * module._sz_cache.element_size()
    assert held <= 1.1 * (thudm_bytes + 2 * module.out_features)  # never both layouts: within 10%
    model.to("meta")  # leaving the CPU: THUDM's bytes travel
    assert module.weight.dtype == torch.int8 and module.weight.is_meta
    model.to_empty(device="cpu")
    assert module.weight.dtype == torch.uint8
    model.load_state_dict(state)
    assert module.weight.dtype == torch.uint8
    after = model.state_dict()
    # (to_empty leaves the rotary inv_freq buffers empty: loading ignores them, as the original does)
    assert all(torch.equal(v, after[k]) for k, v in state.items() if "inv_freq" not in k)


def test_load_state_dict_reads_thudms_layout_and_names_bad_tensors():
    model = fp_model().quantize(4)
    state = model.state_dict()
    fresh = ChatGLMForConditionalGeneration(model.config)
    fresh.load_state_dict(state)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.items())
    bad = dict(state)
    key = "transformer.layers.1.attention.dense.weight"
    bad[key] = state[key].float()
    with pytest.raises(RuntimeError, match=f"{key} must be int8 \\[128, 64\\]"):
        fresh.load_state_dict(bad)
    del bad[key]
    with pytest.raises(RuntimeError, match=f"Missing key.*{key}"):
        fresh.load_state_dict(bad)


def test_training_loss_through_a_quantized_head_equals_the_unfused_loss():
    model = fp_model(pre_seq_len=4).quantize(8, quantize_embeddings=True)
    labels = IDS.clone()
    labels[:, :5] = -100
    model.eval()
    expected = model(IDS, labels=labels).loss  # logits, then fp32 cross-entropy
    model.train()
    model.transformer.dropout.p = 0.0
    fused = model(IDS, labels=labels)  # training mode: chunked head loss, logits never whole
    assert fused.logits is None
    assert_fp32_close(fused.loss, expected, 1e-5, "chunked quantized-head loss")  # same arithmetic, summed by chunks
    fused.loss.backward()
    assert model.transformer.prefix_encoder.embedding.weight.grad.abs().max() > 0


# ----------------------------------------------------------------------------- checkpoints in THUDM's layout


def write_thudm_quantized(model, directory, bits, shards=2, fmt="bin"):
    """An independent writer of THUDM's chatglm-6b-int8/-int4 layout: fp16 tensors, and for the four linears of
    every block int8 `weight` (4 bits: two per byte, high nibble first) + fp16 `weight_scale`, from the float
    weights by the layout's definition (numpy). Sharded with an index; config.json says quantization_bit."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    prefixes = set(quantized_keys(model.config))
    tensors = {}
    for key, value in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in prefixes and key.endswith(".weight"):
            q, scale = oracle_quantize(value.float().numpy(), bits)
            tensors[key] = torch.from_numpy(q if bits == 8 else oracle_pack4(q))
            tensors[owner + ".weight_scale"] = torch.from_numpy(scale)
        else:
            tensors[key] = value.half()
    keys = sorted(tensors)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = (f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin" if fmt == "bin"
                else f"model-{i + 1:05d}-of-{shards:05d}.safetensors")
        part = {k: tensors[k].contiguous() for k in keys[i * per:(i + 1) * per]}
        torch.save(part, directory / name) if fmt == "bin" else save_file(part, str(directory / name))
        weight_map.update({k: name for k in part})
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (directory / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = model.config.to_dict()
    config.update(quantization_bit=bits, torch_dtype="float16")
    config.pop("dtype", None)
    (directory / "config.json").write_text(json.dumps(config))
    return tensors


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_thudm_quantized_checkpoint_loads(tmp_path, bits, fmt, cpu_path):
    written = write_thudm_quantized(fp_model(), tmp_path / "ckpt", bits, fmt=fmt)
    model = ChatGLMForConditionalGeneration.from_pretrained(tmp_path / "ckpt", torch_dtype=torch.float32)
    assert model.config.quantization_bit == bits
    state = model.state_dict()
    for key, value in written.items():
        if value.dtype == torch.int8 or key.endswith("weight_scale"):
            assert torch.equal(state[key], value), key  # the bytes as written
    twin = dequantized_twin(model, bits)
    for prefix in quantized_keys(model.config):  # the twin holds exactly the writer's q * scale
        w = torch.from_numpy((oracle_decode4(written[prefix + ".weight"].numpy()) if bits == 4
                              else written[prefix + ".weight"].numpy()).astype(np.float64))
        assert torch.equal(twin.get_submodule(prefix).weight.double(),
                           (w * written[prefix + ".weight_scale"].double()[:, None]).float().double())
    with torch.no_grad():
        assert_fp32_close(model(IDS).logits, twin(IDS).logits, 1e-4, "THUDM checkpoint logits")  # fp32 model rule
    base = ChatGLMModel.from_pretrained(tmp_path / "ckpt", torch_dtype=torch.float32)
    assert isinstance(base.layers[0].attention.dense, QuantizedLinear)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("embeddings", [False, True])
def test_save_pretrained_round_trip(tmp_path, bits, embeddings, cpu_path):
    model = fp_model().quantize(bits, quantize_embeddings=embeddings)
    model.save_pretrained(tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("transformer.layers.1.mlp.dense_4h_to_h.weight").dtype == torch.int8
        assert f.get_tensor("transformer.layers.1.mlp.dense_4h_to_h.weight_scale").dtype == torch.float16
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_bit"] == bits
    assert ("transformer.word_embeddings.weight_scale" in keys) == embeddings
    loaded = ChatGLMForConditionalGeneration.from_pretrained(tmp_path / "q")
    assert loaded.dtype == torch.float32
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, loaded(IDS).logits)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantizing_while_loading_writes_the_layout_definition(tmp_path, bits):
    base = fp_model()
    base.save_pretrained(tmp_path / "fp")
    expected = write_thudm_quantized(base, tmp_path / "thudm", bits)  # the writer's bytes from the same weights
    model = ChatGLMForConditionalGeneration.from_pretrained(tmp_path / "fp", quantization_bit=bits)
    state = model.state_dict()
    for prefix in quantized_keys(model.config):
        for leaf in ("weight", "weight_scale"):
            assert torch.equal(state[f"{prefix}.{leaf}"], expected[f"{prefix}.{leaf}"]), (prefix, leaf)
    quantized_after = base.quantize(bits)  # the same weights quantized after loading: the same model
    assert all(torch.equal(v, state[k]) for k, v in quantized_after.state_dict().items() if "inv_freq" not in k)


def test_checkpoint_layout_mismatches_are_named(tmp_path):
    base = fp_model()
    good = write_thudm_quantized(base, tmp_path / "q8", 8, shards=1)
    key = "transformer.layers.0.attention.dense"
    digest = tree_digest(tmp_path)

    qkv = "transformer.layers.0.attention.query_key_value"
    with pytest.raises(ValueError, match=f"{qkv}.weight in .* is int8 \\[384, 128\\]: the checkpoint is quantized to "
                                         "8 bits but config.quantization_bit=4"):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path / "q8", quantization_bit=4)
    with pytest.raises(ValueError, match=f"the checkpoint is quantized \\(.*weight_scale.*\\) but "
                                         "config.quantization_bit is 0"):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path / "q8", quantization_bit=0)
    assert tree_digest(tmp_path) == digest  # nothing written

    def variant(name, change):
        tensors = dict(good)
        change(tensors)
        d = tmp_path / name
        d.mkdir()
        torch.save(tensors, d / "pytorch_model.bin")
        (d / "config.json").write_text((tmp_path / "q8" / "config.json").read_text())
        return d

    d = variant("no-scale", lambda t: t.pop(key + ".weight_scale"))
    with pytest.raises(ValueError, match=f"{key}.weight in .* is int8 \\(quantized\\) but the checkpoint has no "
                                         f"{key}.weight_scale"):
        ChatGLMForConditionalGeneration.from_pretrained(d)
    d = variant("float-with-scale", lambda t: t.update({key + ".weight": base.state_dict()[key + ".weight"]}))
    with pytest.raises(ValueError, match=f"{key}.weight_scale is in .* but {key}.weight in .* is torch.float32"):
        ChatGLMForConditionalGeneration.from_pretrained(d)
    d = variant("bad-scale", lambda t: t.update({key + ".weight_scale": t[key + ".weight_scale"][:5]}))
    with pytest.raises(ValueError, match=f"{key}.weight_scale in .* is torch.float16 \\[5\\], the model expects a "
                                         "floating \\(fp16\\) \\[128\\]"):
        ChatGLMForConditionalGeneration.from_pretrained(d)
    d = variant("uint8", lambda t: t.update({key + ".weight": t[key + ".weight"].view(torch.uint8)}))
    with pytest.raises(ValueError, match=f"{key}.weight in .* is torch.uint8: expected THUDM's int8 \\[128, 128\\]"):
        ChatGLMForConditionalGeneration.from_pretrained(d)
    with pytest.raises(TypeError, match="device_map=.* with quantization_bit=8 is not supported"):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path / "q8", device_map="cpu")
    with pytest.raises(TypeError, match="load_in_4bit=True.*pass quantization_bit=4"):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path / "q8", load_in_4bit=True)


_PEAK = r"""
import json, sys, torch
from glm_kernels import ChatGLMForConditionalGeneration

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
before = status("VmRSS")
model = ChatGLMForConditionalGeneration.from_pretrained(sys.argv[1], torch_dtype=torch.float16,
                                                        quantization_bit=int(sys.argv[2]))
peak = status("VmHWM")
held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
print(json.dumps({"before": before, "peak": peak, "held": held}))
"""


@pytest.fixture(scope="module")
def fp16_checkpoint(tmp_path_factory):
    from glm_kernels.configuration import ChatGLMConfig
    from glm_kernels.tools.load_memory import write_checkpoint

    # linears dominate (16 layers of hidden 1024: 403 MB of fp16), small vocabulary
    config = ChatGLMConfig(vocab_size=8192, hidden_size=1024, num_layers=16, num_attention_heads=16,
                           inner_hidden_size=4096, torch_dtype="float16")
    directory = tmp_path_factory.mktemp("fp16") / "ckpt"
    return directory, write_checkpoint(directory, config, shards=4)


@pytest.mark.parametrize("bits, extension", [(8, "1"), (4, "1"), (4, "0")])  # "0": the 4-bit weights repacked
def test_quantizing_while_loading_never_holds_the_16_bit_model(fp16_checkpoint, bits, extension):
    """Peak RSS while loading a sharded fp16 checkpoint with quantization_bit stays far below a 16-bit copy."""
    directory, fp16_bytes = fp16_checkpoint
    largest_shard = max(p.stat().st_size for p in directory.glob("*.bin"))
    out = subprocess.run([sys.executable, "-c", _PEAK, str(directory), str(bits)], check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",  # freed blocks go back (pitfalls.md)
                              cpu_ext.ENV_VAR: extension})
    r = json.loads(out.stdout.strip().splitlines()[-1])
    increase = r["peak"] - r["before"]
    # the quantized model + one shard's mapped pages + one matrix's quantization buffers (fp32 rows, int8 values,
    # packing: 16 x 4096 x 1024 bytes) + 10%; a 16-bit copy of the model does not fit in it
    bound = r["held"] + largest_shard + 16 * 4096 * 1024 + 0.1 * r["held"]
    assert bound < fp16_bytes, (bound, fp16_bytes)
    assert increase <= bound, (increase, r, largest_shard, fp16_bytes)


def test_a_triton_run_gets_thudms_bytes_from_a_cpu_packed_module(monkeypatch):
    """The CPU form is the torch backend's: a Triton implementation (here a stand-in recording its arguments,
    forced on CPU tensors as under the interpreter) receives THUDM's int8 bytes."""
    from glm_kernels import backend

    monkeypatch.setattr(cpu_ext, "extension", lambda: None)
    module = fp_model().quantize(4).transformer.layers[0].mlp.dense_h_to_4h
    assert module.weight.dtype == torch.uint8
    seen = []

    def stand_in(x, weight, scale, bits, bias=None):
        seen.append(weight)
        return backend._REGISTRY["quant_linear"]["torch"].fn(x, weight, scale, bits, bias)

    backend.available("quant_linear")  # registers the real kernels first, if triton imports
    monkeypatch.setitem(backend._REGISTRY["quant_linear"], "triton", backend.Impl(stand_in))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(3, module.in_features)
    out = module(x, backend="triton")
    assert len(seen) == 1 and seen[0].dtype == torch.int8
    assert torch.equal(seen[0], module.thudm_weight())
    assert_fp32_close(out, module(x, backend="torch"), 1e-4, "same product")  # matmul rule


def test_quantization_report_prints_the_table():
    import io

    from glm_kernels.quant import report

    out = io.StringIO()
    assert report.main(["--prompts", "2", "--new-tokens", "4", "--bits", "8"], out=out) == 0
    rows = [line for line in out.getvalue().splitlines() if line.startswith("| 8 |")]
    assert len(rows) == 2  # the embeddings / LM head kept, then quantized
    cells = rows[0].split("|")
    assert 0 < float(cells[3]) < 0.1  # max logit error / max logit: INT8 moves the logits, a little
    from glm_kernels import ChatGLMTokenizer

    model = ChatGLMForConditionalGeneration.from_pretrained(report.BASE_DIR)
    prompts = report._prompts(ChatGLMTokenizer.from_pretrained(report.BASE_DIR), report.DEV_FILE, 2)
    same = report.compare(model, model, prompts, 4, model.config.eos_token_id)  # a model against itself
    assert same["max_rel"] == 0 and same["top1"] == 1 and same["identical"] == 2 and same["agreed"] == 1


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_embedding_lookup_is_the_dequantized_row(bits, dtype, cpu_path):
    # A decode step's few ids (<= FEW_IDS) take the extension's row dequantization, more ids the ATen path, and
    # without the extension always the ATen path: every one is the oracle's q * scale in fp32, rounded once to the
    # model's dtype (bitwise).
    from glm_kernels.quant.modules import FEW_IDS

    torch.manual_seed(3)
    weight = torch.randn(40, 64)
    embedding = QuantizedEmbedding.from_embedding(torch.nn.Embedding.from_pretrained(weight), bits).to(dtype)
    q = embedding.thudm_weight().numpy()
    values = (q if bits == 8 else oracle_decode4(q)).astype(np.float32)
    table = values * embedding.weight_scale.numpy().astype(np.float32)[:, None]
    for ids in ([[5]], [[0, 39]], [[7], [2]], [list(range(FEW_IDS + 4))]):  # the last: more ids than FEW_IDS
        ids = torch.tensor(ids)
        out = embedding(ids)
        want = torch.from_numpy(table[ids.numpy()]).to(dtype)
        assert out.dtype == dtype and out.shape == (*ids.shape, 64)
        assert torch.equal(out, want), f"ids {ids.tolist()}"
    for bad in ([[40]], [[-1]], [[1, 2, 45]]):
        with pytest.raises(IndexError):
            embedding(torch.tensor(bad))
