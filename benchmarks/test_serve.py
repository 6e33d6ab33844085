"""Serving throughput and latency: S concurrent streams batched by the engine against one-at-a-time serving.

The mid-size random ChatGLM of `test_decode.py` (hidden 2048, 8 layers, 16 heads of 128, vocabulary
130528) in bf16. A round serves S requests (S = 1, 4, 16), each a 24-token prompt answered with 32 greedy
tokens, all arriving at once:
- glm_kernels: the serving engine (`glm_kernels.serve.Engine`, `max_batch_size=16`), what
  `glm-kernels serve` runs behind HTTP: prompts run alone, then every running row decodes in one forward;
- reference: the same requests one after another through `generate()` (the same model), as the
  original `api.py` serves them (one `chat()` at a time).

The time of a round is the table's ms (so speedup = aggregate tokens/s ratio); each case also records
aggregate tokens/s of both, and per request the time per output token (TPOT: first to last token /
31) and the latency (arrival to last token), p50 and p99 over the requests of every round.
HTTP is left out: its cost per token is microseconds against ~100 ms decoding steps.

Goal (issue 10): >= 3x aggregate tokens/s at 16 streams, with p50 TPOT under 2x the single-stream one.
"""
import os

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from glm_kernels import ChatGLMConfig, ChatGLMForConditionalGeneration
from glm_kernels.serve import Engine, SamplingParams, base_prefix
from timing import measure, stamp

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("benchmarks never time the Triton interpreter (unset TRITON_INTERPRET)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = dict(hidden_size=2048, num_layers=8, num_attention_heads=16, inner_hidden_size=8192,
              max_sequence_length=2304)
DTYPE = torch.bfloat16
STREAMS = [1, 4, 16]
PROMPT_TOKENS, NEW_TOKENS = 24, 32
_MODEL = {}


def model():
    if not _MODEL:
        torch.manual_seed(0)
        with torch.no_grad():
            _MODEL["m"] = ChatGLMForConditionalGeneration(ChatGLMConfig(**CONFIG)).to(DTYPE).to(DEVICE).eval()
    return _MODEL["m"]


class IdText:
    """Detokenizer for the random model's ids (no real tokenizer has its 130528 ids): one CJK character each,
    so the engine's text handling runs per token as it does with ChatGLM's tokenizer."""

    def decode(self, ids):
        return "".join(chr(0x4E00 + i % 20000) for i in ids)


def prompts(cfg, count):
    out = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        out.append(torch.randint(10, 130000, (PROMPT_TOKENS - 2,), generator=g).tolist() +
                   [cfg.gmask_token_id, cfg.bos_token_id])
    return out


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


class Stamps(BaseStreamer):
    """Times of the tokens `generate()` produces (the first `put` is the prompt)."""

    def __init__(self):
        self.times, self.calls = [], 0

    def put(self, value):
        self.calls += 1
        if self.calls > 1:
            self.times.append(stamp(DEVICE))

    def end(self):
        pass


@pytest.mark.parametrize("streams", STREAMS)
@pytest.mark.parametrize("impl", ["glm_kernels", "reference"])
def test_serve_streams(benchmark, impl, streams):
    m = model()
    cfg = m.config
    requests = prompts(cfg, streams)
    stats = []  # per request of every round: (tpot, latency, tokens)

    if impl == "glm_kernels":
        engine = Engine(m, IdText(), {"base": base_prefix("base", m)}, max_batch_size=16, max_context=512)

        def serve():
            stamps = {}
            start = stamp(DEVICE)
            for i, ids in enumerate(requests):
                engine.submit("base", ids, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0),
                              lambda ev, i=i: stamps.setdefault(i, []).append((stamp(DEVICE),
                                                                               ev.completion_tokens)))
            while engine.stats()["running"] or engine.stats()["waiting"]:
                engine.step()
            for events in stamps.values():  # events carry the token count: a held-back piece skips none
                (t0, n0), (t1, n1) = events[0], events[-1]
                stats.append(((t1 - t0) / (n1 - n0), t1 - start, n1))
        rounds, warmup = 3, 1
    else:
        def serve():
            start = stamp(DEVICE)
            for ids in requests:
                stamps = Stamps()
                out = m.generate(torch.tensor([ids], device=DEVICE), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 streamer=stamps)
                n = out.shape[1] - len(ids)
                stats.append(((stamps.times[-1] - stamps.times[0]) / (n - 1), stamps.times[-1] - start, n))
        # a round of 16 takes about a minute here: warm up on one request instead of a whole round
        m.generate(torch.tensor([requests[0]], device=DEVICE), max_new_tokens=4, do_sample=False)
        rounds, warmup = (1, 0) if streams >= 16 else (2, 0)

    with torch.no_grad():
        case = f"{streams} concurrent stream{'s' * (streams > 1)}, {NEW_TOKENS} tokens each"
        measure(benchmark, case, impl, serve, device=DEVICE, dtype=DTYPE, rounds=rounds, warmup_rounds=warmup)
    measured = stats if benchmark.disabled else stats[warmup * streams:]  # disabled: one call, no warm-up
    tokens = sum(n for _, _, n in measured)
    assert tokens == len(measured) * NEW_TOKENS  # random weights: no early eos, every request ran its length
    seconds = benchmark.stats.stats.median if benchmark.stats else None
    tpot = [t for t, _, _ in measured]
    latency = [lat for _, lat, _ in measured]
    benchmark.extra_info.update(
        streams=streams,
        tokens_per_s=round(streams * NEW_TOKENS / seconds, 2) if seconds else None,
        tpot_p50_ms=round(percentile(tpot, 0.5) * 1e3, 1), tpot_p99_ms=round(percentile(tpot, 0.99) * 1e3, 1),
        latency_p50_ms=round(percentile(latency, 0.5) * 1e3, 0),
        latency_p99_ms=round(percentile(latency, 0.99) * 1e3, 0))
