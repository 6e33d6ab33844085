"""GPU compile proof: every configuration the launchers choose compiles ahead of time for sm_75, sm_80, sm_86, sm_89
and sm_90 (fp16, bf16, fp32, with the argument specialisations that occur at run time) without spills and within
each target's shared memory per block.

About 6 minutes on 2 cores with a cold Triton cache, plus 6.5-7.5 for the 650 compiles of the weight-only
quant_linear kernels (measured alone, `compile-report --kernel quant_linear`); what is compiled once for several
targets is in docs/kernels.md ("What the compile proof prunes").
"""
import os
import subprocess
import sys
from collections import defaultdict

from glm_kernels.backend import TARGETS
from glm_kernels.kernels import load_all
from glm_kernels.tools.compile_report import SHARED_LIMIT

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
KERNELS = ("_rope_qkv_kernel", "_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_bwd_delta", "_attn_decode_partial",
           "_attn_decode_combine", "_softmax_fwd_kernel", "_softmax_bwd_kernel", "_ln_fwd_kernel", "_ln_bwd_kernel",
           "_gelu_fwd_kernel", "_gelu_bwd_kernel", "_ce_rows_kernel", "_qgemv_kernel", "_qgemv_reduce", "_qgemm_kernel",
           "_qgemm_dx_kernel")


def _table(text: str, title: str) -> list[list[str]]:
    lines = text.split(title, 1)[1].strip().splitlines()
    return [[c.strip() for c in line.split("|")[1:-1]] for line in lines[2:] if line.startswith("|")]


def test_every_config_compiles_for_every_target_without_spills(tmp_path):
    report = tmp_path / "compile_report.md"
    out = subprocess.run([sys.executable, "-m", "glm_kernels.cli", "compile-report", "--markdown", str(report)],
                         env=ENV, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = _table(report.read_text(), "Every compile")
    # exactly the launch configurations and specialisations the kernel modules list for each target
    listed = {(s.name, s.label, v.label, f"sm_{cc}") for cc, info in TARGETS.items() for m in load_all()
              for s in m.compile_specs(info) for v in s.variants()}
    assert {(r[0], r[1], r[2], r[3]) for r in rows} == listed
    dtypes = defaultdict(set)
    for kernel, config, variant, target, regs, stack, local, shared, limit, ok in rows:
        cc = int(target[3:])
        assert int(local) == 0 and int(stack) == 0, f"{kernel} {config} [{variant}] {target} spills ({stack}/{local} B)"
        assert int(shared) <= SHARED_LIMIT[cc] == int(limit), f"{kernel} {config} {target} needs {shared} B of shared"
        assert 0 < int(regs) <= 255 and ok == "yes"
        dtypes[kernel, target].add(config.split()[0])
    for kernel in KERNELS:
        for cc in TARGETS:
            assert dtypes[kernel, f"sm_{cc}"] == {"fp16", "bf16", "fp32"}, (kernel, cc)


def test_sm89_reuses_the_ptx_of_sm86():
    """The report compiles sm_89 with ptxas only, from sm_86's PTX: Triton generates the same PTX for both."""
    out = subprocess.run([sys.executable, "-m", "glm_kernels.tools.compile_report", "--verify-front-end"], env=ENV,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "identical" in out.stdout
