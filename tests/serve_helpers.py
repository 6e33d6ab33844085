"""Shared pieces of the serving tests: the demo's tiny base model, two P-Tuning prefixes, a real server.

Servers listen on 127.0.0.1 only (a free port), in a background thread, and stop at the end of the
`with` block; every request in the tests is bounded (few tokens, timeouts on the clients).
"""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from glm_kernels import ChatGLMForConditionalGeneration, ChatGLMTokenizer
from glm_kernels.generation import process_response
from glm_kernels.serve import Engine, base_prefix, create_app, load_prefix

BASE = Path(__file__).resolve().parents[1] / "glm_kernels" / "ptuning" / "assets" / "base"
BASE_NAME = "chatglm-demo"
# name -> (pre_seq_len, prefix_projection, seed, std): different lengths, with and without the projection; the
# std is large enough for each prefix to change the demo model's answers
PREFIXES = {"short": (4, False, 1, 3.0), "long": (9, True, 2, 0.5)}


def write_prefixes(directory: Path) -> dict[str, Path]:
    """P-Tuning checkpoints over the demo base (random prefix weights large enough to change answers)."""
    out = {}
    for name, (length, projection, seed, std) in PREFIXES.items():
        model = ChatGLMForConditionalGeneration.from_pretrained(str(BASE), pre_seq_len=length,
                                                                prefix_projection=projection)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.transformer.prefix_encoder.parameters():
                p.normal_(0, std)
        model.save_ptuning_checkpoint(directory / name)
        out[name] = directory / name
    return out


def load_base():
    return (ChatGLMForConditionalGeneration.from_pretrained(str(BASE)).eval(),
            ChatGLMTokenizer.from_pretrained(str(BASE)))


def make_engine(model, tokenizer, prefix_dirs, **kwargs) -> Engine:
    prefixes = {BASE_NAME: base_prefix(BASE_NAME, model)}
    for name, directory in prefix_dirs.items():
        prefixes[name] = load_prefix(name, directory, model)
    return Engine(model, tokenizer, prefixes, **kwargs)


def solo_answer(prefix_dirs, model_name: str, prompt: str, max_new_tokens: int, quantization_bit: int = 0,
                _cache={}):
    """(answer, generated tokens, finish reason) of one greedy request run alone with `generate()` on a model
    loaded with its prefix the usual way (`from_pretrained(..., pre_seq_len, ptuning_checkpoint)`, quantized
    to `quantization_bit` if given), the answer cut and post-processed as `chat()` does."""
    key = (model_name, quantization_bit)
    if key not in _cache:
        quant = {"quantization_bit": quantization_bit} if quantization_bit else {}
        if model_name == BASE_NAME:
            model = ChatGLMForConditionalGeneration.from_pretrained(str(BASE), **quant)
        else:
            length, projection, _, _ = PREFIXES[model_name]
            model = ChatGLMForConditionalGeneration.from_pretrained(
                str(BASE), pre_seq_len=length, prefix_projection=projection,
                ptuning_checkpoint=str(prefix_dirs[model_name]), **quant)
        _cache[key] = (model.eval(), ChatGLMTokenizer.from_pretrained(str(BASE)))
    model, tokenizer = _cache[key]
    inputs = tokenizer([prompt], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    n = len(ids)
    stopped = tokenizer.eos_token_id in ids
    if stopped:
        ids = ids[:ids.index(tokenizer.eos_token_id)]
    return process_response(tokenizer.decode(ids)), n, "stop" if stopped else "length"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    url: str
    engine: Engine
    prefix_dirs: dict

    @property
    def models(self) -> list[str]:
        return self.engine.model_names

    def chat(self, model: str, messages: list[dict], max_tokens: int) -> str:
        """The server's non-streamed greedy answer."""
        r = httpx.post(f"{self.url}/v1/chat/completions", timeout=60,
                       json={"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]


@contextmanager
def served(engine: Engine, prefix_dirs=None, timeout: float = 60.0):
    """A real uvicorn server for `engine` on 127.0.0.1 in a background thread: yields a `Served`."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, timeout=timeout), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield Served(f"http://127.0.0.1:{port}", engine, prefix_dirs or {})
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "the test server did not stop"
