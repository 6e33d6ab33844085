"""`ChatGLMTokenizer`: the ChatGLM-6B (v1) tokenizer, working on transformers 5.

Behaviour is that of THUDM's final `tokenization_chatglm.py` for ChatGLM-6B
(the one beside `ice_text.model`), reimplemented; the differences are listed
at the end of this docstring. THUDM's file fails from transformers 4.34 on
("'ChatGLMTokenizer' object has no attribute 'sp_tokenizer'") because the base
class `__init__` now calls `get_vocab()` before the subclass has loaded its
SentencePiece model; here the model is loaded first.

Text -> ids:
- `\\n` -> `<n>`, tab -> `<|tab|>`, each run of 2..80 spaces -> `<|blank_N|>`
  (longest first), then SentencePiece (`ice_text.model`). Decoding reverses it.
- id = SentencePiece id + `num_image_tokens`; ids below `num_image_tokens` are
  the image tokens `<image_N>`. The class default is 20000 (the first
  ChatGLM-6B release, vocab 150528); the `tokenizer_config.json` of the
  released 130528-vocab checkpoint sets `num_image_tokens: 0`, which gives
  `[MASK]` 130000, `[gMASK]` 130001, `<sop>` 130004, `<eop>` 130005, `<pad>` 3
  and 130344 ids in all.
- `build_inputs_with_special_tokens`: `ids + [gMASK] <sop>`, and for a pair
  `ids_0 + [gMASK] <sop> + ids_1 + <eop>`, always (the final file's rule).
- Padding is on the left. By default (`glm_attention_mask=True`) padding
  builds the original's inputs: a bool mask `[1, s, s]` per sequence (True =
  may NOT attend; bidirectional over the context before `<sop>`, causal from
  it on) and 2D position ids `[2, s]`, left-padded with True / 0. A batch with
  `return_tensors="pt"` gives `input_ids [b, s]`, `attention_mask` bool
  `[b, 1, s, s]`, `position_ids [b, 2, s]`. With `glm_attention_mask=False`
  (init argument, or per call: `tokenizer(texts, padding=True,
  glm_attention_mask=False)`, `tokenizer.pad(..., glm_attention_mask=False)`)
  it returns the standard padding mask instead: `attention_mask [b, s]`, 1 =
  token, 0 = left padding, and no `position_ids` (the model derives them from
  the ids and the padding, as `glm_kernels.inputs.get_position_ids(pad=...)`).
  As in the original, the GLM mask and position ids are built only when a
  length is in play (padding, or a `max_length`): `tokenizer(text)` and
  `tokenizer([prompt], return_tensors="pt")` (what `chat()` sends) return
  `input_ids` alone. The position ids follow the tokenizer's rule: the first
  `[MASK]` if the sequence has one, else the first `[gMASK]` (the model's own
  `get_position_ids` prefers `[gMASK]`; both only differ when both are present).

Deliberate differences from the original:
- A directory without `ice_text.model` raises `FileNotFoundError` naming the
  path expected (the original fails inside SentencePiece).
- `padding_side="right"` raises `ValueError` (the original `assert`s).
- `[gMASK]` and `</s>` written in the text are matched as single special
  tokens like `<sop>`, `<eop>`, `[MASK]`, `<pad>`, `<unk>` (transformers 5
  treats every named `*_token` as special; on 4.27 only the standard five were).
- `get_special_tokens_mask` marks the tokens `build_inputs_with_special_tokens`
  adds (the original inherited a mask of the wrong length).
- A sequence longer than `max_length` is left as it is by padding (the
  original's `np.pad` failed on the negative width).
- Decoding an id outside the vocabulary raises `IndexError` naming the id and
  the vocabulary size (SentencePiece's own message names neither).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import sentencepiece as spm
from transformers.tokenization_python import PreTrainedTokenizer
from transformers.tokenization_utils_base import PaddingStrategy

from .configuration import ChatGLMConfig

VOCAB_FILES_NAMES = {"vocab_file": "ice_text.model"}
SPECIAL_PIECES = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
LINEBREAK_TOKEN = "<n>"
TAB_TOKEN = "<|tab|>"
MAX_BLANK_LENGTH = 80


def blank_token(length: int) -> str:
    """Return the piece that stands for a run of `length` (>= 2) spaces: `<|blank_{length}|>`."""
    if length < 2:
        raise ValueError(f"a blank token stands for 2 or more spaces, got {length}")
    return f"<|blank_{length}|>"


class SPTokenizer:
    """SentencePiece model plus ChatGLM's whitespace codes and image-token offset.

    The same operations as the original's `SPTokenizer` (`encode`, `decode`,
    `tokenize`, `decode_tokens`, and `[id]` / `[piece]` look-ups).
    """

    def __init__(self, vocab_file: str, num_image_tokens: int = 20000, max_blank_length: int = MAX_BLANK_LENGTH):
        self.vocab_file = vocab_file
        self.num_image_tokens = num_image_tokens
        self.max_blank_length = max_blank_length
        self.special_tokens = list(SPECIAL_PIECES)
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["sp"] = self.sp.serialized_model_proto()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.sp = spm.SentencePieceProcessor(model_proto=state["sp"])

    @property
    def num_text_tokens(self) -> int:
        """Number of SentencePiece pieces."""
        return self.sp.vocab_size()

    @property
    def num_tokens(self) -> int:
        """Number of ids: image tokens plus SentencePiece pieces."""
        return self.num_image_tokens + self.num_text_tokens

    def preprocess(self, text: str, linebreak: bool = True, whitespaces: bool = True) -> str:
        """Return `text` with `\\n`, tabs and runs of spaces replaced by their pieces."""
        if linebreak:
            text = text.replace("\n", LINEBREAK_TOKEN)
        if whitespaces:
            text = text.replace("\t", TAB_TOKEN)
            for length in range(self.max_blank_length, 1, -1):
                text = text.replace(" " * length, blank_token(length))
        return text

    def postprocess(self, text: str) -> str:
        """Return `text` with the linebreak, tab and blank pieces turned back into whitespace."""
        text = text.replace(LINEBREAK_TOKEN, "\n").replace(TAB_TOKEN, "\t")
        for length in range(2, self.max_blank_length + 1):
            text = text.replace(blank_token(length), " " * length)
        return text

    def tokenize(self, text: str, linebreak: bool = True, whitespaces: bool = True,
                 add_dummy_prefix: bool = True) -> list[str]:
        """Return the pieces of `text`; without `add_dummy_prefix`, the leading `▁` piece is not produced."""
        text = self.preprocess(text, linebreak, whitespaces)
        if not add_dummy_prefix:
            text = LINEBREAK_TOKEN + text
        pieces = self.sp.encode_as_pieces(text)
        return pieces if add_dummy_prefix else pieces[2:]

    def encode(self, text: str, linebreak: bool = True, whitespaces: bool = True,
               add_dummy_prefix: bool = True) -> list[int]:
        """Return the ids of `text` (SentencePiece ids + `num_image_tokens`), no special tokens added."""
        text = self.preprocess(text, linebreak, whitespaces)
        if not add_dummy_prefix:
            text = LINEBREAK_TOKEN + text
        ids = [i + self.num_image_tokens for i in self.sp.encode_as_ids(text)]
        return ids if add_dummy_prefix else ids[2:]

    def decode(self, ids: list[int]) -> str:
        """Return the text of `ids`; image-token ids are dropped."""
        pieces = [int(i) - self.num_image_tokens for i in ids]
        return self.postprocess(self.sp.decode_ids([i for i in pieces if i >= 0]))

    def decode_tokens(self, tokens: list[str]) -> str:
        """Return the text of a list of pieces."""
        return self.postprocess(self.sp.decode_pieces(list(tokens)))

    def id_to_token(self, index: int) -> str:
        """Return the piece of id `index` (`<image_N>` below `num_image_tokens`)."""
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        if index >= self.num_tokens:
            raise IndexError(f"token id {index} is outside the ChatGLM tokenizer's vocabulary of "
                             f"{self.num_tokens} ids ({self.vocab_file})")
        return self.sp.id_to_piece(index - self.num_image_tokens)

    def token_to_id(self, token: str) -> int:
        """Return the id of piece `token` (an unknown piece gives the id of `<unk>`)."""
        if token.startswith("<image_") and token.endswith(">") and token[7:-1].isdigit():
            return int(token[7:-1])
        return self.sp.piece_to_id(token) + self.num_image_tokens

    def __getitem__(self, key: int | str) -> str | int:
        if isinstance(key, int):
            return self.id_to_token(key)
        if isinstance(key, str):
            return self.token_to_id(key)
        raise ValueError("The key should be str or int.")


class _Prebuilt:
    """Holds a mask already built per sequence so that `pad` passes it on to `_pad` unchanged."""

    __slots__ = ("array",)

    def __init__(self, array):
        self.array = array


def _unwrap(value):
    return value.array if isinstance(value, _Prebuilt) else value


def build_glm_attention_mask(input_ids: list[int], bos_token_id: int) -> np.ndarray:
    """Return the original tokenizer's bool mask `[1, s, s]` of one sequence (True = may not attend).

    Context length c = index of the first bos (`<sop>`), or s without one; every
    row sees the columns `< c` and, causally, those up to itself.
    """
    seq = len(input_ids)
    context = input_ids.index(bos_token_id) if bos_token_id in input_ids else seq
    visible = np.tril(np.ones((1, seq, seq)))
    visible[:, :, :context] = 1
    return np.bool_(visible < 0.5)


def build_glm_position_ids(input_ids: list[int], bos_token_id: int, mask_token_id: int,
                     gmask_token_id: int) -> np.ndarray:
    """Return the original tokenizer's int64 position ids `[2, s]` of one sequence.

    Row 0: `arange(s)` with `[c:]` replaced by the index of the first `[MASK]`
    (of `[gMASK]` when there is no `[MASK]`; unchanged when there is neither).
    Row 1 (block positions): 0 on the context, `1, 2, ...` from c on.
    """
    seq = len(input_ids)
    context = input_ids.index(bos_token_id) if bos_token_id in input_ids else seq
    positions = np.arange(seq, dtype=np.int64)
    mask_token = mask_token_id if mask_token_id in input_ids else gmask_token_id
    if mask_token in input_ids:
        positions[context:] = input_ids.index(mask_token)
    block = np.concatenate([np.zeros(context, dtype=np.int64),
                            np.arange(1, seq - context + 1, dtype=np.int64)])
    return np.stack([positions, block], axis=0)


class ChatGLMTokenizer(PreTrainedTokenizer):
    """The ChatGLM-6B tokenizer (SentencePiece `ice_text.model`), THUDM's behaviour on transformers 5.

    Args:
        vocab_file: path of `ice_text.model`.
        do_lower_case, remove_space: text preprocessing (both False for ChatGLM-6B).
        bos_token `<sop>`, eos_token `<eop>`, end_token `</s>`, mask_token
        `[MASK]`, gmask_token `[gMASK]`, pad_token `<pad>`, unk_token `<unk>`.
        padding_side: "left", the only side supported.
        num_image_tokens: offset of the text ids (default 20000 as the
            original class; the released checkpoint's config sets 0).
        glm_attention_mask: True (default, drop-in): padding returns the
            original's bool `attention_mask [1, s, s]` per sequence (`[b, 1, s,
            s]` as a batch) and `position_ids [2, s]`; False: the standard
            padding mask `[s]` (1 = token, 0 = padding) and no position ids.
            Also a per-call keyword of `__call__`, `encode` and `pad`.
        clean_up_tokenization_spaces: default True, as transformers 4.x
            decoded the original ("a , b" -> "a, b"); pass False for exact
            round trips.

    `from_pretrained(dir)` reads `ice_text.model` and `tokenizer_config.json`
    as THUDM ships them (their `auto_map` is ignored; `AutoTokenizer` finds this
    class once `register_auto_classes()` has run, which importing
    `glm_kernels` does).
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"

    def __init__(
        self,
        vocab_file: str | None = None,
        do_lower_case: bool = False,
        remove_space: bool = False,
        bos_token: str = "<sop>",
        eos_token: str = "<eop>",
        end_token: str = "</s>",
        mask_token: str = "[MASK]",
        gmask_token: str = "[gMASK]",
        padding_side: str = "left",
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        num_image_tokens: int = 20000,
        glm_attention_mask: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("auto_map", None)  # THUDM's points at their remote code; this class replaces it
        if padding_side != "left":
            raise ValueError(f"ChatGLMTokenizer pads on the left only (the model reads left padding); "
                             f"got padding_side={padding_side!r}")
        if not isinstance(num_image_tokens, int) or isinstance(num_image_tokens, bool) or num_image_tokens < 0:
            raise ValueError(f"num_image_tokens must be an int >= 0, got {num_image_tokens!r}")
        if vocab_file is None or not os.path.isfile(vocab_file):
            where = vocab_file if vocab_file is not None else os.path.join(
                str(kwargs.get("name_or_path") or "."), VOCAB_FILES_NAMES["vocab_file"])
            raise FileNotFoundError(f"ChatGLMTokenizer needs the SentencePiece model "
                                    f"{VOCAB_FILES_NAMES['vocab_file']}: no such file {where}")
        # Loaded before the base __init__, which already calls get_vocab().
        self.vocab_file = vocab_file
        self.sp_tokenizer = SPTokenizer(vocab_file, num_image_tokens=num_image_tokens)
        self.num_image_tokens = num_image_tokens
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        self.glm_attention_mask = bool(glm_attention_mask)
        self._base_vocab: dict[str, int] | None = None
        kwargs.setdefault("clean_up_tokenization_spaces", True)
        super().__init__(
            do_lower_case=do_lower_case,
            remove_space=remove_space,
            padding_side=padding_side,
            bos_token=bos_token,
            eos_token=eos_token,
            end_token=end_token,
            mask_token=mask_token,
            gmask_token=gmask_token,
            pad_token=pad_token,
            unk_token=unk_token,
            num_image_tokens=num_image_tokens,
            glm_attention_mask=self.glm_attention_mask,
            **kwargs,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *init_inputs, **kwargs):
        """Return the tokenizer of a checkpoint directory (or hub id); `FileNotFoundError` without `ice_text.model`."""
        path = os.fspath(pretrained_model_name_or_path)
        directory = os.path.join(path, kwargs.get("subfolder") or "")
        if os.path.isdir(directory) and kwargs.get("vocab_file") is None:
            vocab = os.path.join(directory, VOCAB_FILES_NAMES["vocab_file"])
            if not os.path.isfile(vocab):
                raise FileNotFoundError(
                    f"{cls.__name__}: {directory} has no {VOCAB_FILES_NAMES['vocab_file']} (the SentencePiece model "
                    f"ChatGLM-6B ships beside tokenizer_config.json); expected {vocab}"
                )
        return super().from_pretrained(pretrained_model_name_or_path, *init_inputs, **kwargs)

    # ----------------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of ids of the model file: `num_image_tokens` + SentencePiece pieces."""
        return self.sp_tokenizer.num_tokens

    @property
    def gmask_token_id(self) -> int | None:
        """Id of `[gMASK]`, or None if unset."""
        token = self._special_tokens_map.get("gmask_token")
        return None if token is None else self.convert_tokens_to_ids(str(token))

    @property
    def end_token_id(self) -> int | None:
        """Id of the end token `</s>`, or None if unset."""
        token = self._special_tokens_map.get("end_token")
        return None if token is None else self.convert_tokens_to_ids(str(token))

    def get_vocab(self) -> dict[str, int]:
        """Return `{piece: id}` for every id (image tokens included) and the added tokens."""
        if self.__dict__.get("_base_vocab") is None:
            self._base_vocab = {self._convert_id_to_token(i): i for i in range(self.vocab_size)}
        vocab = dict(self._base_vocab)
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_tokenizer.token_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_tokenizer.id_to_token(int(index))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Write the SentencePiece model as `ice_text.model` in `save_directory`; return `(path,)`."""
        if os.path.isdir(save_directory):
            prefix = f"{filename_prefix}-" if filename_prefix else ""
            path = os.path.join(save_directory, prefix + VOCAB_FILES_NAMES["vocab_file"])
        else:
            path = save_directory
        with open(path, "wb") as f:
            f.write(self.sp_tokenizer.sp.serialized_model_proto())
        return (path,)

    # ----------------------------------------------------------------- text
    def preprocess_text(self, inputs: str) -> str:
        """Return `inputs` with spaces collapsed (`remove_space`) and lower-cased (`do_lower_case`)."""
        outputs = " ".join(inputs.strip().split()) if self.remove_space else inputs
        return outputs.lower() if self.do_lower_case else outputs

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_tokenizer.tokenize(self.preprocess_text(text))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Return the text of a list of pieces (whitespace pieces turned back into whitespace)."""
        return self.sp_tokenizer.decode_tokens(tokens)

    def _decode(self, token_ids, skip_special_tokens: bool = False,
                clean_up_tokenization_spaces: bool | None = None, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        pad = self.pad_token_id
        token_ids = [int(t) for t in token_ids if int(t) != pad]  # the original drops padding first
        if not token_ids:
            return ""
        return super()._decode(token_ids, skip_special_tokens=skip_special_tokens,
                               clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    # ----------------------------------------------------------------- special tokens
    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        """Return `ids_0 + [gMASK, <sop>]`, and with a pair `ids_0 + [gMASK, <sop>] + ids_1 + [<eop>]`."""
        ids = list(token_ids_0) + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids = ids + list(token_ids_1) + [self.eos_token_id]
        return ids

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        """Return 1 for each token `build_inputs_with_special_tokens` adds, 0 for the others."""
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        mask = [0] * len(token_ids_0) + [1, 1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    # ----------------------------------------------------------------- padding
    @contextlib.contextmanager
    def _mask_format(self, glm_attention_mask: bool | None):
        previous = self.__dict__.get("_call_glm_attention_mask")
        if glm_attention_mask is not None:
            self._call_glm_attention_mask = bool(glm_attention_mask)
        try:
            yield
        finally:
            self._call_glm_attention_mask = previous

    def _uses_glm_mask(self) -> bool:
        call = self.__dict__.get("_call_glm_attention_mask")
        return self.glm_attention_mask if call is None else call

    def _encode_plus(self, *args, glm_attention_mask: bool | None = None, **kwargs):
        with self._mask_format(glm_attention_mask):
            return super()._encode_plus(*args, **kwargs)

    def pad(self, encoded_inputs, *args, glm_attention_mask: bool | None = None, **kwargs):
        """Pad on the left as `PreTrainedTokenizerBase.pad`; return a `BatchEncoding`.

        `glm_attention_mask` (None = the tokenizer's setting) selects the
        original's bool `[1, s, s]` mask and `[2, s]` position ids, or the
        standard `[s]` padding mask. GLM masks and position ids already present
        in the features are padded (True / 0 on the left), as the original does.
        """
        if isinstance(encoded_inputs, (list, tuple)) and encoded_inputs and isinstance(encoded_inputs[0], Mapping):
            encoded_inputs = {key: [example[key] for example in encoded_inputs] for key in encoded_inputs[0].keys()}
        if isinstance(encoded_inputs, Mapping) and "attention_mask" in encoded_inputs:
            masks = encoded_inputs["attention_mask"]
            # transformers 5 would stack >1-D masks without padding them: hand them to _pad instead.
            if isinstance(masks, (list, tuple)) and masks and getattr(masks[0], "ndim", 0) > 1:
                encoded_inputs = dict(encoded_inputs)
                encoded_inputs["attention_mask"] = [_Prebuilt(np.asarray(m)) for m in masks]
        with self._mask_format(glm_attention_mask):
            return super().pad(encoded_inputs, *args, **kwargs)

    def _pad(self, encoded_inputs, max_length: int | None = None,
             padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
             pad_to_multiple_of: int | None = None, padding_side: str | None = None,
             return_attention_mask: bool | None = None) -> dict:
        side = padding_side if padding_side is not None else self.padding_side
        if side != "left":
            raise ValueError(f"ChatGLMTokenizer pads on the left only; got padding_side={side!r}")
        if "attention_mask" in encoded_inputs:
            encoded_inputs["attention_mask"] = _unwrap(encoded_inputs["attention_mask"])
        if not self._uses_glm_mask():
            return super()._pad(encoded_inputs, max_length=max_length, padding_strategy=padding_strategy,
                                pad_to_multiple_of=pad_to_multiple_of, padding_side="left",
                                return_attention_mask=return_attention_mask)

        required = list(encoded_inputs[self.model_input_names[0]])
        seq = len(required)
        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = seq
        if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        needs_padding = padding_strategy != PaddingStrategy.DO_NOT_PAD and max_length is not None \
            and seq < max_length

        # As the original: mask and positions are built when a length is in play (padding or max_length).
        if max_length is not None:
            bos = self.bos_token_id
            if return_attention_mask is not False and "attention_mask" not in encoded_inputs:
                encoded_inputs["attention_mask"] = build_glm_attention_mask(required, bos)
            if "position_ids" not in encoded_inputs:
                encoded_inputs["position_ids"] = build_glm_position_ids(required, bos, self.mask_token_id,
                                                                        self.gmask_token_id)

        if needs_padding:
            difference = max_length - seq
            if "attention_mask" in encoded_inputs:
                encoded_inputs["attention_mask"] = np.pad(
                    np.asarray(encoded_inputs["attention_mask"], dtype=bool),
                    pad_width=[(0, 0), (difference, 0), (difference, 0)], mode="constant", constant_values=True)
            if "token_type_ids" in encoded_inputs:
                encoded_inputs["token_type_ids"] = [self.pad_token_type_id] * difference + list(
                    encoded_inputs["token_type_ids"])
            if "special_tokens_mask" in encoded_inputs:
                encoded_inputs["special_tokens_mask"] = [1] * difference + list(encoded_inputs["special_tokens_mask"])
            if "position_ids" in encoded_inputs:
                encoded_inputs["position_ids"] = np.pad(np.asarray(encoded_inputs["position_ids"], dtype=np.int64),
                                                        pad_width=[(0, 0), (difference, 0)])
            encoded_inputs[self.model_input_names[0]] = [self.pad_token_id] * difference + required
        return encoded_inputs


def check_tokenizer_matches(tokenizer: ChatGLMTokenizer, config: ChatGLMConfig) -> None:
    """Raise `ValueError` naming each difference between a tokenizer and a model config; return None.

    Checked: every id of the tokenizer has an embedding row (`len(tokenizer) <=
    config.vocab_size`: the released pair has 130344 ids for 130528 rows), and
    the bos / eos / mask / gmask / pad ids are the config's.
    """
    problems = []
    size = len(tokenizer)
    if size > config.vocab_size:
        hint = ""
        if getattr(tokenizer, "num_image_tokens", 0) and size - tokenizer.num_image_tokens <= config.vocab_size:
            hint = (f" (the tokenizer offsets text ids by num_image_tokens={tokenizer.num_image_tokens}; the "
                    f"released 130528-vocab checkpoint uses num_image_tokens=0)")
        problems.append(f"vocabulary size: the tokenizer has {size} ids but the model's vocab_size is "
                        f"{config.vocab_size}{hint}")
    for name in ("bos", "eos", "mask", "gmask", "pad"):
        tokenizer_id = getattr(tokenizer, f"{name}_token_id")
        config_id = getattr(config, f"{name}_token_id")
        if tokenizer_id != config_id:
            token = getattr(tokenizer, f"{name}_token", None)
            problems.append(f"{name}_token_id: tokenizer {tokenizer_id} ({token!r}), config {config_id}")
    if problems:
        raise ValueError("tokenizer does not match the ChatGLM config: " + "; ".join(problems))


def register_auto_classes() -> None:
    """Register `ChatGLMConfig` as model type "chatglm" (unless taken) and `ChatGLMTokenizer` for it; return None.

    Afterwards `AutoTokenizer.from_pretrained(dir)` on a ChatGLM-6B checkpoint
    directory returns a `ChatGLMTokenizer` (without `trust_remote_code`; with
    `trust_remote_code=True` transformers runs THUDM's file instead).
    """
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        CONFIG_MAPPING["chatglm"]
    except KeyError:
        AutoConfig.register("chatglm", ChatGLMConfig)
    AutoTokenizer.register(ChatGLMConfig, tokenizer_class=ChatGLMTokenizer, exist_ok=True)
