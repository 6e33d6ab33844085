"""from_pretrained(device_map=...): accelerate's plans with GLM's constraints, cpu/disk offload, arguments."""
import collections
import logging

import pytest
import torch
from accelerate.utils import compute_module_sizes, convert_file_size_to_int

from conftest import make_model
from glm_kernels import ChatGLMConfig, ChatGLMForConditionalGeneration, ChatGLMModel, placement
from helpers import assert_fp32_close
from test_loading import IDS, write_original


# ---------------------------------------------------------------- the plan for ChatGLM-6B, computed on meta


def meta_6b(**overrides):
    with torch.device("meta"):
        return ChatGLMForConditionalGeneration(ChatGLMConfig(**overrides)).to(torch.float16)


BUDGETS = [
    {0: "8GiB", 1: "8GiB"},
    {0: "6GiB", 1: "6GiB", 2: "6GiB"},
    {0: "10GiB", 1: "5GiB", 2: "5GiB", 3: "5GiB"},
    {0: "4GiB", 1: "4GiB", "cpu": "8GiB"},
]


@pytest.mark.parametrize("kind", ["auto", "sequential"])
@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: "+".join(f"{k}:{v}" for k, v in b.items()))
@pytest.mark.parametrize("prefix", [dict(), dict(pre_seq_len=128), dict(pre_seq_len=128, prefix_projection=True)],
                         ids=["base", "ptuning", "ptuning-projection"])
def test_6b_plan_keeps_blocks_whole_and_honours_the_budgets(kind, budget, prefix):
    model = meta_6b(**prefix)
    plan = placement.infer_device_map(model, kind, dict(budget), torch.float16)
    assert all(p.is_meta for p in model.parameters())  # planned without allocating anything
    devices = {name: placement.device_of(name, plan) for name, _ in model.named_parameters(remove_duplicate=False)}
    assert None not in devices.values() and "disk" not in devices.values()  # these budgets hold the model
    for i in range(28):  # every block whole, on one device
        assert len({d for n, d in devices.items() if n.startswith(f"transformer.layers.{i}.")}) == 1
    first = next(iter(budget))
    embeddings = devices["transformer.word_embeddings.weight"]
    assert embeddings == first
    assert devices["lm_head.weight"] == embeddings  # tied: one matrix, with the embeddings
    if prefix:
        assert devices["transformer.prefix_encoder.embedding.weight"] == first
    last_block = devices["transformer.layers.27.input_layernorm.weight"]
    final = devices["transformer.final_layernorm.weight"]
    assert final == (last_block if last_block != "cpu" else first)  # with the last block, never offloaded
    # blocks in order over the devices, and no device above its budget
    order = list(budget)
    block_devices = [devices[f"transformer.layers.{i}.input_layernorm.weight"] for i in range(28)]
    assert block_devices == sorted(block_devices, key=order.index)
    sizes = compute_module_sizes(model, dtype=torch.float16)
    used = collections.Counter()
    for name, device in plan.items():
        used[device] += sizes[name]
    for device, limit in budget.items():
        assert used[device] <= convert_file_size_to_int(limit), (device, used[device])


def test_a_plan_too_small_for_the_model_offloads_to_disk():
    plan = placement.infer_device_map(meta_6b(), "sequential", {0: "3GiB", "cpu": "3GiB"}, torch.float16)
    assert "disk" in plan.values()
    assert placement.device_of("transformer.final_layernorm.weight", plan) == 0  # pinned to the GPU
    assert placement.needs_hooks(plan)
    assert not placement.needs_hooks({"transformer.layers.0": 0, "lm_head": 1, "transformer": 1})


# ---------------------------------------------------------------- loading over cpu and disk


@pytest.fixture
def checkpoint(tmp_path):
    model = make_model(num_layers=4, pre_seq_len=3, tie_word_embeddings=True)
    return model, write_original(model, tmp_path / "ckpt", shards=2, fmt="safetensors")


HAND_MAP = {"transformer.word_embeddings": "cpu", "lm_head": "cpu", "transformer.prefix_encoder": "cpu",
            "transformer.layers.0": "cpu", "transformer.layers.1": "disk", "transformer.layers.2": "disk",
            "transformer.layers.3": "cpu", "transformer.final_layernorm": "cpu"}


@pytest.mark.parametrize("device_map", ["hand", "auto"])
def test_disk_offload_gives_the_undispatched_outputs(checkpoint, tmp_path, device_map):
    model, directory = checkpoint
    kwargs = dict(device_map=HAND_MAP) if device_map == "hand" else \
        dict(device_map="auto", max_memory={"cpu": 2_000_000})  # room for the embeddings and one block
    loaded = ChatGLMForConditionalGeneration.from_pretrained(directory, torch_dtype=torch.float32,
                                                             offload_folder=tmp_path / "offload", **kwargs)
    plan = loaded.hf_device_map
    on_disk = [i for i in range(4) if placement.device_of(f"transformer.layers.{i}", plan) == "disk"]
    assert on_disk and len(on_disk) < 4
    for i in on_disk:  # weights on disk, loaded at each call
        assert all(p.is_meta for p in loaded.transformer.layers[i].parameters())
        assert (tmp_path / "offload" / f"transformer.layers.{i}.mlp.dense_h_to_4h.weight.dat").is_file()
    assert loaded.lm_head.weight is loaded.transformer.word_embeddings.weight
    with torch.no_grad():
        assert_fp32_close(loaded(IDS).logits, model(IDS).logits, 1e-4, "disk-offloaded logits")  # model rule
    for kwargs in (dict(do_sample=False), dict(do_sample=False, num_beams=2)):
        assert torch.equal(loaded.generate(IDS, max_new_tokens=5, **kwargs),
                           model.generate(IDS, max_new_tokens=5, **kwargs))


def test_base_model_and_ptuning_over_a_device_map(checkpoint, tmp_path):
    model, directory = checkpoint
    base_map = {k[len("transformer."):]: v for k, v in HAND_MAP.items() if k.startswith("transformer.")}
    base = ChatGLMModel.from_pretrained(directory, torch_dtype=torch.float32, device_map=base_map,
                                        offload_folder=tmp_path / "offload-base")
    with torch.no_grad():
        assert_fp32_close(base(IDS).last_hidden_state, model.transformer(IDS).last_hidden_state, 1e-4,
                          "disk-offloaded base model")
    # a fresh prefix encoder over base weights (P-Tuning) is initialised on its device
    plain = make_model(num_layers=4, tie_word_embeddings=True)
    plain_dir = write_original(plain, tmp_path / "plain", shards=1)
    tuned = ChatGLMForConditionalGeneration.from_pretrained(plain_dir, pre_seq_len=3, torch_dtype=torch.float32,
                                                            device_map=HAND_MAP, offload_folder=tmp_path / "o2")
    assert tuned.transformer.prefix_encoder.embedding.weight.requires_grad
    assert not any(p.requires_grad for n, p in tuned.named_parameters() if "prefix_encoder" not in n)
    assert torch.isfinite(tuned(IDS).logits).all()


def test_bad_device_maps_are_refused(checkpoint, tmp_path):
    _, directory = checkpoint

    def load(device_map, **kwargs):
        return ChatGLMForConditionalGeneration.from_pretrained(directory, device_map=device_map, **kwargs)

    split = {**HAND_MAP, "transformer.layers.1.mlp": "cpu"}
    with pytest.raises(ValueError, match="device_map splits transformer.layers.1 .*a GLMBlock must stay whole"):
        load(split, offload_folder=tmp_path / "o")
    with pytest.raises(ValueError, match="tied weights must share a device"):
        load({**HAND_MAP, "lm_head": "meta"})
    with pytest.raises(ValueError, match="transformer.layers.3"):  # accelerate: weights without a device
        load({k: v for k, v in HAND_MAP.items() if k != "transformer.layers.3"}, offload_folder=tmp_path / "o")
    with pytest.raises(ValueError, match="offloads transformer.final_layernorm to disk"):
        load({**HAND_MAP, "transformer.final_layernorm": "disk"}, offload_folder=tmp_path / "o")
    with pytest.raises(ValueError, match=r"offloads \['transformer.layers.1', 'transformer.layers.2'\] to disk: "
                                         "pass offload_folder="):
        load(HAND_MAP)
    with pytest.raises(ValueError, match="device_map must be a dict, a device or one of"):
        load("everywhere")
    with pytest.raises(TypeError, match="takes device or device_map, not both"):
        load("cpu", device="cpu")
    single = load("cpu")
    assert single.hf_device_map == {"": "cpu"} and single.device.type == "cpu"


# ---------------------------------------------------------------- transformers' / THUDM's keyword arguments


def test_original_from_pretrained_arguments(checkpoint, caplog):
    model, directory = checkpoint
    with caplog.at_level(logging.INFO, logger="glm_kernels.loading"):
        loaded = ChatGLMForConditionalGeneration.from_pretrained(
            directory, trust_remote_code=True, revision="main", low_cpu_mem_usage=True, empty_init=False,
            torch_dtype=torch.float32, load_in_8bit=False, attn_implementation=None, use_safetensors=True)
    assert "trust_remote_code=True ignored: the modeling code is this package's" in caplog.text
    assert "revision ignored for the local directory" in caplog.text
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    refused = {"load_in_8bit": True, "quantization_config": {"bits": 4}, "attn_implementation": "flash_attention_2",
               "from_tf": True, "output_loading_info": True, "weights_only": False}
    for key, value in refused.items():
        with pytest.raises(TypeError, match=rf"from_pretrained\({key}=.*\) is not supported: "):
            ChatGLMForConditionalGeneration.from_pretrained(directory, **{key: value})
    with pytest.raises(FileNotFoundError, match="expected one of pytorch_model.bin.index.json, pytorch_model.bin"):
        ChatGLMForConditionalGeneration.from_pretrained(directory, use_safetensors=False)


def test_load_model_on_gpus(monkeypatch):
    with pytest.raises(ValueError, match=r"load_model_on_gpus\(num_gpus=2\): this machine has 0 CUDA devices"):
        placement.load_model_on_gpus("ckpt", num_gpus=2)
    calls = []
    monkeypatch.setattr(ChatGLMForConditionalGeneration, "from_pretrained",
                        classmethod(lambda cls, path, **kwargs: calls.append((path, kwargs))))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (10 * 2**30 + i, 16 * 2**30))
    placement.load_model_on_gpus("ckpt", num_gpus=2, pre_seq_len=128)
    placement.load_model_on_gpus("ckpt", num_gpus=1)
    placement.load_model_on_gpus("ckpt", num_gpus=3, device_map={"": 0}, torch_dtype=torch.bfloat16)
    assert calls == [
        ("ckpt", dict(torch_dtype=torch.float16, pre_seq_len=128, device_map="auto",
                      max_memory={0: 10 * 2**30, 1: 10 * 2**30 + 1})),
        ("ckpt", dict(torch_dtype=torch.float16, device="cuda")),
        ("ckpt", dict(torch_dtype=torch.bfloat16, device_map={"": 0})),
    ]
