"""Quantization error report: a quantized model against the same model unquantized.

    glm-kernels quant-report [--model DIR] [--data FILE] [--prompts 16] [--new-tokens 32]
                               [--dtype float32] [--bits 8,4]

For bits 8 and 4, with and without the embeddings / LM head quantized
(`quantization_embeddings`), the model is loaded with `quantization_bit`
(quantized while loading) and compared with the unquantized model on the
prompts of a data file (THUDM's `content`/`summary` JSON lines):

- logits, teacher-forced over prompt + reference answer: max and mean
  |difference|, both relative to max |logit| of the unquantized model, and how
  often the top-1 token is the same;
- greedy generation of `--new-tokens` tokens from each prompt: how many
  answers are identical, and the share of generated tokens produced before
  the two answers first differ.

Defaults: the small ChatGLM trained for the demo (`glm_kernels/ptuning/assets/`,
hidden 128, 4 layers: real trained weights, not random ones) and its dev
prompts. `--model` takes any ChatGLM-6B checkpoint directory (with `--dtype
bfloat16` to halve the memory of the unquantized copy). The numbers in
docs/quantization.md come from this command.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..ptuning.demo import BASE_DIR, DEV_FILE


def _prompts(tokenizer, data_file: Path, count: int):
    rows = [json.loads(line) for line in Path(data_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for row in rows[:count]:
        prompt = tokenizer(row["content"], return_tensors="pt")["input_ids"]
        answer = tokenizer.encode(row["summary"], add_special_tokens=False)
        out.append((prompt, answer))
    return out


@torch.no_grad()
def compare(base, quantized, prompts, new_tokens: int, eos_token_id: int) -> dict:
    """Logit and greedy-token agreement of `quantized` against `base` over `prompts` [(prompt ids, answer ids)]."""
    max_err = sum_err = count = scale = 0.0
    top1_same = top1_total = 0
    identical = generated = agreed = 0
    for prompt, answer in prompts:
        ids = torch.cat((prompt, torch.tensor([answer + [eos_token_id]])), dim=1)
        ref = base(ids).logits.float()
        out = quantized(ids).logits.float()
        diff = (out - ref).abs()
        max_err, sum_err, count = max(max_err, float(diff.max())), sum_err + float(diff.sum()), count + diff.numel()
        scale = max(scale, float(ref.abs().max()))
        top1_same += int((out.argmax(-1) == ref.argmax(-1)).sum())
        top1_total += ref.shape[1]
        a = base.generate(prompt, max_new_tokens=new_tokens, do_sample=False)[0, prompt.shape[1]:]
        b = quantized.generate(prompt, max_new_tokens=new_tokens, do_sample=False)[0, prompt.shape[1]:]
        identical += int(torch.equal(a, b))
        n = min(len(a), len(b))
        differ = (a[:n] != b[:n]).nonzero()
        agreed += int(differ[0, 0]) if len(differ) else n
        generated += len(a)
    return {"max_rel": max_err / scale, "mean_rel": sum_err / count / scale, "scale": scale,
            "top1": top1_same / top1_total, "identical": identical, "prompts": len(prompts),
            "agreed": agreed / max(generated, 1)}


def main(argv=None, out=sys.stdout) -> int:
    from ..modeling import ChatGLMForConditionalGeneration
    from ..tokenization import ChatGLMTokenizer

    p = argparse.ArgumentParser(prog="glm-kernels quant-report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(BASE_DIR), help="checkpoint directory (default: the demo's base model)")
    p.add_argument("--data", default=str(DEV_FILE), help="JSON lines with content / summary")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--bits", default="8,4", help="comma-separated: 8, 4")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    bits_list = [int(b) for b in args.bits.split(",") if b]
    tokenizer = ChatGLMTokenizer.from_pretrained(args.model)
    prompts = _prompts(tokenizer, args.data, args.prompts)
    base = ChatGLMForConditionalGeneration.from_pretrained(args.model, torch_dtype=dtype)
    eos = base.config.eos_token_id
    print(f"model {args.model} ({base.config.num_layers} layers, hidden {base.config.hidden_size}, vocabulary "
          f"{base.config.vocab_size}), {args.dtype}; {len(prompts)} prompts of {args.data}, {args.new_tokens} "
          "greedy tokens each", file=out)
    print("| bits | embeddings + LM head | max logit error / max logit | mean logit error / max logit | "
          "top-1 same (teacher-forced) | identical greedy answers | greedy tokens before the first difference |",
          file=out)
    print("|---|---|---|---|---|---|---|", file=out)
    for bits in bits_list:
        for embeddings in (False, True):
            quantized = ChatGLMForConditionalGeneration.from_pretrained(
                args.model, torch_dtype=dtype, quantization_bit=bits, quantization_embeddings=embeddings)
            r = compare(base, quantized, prompts, args.new_tokens, eos)
            print(f"| {bits} | {'quantized' if embeddings else 'kept'} | {r['max_rel']:.2e} | {r['mean_rel']:.2e} | "
                  f"{100 * r['top1']:.1f}% | {r['identical']}/{r['prompts']} | {100 * r['agreed']:.1f}% |",
                  file=out, flush=True)
            del quantized
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
