"""LM head + cross-entropy, loss + backward: `fused_linear_cross_entropy` vs the unfused original, time and peak memory.

N = 512 tokens, hidden 2048, vocabulary 130528 (ChatGLM-6B's), frozen head (P-Tuning: the gradient reaches the
hidden states only), every label valid (no ignored rows, which the fused op would skip). fp32 and bf16; on the
CPU the torch path, on a GPU the Triton kernel.

Peak memory is measured once per case, outside the timed rounds, as the growth over the memory held before the
step (inputs already allocated): on the CPU the resident set's high-water mark in a fresh process, on a GPU the
allocator's peak (`benchmarks/memory.py`). The table after the timings prints both peaks and their ratio (reference / glm_kernels).
"""
import os

import pytest
import torch
import torch.nn.functional as F

from glm_kernels import ops
from memory import peak_mib
from timing import measure

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("benchmarks never time the Triton interpreter (unset TRITON_INTERPRET)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, HIDDEN, VOCAB = 512, 2048, 130528
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_INPUTS = {}


def _inputs(dtype):
    if dtype not in _INPUTS:
        _INPUTS.clear()  # one head in memory at a time
        g = torch.Generator().manual_seed(0)
        weight = (torch.randn(VOCAB, HIDDEN, generator=g) / HIDDEN**0.5).to(dtype).to(DEVICE)
        hidden = torch.randn(N, HIDDEN, generator=g).to(dtype).to(DEVICE)
        labels = torch.randint(0, VOCAB, (N,), generator=g).to(DEVICE)
        _INPUTS[dtype] = hidden, weight, labels
    return _INPUTS[dtype]


def make_step(impl, dtype_name):
    """Loss + backward of one implementation on this dtype's inputs."""
    hidden, weight, labels = _inputs(DTYPES[dtype_name])

    def step():
        h = hidden.detach().requires_grad_()
        if impl == "glm_kernels":
            loss = ops.fused_linear_cross_entropy(h, weight, labels)
        else:
            loss = F.cross_entropy(F.linear(h, weight).float(), labels)
        loss.backward()

    return step


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("impl", ["glm_kernels", "reference"])
def test_lm_loss_forward_backward(benchmark, impl, dtype_name):
    step = make_step(impl, dtype_name)
    step()  # warm-up
    measure(benchmark, f"lm loss+bwd {N}x{HIDDEN} vocab {VOCAB} {dtype_name}", impl, step, device=DEVICE,
            dtype=dtype_name, rounds=3, warmup_rounds=0,
            peak_mib=peak_mib("test_lm_loss", "make_step", impl, dtype_name))
