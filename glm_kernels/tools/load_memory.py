"""Peak resident memory of `from_pretrained` on a synthetic sharded checkpoint.

Writes a ChatGLM checkpoint in the released layout (fp16 `.bin` shards +
`pytorch_model.bin.index.json`, with the `rotary_emb.inv_freq` keys), then
loads it in a fresh Python process and reads the kernel's peak RSS counter
(VmHWM, reset just before loading) against the RSS before loading.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..configuration import ChatGLMConfig
from ..modeling import ChatGLMForConditionalGeneration

_MEASURE = r"""
import json, sys, torch
from glm_kernels import ChatGLMForConditionalGeneration

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
except OSError:
    pass
before = status("VmRSS")
model = ChatGLMForConditionalGeneration.from_pretrained(sys.argv[1], torch_dtype=torch.float16)
peak = status("VmHWM")
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"rss_before": before, "peak_rss": peak, "weights_bytes": weights}))
"""


def synthetic_config(gb: float) -> ChatGLMConfig:
    """A 6B-shaped config (hidden 1024, vocab 130528) with as many layers as fit in `gb` of fp16."""
    h, inner, vocab = 1024, 4096, 130528
    per_layer = 2 * (4 * h * h + 2 * h * inner + 9 * h)
    fixed = 2 * (vocab * h + 2 * h)
    layers = max(1, round((gb * 1e9 - fixed) / per_layer))
    return ChatGLMConfig(vocab_size=vocab, hidden_size=h, num_layers=layers, num_attention_heads=16,
                         inner_hidden_size=inner, torch_dtype="float16")


def write_checkpoint(directory: Path, config: ChatGLMConfig, shards: int, fmt: str = "bin") -> int:
    """Write random fp16 weights in `shards` files; returns the bytes of tensor data written."""
    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    keys = list(shapes)
    per_shard = -(-len(keys) // shards)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    prefix = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map, total, embedding = {}, 0, None
    gen = torch.Generator().manual_seed(0)
    for i in tqdm(range(shards), desc="write shards"):
        name = f"{prefix}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {}
        for k in keys[i * per_shard:(i + 1) * per_shard]:
            if k == "lm_head.weight" and config.tie_word_embeddings:
                t = embedding  # the released checkpoint stores the tied head as a copy of the embeddings
            else:
                t = torch.empty(shapes[k], dtype=torch.float16).normal_(0, 0.02, generator=gen)
            if k == "transformer.word_embeddings.weight":
                embedding = t
            part[k] = t
            weight_map[k] = name
            total += t.numel() * 2
        if fmt == "safetensors":
            save_file(part, str(directory / name), metadata={"format": "pt"})
        else:
            torch.save(part, directory / name)
        del part
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (directory / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(str(directory))
    return total


def measure(directory: Path) -> dict:
    """Load the checkpoint in a fresh process; returns its RSS figures in bytes."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(directory)], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(args) -> int:
    config = synthetic_config(args.gb)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp) / "ckpt"
        total = write_checkpoint(directory, config, args.shards, args.format)
        shard_bytes = max(p.stat().st_size for p in directory.iterdir() if p.suffix in (".bin", ".safetensors"))
        r = measure(directory)
    increase = r["peak_rss"] - r["rss_before"]
    mb = 1 / 2**20
    print("| checkpoint | shards | largest shard | RSS before | peak RSS | peak increase | increase / weights |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {total * mb:.0f} MiB ({args.format}) | {args.shards} | {shard_bytes * mb:.0f} MiB | "
          f"{r['rss_before'] * mb:.0f} MiB | {r['peak_rss'] * mb:.0f} MiB | {increase * mb:.0f} MiB | "
          f"{increase / r['weights_bytes']:.2f} |")
    return 0
