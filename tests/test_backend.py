"""The backend choice (glm_kernels.backend): by capability, per call in automatic mode, strict when explicit.

No GPU here: the CUDA device is described by patching `backend._query_cuda_device` (the one place that reads
`torch.cuda.get_device_properties`), and calls are made with CPU or meta tensors on a `cuda` device argument
(resolution only reads shapes and dtypes).
"""
import re
from pathlib import Path

import pytest
import torch

from glm_kernels import backend, ops
from glm_kernels.backend import TARGETS, DeviceInfo
from glm_kernels.kernels import attention as attn
from glm_kernels.ops.mask import GLMMask

CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu(monkeypatch):
    """`gpu(sm)` makes cuda:0 look like the target sm (its capability and shared memory)."""
    def use(sm):
        backend._plan.cache_clear()
        monkeypatch.setattr(backend, "_query_cuda_device", lambda index: TARGETS[sm])
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    yield use
    backend._plan.cache_clear()


def attention_args(hd=128, dtype=torch.float16, mask=None):
    q = torch.empty(4, 1, 2, hd, dtype=dtype, device="meta")
    return q, q, q, 0, mask, False, None, None


@pytest.mark.parametrize("sm,expected", [(75, "torch"), (80, "triton"), (86, "triton"), (89, "triton"),
                                         (90, "triton")])
def test_attention_runs_triton_from_sm80_only(gpu, sm, expected):
    gpu(sm)
    assert backend.resolve("attention", CUDA, None, attention_args()) == expected
    # the element-wise kernels need no tensor cores: Triton from sm_75 on
    assert backend.resolve("layernorm", CUDA) == "triton"
    choice, reason = backend.capability_choice("attention", TARGETS[sm])
    assert choice == expected and (("compute capability 7.5 < 8.0" in reason) == (sm == 75))


def test_auto_mode_falls_back_per_call_and_explicit_mode_is_strict(gpu):
    gpu(80)
    # a head dim the kernels do not take: automatic mode runs the PyTorch op, an explicit request raises
    assert backend.resolve("attention", CUDA, None, attention_args(hd=96)) == "torch"
    with pytest.raises(ValueError, match=r"op 'attention'.*head dims \(32, 64, 128\), got 96"):
        backend.resolve("attention", CUDA, "triton", attention_args(hd=96))
    # a dtype the kernels do not take
    x = torch.empty(3, 8, dtype=torch.float64, device="meta")
    assert backend.resolve("gelu", CUDA, None, (x, None)) == "torch"
    with pytest.raises(ValueError, match=r"op 'gelu'.*unsupported dtype torch.float64"):
        backend.resolve("gelu", CUDA, "triton", (x, None))
    # a LayerNorm too wide for the kernels
    w = torch.empty(20000, device="meta")
    assert backend.resolve("layernorm", CUDA, None, (w[None], None, 1.0, w, w, 1e-5, False)) == "torch"
    # supported calls run the kernels
    assert backend.resolve("attention", CUDA, None, attention_args(hd=64, dtype=torch.bfloat16)) == "triton"
    # an explicit request on sm_75 is honoured (the kernels are compiled for it)
    gpu(75)
    assert backend.resolve("attention", CUDA, "triton", attention_args()) == "triton"


def test_unsupported_call_runs_the_torch_op_end_to_end(monkeypatch):
    # automatic mode with a head dim of 48 on a (pretended) A100 computes with the torch implementation
    calls = []
    impl = backend._REGISTRY["attention"]["torch"]
    monkeypatch.setitem(backend._REGISTRY["attention"], "torch",
                        backend.Impl(lambda *a: calls.append(a) or impl.fn(*a), impl.supports, impl.min_capability))
    monkeypatch.setattr(backend, "device_info", lambda device: TARGETS[80])
    q = torch.randn(3, 1, 2, 48)
    real = backend.resolve
    monkeypatch.setattr(backend, "resolve", lambda op, device, b=None, args=None: real(op, CUDA, b, args))
    out, _ = ops.glm_attention(q, q, q, 0, None)
    assert len(calls) == 1 and out.shape == (3, 1, 96)


def test_device_info_is_read_once_per_device(monkeypatch):
    backend._query_cuda_device.cache_clear()
    seen = []

    class Props:
        major, minor, shared_memory_per_block_optin, shared_memory_per_block, name = 7, 5, 65536, 49152, "Tesla T4"

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: seen.append(index) or Props())
    try:
        for _ in range(3):
            info = backend.device_info(torch.device("cuda", 1))
        assert info == DeviceInfo((7, 5), 65536, "Tesla T4") and seen == [1]
        assert not info.tensor_cores and TARGETS[80].tensor_cores
        # the launchers configure themselves from it: the T4's small tiles, fp32 dots on the FMA units
        assert attn.bwd_config(128, torch.float16, info) == attn.bwd_config(128, torch.float16, TARGETS[75])
        assert attn.bwd_config(128, torch.float16, info) != attn.bwd_config(128, torch.float16, TARGETS[80])
        assert attn._upcast(torch.float16, info) and not attn._upcast(torch.float16, TARGETS[80])
    finally:
        backend._query_cuda_device.cache_clear()
    assert backend.device_info("cpu") == backend.DEFAULT_DEVICE
    with backend.assume_device(TARGETS[90]):
        assert backend.device_info("cpu") == TARGETS[90]


def test_plan_is_decided_once_per_device_and_request(gpu):
    gpu(75)
    plan = backend.plan(None, CUDA)
    assert plan is backend.plan(None, CUDA)  # cached: the model asks once
    assert plan.choices["attention"] == "torch" and plan.choices["layernorm"] == "triton"
    assert "compute capability 7.5 < 8.0" in plan.reasons["attention"]
    # the ops take the plan as their backend argument
    assert backend.resolve("attention", CUDA, plan, attention_args()) == "torch"
    assert backend.resolve("layernorm", CUDA, plan) == "triton"
    strict = backend.plan("triton", CUDA)
    assert strict.requested == "triton"
    assert backend.resolve("attention", CUDA, strict, attention_args()) == "triton"
    with pytest.raises(ValueError, match="head dims"):
        backend.resolve("attention", CUDA, strict, attention_args(hd=40))
    cpu_plan = backend.plan(None, "cpu")
    assert set(cpu_plan.choices.values()) == {"torch"}
    assert ops.layer_norm(torch.ones(2, 4), None, None, 1e-5, backend=cpu_plan).shape == (2, 4)


def test_support_table_in_the_docs_is_current():
    table = backend.support_table()
    rows = table.splitlines()[2:]
    assert len(rows) == len(TARGETS) * 3
    t4 = [r for r in rows if "sm_75" in r]
    assert all("PyTorch (compute capability 7.5 < 8.0)" in r for r in t4)
    assert all(r.count("Triton") >= 5 for r in rows if "sm_75" not in r)
    doc = (Path(__file__).parent.parent / "docs" / "kernels.md").read_text()
    assert table in doc, "docs/kernels.md: paste glm_kernels.backend.support_table() (python -c 'from " \
                         "glm_kernels.backend import support_table; print(support_table())')"
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    summary = backend.support_summary()
    assert summary.count("\n") == len(TARGETS) + 1 and "| T4, RTX 20xx | sm_75 | Triton; `attention` PyTorch" in summary
    assert summary in readme, "README.md: paste glm_kernels.backend.support_summary()"


def test_glm_mask_meta_call_is_supported():
    mask = GLMMask(0, torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
    assert attn._supports(*attention_args(mask=mask)) is None
    bad = torch.zeros(1, 1, 4, 4, dtype=torch.int8)
    assert re.search("GLMMask or bool", attn._supports(*attention_args(mask=bad)))
