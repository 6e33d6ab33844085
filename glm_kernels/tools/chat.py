"""`glm-kernels chat`: a terminal chat with a ChatGLM checkpoint, streaming tokens as they come.

    glm-kernels chat --model path/to/chatglm-6b [--ptuning-checkpoint out/ptuning] [--greedy]

Type a message and press enter; `clear` starts a new conversation, `stop` (or end of input) quits.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..loading import ptuning_settings


def load_model(model_dir, device=None, dtype=None, backend=None, **overrides):
    """(model, tokenizer) of a checkpoint directory for inference: on CUDA when there is one, in its own dtype
    there and float32 on the CPU unless `dtype` says otherwise; `overrides`: config fields and
    `from_pretrained` arguments (`pre_seq_len`, `ptuning_checkpoint`, `quantization_bit`, ...)."""
    from .. import ChatGLMForConditionalGeneration, ChatGLMTokenizer

    tokenizer = ChatGLMTokenizer.from_pretrained(str(model_dir))
    if backend:
        overrides["kernel_backend"] = backend
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("auto" if device == "cuda" else "float32")
    model = ChatGLMForConditionalGeneration.from_pretrained(str(model_dir), torch_dtype=dtype, device=device,
                                                            **overrides)
    return model, tokenizer


def load(args):
    """(model, tokenizer) from the command-line arguments."""
    overrides = {}
    if args.ptuning_checkpoint:
        settings = ptuning_settings(args.ptuning_checkpoint, args.pre_seq_len)
        overrides = dict(pre_seq_len=settings["pre_seq_len"], prefix_projection=settings["prefix_projection"],
                         ptuning_checkpoint=args.ptuning_checkpoint)
    elif args.pre_seq_len is not None:
        overrides["pre_seq_len"] = args.pre_seq_len
    return load_model(Path(args.model), args.device, args.dtype, args.backend, **overrides)


def main(args, stdin=None, stdout=None) -> int:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    try:
        model, tokenizer = load(args)
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"glm-kernels chat: {err}", file=sys.stderr)
        return 2
    gen = dict(max_length=args.max_length, do_sample=not args.greedy, top_p=args.top_p,
               temperature=args.temperature)
    history = []
    print("ChatGLM (glm_kernels). 'clear' starts over, 'stop' quits.", file=stdout, flush=True)
    while True:
        print("\n用户：", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        query = line.strip()
        if query == "stop":
            break
        if query == "clear":
            history = []
            continue
        if not query:
            continue
        print("\nChatGLM：", end="", file=stdout, flush=True)
        shown = ""
        for response, new_history in model.stream_chat(tokenizer, query, history, **gen):
            print(response[len(shown):], end="", file=stdout, flush=True)
            shown, history = response, new_history
        print(file=stdout, flush=True)
    return 0


def add_parser(sub) -> None:
    chat = sub.add_parser("chat", help="chat with a checkpoint in the terminal, streaming tokens")
    chat.add_argument("--model", required=True, help="checkpoint directory (config.json, weights, ice_text.model)")
    chat.add_argument("--ptuning-checkpoint", default=None, help="P-Tuning v2 checkpoint to load over the model")
    chat.add_argument("--pre-seq-len", type=int, default=None,
                      help="prefix length (default: from the P-Tuning checkpoint's config.json)")
    chat.add_argument("--dtype", default=None, help="float32, float16, bfloat16 or auto (default: auto on CUDA, "
                                                    "float32 on the CPU)")
    chat.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    chat.add_argument("--backend", choices=["torch", "triton"], default=None)
    chat.add_argument("--max-length", type=int, default=2048)
    chat.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    chat.add_argument("--top-p", type=float, default=0.7)
    chat.add_argument("--temperature", type=float, default=0.95)
    chat.set_defaults(func=main)
