"""Checkpoint round trips in the original layouts, P-Tuning checkpoints, every error case, loading memory."""
import argparse
import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_model
from glm_kernels import ChatGLMForConditionalGeneration, ChatGLMModel

BOS, GMASK = 994, 991
IDS = torch.tensor([[5, 17, 42, GMASK, BOS, 8, 9]])


def write_original(model, directory, shards=3, fmt="bin", drop=(), extra=None, inv_freq=True):
    """Write `model` as THUDM released it: sharded fp16 .bin + index, inv_freq buffers included."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.clone() for k, v in model.state_dict().items() if k not in drop}
    if not inv_freq:
        state = {k: v for k, v in state.items() if "inv_freq" not in k}
    state.update(extra or {})
    keys = list(state)
    per = -(-len(keys) // shards)
    weight_map = {}
    ext, stem = ("safetensors", "model") if fmt == "safetensors" else ("bin", "pytorch_model")
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: state[k].contiguous() for k in keys[i * per:(i + 1) * per]}
        (save_file(part, str(directory / name)) if fmt == "safetensors" else torch.save(part, directory / name))
        weight_map.update({k: name for k in part})
    index = f"{stem}.{ext}.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (directory / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.config.save_pretrained(str(directory))
    config = json.loads((directory / "config.json").read_text())
    config.pop("dtype", None)
    config["torch_dtype"] = str(model.dtype).replace("torch.", "")  # the released config's spelling
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def tree_digest(directory):
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        h.update(str(p.relative_to(directory)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def fp16_model():
    return make_model().half()


def test_sharded_bin_with_inv_freq_round_trip(tmp_path, fp16_model):
    d = write_original(fp16_model, tmp_path / "ckpt")
    assert any("inv_freq" in k for k in json.loads((d / "pytorch_model.bin.index.json").read_text())["weight_map"])
    loaded = ChatGLMForConditionalGeneration.from_pretrained(d, torch_dtype=torch.float16)
    assert not loaded.training and loaded.dtype == torch.float16
    assert torch.equal(loaded(IDS).logits, fp16_model(IDS).logits)


def test_auto_dtype_and_conversion(tmp_path, fp16_model):
    d = write_original(fp16_model, tmp_path / "ckpt")
    assert ChatGLMForConditionalGeneration.from_pretrained(d).dtype == torch.float16  # config.json torch_dtype
    as32 = ChatGLMForConditionalGeneration.from_pretrained(d, torch_dtype="float32")
    assert as32.dtype == torch.float32
    assert torch.equal(as32.transformer.word_embeddings.weight, fp16_model.transformer.word_embeddings.weight.float())


@pytest.mark.parametrize("shards", [1, 2])
def test_safetensors_round_trip(tmp_path, fp16_model, shards):
    d = tmp_path / "st"
    if shards == 1:
        d.mkdir()
        save_file({k: v.contiguous() for k, v in fp16_model.state_dict().items() if k != "lm_head.weight"},
                  str(d / "model.safetensors"))
        fp16_model.config.save_pretrained(str(d))
    else:
        write_original(fp16_model, d, shards=2, fmt="safetensors")
    loaded = ChatGLMForConditionalGeneration.from_pretrained(d, torch_dtype=torch.float16)
    assert torch.equal(loaded(IDS).logits, fp16_model(IDS).logits)
    assert loaded.lm_head.weight is loaded.transformer.word_embeddings.weight


def test_save_pretrained_round_trip(tmp_path):
    model = make_model(pre_seq_len=3, prefix_projection=True)
    model.save_pretrained(tmp_path / "saved")
    loaded = ChatGLMForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert loaded.config.pre_seq_len == 3 and loaded.dtype == torch.float32
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    # both keys stay in the state dict, tied to one tensor
    sd = loaded.state_dict()
    assert "lm_head.weight" in sd and sd["lm_head.weight"].data_ptr() == sd[
        "transformer.word_embeddings.weight"].data_ptr()


def test_strict_load_state_dict_of_original_keys(fp16_model):
    state = fp16_model.state_dict()
    assert sum("rotary_emb.inv_freq" in k for k in state) == 2
    fresh = make_model().half()
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh(IDS).logits, fp16_model(IDS).logits)
    fresh.load_state_dict({k: v for k, v in state.items() if "inv_freq" not in k}, strict=True)


def test_base_model_loads_the_lm_checkpoint(tmp_path, fp16_model):
    d = write_original(fp16_model, tmp_path / "ckpt")
    base = ChatGLMModel.from_pretrained(d, torch_dtype=torch.float16)
    assert torch.equal(base(IDS).last_hidden_state, fp16_model.transformer(IDS).last_hidden_state)


def test_ptuning_checkpoint_round_trip(tmp_path, fp16_model):
    base_dir = write_original(fp16_model, tmp_path / "base")
    tuned = ChatGLMForConditionalGeneration.from_pretrained(base_dir, pre_seq_len=4)
    with torch.no_grad():
        tuned.transformer.prefix_encoder.embedding.weight.normal_()
    tuned.save_ptuning_checkpoint(tmp_path / "pt")
    again = ChatGLMForConditionalGeneration.from_pretrained(base_dir, pre_seq_len=4, ptuning_checkpoint=tmp_path / "pt")
    assert torch.equal(again(IDS).logits, tuned(IDS).logits)
    # THUDM's trainer layout: pytorch_model.bin with only transformer.prefix_encoder.* keys
    thudm = tmp_path / "thudm"
    thudm.mkdir()
    torch.save({"transformer.prefix_encoder.embedding.weight": tuned.transformer.prefix_encoder.embedding.weight
                .detach().float()}, thudm / "pytorch_model.bin")
    other = ChatGLMForConditionalGeneration.from_pretrained(base_dir, pre_seq_len=4)
    other.load_ptuning_checkpoint(thudm)
    assert torch.equal(other(IDS).logits, tuned(IDS).logits)


# ---------------------------------------------------------------- errors, with nothing changed


def _expect(exc, match, directory, fn):
    digest = tree_digest(directory)
    with pytest.raises(exc, match=match):
        fn()
    assert tree_digest(directory) == digest, "a failed load must not touch the files"


def test_missing_directory_config_and_weights(tmp_path, fp16_model):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect(FileNotFoundError, "no config.json", empty, lambda: ChatGLMForConditionalGeneration.from_pretrained(empty))
    fp16_model.config.save_pretrained(str(empty))
    _expect(FileNotFoundError, "no weights in .*pytorch_model.bin.index.json", empty,
            lambda: ChatGLMForConditionalGeneration.from_pretrained(empty))


def test_shard_listed_but_absent(tmp_path, fp16_model):
    d = write_original(fp16_model, tmp_path / "ckpt")
    (d / "pytorch_model-00002-of-00003.bin").unlink()
    _expect(FileNotFoundError, "lists shard pytorch_model-00002-of-00003.bin, which is missing", d,
            lambda: ChatGLMForConditionalGeneration.from_pretrained(d))


def test_missing_and_unexpected_keys(tmp_path, fp16_model):
    d = write_original(fp16_model, tmp_path / "missing", drop=("transformer.layers.1.mlp.dense_4h_to_h.bias",))
    _expect(ValueError, r"missing keys: transformer\.layers\.1\.mlp\.dense_4h_to_h\.bias", d,
            lambda: ChatGLMForConditionalGeneration.from_pretrained(d))
    lenient = ChatGLMForConditionalGeneration.from_pretrained(d, strict=False)
    assert torch.isfinite(lenient(IDS).logits).all()
    d2 = write_original(fp16_model, tmp_path / "extra", extra={"transformer.layers.0.extra.weight": torch.ones(2)})
    _expect(ValueError, r"unexpected keys: transformer\.layers\.0\.extra\.weight", d2,
            lambda: ChatGLMForConditionalGeneration.from_pretrained(d2))
    d3 = write_original(make_model(pre_seq_len=2).half(), tmp_path / "ptuned")
    cfg = json.loads((d3 / "config.json").read_text())
    cfg["pre_seq_len"] = None
    (d3 / "config.json").write_text(json.dumps(cfg))
    _expect(ValueError, "holds a P-Tuning prefix encoder but config.pre_seq_len is None", d3,
            lambda: ChatGLMForConditionalGeneration.from_pretrained(d3))


def test_shape_mismatch(tmp_path, fp16_model):
    bad = {"transformer.final_layernorm.weight": torch.ones(64, dtype=torch.float16)}
    d = write_original(fp16_model, tmp_path / "ckpt", drop=tuple(bad), extra=bad)
    _expect(ValueError, r"transformer\.final_layernorm\.weight in .* has shape \[64\], the model expects \[128\]", d,
            lambda: ChatGLMForConditionalGeneration.from_pretrained(d))


def test_unreadable_and_unsafe_files(tmp_path, fp16_model):
    d = write_original(fp16_model, tmp_path / "ckpt", shards=1)
    shard = d / "pytorch_model-00001-of-00001.bin"
    shard.write_bytes(b"not a checkpoint")
    _expect(ValueError, "cannot read checkpoint file .*pytorch_model-00001-of-00001.bin", d,
            lambda: ChatGLMForConditionalGeneration.from_pretrained(d))
    torch.save({"w": torch.ones(1), "code": argparse.Namespace(a=1)}, shard)  # refused by weights_only=True
    _expect(ValueError, "(?s)cannot read checkpoint file .*Unsupported global", d,
            lambda: ChatGLMForConditionalGeneration.from_pretrained(d))
    torch.save({"w": torch.ones(1), "step": 3}, shard)
    _expect(ValueError, "does not hold a flat state dict of tensors", d,
            lambda: ChatGLMForConditionalGeneration.from_pretrained(d))


def _ptuning_file(directory, tensors):
    directory.mkdir()
    torch.save(tensors, directory / "pytorch_model.bin")
    return directory


def test_ptuning_mismatches_leave_the_model_untouched(tmp_path):
    model = make_model(pre_seq_len=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    width = 2 * 2 * 128
    cases = [
        (_ptuning_file(tmp_path / "p8", {"transformer.prefix_encoder.embedding.weight": torch.ones(8, width)}),
         r"trained with pre_seq_len=8, model has pre_seq_len=4"),
        (_ptuning_file(tmp_path / "proj", {"transformer.prefix_encoder.embedding.weight": torch.ones(4, 128),
                                           "transformer.prefix_encoder.trans.0.weight": torch.ones(128, 128)}),
         r"trained with prefix_projection=True, the model has prefix_projection=False"),
        (_ptuning_file(tmp_path / "full", {"transformer.prefix_encoder.embedding.weight": torch.ones(4, width),
                                           "transformer.word_embeddings.weight": torch.ones(3, 128)}),
         r"holds transformer\.word_embeddings\.weight, which is not a prefix-encoder key"),
    ]
    for directory, message in cases:
        _expect(ValueError, message, directory, lambda: model.load_ptuning_checkpoint(directory))
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    plain = make_model()
    with pytest.raises(ValueError, match="no prefix encoder"):
        plain.load_ptuning_checkpoint(cases[0][0])
    projected = make_model(pre_seq_len=4, prefix_projection=True)
    with pytest.raises(ValueError, match="trained with prefix_projection=False, the model has prefix_projection=True"):
        projected.load_ptuning_checkpoint(_ptuning_file(tmp_path / "noproj", {
            "transformer.prefix_encoder.embedding.weight": torch.ones(4, width)}))


def test_bad_dtype_and_argument(tmp_path, fp16_model):
    d = write_original(fp16_model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="torch_dtype must be a floating torch.dtype"):
        ChatGLMForConditionalGeneration.from_pretrained(d, torch_dtype=torch.int8)
    with pytest.raises(TypeError, match="unexpected argument 'pre_seq_length'"):
        ChatGLMForConditionalGeneration.from_pretrained(d, pre_seq_length=4)
    with pytest.raises(ValueError, match="num_attention_heads=3"):
        ChatGLMForConditionalGeneration.from_pretrained(d, num_attention_heads=3)


def test_loading_holds_one_copy_of_the_weights(tmp_path):
    """Peak RSS while loading a sharded checkpoint stays well under two copies of the weights."""
    from glm_kernels.tools.load_memory import measure, synthetic_config, write_checkpoint

    config = synthetic_config(0.4)
    write_checkpoint(tmp_path / "ckpt", config, shards=4)
    largest_shard = max(p.stat().st_size for p in (tmp_path / "ckpt").glob("*.bin"))
    r = measure(tmp_path / "ckpt")
    increase, weights = r["peak_rss"] - r["rss_before"], r["weights_bytes"]
    # one copy of the weights + the mapped pages of one shard + 10% slack; two copies (2 * weights) exceed it
    bound = weights + largest_shard + 0.1 * weights
    assert bound < 2 * weights
    assert increase <= bound, (increase, weights, largest_shard)
