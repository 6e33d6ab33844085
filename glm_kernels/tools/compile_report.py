"""Compile every Triton kernel configuration ahead of time for sm_80 and sm_90, without a GPU.

    glm-kernels compile-report [--kernel attention] [--markdown docs/compile_report.md]

For each `CompileSpec` that the kernel modules list (every launch
configuration their launchers can choose, fp16 and bf16), builds a cubin with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` and reads
registers, stack, local memory (spills) and shared memory with the
`cuobjdump` that ships with Triton. Exits 1 if any configuration spills or
needs more shared memory than the target allows.

Must run without `TRITON_INTERPRET` (interpreted kernels cannot be compiled);
the CLI re-executes itself without it when needed.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Largest dynamic shared memory one block may use, in bytes (CUDA occupancy tables).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TARGETS = (80, 90)


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    found = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        found[key.lower()] = int(m.group(1)) if m else 0
    return found


def compile_spec(spec, cc: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    res = _resources(compiled.asm["cubin"])
    shared = max(int(compiled.metadata.shared), res["shared"])
    return {"kernel": spec.name, "config": spec.label, "target": f"sm_{cc}", "registers": res["reg"],
            "stack": res["stack"], "local": res["local"], "shared": shared,
            "ok": res["local"] == 0 and res["stack"] == 0 and shared <= SHARED_LIMIT[cc]}


def _compile_job(job) -> dict:
    import importlib

    module_name, index, cc = job
    return compile_spec(importlib.import_module(module_name).compile_specs()[index], cc)


def collect(kernel: str | None = None, workers: int | None = None) -> list[dict]:
    """Compile every spec (of one kernel module, or all) for every target, in parallel processes."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    from glm_kernels.kernels import load_all

    jobs = []
    for module in load_all():
        if kernel and module.__name__.rsplit(".", 1)[-1] != kernel:
            continue
        jobs += [(module.__name__, i, cc) for i in range(len(module.compile_specs())) for cc in TARGETS]
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(_compile_job, jobs, chunksize=4), total=len(jobs), desc="compile",
                         file=sys.stderr))


def markdown(rows: list[dict]) -> str:
    lines = ["| kernel | config | target | registers | stack (B) | spills (local B) | shared memory (B) | ok |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['config']} | {r['target']} | {r['registers']} | {r['stack']} | "
                     f"{r['local']} | {r['shared']} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


def main(args) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = [sys.executable, "-m", "glm_kernels.cli", "compile-report"] + \
            (["--kernel", args.kernel] if args.kernel else []) + (["--markdown", args.markdown] if args.markdown
                                                                   else [])
        return subprocess.run(argv, env=env).returncode
    rows = collect(args.kernel)
    table = markdown(rows)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    bad = [r for r in rows if not r["ok"]]
    if bad:
        print(f"{len(bad)} configuration(s) spill or exceed shared memory", file=sys.stderr)
    return 1 if bad or not rows else 0
