"""Inputs, masks and caches on other devices: clear errors; a model spread over devices (CPU + "meta" here)."""
import pytest
import torch

import glm_kernels.ops.attention as attention_ops
from conftest import make_model
from glm_kernels.cache import GLMKVCache
from test_model import left_padded_batch

BOS, GMASK = 994, 991
IDS = torch.tensor([[5, 17, 42, GMASK, BOS]])


def test_masks_and_positions_on_another_device_are_refused():
    model = make_model()
    with pytest.raises(ValueError, match="attention_mask is on meta but the inputs .* are on cpu"):
        model(IDS, attention_mask=torch.ones(1, 5, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="position_ids is on meta but the inputs .* are on cpu"):
        model(IDS, position_ids=torch.zeros(1, 2, 5, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="attention_mask is on meta but input_ids are on cpu"):
        model.generate(IDS, attention_mask=torch.ones(1, 5, dtype=torch.long, device="meta"), max_new_tokens=1)


def test_caches_on_another_device_are_refused():
    model = make_model(pre_seq_len=2)
    with pytest.raises(ValueError, match=r"past_key_values \(GLMKVCache\) layer 0 is on meta, the model's inputs "
                                         r"are on cpu"):
        model(IDS, past_key_values=GLMKVCache(model.config, 1, 8, device="meta"))
    with pytest.raises(ValueError, match=r"GLMKVCache\) layer 1 is on meta, the model's inputs are on cpu"):
        model(IDS, past_key_values=GLMKVCache(model.config, 1, 8, device=["cpu", "meta"]))
    with pytest.raises(ValueError, match=r"GLMKVCache\) layer 0 is on meta"):
        model.generate(IDS, past_key_values=GLMKVCache(model.config, 1, 8, device="meta"), max_new_tokens=1)
    past = model(IDS, use_cache=True).past_key_values
    moved = (past[0], tuple(t.to("meta") for t in past[1]))
    with pytest.raises(ValueError, match="past_key_values layer 1 key is on meta, the model runs layer 1 on cpu"):
        model(torch.tensor([[7]]), position_ids=torch.tensor([[[3], [2]]]), past_key_values=moved)
    with pytest.raises(ValueError, match="GLMKVCache got 3 devices for 2 layers"):
        GLMKVCache(model.config, 1, 8, device=["cpu"] * 3)


@pytest.fixture
def split_model(monkeypatch):
    """Layer 0 and the embeddings on the CPU, layers 1-2 and the final LayerNorm on "meta": every tensor a layer
    gets must be moved to its device (ops refuse mixed cpu/meta operands)."""
    # meta tensors have no values for the torch attention op's fully-masked-row check
    fused = attention_ops._fused_inference
    monkeypatch.setattr(attention_ops, "_fused_inference", lambda q, k, v, mask: fused(q, k, v, None if q.is_meta
                                                                                      else mask))
    model = make_model(num_layers=3, pre_seq_len=2).transformer
    for module in (model.layers[1], model.layers[2], model.final_layernorm):
        module.to("meta")
    return model


def test_a_model_over_two_devices_moves_activations_at_block_boundaries(split_model):
    model = split_model
    devices = model.layer_devices()
    assert devices == [torch.device("cpu"), torch.device("meta"), torch.device("meta")]
    ids, mask, pos = left_padded_batch([[5, 6, 7, GMASK, BOS], [11, GMASK, BOS]], 5)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)  # prefix as tuples
        assert out.last_hidden_state.device.type == "meta" and out.last_hidden_state.shape == (5, 2, 128)
        assert [h.device.type for h in out.hidden_states] == ["cpu", "meta", "meta", "meta"]
        cache = GLMKVCache(model.config, 2, 8, device=devices)
        model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache)
        assert [layer.keys.device.type for layer in cache.layers] == ["cpu", "meta", "meta"]
        on_meta = cache.mask_on(torch.device("meta"))
        for step in range(2):
            step_pos = pos[..., -1:] + torch.tensor([0, 1 + step])[None, :, None]
            out = model(torch.tensor([[8], [9]]), position_ids=step_pos, past_key_values=cache, check_inputs=False)
            assert cache.mask_on(torch.device("meta")) is on_meta  # moved once per cache, not per step
        assert cache.get_seq_length() == 7 and out.last_hidden_state.device.type == "meta"


def test_loading_over_two_devices_places_every_weight_without_hooks(split_model, tmp_path, monkeypatch):
    """A map over two GPUs allocates each weight on its device and the model moves the activations itself (no
    accelerate hooks). Here the two devices are the CPU and "meta"; accelerate would take a CPU next to another
    device for CPU offload, so the test tells the loader it is not."""
    from test_loading import write_original
    from glm_kernels import ChatGLMModel, placement

    monkeypatch.setattr(placement, "needs_hooks", lambda plan: False)
    source = make_model(num_layers=3, pre_seq_len=2)
    directory = write_original(source, tmp_path / "ckpt", shards=2, fmt="safetensors")
    device_map = {"word_embeddings": "cpu", "prefix_encoder": "cpu", "layers.0": "cpu", "layers.1": "meta",
                  "layers.2": "meta", "final_layernorm": "meta"}
    model = ChatGLMModel.from_pretrained(directory, torch_dtype=torch.float32, device_map=device_map)
    assert model.hf_device_map == device_map
    assert not any("_hf_hook" in m.__dict__ for m in model.modules())
    for name, p in model.named_parameters():
        expected = "meta" if name.startswith(("layers.1.", "layers.2.", "final_layernorm.")) else "cpu"
        assert p.device.type == expected, name
    assert torch.equal(model.layers[0].attention.query_key_value.weight,
                       source.transformer.layers[0].attention.query_key_value.weight)
    assert torch.equal(model.layers[0].attention.rotary_emb.inv_freq,
                       source.transformer.layers[0].attention.rotary_emb.inv_freq)
    with torch.no_grad():
        out = model(IDS)
    assert out.last_hidden_state.device.type == "meta" and out.last_hidden_state.shape == (5, 1, 128)
