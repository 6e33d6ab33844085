"""glm_kernels: ChatGLM-6B (v1) with P-Tuning v2 on fused kernels, drop-in for THUDM's modeling code.

    from glm_kernels import ChatGLMForConditionalGeneration
    model = ChatGLMForConditionalGeneration.from_pretrained("path/to/chatglm-6b", torch_dtype=torch.float16)
"""
from .configuration import ChatGLMConfig
from .modeling import (
    ChatGLMForConditionalGeneration,
    ChatGLMModel,
    ChatGLMPreTrainedModel,
    GLMBlock,
    PrefixEncoder,
)
from .tokenization import ChatGLMTokenizer, check_tokenizer_matches, register_auto_classes

register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "ChatGLMConfig",
    "ChatGLMForConditionalGeneration",
    "ChatGLMModel",
    "ChatGLMPreTrainedModel",
    "ChatGLMTokenizer",
    "GLMBlock",
    "PrefixEncoder",
    "check_tokenizer_matches",
]
