"""Every Triton launch runs on its tensors' device (Triton launches on the current device and its current stream).

Statically: no kernel module writes `kernel[grid](...)`; every launch goes through `common.launch`, whose one
`kernel[grid](...)` sits inside `with device_context(device)`. Dynamically, under the interpreter: with the device
context patched to a recorder, every kernel of a forward and backward of each op runs inside the context of its
tensors' device.
"""
import ast
from pathlib import Path

import torch

from glm_kernels import ops
from glm_kernels.kernels import common
from glm_kernels.ops.mask import GLMMask

KERNELS = Path(common.__file__).parent


def _subscript_calls(tree):
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)]


def test_no_launch_outside_the_guarded_helper():
    for path in sorted(KERNELS.glob("*.py")):
        tree = ast.parse(path.read_text())
        calls = _subscript_calls(tree)
        if path.name != "common.py":
            assert not calls, f"{path.name}:{calls[0].lineno if calls else 0}: launch through common.launch"
            continue
        launch_fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "launch")
        assert len(calls) == 1 and calls[0] in list(ast.walk(launch_fn))
        guard = [n for n in ast.walk(launch_fn) if isinstance(n, ast.With)]
        assert len(guard) == 1 and calls[0] in list(ast.walk(guard[0]))
        ctx = guard[0].items[0].context_expr
        assert isinstance(ctx, ast.Call) and ctx.func.id == "device_context"
    # and every kernel module does launch through it
    for name in ("attention", "rope", "softmax", "layernorm", "gelu", "cross_entropy"):
        assert "launch(" in (KERNELS / f"{name}.py").read_text()


def test_device_context_is_the_tensors_cuda_device():
    ctx = common.device_context(torch.device("cuda", 1))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    assert not isinstance(common.device_context(torch.device("cpu")), torch.cuda.device)


def test_every_launch_runs_inside_its_devices_context(monkeypatch):
    state = {"inside": None, "entered": [], "ran": []}

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            state["inside"] = self.device
            state["entered"].append(self.device)

        def __exit__(self, *exc):
            state["inside"] = None

    monkeypatch.setattr(common, "device_context", Recorder)
    real = common.launch

    def watched(kernel, grid, *args, **kwargs):
        class Hook:
            def __getitem__(self, g):
                def run(*a, **k):
                    state["ran"].append((getattr(kernel, "__name__", "?"), state["inside"]))
                    return kernel[g](*a, **k)
                return run
        return real(Hook(), grid, *args, **kwargs)

    for module in ("attention", "rope", "softmax", "layernorm", "gelu"):
        monkeypatch.setattr(f"glm_kernels.kernels.{module}.launch", watched)

    q, k, v = (torch.randn(20, 1, 2, 32, requires_grad=True) for _ in range(3))
    mask = GLMMask(0, torch.zeros(1, dtype=torch.long), torch.tensor([5]))
    out, _ = ops.glm_attention(q, k, v, 0, mask, backend="triton")
    out = ops.bias_gelu(out, None, backend="triton")
    out = ops.residual_layer_norm(out, out, 2.0, None, None, 1e-5, backend="triton")
    out.sum().backward()
    mixed = torch.randn(3, 1, 3 * 64)
    cos, sin = ops.rotary_table(8, 16, torch.float32)
    ops.rope_qkv(mixed, torch.zeros(1, 2, 3, dtype=torch.long), cos, sin, 2, backend="triton")
    ops.scaled_masked_softmax(torch.randn(1, 1, 2, 5), None, 1.0, backend="triton")
    names = {name for name, _ in state["ran"]}
    assert {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_gelu_fwd_kernel", "_ln_bwd_kernel",
            "_rope_qkv_kernel", "_softmax_fwd_kernel"} <= names
    assert all(device == torch.device("cpu") for _, device in state["ran"]), state["ran"]
    assert len(state["entered"]) == len(state["ran"])
