"""Weight-only INT8/INT4 against the same model in bf16: decode ms/token and prefill, same run, with each floor.

The mid-size random ChatGLM of `test_decode.py` (hidden 2048, 8 layers, 16 heads of 128, vocabulary 130528),
in bf16 (the "reference" column) and quantized from those bf16 weights with `model.quantize(bits,
quantize_embeddings=True)` (the "glm_kernels" column): the four linears of every block and the tied embedding /
LM head, per-row scales as THUDM's. At this size the LM head is 40% of the weights, so leaving it in bf16 would
cap INT4 at ~1.8x.

Decode reads every weight once per token: the floor of a quantized model is the time to read the weights one
step reads (the packed bytes and scales), measured on the model's own tensors with `timing.read_floor_seconds`
before every timed round of its step (`timing.RoundFloor`), together with the step's quantized products alone
(`products_ms`: every `QuantizedLinear` of the model, the LM head included, on one bf16 row). The table's shares
pair each round with the floor read just before it (`floor_share`, `products_share`: medians over the rounds of
floor / step and floor / products), because DRAM bandwidth on this VM moves between ~23 and ~48 GB/s within a
minute. The products split the step into what its products cost against the floor and what the rest of the step
(attention, norms, rotation, GeLU, Python of 8 layers) adds. Each case also records the memory of the loaded
weights (`model_mib`: parameters and buffers as held, packed forms included).

Goal (issue 9): INT8 >= 1.6x and INT4 >= 2.5x faster than bf16 decoding, each >= 70% of its own floor (floor /
time >= 0.7). chatglm.cpp 0.4.2 on the same random weights, context 128, 2 threads, measured on this machine
when the issue was filed: Q8_0 59 ms/token, Q4_0 45, F16 92.
"""
import copy
import os

import pytest
import torch

from glm_kernels import ChatGLMConfig, ChatGLMForConditionalGeneration, cpu_ext
from glm_kernels.cache import GLMKVCache
from glm_kernels.quant.modules import QuantizedLinear
from timing import RoundFloor, measure

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("benchmarks never time the Triton interpreter (unset TRITON_INTERPRET)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = dict(hidden_size=2048, num_layers=8, num_attention_heads=16, inner_hidden_size=8192,
              max_sequence_length=2304)
CONTEXT = 128
PREFILL = 256
DECODE_ROUNDS = 15  # quantized steps (12-30 ms each), each after its floor read and products
BITS = (8, 4)
_MODELS = {}


def models():
    """{"bf16": model, 8: INT8 model, 4: INT4 model}, built once (about 1.3 + 0.7 + 0.4 GB)."""
    if not _MODELS:
        torch.manual_seed(0)
        with torch.no_grad():
            base = ChatGLMForConditionalGeneration(ChatGLMConfig(**CONFIG)).to(torch.bfloat16).to(DEVICE).eval()
            for bits in BITS:
                _MODELS[bits] = copy.deepcopy(base).quantize(bits, quantize_embeddings=True)
        _MODELS["bf16"] = base
    return _MODELS


def held_tensors(model) -> list:
    """Every parameter and buffer as the model holds it, a tied matrix once."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen.setdefault(t.data_ptr(), t.detach())
    return list(seen.values())


def held_bytes(model) -> int:
    """Bytes of every parameter and buffer as the model holds them (a tied matrix once)."""
    return sum(t.numel() * t.element_size() for t in held_tensors(model))


def read_per_token(model) -> list:
    """The tensors one decode step reads: everything but the rotary buffers (the embedding is only gathered, but
    as the tied LM head it is read whole once)."""
    rotary = {b.data_ptr() for n, b in model.named_buffers() if n.endswith("inv_freq")}
    return [t for t in held_tensors(model) if t.data_ptr() not in rotary]


def products_call(model):
    """The quantized products of one decode step alone, as a callable: each `QuantizedLinear` of `model` (the four
    of every block and the LM head) on one row of x in the model's dtype, in the step's order. On the CPU with the
    extension they are its `linear` called directly, as the one-call blocks run them (through the module each
    call would add ~30 us of Python); otherwise through the module."""
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    rows = [torch.randn(1, m.in_features, dtype=model.dtype, device=DEVICE) for m in linears]
    ext = cpu_ext.extension() if DEVICE == "cpu" else None

    def products():
        with torch.no_grad():
            for module, x in zip(linears, rows):
                if ext is not None:
                    ext.linear(x, module.weight, module.weight_scale, module.bits, module.bias)
                else:
                    module(x)

    return products


def decode_step(model):
    """One token over a cache of CONTEXT tokens (the cache's fill is kept fixed across rounds)."""
    cfg = model.config
    cache = GLMKVCache(cfg, batch_size=1, max_length=CONTEXT + 64, dtype=torch.bfloat16, device=DEVICE)
    prompt = torch.tensor([[5, 6, cfg.gmask_token_id, cfg.bos_token_id]], device=DEVICE)
    with torch.no_grad():
        model(prompt, past_key_values=cache)
        for layer in cache.layers:
            layer.keys[:, :, :CONTEXT].normal_()
            layer.values[:, :, :CONTEXT].normal_()
    cache.filled = CONTEXT
    token = torch.tensor([[5]], device=DEVICE)
    position_ids = torch.tensor([[[CONTEXT - 5], [5]]], device=DEVICE)

    def step():
        with torch.no_grad():
            model(token, position_ids=position_ids, past_key_values=cache)
        cache.filled -= 1

    return step


@pytest.mark.parametrize("impl", ["glm_kernels", "reference"])
@pytest.mark.parametrize("bits", BITS, ids=["int8", "int4"])
def test_decode(benchmark, bits, impl):
    model = models()[bits if impl == "glm_kernels" else "bf16"]
    group = f"decode 1 token at context {CONTEXT}, INT{bits} vs bf16"
    info = dict(device=DEVICE, dtype=f"int{bits}", model_mib=held_bytes(model) / 2**20)
    if impl == "reference":
        measure(benchmark, group, impl, decode_step(model), rounds=7, **info)
        return
    # the quantized step against its own floor, read before each round, with its products alone
    floor = RoundFloor(read_per_token(model), DEVICE, products=products_call(model))
    measure(benchmark, group, impl, decode_step(model), rounds=DECODE_ROUNDS, setup=floor, **info)
    floor.record(benchmark)


@pytest.mark.parametrize("impl", ["glm_kernels", "reference"])
@pytest.mark.parametrize("bits", BITS, ids=["int8", "int4"])
def test_prefill(benchmark, bits, impl):
    model = models()[bits if impl == "glm_kernels" else "bf16"]
    cfg = model.config
    ids = torch.randint(0, 130000, (1, PREFILL))
    ids[0, PREFILL - 6], ids[0, PREFILL - 5] = cfg.gmask_token_id, cfg.bos_token_id
    ids = ids.to(DEVICE)

    def run():
        with torch.no_grad():
            model(ids, past_key_values=GLMKVCache(cfg, 1, PREFILL + 8, dtype=torch.bfloat16, device=DEVICE),
                  logits_to_keep=1)

    measure(benchmark, f"prefill {PREFILL} tokens, INT{bits} vs bf16", impl, run, device=DEVICE,
            dtype=f"int{bits}", rounds=3, model_mib=held_bytes(model) / 2**20)
