"""ChatGLMTokenizer against the behaviour of THUDM's final `tokenization_chatglm.py` (ChatGLM-6B v1).

The SentencePiece models are trained here (well under a second) with ChatGLM's
pieces: `<pad>` at id 3 as in `ice_text.model`, `<n>`, `<|tab|>`, the
`<|blank_N|>` pieces and the 8 special pieces. One fixture rebuilds the
released layout (130344 pieces, `[MASK]` at 130000) by appending pieces to the
serialized model, so the ChatGLM-6B ids themselves are checked.
"""
import io
import json
import pickle
import struct

import numpy as np
import pytest
import sentencepiece as spm
import torch
from transformers import AutoTokenizer

import glm_kernels
from glm_kernels import ChatGLMConfig, ChatGLMTokenizer, check_tokenizer_matches
from glm_kernels import inputs as glm_inputs
from glm_kernels.tokenization import SPECIAL_PIECES, blank_token

WHITESPACE_PIECES = ["<n>", "<|tab|>"] + [blank_token(n) for n in range(2, 81)]
CORPUS = [
    "Hello world, this is a small test of the tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界！今天天气很好。我们一起去公园散步吧。",
    "def f(x):<n><|blank_4|>return x * 2<n>",
    "ChatGLM-6B 是一个开源的、支持中英双语的对话语言模型。",
] * 20
TEXTS = [
    "Hello world",
    "line one\nline two\n\nline four",
    "tab\tseparated\tvalues",
    "two  three   four    five     spaces",
    "x" + " " * 80 + "y" + " " * 81 + "z" + " " * 163 + "w",
    "你好，世界！\n    缩进的中文。",
    "def f(x):\n    if x:\n\treturn x  # 注释\n",
    " leading and trailing ",
    "稀有字符：龘",  # not in the training text: SentencePiece byte fallback
]


def train_model(special_type="user_defined", corpus=CORPUS, vocab_size=600):
    """Bytes of a small SentencePiece model with ChatGLM's pieces (`<pad>` = 3), trained on `corpus`."""
    buf = io.BytesIO()
    specials = {"user_defined_symbols": WHITESPACE_PIECES + list(SPECIAL_PIECES)}
    if special_type == "control":
        specials = {"user_defined_symbols": WHITESPACE_PIECES, "control_symbols": list(SPECIAL_PIECES)}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=vocab_size, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, pad_piece="<pad>", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        minloglevel=2, **specials)
    return buf.getvalue()


def _varint(n):
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | 0x80 if n else low)
        if not n:
            return bytes(out)


def _piece(text, piece_type):
    """A serialized `ModelProto.pieces` entry (piece = 1, score = 2, type = 3)."""
    raw = text.encode()
    msg = b"\x0a" + _varint(len(raw)) + raw + b"\x15" + struct.pack("<f", 0.0) + b"\x18" + _varint(piece_type)
    return b"\x0a" + _varint(len(msg)) + msg


def release_layout_model():
    """A model laid out as ChatGLM-6B's ice_text.model: 130344 pieces, the 8 special pieces from 130000.

    Appending serialized `pieces` entries to a model extends its repeated field.
    UNUSED (5) fillers stand in for the real vocabulary.
    """
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=500, hard_vocab_limit=False,
        user_defined_symbols=["<n>"], pad_id=3, pad_piece="<pad>", byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    base = buf.getvalue()
    n = spm.SentencePieceProcessor(model_proto=base).vocab_size()
    extra = bytearray()
    for i in range(n, 130000):
        extra += _piece(f"<filler_{i}>", 5)
    for s in SPECIAL_PIECES:
        extra += _piece(s, 3)  # CONTROL
    for s in WHITESPACE_PIECES[1:]:
        extra += _piece(s, 4)  # USER_DEFINED
    for i in range(256):
        extra += _piece(f"<tail_{i}>", 5)
    return base + bytes(extra)


# THUDM's files, as the released checkpoint ships them (auto_map points at their remote code).
THUDM_TOKENIZER_CONFIG = {
    "name_or_path": "THUDM/chatglm-6b",
    "bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>", "gmask_token": "[gMASK]",
    "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>",
    "remove_space": False, "do_lower_case": False, "num_image_tokens": 0,
    "tokenizer_class": "ChatGLMTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
}
THUDM_CONFIG = {
    "_name_or_path": "THUDM/chatglm-6b", "architectures": ["ChatGLMModel"],
    "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                 "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                 "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
    "bos_token_id": 130004, "eos_token_id": 130005, "mask_token_id": 130000, "gmask_token_id": 130001,
    "pad_token_id": 3, "hidden_size": 4096, "inner_hidden_size": 16384, "layernorm_epsilon": 1e-05,
    "max_sequence_length": 2048, "model_type": "chatglm", "num_attention_heads": 32, "num_layers": 28,
    "position_encoding_2d": True, "torch_dtype": "float16", "transformers_version": "4.23.1",
    "use_cache": True, "vocab_size": 130528,
}


@pytest.fixture(scope="module")
def model_bytes():
    return train_model()


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory, model_bytes):
    path = tmp_path_factory.mktemp("ice") / "ice_text.model"
    path.write_bytes(model_bytes)
    return str(path)


@pytest.fixture(scope="module")
def tok(vocab_file):
    return ChatGLMTokenizer(vocab_file)


@pytest.fixture(scope="module")
def sp(model_bytes):
    return spm.SentencePieceProcessor(model_proto=model_bytes)


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chatglm-6b")
    (d / "ice_text.model").write_bytes(release_layout_model())
    (d / "tokenizer_config.json").write_text(json.dumps(THUDM_TOKENIZER_CONFIG))
    (d / "config.json").write_text(json.dumps(THUDM_CONFIG))
    return d


def ids_of(tok, *pieces):
    return [tok.convert_tokens_to_ids(p) for p in pieces]


# ------------------------------------------------------------------ ids and text
def test_ids_are_sentencepiece_ids_plus_image_offset(tok, sp):
    text = "Hello world\n你好  世界\tx"
    ids = tok.encode(text, add_special_tokens=False)
    preprocessed = "Hello world<n>你好<|blank_2|>世界<|tab|>x"
    assert ids == [i + 20000 for i in sp.encode_as_ids(preprocessed)]
    assert min(ids) >= 20000
    assert tok.vocab_size == len(tok) == 20000 + sp.vocab_size()
    for name, piece in [("bos", "<sop>"), ("eos", "<eop>"), ("mask", "[MASK]"), ("gmask", "[gMASK]"),
                        ("pad", "<pad>"), ("unk", "<unk>"), ("end", "</s>")]:
        assert getattr(tok, f"{name}_token_id") == sp.piece_to_id(piece) + 20000, name
    assert tok.pad_token_id == 20003  # <pad> is SentencePiece id 3
    # ids below num_image_tokens are image tokens
    assert tok.convert_ids_to_tokens([0, 7, 19999]) == ["<image_0>", "<image_7>", "<image_19999>"]
    assert tok.convert_tokens_to_ids(["<image_0>", "<image_19999>"]) == [0, 19999]
    assert tok.convert_ids_to_tokens(20000 + sp.piece_to_id("▁")) == "▁"
    vocab = tok.get_vocab()
    assert vocab["<image_123>"] == 123 and vocab["[gMASK]"] == tok.gmask_token_id and len(vocab) == len(tok)


def test_num_image_tokens_zero_gives_sentencepiece_ids(vocab_file, sp):
    tok0 = ChatGLMTokenizer(vocab_file, num_image_tokens=0)
    assert tok0.encode("你好 world", add_special_tokens=False) == sp.encode_as_ids("你好 world")
    assert tok0.pad_token_id == 3 and len(tok0) == sp.vocab_size()


def test_whitespace_pieces_longest_run_first(tok):
    assert tok.tokenize("a\nb") == ["▁", "a", "<n>", "b"]
    pieces = tok.tokenize("a\tb  c     d" + " " * 80 + "e" + " " * 82 + "f")
    whitespace = [p for p in pieces if p.startswith("<|")]
    # 5 spaces are one <|blank_5|>, not <|blank_2|> + <|blank_3|>; 82 = 80 + 2
    assert whitespace == ["<|tab|>", "<|blank_2|>", "<|blank_5|>", "<|blank_80|>", "<|blank_80|>", "<|blank_2|>"]
    assert "<n>" in tok.tokenize("x\ny") and "\n" not in "".join(tok.tokenize("x\ny"))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(tok, text):
    ids = tok(text)["input_ids"]
    assert ids[-2:] == [tok.gmask_token_id, tok.bos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids[:-2]) == text
    # the special pieces of this model are user-defined, so they decode to their text
    assert tok.decode(ids) == text + "[gMASK]<sop>"
    assert tok.unk_token_id not in ids  # byte fallback covers every character


def test_decode_drops_padding_and_cleans_up_like_transformers_4(tok):
    ids = tok.encode("a , b .", add_special_tokens=False)
    # transformers 4.x decoded with clean_up_tokenization_spaces=True; so does this tokenizer by default
    assert tok.decode(ids) == "a, b."
    assert tok.decode(ids, clean_up_tokenization_spaces=False) == "a , b ."
    assert tok.decode([tok.pad_token_id] * 3 + ids, clean_up_tokenization_spaces=False) == "a , b ."
    assert tok.decode([tok.pad_token_id]) == ""
    # image tokens decode to their piece name, as the original's convert_tokens_to_string does
    assert tok.decode([tok.convert_tokens_to_ids("<|tab|>"), 7]) == "\t<image_7>"
    with pytest.raises(IndexError, match=f"token id {len(tok) + 5} is outside"):
        tok.decode([len(tok) + 5])


def test_control_special_pieces_decode_to_nothing(tmp_path):
    """With the special pieces as CONTROL pieces, a generated reply ending in <eop> decodes to its text alone."""
    (tmp_path / "ice_text.model").write_bytes(train_model("control"))
    tok = ChatGLMTokenizer(str(tmp_path / "ice_text.model"))
    # SentencePiece never emits a CONTROL piece for text: the tokenizer matches "[gMASK]" itself
    assert tok.encode("问[gMASK]答", add_special_tokens=False).count(tok.gmask_token_id) == 1
    reply = tok.encode("你好\n  世界", add_special_tokens=False) + [tok.eos_token_id]
    assert tok.decode(reply) == "你好\n  世界"
    assert tok("你好")["input_ids"][-2:] == ids_of(tok, "[gMASK]", "<sop>")


def test_special_tokens_in_text_are_single_tokens(tok):
    ids = tok.encode("问题[gMASK]<sop>回答<eop>", add_special_tokens=False)
    for name in ("gmask", "bos", "eos"):
        assert ids.count(getattr(tok, f"{name}_token_id")) == 1, name


# ------------------------------------------------------------------ special tokens
def test_build_inputs_appends_gmask_sop_and_pair_rule(tok):
    a, b, c = tok.encode("你好 world", add_special_tokens=False)[:3]
    g, s, e, m = tok.gmask_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id
    assert tok.build_inputs_with_special_tokens([a, b]) == [a, b, g, s]
    # the final original appends [gMASK] <sop> whatever the prompt holds, a [MASK] or [gMASK] included
    assert tok.build_inputs_with_special_tokens([a, m, b]) == [a, m, b, g, s]
    assert tok.build_inputs_with_special_tokens([a, g]) == [a, g, g, s]
    # second sequence: appended after <sop>, then <eop>, even when it already ends with <eop>
    assert tok.build_inputs_with_special_tokens([a], [b, c]) == [a, g, s, b, c, e]
    assert tok.build_inputs_with_special_tokens([a], [b, e]) == [a, g, s, b, e, e]
    assert tok.build_inputs_with_special_tokens([a], []) == [a, g, s, e]
    ids_0 = [a, b]
    tok.build_inputs_with_special_tokens(ids_0, [c])
    assert ids_0 == [a, b]  # inputs are not modified in place
    assert tok.num_special_tokens_to_add() == 2 and tok.num_special_tokens_to_add(pair=True) == 3

    pair = tok("你好", "世界", return_special_tokens_mask=True)
    first = tok.encode("你好", add_special_tokens=False)
    second = tok.encode("世界", add_special_tokens=False)
    assert pair["input_ids"] == first + [g, s] + second + [e]
    assert pair["special_tokens_mask"] == [0] * len(first) + [1, 1] + [0] * len(second) + [1]


def test_truncation_keeps_gmask_sop(tok):
    ids = tok("the quick brown fox jumps over the lazy dog", max_length=6, truncation=True)["input_ids"]
    assert len(ids) == 6 and ids[-2:] == [tok.gmask_token_id, tok.bos_token_id]


# ------------------------------------------------------------------ masks, positions, padding
T, F = True, False


def test_left_padding_batch_of_three_hand_written(tok):
    a, b, c = ids_of(tok, "a", "b", "c")
    P, G, S = tok.pad_token_id, tok.gmask_token_id, tok.bos_token_id
    batch = tok([[a], [a, b], [a, b, c]], padding=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask", "position_ids"}
    assert batch["input_ids"].tolist() == [[P, P, a, G, S], [P, a, b, G, S], [a, b, c, G, S]]
    assert batch["attention_mask"].dtype == torch.bool and batch["attention_mask"].shape == (3, 1, 5, 5)
    expected_mask = [
        # [P P a G S]: context a G (c = 2); padded rows and columns True
        [[T, T, T, T, T],
         [T, T, T, T, T],
         [T, T, F, F, T],
         [T, T, F, F, T],
         [T, T, F, F, F]],
        # [P a b G S]: context a b G (c = 3)
        [[T, T, T, T, T],
         [T, F, F, F, T],
         [T, F, F, F, T],
         [T, F, F, F, T],
         [T, F, F, F, F]],
        # [a b c G S]: context a b c G (c = 4)
        [[F, F, F, F, T],
         [F, F, F, F, T],
         [F, F, F, F, T],
         [F, F, F, F, T],
         [F, F, F, F, F]],
    ]
    assert batch["attention_mask"][:, 0].tolist() == expected_mask
    assert batch["position_ids"].dtype == torch.int64
    assert batch["position_ids"].tolist() == [
        [[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]],  # positions of [a G S] = 0 1 1 (<sop> at [gMASK]'s 1)
        [[0, 0, 1, 2, 2], [0, 0, 0, 0, 1]],
        [[0, 1, 2, 3, 3], [0, 0, 0, 0, 1]],
    ]


def test_mask_and_positions_after_sop_and_mask_token_rule(tok):
    """Causal rows after <sop>; [MASK] takes precedence over [gMASK] for the positions (the tokenizer's rule)."""
    a, b, c, d = ids_of(tok, "a", "b", "c", "d")
    P, G, S, M = tok.pad_token_id, tok.gmask_token_id, tok.bos_token_id, tok.mask_token_id
    out = tok.pad({"input_ids": [a, M, b, G, S, c, d]}, padding="max_length", max_length=9)
    assert out["input_ids"] == [P, P, a, M, b, G, S, c, d]
    assert out["attention_mask"].tolist() == [[
        [T, T, T, T, T, T, T, T, T],
        [T, T, T, T, T, T, T, T, T],
        [T, T, F, F, F, F, T, T, T],
        [T, T, F, F, F, F, T, T, T],
        [T, T, F, F, F, F, T, T, T],
        [T, T, F, F, F, F, T, T, T],
        [T, T, F, F, F, F, F, T, T],
        [T, T, F, F, F, F, F, F, T],
        [T, T, F, F, F, F, F, F, F],
    ]]
    assert out["position_ids"].tolist() == [[0, 0, 0, 1, 2, 3, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 2, 3]]
    # pad_to_multiple_of rounds the length up; without <sop> the whole row is context
    out = tok.pad({"input_ids": [a, G, b]}, padding=True, pad_to_multiple_of=4)
    assert out["input_ids"] == [P, a, G, b]
    assert not out["attention_mask"][0, 1:, 1:].any() and out["attention_mask"][0, :, 0].all()
    assert out["position_ids"].tolist() == [[0, 0, 1, 2], [0, 0, 0, 0]]


def test_padded_batch_agrees_with_the_models_own_masks(tok):
    texts = ["你好", "Hello world, this is a test.", "def f(x):\n    return x"]
    batch = tok(texts, padding=True, return_tensors="pt")
    ids = batch["input_ids"]
    pad = (ids == tok.pad_token_id).int().cumprod(dim=1).sum(dim=1)
    positions = glm_inputs.get_position_ids(ids, tok.bos_token_id, tok.mask_token_id, tok.gmask_token_id, pad=pad)
    assert torch.equal(batch["position_ids"], positions)
    longest = int(pad.argmin())
    assert torch.equal(batch["attention_mask"][longest], glm_inputs.get_masks(ids[longest:longest + 1],
                                                                                tok.bos_token_id)[0])
    for row, n in enumerate(pad.tolist()):
        inner = glm_inputs.get_masks(ids[row:row + 1, n:], tok.bos_token_id)[0, 0]
        assert torch.equal(batch["attention_mask"][row, 0, n:, n:], inner)
        assert batch["attention_mask"][row, 0, :n].all() and batch["attention_mask"][row, 0, :, :n].all()


def test_standard_2d_padding_mask_option(vocab_file, tok):
    a, b, c = ids_of(tok, "a", "b", "c")
    prompts = [[a], [a, b], [a, b, c]]
    glm = tok(prompts, padding=True, return_tensors="pt")
    flat = tok(prompts, padding=True, return_tensors="pt", glm_attention_mask=False)
    assert set(flat) == {"input_ids", "attention_mask"}
    assert torch.equal(flat["input_ids"], glm["input_ids"])
    assert flat["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    # the per-call choice does not stick
    assert tok(prompts, padding=True, return_tensors="pt")["attention_mask"].shape == (3, 1, 5, 5)
    # as an init option, and overridden per call
    tok2d = ChatGLMTokenizer(vocab_file, glm_attention_mask=False)
    assert tok2d(prompts, padding=True, return_tensors="pt")["attention_mask"].tolist() == \
        flat["attention_mask"].tolist()
    assert tok2d(prompts, padding=True, return_tensors="pt", glm_attention_mask=True)["attention_mask"].shape == \
        (3, 1, 5, 5)
    assert tok2d("a b")["attention_mask"] == [1] * len(tok2d("a b")["input_ids"])
    padded = tok.pad({"input_ids": [[a, 1], [a]]}, glm_attention_mask=False)
    assert padded["attention_mask"] == [[1, 1], [0, 1]]


def test_unpadded_inputs_are_ids_only_as_the_original(tok):
    # the original builds mask and positions only when padding (or a max_length) is in play
    assert set(tok("你好")) == {"input_ids"}
    single = tok(["你好"], return_tensors="pt")
    assert set(single) == {"input_ids"} and single["input_ids"].shape[0] == 1
    n = len(tok("你好")["input_ids"])
    padded = tok("你好", padding="max_length", max_length=n + 2, return_tensors="pt")
    assert padded["input_ids"].shape == (1, n + 2) and padded["attention_mask"].shape == (1, 1, n + 2, n + 2)
    assert padded["position_ids"].shape == (1, 2, n + 2)


def test_pad_pads_prebuilt_masks_like_the_original(tok):
    texts = ["你好", "Hello world, this is a test.", "a  b"]
    features = [tok(t, max_length=64, truncation=True) for t in texts]
    assert features[0]["attention_mask"].shape[0] == 1 and features[0]["attention_mask"].ndim == 3
    collated = tok.pad(features, return_tensors="pt")
    direct = tok(texts, padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert torch.equal(collated[key], direct[key]), key


def test_right_padding_is_refused(vocab_file, tok):
    with pytest.raises(ValueError, match="left only"):
        tok(["a", "a b c"], padding=True, padding_side="right")
    with pytest.raises(ValueError, match="left only"):
        ChatGLMTokenizer(vocab_file, padding_side="right")


# ------------------------------------------------------------------ checkpoints and auto classes
def test_released_layout_ids_and_config_check(release_dir):
    tok = ChatGLMTokenizer.from_pretrained(str(release_dir))
    assert tok.num_image_tokens == 0  # from THUDM's tokenizer_config.json
    assert (tok.mask_token_id, tok.gmask_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == \
        (130000, 130001, 130004, 130005, 3)
    assert len(tok) == tok.vocab_size == 130344
    check_tokenizer_matches(tok, ChatGLMConfig())  # 130344 ids fit the 130528 embedding rows
    ids = tok("你好")["input_ids"]
    assert ids[-2:] == [130001, 130004]
    assert tok.decode(tok("你好\n  世界")["input_ids"] + [130005]) == "你好\n  世界"  # CONTROL pieces vanish

    old = ChatGLMTokenizer.from_pretrained(str(release_dir), num_image_tokens=20000)
    assert len(old) == 150344
    with pytest.raises(ValueError) as err:
        check_tokenizer_matches(old, ChatGLMConfig())
    message = str(err.value)
    for part in ("vocabulary size", "150344", "130528", "bos_token_id: tokenizer 150004", "gmask_token_id",
                 "mask_token_id", "eos_token_id", "pad_token_id: tokenizer 20003"):
        assert part in message, part
    with pytest.raises(ValueError) as err:
        check_tokenizer_matches(tok, ChatGLMConfig(pad_token_id=0))
    assert "pad_token_id: tokenizer 3 ('<pad>'), config 0" in str(err.value)
    assert "vocabulary" not in str(err.value) and "bos_token_id" not in str(err.value)


def test_auto_tokenizer_on_a_thudm_checkpoint_ignores_auto_map(release_dir):
    tok = AutoTokenizer.from_pretrained(str(release_dir))
    assert type(tok) is ChatGLMTokenizer
    assert tok.gmask_token_id == 130001 and tok("你好")["input_ids"][-2:] == [130001, 130004]


def test_save_pretrained_round_trip(tmp_path, vocab_file):
    tok = ChatGLMTokenizer(vocab_file, glm_attention_mask=False)
    out = tmp_path / "saved"
    files = tok.save_pretrained(str(out))
    assert (out / "ice_text.model").read_bytes() == open(vocab_file, "rb").read()
    assert any(str(f).endswith("tokenizer_config.json") for f in files)
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "ChatGLMTokenizer" and "auto_map" not in saved
    assert saved["num_image_tokens"] == 20000 and saved["glm_attention_mask"] is False

    again = ChatGLMTokenizer.from_pretrained(str(out))
    for text in TEXTS:
        assert again(text)["input_ids"] == tok(text)["input_ids"]
    batch = [TEXTS[0], TEXTS[5]]
    assert again(batch, padding=True)["attention_mask"] == tok(batch, padding=True)["attention_mask"]
    assert again.glm_attention_mask is False and again.padding_side == "left"

    ChatGLMConfig(vocab_size=len(tok)).save_pretrained(str(out))
    auto = AutoTokenizer.from_pretrained(str(out))
    assert type(auto) is ChatGLMTokenizer and auto(TEXTS[1])["input_ids"] == tok(TEXTS[1])["input_ids"]

    copy = pickle.loads(pickle.dumps(tok))
    assert copy(TEXTS[3])["input_ids"] == tok(TEXTS[3])["input_ids"]


def test_register_auto_classes_is_idempotent():
    glm_kernels.tokenization.register_auto_classes()
    glm_kernels.tokenization.register_auto_classes()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING
    assert CONFIG_MAPPING["chatglm"] is ChatGLMConfig
    assert TOKENIZER_MAPPING[ChatGLMConfig] is ChatGLMTokenizer


# ------------------------------------------------------------------ errors
def test_directory_without_ice_text_model(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(THUDM_TOKENIZER_CONFIG))
    (tmp_path / "config.json").write_text(json.dumps(THUDM_CONFIG))
    expected = str(tmp_path / "ice_text.model")
    with pytest.raises(FileNotFoundError, match="ice_text.model") as err:
        ChatGLMTokenizer.from_pretrained(str(tmp_path))
    assert expected in str(err.value)
    with pytest.raises(FileNotFoundError) as err:
        AutoTokenizer.from_pretrained(str(tmp_path))
    assert expected in str(err.value)
    with pytest.raises(FileNotFoundError, match="no such file .*missing.model"):
        ChatGLMTokenizer(str(tmp_path / "missing.model"))


def test_mask_helpers_match_original_numpy_recipe():
    """The numpy builders against the original's recipe written out (tril, context columns, `< 0.5`)."""
    from glm_kernels.tokenization import build_glm_attention_mask, build_glm_position_ids
    ids = [5, 6, 1, 7, 2, 8, 9]  # [MASK]=1 at 2, [gMASK]=7, <sop>=2 at 4
    mask = build_glm_attention_mask(ids, bos_token_id=2)
    ref = np.tril(np.ones((1, 7, 7)))
    ref[:, :, :4] = 1
    assert mask.dtype == np.bool_ and np.array_equal(mask, ref < 0.5)
    assert build_glm_position_ids(ids, 2, 1, 7).tolist() == [[0, 1, 2, 3, 2, 2, 2], [0, 0, 0, 0, 1, 2, 3]]
    assert build_glm_position_ids([5, 7, 2], 2, 1, 7).tolist() == [[0, 1, 1], [0, 0, 1]]
    assert build_glm_position_ids([5, 6], 2, 1, 7).tolist() == [[0, 1], [0, 0]]  # no <sop>, no mask token
