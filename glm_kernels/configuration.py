"""`ChatGLMConfig`: the configuration of ChatGLM-6B (v1), field for field.

Field names, defaults and `model_type` are those of THUDM's
`configuration_chatglm.py`, so a released `config.json` loads unchanged.
"""
from __future__ import annotations

from transformers import PretrainedConfig


class ChatGLMConfig(PretrainedConfig):
    """Configuration of a ChatGLM-6B model.

    Args (6B values are the defaults):
        vocab_size: 130528. hidden_size: 4096. num_layers: 28.
        num_attention_heads: 32 (head dim = hidden_size / heads = 128).
        inner_hidden_size: 16384 (MLP width). layernorm_epsilon: 1e-5.
        max_sequence_length: 2048, the longest sequence (prompt + generated
            tokens, P-Tuning prefix not counted) the model accepts.
        position_encoding_2d: True. ChatGLM-6B's 2D rotary positions; the
            1D variant of the original code is not supported.
        bos/eos/mask/gmask/pad token ids: 130004 (<sop>), 130005 (<eop>),
            130000 ([MASK]), 130001 ([gMASK]), 3.
        pre_seq_len: P-Tuning v2 prefix length, or None for no prefix.
        prefix_projection: encode the prefix through a 2-layer MLP.
        quantization_bit: 0 (none), 8 or 4: THUDM's weight-only quantization of
            the four linears of every block (`QuantizedLinear`: int8 `weight` +
            fp16 `weight_scale`, as `chatglm-6b-int8`/`-int4` store them);
            see docs/quantization.md.
        quantization_embeddings: False. With quantization_bit, also quantize
            the word embeddings and the LM head (THUDM's `quantize_embeddings`).
        tie_word_embeddings: True: `lm_head.weight` is
            `transformer.word_embeddings.weight`, as in the original.
        kernel_backend: None (choose by device), "torch" or "triton"; see
            `glm_kernels.backend`.

    `num_hidden_layers` is an alias of `num_layers` (transformers'
    generation code looks it up under that name).
    """

    model_type = "chatglm"
    attribute_map = {"num_hidden_layers": "num_layers"}
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 130528,
        hidden_size: int = 4096,
        num_layers: int = 28,
        num_attention_heads: int = 32,
        layernorm_epsilon: float = 1e-5,
        use_cache: bool = True,
        bos_token_id: int = 130004,
        eos_token_id: int = 130005,
        mask_token_id: int = 130000,
        gmask_token_id: int = 130001,
        pad_token_id: int = 3,
        max_sequence_length: int = 2048,
        inner_hidden_size: int = 16384,
        position_encoding_2d: bool = True,
        quantization_bit: int = 0,
        quantization_embeddings: bool = False,
        pre_seq_len: int | None = None,
        prefix_projection: bool = False,
        tie_word_embeddings: bool = True,
        kernel_backend: str | None = None,
        **kwargs,
    ):
        self.num_layers = num_layers
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.max_sequence_length = max_sequence_length
        self.layernorm_epsilon = layernorm_epsilon
        self.inner_hidden_size = inner_hidden_size
        self.use_cache = use_cache
        self.mask_token_id = mask_token_id
        self.gmask_token_id = gmask_token_id
        self.position_encoding_2d = position_encoding_2d
        self.quantization_bit = quantization_bit
        self.quantization_embeddings = quantization_embeddings
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        self.kernel_backend = kernel_backend
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate_model_shape(self) -> None:
        """Raise `ValueError` naming the field when the config cannot build a model."""
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                     "inner_hidden_size", "max_sequence_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ChatGLMConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"ChatGLMConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim % 4:
            raise ValueError(
                f"ChatGLMConfig: head dim hidden_size/num_attention_heads={self.head_dim} must be a "
                "multiple of 4 (2D rotary splits it in two halves, each rotated in two halves)"
            )
        if not self.position_encoding_2d:
            raise ValueError(
                "ChatGLMConfig.position_encoding_2d=False is not supported: glm_kernels implements "
                "ChatGLM-6B's 2D rotary positions only"
            )
        bits = self.quantization_bit
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (0, 4, 8):
            raise ValueError(f"ChatGLMConfig.quantization_bit={bits!r} is not supported: 0 (no quantization), 8 or 4 "
                             "(THUDM's weight-only INT8 / INT4)")
        if bits == 4:
            for name in ("hidden_size", "inner_hidden_size"):
                if getattr(self, name) % 2:
                    raise ValueError(f"ChatGLMConfig.quantization_bit=4 packs two columns per byte: {name}="
                                     f"{getattr(self, name)} must be even")
        if self.quantization_embeddings and not bits:
            raise ValueError("ChatGLMConfig.quantization_embeddings=True needs quantization_bit 4 or 8")
        if self.pre_seq_len is not None and (
            not isinstance(self.pre_seq_len, int) or isinstance(self.pre_seq_len, bool) or self.pre_seq_len <= 0
        ):
            raise ValueError(f"ChatGLMConfig.pre_seq_len must be None or a positive int, got {self.pre_seq_len!r}")
        if self.kernel_backend is not None:
            from .backend import BACKENDS

            if self.kernel_backend not in BACKENDS:
                raise ValueError(
                    f"ChatGLMConfig.kernel_backend={self.kernel_backend!r} is not one of {BACKENDS} (or None)"
                )
