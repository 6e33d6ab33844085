"""Decode steps make no host sync and build no mask scalars: generate() with the GLMKVCache, and a manual loop.

A host sync is any op that makes the host wait for the device on a GPU (`item()`, `int()`, `bool()`,
`torch.equal`, `nonzero`, `tolist()` ..., see `sync_counter`). The prompt is checked once per
`generate()` call (the prefill may sync); every step after it must not.
"""
import functools

import pytest
import torch

from conftest import make_model
from glm_kernels import ops
from glm_kernels.cache import GLMKVCache
from glm_kernels.generation import InvalidScoreLogitsProcessor
from glm_kernels.ops.mask import GLMMask
from helpers import assert_fp32_close
from sync_counter import count_syncs
from test_model import left_padded_batch

BOS, GMASK, PAD = 994, 991, 3
# the Triton launchers (glm_kernels/kernels/, another part of the project) check some inputs on the host
# when they run on the CPU interpreter, and the interpreter itself reads tensors on the host: their syncs are
# not this test's subject (the launchers' GPU path is kept sync-free where it is written)
TRITON_LAUNCHERS = ("glm_kernels/kernels/", "/triton/")


def record_syncs(monkeypatch, model, calls, exclude=()):
    """Wrap the model's generation hooks (and the cache's beam reordering) so that each call's host syncs are
    appended to `calls` as (name, count, by op)."""
    def wrap(fn, name):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            with count_syncs(exclude) as counts:
                out = fn(*args, **kwargs)
            calls.append((name, sum(counts.values()), dict(counts)))
            return out
        return counted

    for name in ("forward", "prepare_inputs_for_generation", "_update_model_kwargs_for_generation"):
        setattr(model, name, wrap(getattr(model, name), name))
    monkeypatch.setattr(GLMKVCache, "reorder_cache", wrap(GLMKVCache.reorder_cache, "reorder_cache"))


def decode_calls(calls):
    """Every call after the prefill's forward."""
    first = next(i for i, (name, _, _) in enumerate(calls) if name == "forward")
    return calls[first + 1:]


MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_p=0.7, temperature=0.95),
    "beams": dict(do_sample=False, num_beams=2),
    "chat processor": dict(do_sample=True, top_p=0.7, temperature=0.95,
                           logits_processor=[InvalidScoreLogitsProcessor()]),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("prefix", [None, 4], ids=["no-prefix", "prefix"])
def test_generate_decode_steps_make_no_host_sync(mode, prefix, monkeypatch):
    model = make_model(tie_word_embeddings=False, pre_seq_len=prefix)
    ids = torch.tensor([[5, 17, 42, GMASK, BOS], [7, 8, 9, GMASK, BOS]])
    calls = []
    record_syncs(monkeypatch, model, calls)
    kwargs = dict(MODES[mode])
    processors = kwargs.pop("logits_processor", None)
    if processors:
        processors = [functools.partial(_counted_processor, processors[0], calls)]
    model.generate(ids, max_new_tokens=6, min_new_tokens=6, logits_processor=processors, **kwargs)
    steps = decode_calls(calls)
    assert sum(name == "forward" for name, _, _ in steps) == 5  # 6 tokens: the prefill and 5 decode steps
    assert [c for c in steps if c[1]] == [], "host syncs in decode steps"


def _counted_processor(processor, calls, input_ids, scores):
    with count_syncs() as counts:
        out = processor(input_ids, scores)
    calls.append(("InvalidScoreLogitsProcessor", sum(counts.values()), dict(counts)))
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_left_padded_generate_decode_steps_make_no_host_sync(backend, monkeypatch):
    model = make_model(tie_word_embeddings=False, kernel_backend=backend)
    rows = [[5, 6, 7, GMASK, BOS], [11, GMASK, BOS]]
    ids, mask4d, pos = left_padded_batch(rows, 5)
    calls = []
    record_syncs(monkeypatch, model, calls, exclude=TRITON_LAUNCHERS)
    out = model.generate(ids, attention_mask=mask4d, position_ids=pos, max_new_tokens=4, min_new_tokens=4,
                         do_sample=False)
    assert [c for c in decode_calls(calls) if c[1]] == []
    for i, row in enumerate(rows):  # and the padding is honoured: each row as if alone
        alone = model.generate(torch.tensor([row]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert torch.equal(out[i, 5:], alone[0, len(row):])


def step_positions(model, ids, mask, step):
    """The original's positions for new token `step` (0-based) after the prompt: mask position, block + 1."""
    last = model._glm_position_ids(ids, mask)[..., -1:].clone()
    last[:, 1] += 1 + step
    return last


def manual_decode(model, ids, steps, mask=None, **step_kwargs):
    """Prefill then `steps` one-token steps on a GLMKVCache; returns (syncs per step, logits per step)."""
    cache = GLMKVCache(model.config, ids.shape[0], ids.shape[1] + steps)
    syncs, logits = [], []
    with torch.no_grad():
        out = model(ids, attention_mask=mask, past_key_values=cache)
        for step in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            pos = step_positions(model, ids, mask, step)
            with count_syncs() as counts:
                out = model(token, position_ids=pos, past_key_values=cache, **step_kwargs)
            syncs.append(dict(counts))
            logits.append(out.logits[:, -1])
    return syncs, torch.stack(logits, 1)


@pytest.mark.parametrize("prefix", [None, 3], ids=["no-prefix", "prefix"])
def test_manual_decode_loop_checks_unless_told_not_to(prefix, monkeypatch):
    import glm_kernels.ops.block as block_mod

    model = make_model(tie_word_embeddings=False, pre_seq_len=prefix)
    ids = torch.tensor([[5, 17, 42, GMASK, BOS]])
    # the forward's checks, as a GPU decode runs them (the CPU's one-call step checks the same in C++, below)
    monkeypatch.setattr(block_mod, "WHOLE_STEP", False)
    checked, ref = manual_decode(model, ids, 4)
    # by default every step checks its ids and positions: min and max of each, read on the host
    assert checked == [{"_local_scalar_dense": 4}] * 4
    unchecked, out = manual_decode(model, ids, 4, check_inputs=False)
    assert unchecked == [{}] * 4
    assert torch.equal(out, ref)
    monkeypatch.setattr(block_mod, "WHOLE_STEP", True)
    assert torch.equal(manual_decode(model, ids, 4)[1], ref)
    with torch.no_grad():
        cache = GLMKVCache(model.config, 1, 8)
        model(ids, past_key_values=cache)
        with pytest.raises(ValueError, match="id 5000, outside the vocabulary"):
            model(torch.tensor([[5000]]), position_ids=torch.tensor([[[3], [2]]]), past_key_values=cache)
        with pytest.raises(ValueError, match="position_ids holds 300, outside"):
            model(torch.tensor([[5]]), position_ids=torch.tensor([[[300], [2]]]), past_key_values=cache)


def test_steps_without_a_mask_keep_the_padding_of_the_first_step():
    """After a left-padded prefill, steps without a mask use the cache's padding: as passing the grown mask."""
    model = make_model(tie_word_embeddings=False)
    rows = [[5, 6, 7, GMASK, BOS], [11, GMASK, BOS]]
    ids, mask4d, _ = left_padded_batch(rows, 5)
    mask2d = (ids != PAD).long()
    _, cached_mask = manual_decode(model, ids, 3, mask=mask2d, check_inputs=False)
    cache = GLMKVCache(model.config, 2, 8)
    grown = []
    with torch.no_grad():
        out = model(ids, attention_mask=mask2d, past_key_values=cache)
        for step in range(3):
            token = out.logits[:, -1:].argmax(-1)
            mask2d = torch.cat((mask2d, torch.ones(2, 1, dtype=torch.long)), dim=1)
            pos = step_positions(model, ids, mask2d[:, :5], step)
            out = model(token, position_ids=pos, attention_mask=mask2d, past_key_values=cache)
            grown.append(out.logits[:, -1])
    assert_fp32_close(cached_mask, torch.stack(grown, 1), 1e-4, "steps with the cache's mask vs the grown mask")


@pytest.mark.parametrize("one_call", ["off", "blocks", "layers", "step"],
                         ids=["op-by-op blocks", "one-call blocks", "all blocks in one call", "whole step in one call"])
def test_mask_scalars_are_built_once_per_generate(monkeypatch, one_call):
    """No GLMMask is built in a decode step; every layer of every step gets the same mask object, whose
    scalars are already the attention kernels' int32 (no per-layer conversion). Seen by the attention op of the
    op-by-op block, by `ops.block_infer` when each CPU block runs in one call, by `ops.layers_infer` (once
    per forward, counted for every layer) when all of them do, and by `ops.step_infer` for the steps after the
    prompt when the whole step runs in one call."""
    import glm_kernels.ops.block as block_mod

    model = make_model(tie_word_embeddings=False)
    rows = [[5, 6, 7, GMASK, BOS], [11, GMASK, BOS]]
    ids, mask4d, pos = left_padded_batch(rows, 5)
    masks, built = [], []
    monkeypatch.setattr(block_mod, "ENABLED", one_call != "off")
    monkeypatch.setattr(block_mod, "ALL_LAYERS", one_call in ("layers", "step"))
    monkeypatch.setattr(block_mod, "WHOLE_STEP", one_call == "step")
    if one_call in ("layers", "step"):
        whole, step = ops.layers_infer, ops.step_infer
        monkeypatch.setattr(ops, "layers_infer", lambda hidden, blocks, *a: masks.extend(
            [(hidden.shape[0], a[5])] * len(blocks)) or whole(hidden, blocks, *a))
        if one_call == "step":  # the steps after the prompt (which runs layers_infer)
            monkeypatch.setattr(ops, "step_infer", lambda args, ids, pos, start, mask, *a: masks.extend(
                [(ids.shape[1], mask)] * args.num_layers) or step(args, ids, pos, start, mask, *a))
    elif one_call == "blocks":
        block = ops.block_infer
        monkeypatch.setattr(ops, "block_infer", lambda hidden, *a: masks.append((hidden.shape[0], a[9])) or
                            block(hidden, *a))
    else:
        attention = ops.glm_attention
        monkeypatch.setattr(ops, "glm_attention", lambda q, k, v, layer_id, mask, *a, **kw:
                            masks.append((q.shape[0], mask)) or attention(q, k, v, layer_id, mask, *a, **kw))
    post_init = GLMMask.__post_init__
    monkeypatch.setattr(GLMMask, "__post_init__", lambda self: built.append(len(masks)) or post_init(self))
    model.generate(ids, attention_mask=mask4d, position_ids=pos, max_new_tokens=4, min_new_tokens=4,
                   do_sample=False)
    steps = [m for sq, m in masks if sq == 1]
    assert len(steps) == 3 * model.config.num_layers
    assert all(m is steps[0] for m in steps) and isinstance(steps[0], GLMMask)
    assert max(built) <= model.config.num_layers  # GLMMasks are built before the prefill's layers only
    for t in (steps[0].pad, steps[0].context):
        assert t.to(device=t.device, dtype=torch.int32).contiguous() is t
    # an unpadded batch: one new token sees every key, the steps need no mask at all
    masks.clear()
    model.generate(torch.tensor([[5, 6, 7, GMASK, BOS]]), max_new_tokens=3, do_sample=False)
    assert [m for sq, m in masks if sq == 1] == [None] * 2 * model.config.num_layers
