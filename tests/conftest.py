"""Test setup: the Triton interpreter (set before anything imports triton) and shared fixtures."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from glm_kernels.selfcheck import tiny_config  # noqa: E402
from glm_kernels.modeling import ChatGLMForConditionalGeneration  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize(model, std=0.1):
    """Give LayerNorms and biases non-trivial values so every parameter matters in a comparison."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(1 + std * torch.randn_like(p) if name.endswith("weight") else std * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(std * torch.randn_like(p))
    return model


def make_model(dtype=torch.float32, **overrides):
    """A tiny random model; the head is tied to the embeddings as in ChatGLM-6B unless overridden."""
    model = ChatGLMForConditionalGeneration(tiny_config(**{"tie_word_embeddings": True, **overrides}))
    return randomize(model).to(dtype).eval()


@pytest.fixture
def cfg():
    return tiny_config()


EXTENSION_MISSING = "glm_kernels._C missing: run `pip install --no-build-isolation -e .` (or make install)"


@pytest.fixture(params=["extension", "pytorch"])
def cpu_path(request, monkeypatch):
    """Run a quantized-CPU test with the C++ extension, and with PyTorch's kernels alone (the extension hidden).

    This machine has a compiler, so the extension must be built (`make test` builds it): missing, the extension
    case fails instead of skipping (elsewhere the package works without it)."""
    from glm_kernels import cpu_ext

    if request.param == "extension":
        assert cpu_ext.extension() is not None, EXTENSION_MISSING
    else:
        monkeypatch.setattr(cpu_ext, "extension", lambda: None)
    return request.param


def supported_isas():
    """Every build of the extension's loops this CPU can run (the tests run each one)."""
    from glm_kernels import cpu_ext

    module = cpu_ext.module()
    best = module.best_isa()
    order = ["scalar", "avx2", "avx512f", "avx512bf16", "avx512vnni"]
    return order[:order.index(best) + 1]


@pytest.fixture(params=["scalar", "avx2", "avx512f", "avx512bf16", "avx512vnni"])
def isa(request):
    """Run an extension test with one build of its loops; a build this CPU cannot run fails the test (this
    machine runs all five: the test that says so is test_this_cpu_runs_every_build)."""
    from glm_kernels import cpu_ext

    assert cpu_ext.module() is not None, EXTENSION_MISSING
    module = cpu_ext.module()
    assert request.param in supported_isas(), f"this CPU does not run {request.param}"
    previous = module.set_isa(request.param)
    yield request.param
    module.set_isa(previous)


@pytest.fixture(scope="session")
def serve_prefix_dirs(tmp_path_factory):
    """Two P-Tuning checkpoints (pre_seq_len 4 and 9, the second with the projection) over the demo base."""
    from serve_helpers import write_prefixes

    return write_prefixes(tmp_path_factory.mktemp("prefixes"))


@pytest.fixture(scope="session")
def served_tiny(serve_prefix_dirs):
    """A real server on 127.0.0.1 (background thread) over the demo's tiny base model and two prefixes."""
    from serve_helpers import load_base, make_engine, served

    model, tokenizer = load_base()
    engine = make_engine(model, tokenizer, serve_prefix_dirs, max_batch_size=8)
    with served(engine, serve_prefix_dirs) as server:
        yield server
