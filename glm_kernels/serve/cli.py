"""`glm-kernels serve`: an OpenAI-compatible server over one base model and named P-Tuning prefixes.

    glm-kernels serve --model THUDM/chatglm-6b-dir --ptuning adgen=output/adgen-pt-128 \\
        [--ptuning other=DIR ...] [--host 127.0.0.1 --port 8000] [--max-batch-size 8]

Every prefix is checked and computed at start; one that does not fit the base model (another
`pre_seq_len`, projection or model shape) stops the server before it listens, with the reason.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path


def build_engine(args):
    """(engine, load messages) from the command-line arguments; ValueError / FileNotFoundError if refused."""
    from ..tools.chat import load_model
    from .engine import Engine
    from .prefixes import base_prefix, load_prefix, parse_ptuning_arg

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: no config.json there (a checkpoint directory is expected)")
    named = [parse_ptuning_arg(text) for text in args.ptuning]
    base_name = args.model_name or model_dir.resolve().name
    names = [base_name] + [name for name, _ in named]
    duplicate = {n for n in names if names.count(n) > 1}
    if duplicate:
        raise ValueError(f"model names must be unique; {', '.join(sorted(duplicate))} is given twice "
                         "(--model-name names the base model)")
    overrides = {"quantization_bit": args.quantization_bit} if args.quantization_bit else {}
    model, tokenizer = load_model(model_dir, args.device, args.dtype, args.backend, **overrides)
    prefixes = {base_name: base_prefix(base_name, model)}
    for name, directory in named:  # all checked before the server listens
        prefixes[name] = load_prefix(name, directory, model, args.pre_seq_len)
    engine = Engine(model, tokenizer, prefixes, max_batch_size=args.max_batch_size,
                    max_prefill_tokens=args.max_prefill_tokens, max_queue=args.max_queue,
                    max_context=args.max_context)
    return engine


def main(args) -> int:
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        engine = build_engine(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"glm-kernels serve: {err}", file=sys.stderr)
        return 2
    for name, prefix in engine.prefixes.items():
        print(f"serving {name!r}" + (f" (P-Tuning prefix, pre_seq_len={prefix.length}, {prefix.source})"
                                     if prefix.source != "base" else " (base model)"), flush=True)
    app = create_app(engine, timeout=args.timeout)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def add_parser(sub) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching over P-Tuning "
                                         "prefixes, and a web chat page",
                           description="OpenAI-compatible server (/v1/chat/completions, /v1/models, /health, the "
                                       "original api.py POST /, a chat page at /) over one base model and named "
                                       "P-Tuning prefixes, batched together. Details: docs/serving.md")
    serve.add_argument("--model", required=True, help="base checkpoint directory (config.json, weights, "
                                                      "ice_text.model)")
    serve.add_argument("--ptuning", action="append", default=[], metavar="NAME=DIR",
                       help="serve a P-Tuning v2 checkpoint as model NAME (repeat for several)")
    serve.add_argument("--pre-seq-len", type=int, default=None,
                       help="the prefixes' length (default: each checkpoint's config.json); a checkpoint of another "
                            "length is refused")
    serve.add_argument("--model-name", default=None, help="the base model's name (default: the directory's name)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                          "only)")
    serve.add_argument("--port", type=int, default=8000, help="default 8000")
    serve.add_argument("--dtype", default=None, help="float32, float16, bfloat16 or auto (default: auto on CUDA, "
                                                     "float32 on the CPU)")
    serve.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    serve.add_argument("--backend", choices=["torch", "triton"], default=None,
                       help="kernel backend (default: by device, or $GLM_KERNELS_BACKEND)")
    serve.add_argument("--quantization-bit", type=int, choices=[4, 8], default=None,
                       help="quantize the base model's weights to INT8/INT4 while loading")
    serve.add_argument("--max-batch-size", type=int, default=8, help="rows decoded together (default 8)")
    serve.add_argument("--max-prefill-tokens", type=int, default=4096,
                       help="prompt tokens admitted per decoding step (default 4096)")
    serve.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (default 64)")
    serve.add_argument("--max-context", type=int, default=None,
                       help="prompt + answer tokens per request (default: the model's max_sequence_length)")
    serve.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take (default 600)")
    serve.add_argument("--log-level", default="info", help="uvicorn's: debug, info, warning, error")
    serve.set_defaults(func=main)
