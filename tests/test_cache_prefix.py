"""A prefix from any `PrefixEncoder` over a base model through `GLMKVCache(prefix_len=...)`, and caches over
buffers the caller owns (`GLMKVCache.from_buffers`): the same numbers as the prefix model, clear errors."""
import pytest
import torch

from conftest import make_model
from glm_kernels.cache import GLMKVCache
from glm_kernels.ops.mask import GLMMask


def prompt_ids(cfg, body=(11, 12, 13, 14)):
    return torch.tensor([[*body, cfg.gmask_token_id, cfg.bos_token_id]])


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_written_into_the_cache_equals_the_prefix_model(projection):
    prefixed = make_model(pre_seq_len=5, prefix_projection=projection)
    with torch.no_grad():
        for p in prefixed.transformer.prefix_encoder.parameters():
            p.normal_(0, 0.5)
    base = make_model()
    base.load_state_dict({k: v for k, v in prefixed.state_dict().items() if "prefix_encoder" not in k})
    base.requires_grad_(False)  # frozen as the prefixed model's base: the same ops (no gradient to keep) run in both
    cfg = base.config
    ids = prompt_ids(cfg)
    ref_cache = GLMKVCache(prefixed.config, 1, 8)
    ref = prefixed(ids, past_key_values=ref_cache).logits
    cache = GLMKVCache(cfg, 1, 8, prefix_len=5)
    cache.write_prefix(prefixed.transformer.prefix_encoder.key_values(1, "cpu", torch.float32))
    out = base(ids, past_key_values=cache).logits
    assert torch.equal(out, ref)  # the same ops on the same values: bitwise
    step = dict(input_ids=torch.tensor([[20]]), position_ids=torch.tensor([[[4], [2]]]))
    assert torch.equal(base(**step, past_key_values=cache).logits, prefixed(**step, past_key_values=ref_cache).logits)


def test_prefix_cache_errors():
    base = make_model()
    prefixed = make_model(pre_seq_len=3)
    cfg = base.config
    ids = prompt_ids(cfg)
    with pytest.raises(ValueError, match=r"reserves 4 prefix columns, the model's prefix encoder has pre_seq_len=None"):
        base(ids, past_key_values=GLMKVCache(cfg, 1, 8, prefix_len=4))
    with pytest.raises(ValueError, match=r"reserves 4 prefix columns, .* pre_seq_len=3"):
        prefixed(ids, past_key_values=GLMKVCache(cfg, 1, 8, prefix_len=4))
    cache = GLMKVCache(cfg, 1, 8, prefix_len=4)
    with pytest.raises(ValueError, match=r"prefix's layer 0 keys and values are \[2, 3, 1, .*expects .*\[2, 4, 1"):
        cache.write_prefix(prefixed.transformer.prefix_encoder.key_values(1, "cpu", torch.float32))
    assert not cache.prefix_written and cache.filled == 0  # untouched
    with pytest.raises(ValueError, match="prefix_len must be >= 0"):
        GLMKVCache(cfg, 1, 8, prefix_len=-1)


def test_cache_over_owned_buffers():
    """Two rows right-aligned in a pool (the serving engine's layout): each row's step equals that row alone."""
    model = make_model()
    cfg = model.config
    nh, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    prompts = [prompt_ids(cfg, (11, 12, 13, 14, 15, 16)), prompt_ids(cfg, (21, 22))]
    solo, caches = [], []
    for ids in prompts:
        cache = GLMKVCache(cfg, 1, ids.shape[1] + 1)
        model(ids, past_key_values=cache)
        caches.append(cache)
    filled = max(c.filled for c in caches)
    keys = [torch.zeros(2, nh, 16, hd) for _ in range(cfg.num_layers)]
    values = [torch.zeros(2, nh, 16, hd) for _ in range(cfg.num_layers)]
    starts = [filled - c.filled for c in caches]
    for row, (c, start) in enumerate(zip(caches, starts)):
        for i in range(cfg.num_layers):
            keys[i][row, :, start:filled] = c.layers[i].keys[0, :, :c.filled]
            values[i][row, :, start:filled] = c.layers[i].values[0, :, :c.filled]
    step_ids = torch.tensor([[30], [31]])
    positions = torch.tensor([[[6], [2]], [[2], [2]]])
    for row, c in enumerate(caches):
        solo.append(model(step_ids[row:row + 1], position_ids=positions[row:row + 1], past_key_values=c).logits)
    starts_t = torch.tensor(starts)
    pool = GLMKVCache.from_buffers(keys, values, filled, GLMMask(0, starts_t, starts_t), seq_length=filled)
    out = model(step_ids, position_ids=positions, past_key_values=pool, check_inputs=False).logits
    for row in range(2):
        scale = solo[row].abs().max()
        assert (out[row] - solo[row][0]).abs().max() <= 1e-4 * scale  # GLM_SPEC fp32, models: batched vs alone
        assert out[row].argmax() == solo[row][0].argmax()
    assert pool.filled == filled + 1 and keys[0][0, :, filled].abs().sum() > 0  # written through the views
    with pytest.raises(ValueError, match="one key and one value buffer per layer"):
        GLMKVCache.from_buffers(keys, values[:1], filled, None)
    with pytest.raises(ValueError, match=r"layer 1 keys \[1, 4, 16, 32\] .* like layer 0's \[2, 4, 16, 32\]"):
        GLMKVCache.from_buffers([keys[0], keys[1][:1]], [values[0], values[1][:1]], filled, None)
    with pytest.raises(ValueError, match=r"filled=17 outside \[0, 16\]"):
        GLMKVCache.from_buffers(keys, values, 17, None)
    with pytest.raises(ValueError, match="the mask is for 1 rows"):
        GLMKVCache.from_buffers(keys, values, filled, GLMMask(0, starts_t[:1], starts_t[:1]))
    with pytest.raises(ValueError, match=r"seq_length=0 outside \[1, filled="):
        GLMKVCache.from_buffers(keys, values, filled, None, seq_length=0)
