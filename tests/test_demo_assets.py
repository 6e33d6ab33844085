"""The shipped P-Tuning demo assets (`glm_kernels/ptuning/assets/`): they load, the data is well formed and is
what the builder produces, and the tiny base model behaves as `glm_kernels.tools.build_demo_assets` designs it."""
import json
import random

import pytest
import torch

from glm_kernels import ChatGLMConfig, ChatGLMForConditionalGeneration, ChatGLMTokenizer, check_tokenizer_matches
from glm_kernels.tools import build_demo_assets as B

BASE = B.ASSETS / "base"
DATA = B.ASSETS / "data"
FEW = 6  # rows of train.json and of dev.json the base model is run on


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def parse(content):
    """`类型#裙*颜色#红色*...` -> `{"类型": "裙", ...}`."""
    return dict(item.split("#", 1) for item in content.split("*"))


@pytest.fixture(scope="module")
def tok():
    return ChatGLMTokenizer.from_pretrained(str(BASE))


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return ChatGLMForConditionalGeneration.from_pretrained(str(BASE))


@pytest.fixture(scope="module")
def train():
    return read_jsonl(DATA / "train.json")


@pytest.fixture(scope="module")
def dev():
    return read_jsonl(DATA / "dev.json")


# ------------------------------------------------------------------ files
def test_asset_files_and_size():
    names = {p.relative_to(B.ASSETS).as_posix() for p in B.ASSETS.rglob("*") if p.is_file()}
    expected = {"data/train.json", "data/dev.json", "base/config.json", "base/model.safetensors",
                "base/ice_text.model", "base/tokenizer_config.json"}
    assert expected <= names, expected - names
    total = sum(p.stat().st_size for p in B.ASSETS.rglob("*") if p.is_file())
    assert total <= 5 * 2**20, f"assets take {total} bytes"


def test_base_loads_and_matches_its_tokenizer(model, tok):
    config = model.config
    assert isinstance(config, ChatGLMConfig) and config.pre_seq_len is None
    assert (config.hidden_size, config.num_layers, config.num_attention_heads) == (128, 4, 4)
    assert config.max_sequence_length >= 2048 and config.kernel_backend is None
    assert model.dtype == torch.float32 and model.lm_head.weight is model.transformer.word_embeddings.weight
    check_tokenizer_matches(tok, config)
    assert config.vocab_size == len(tok) == tok.sp_tokenizer.num_text_tokens  # num_image_tokens = 0
    assert tok.num_image_tokens == 0 and tok.pad_token_id == 3
    assert tok.decode([tok.convert_tokens_to_ids("<eop>")]) == ""  # special pieces are CONTROL pieces


def test_prefix_model_trains_only_the_prefix_encoder():
    model = ChatGLMForConditionalGeneration.from_pretrained(str(BASE), pre_seq_len=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["transformer.prefix_encoder.embedding.weight"]


# ------------------------------------------------------------------ data
def test_data_files_are_adgen_json_lines(train, dev):
    for name in ("train.json", "dev.json"):
        text = (DATA / name).read_text(encoding="utf-8")
        assert "\\u" not in text and text.endswith("\n")  # ensure_ascii=False, one object per line
    assert len(train) == B.NUM_TRAIN and len(dev) == B.NUM_DEV
    for row in train + dev:
        assert set(row) == {"content", "summary"}
        attributes = parse(row["content"])
        assert list(attributes) == [k for k in B.KEYS if k in attributes]
        assert set(B.REQUIRED) <= set(attributes)
        assert all(v in B.VALUES[k] for k, v in attributes.items())
        assert not row["content"].startswith("【")  # untagged: the prefix has to play the tag's role
        assert row["summary"] == B.render_seed(attributes)  # the 种草 style, a function of the attributes
    train_prompts, dev_prompts = [r["content"] for r in train], [r["content"] for r in dev]
    assert len(set(train_prompts)) == len(train) and len(set(dev_prompts)) == len(dev)
    assert not set(train_prompts) & set(dev_prompts)


def test_shipped_data_is_what_the_builder_writes(tmp_path, train, dev):
    assert B.build_data() == B.build_data() == (train, dev)
    B.write_data(tmp_path)
    for name in ("train.json", "dev.json"):
        assert (tmp_path / "data" / name).read_bytes() == (DATA / name).read_bytes(), name


def test_rows_tokenize_within_the_limits(tok, train, dev):
    for row in train + dev:
        a_ids = tok.encode(row["content"], add_special_tokens=False)
        b_ids = tok.encode(row["summary"], add_special_tokens=False)
        assert len(a_ids) <= B.MAX_SOURCE_LENGTH - 1 and len(b_ids) <= B.MAX_TARGET_LENGTH - 2
        assert tok.unk_token_id not in a_ids + b_ids
        assert tok.decode(b_ids) == row["summary"]
        input_ids, labels = B.training_features(tok, row["content"], row["summary"])
        sop = len(a_ids) + 1
        assert input_ids == a_ids + [tok.gmask_token_id, tok.bos_token_id] + b_ids + [tok.eos_token_id]
        assert labels == [-100] * sop + input_ids[sop:]
    # the tagged prompts and every style's answers fit the pre-training limits
    for style, render in B.STYLES.items():
        attributes = [parse(r["content"]) for r in train + dev]
        assert max(len(tok.encode(B.content(a, style), add_special_tokens=False))
                   for a in attributes) <= B.PRETRAIN_SOURCE_LENGTH - 1
        assert max(len(tok.encode(render(a), add_special_tokens=False))
                   for a in attributes) <= min(B.PRETRAIN_TARGET_LENGTH, B.MAX_TARGET_LENGTH) - 2


def test_pretraining_never_shows_the_demo_prompts(train, dev):
    excluded = {r["content"] for r in train + dev}
    rng = random.Random(0)
    for _ in range(500):
        prompt, answer = B.pretraining_example(rng, excluded, untagged=0.4)
        untagged = prompt.split("】", 1)[-1]
        assert untagged not in excluded
        style = prompt[1:prompt.index("】")] if prompt.startswith("【") else B.DEFAULT_STYLE
        assert answer == B.STYLES[style](parse(untagged))


# ------------------------------------------------------------------ the base model
def test_base_answers_each_style_by_its_tag_and_untagged_in_the_default(model, tok, train, dev):
    rows = train[:FEW] + dev[:FEW]
    attributes = [parse(r["content"]) for r in rows]
    prompts = [r["content"] for r in rows] + [B.content(a, s) for s in sorted(B.STYLES) for a in attributes]
    answers = B.greedy(model, tok, prompts)
    untagged, tagged = answers[:len(rows)], answers[len(rows):]
    # untagged prompts: the default style, so NOT already the summary train.json asks for
    assert untagged == [B.STYLES[B.DEFAULT_STYLE](a) for a in attributes]
    assert all(u != r["summary"] for u, r in zip(untagged, rows))
    expected = [B.STYLES[s](a) for s in sorted(B.STYLES) for a in attributes]
    assert tagged == expected
    # the 种草 tag gives exactly the demo's summaries
    assert [B.STYLES[B.DEMO_STYLE](a) for a in attributes] == [r["summary"] for r in rows]


def test_chat_with_the_tag_answers_the_summary(model, tok, dev):
    row = dev[0]
    response, history = model.chat(tok, B.tag(B.DEMO_STYLE) + row["content"], history=[], do_sample=False)
    assert response == row["summary"]
    response, _ = model.chat(tok, row["content"], history=[], do_sample=False)
    assert response == B.render_plain(parse(row["content"]))


def test_a_few_prefix_steps_steer_the_base(tok, train):
    """P-Tuning v2 on the base: the loss of the 种草 summaries falls fast with only the prefix trained."""
    torch.manual_seed(0)
    model = ChatGLMForConditionalGeneration.from_pretrained(str(BASE), pre_seq_len=8).train()
    ids, labels = B.collate([B.training_features(tok, r["content"], r["summary"]) for r in train[:16]],
                            tok.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-2, weight_decay=0.0)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "prefix_encoder" not in k}
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.2 * losses[0] and losses[-1] < 0.3, losses
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
