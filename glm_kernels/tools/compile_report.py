"""Compile every Triton kernel configuration ahead of time for sm_75, sm_80, sm_86, sm_89 and sm_90, without a GPU.

    glm-kernels compile-report [--kernel attention] [--markdown docs/compile_report.md]
    python -m glm_kernels.tools.compile_report [--kernel attention] [--target 75] [--markdown FILE]

For each target GPU (`backend.TARGETS`), each kernel module's
`compile_specs(target)` lists every launch configuration its launchers choose
on that GPU, fp16, bf16 and fp32, each with the argument specialisations that
occur at run time (recorded from the launchers and bound by the JIT's own
binder: 16-divisible integers and pointers, integers equal to 1). Every one is
compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`
and the cubin's registers, stack, local memory (spills) and shared memory are
read with the `cuobjdump` that ships with Triton. Exits 1 if any
configuration spills or needs more shared memory than the target allows per
block (NVIDIA's limits: 64 KiB on sm_75, 163 KiB on sm_80, 99 KiB on sm_86 and
sm_89, 227 KiB on sm_90).

What compiles identically is compiled once: Triton 3.9's NVIDIA backend
generates the same PTX for sm_86 and sm_89 (its only difference between them
is fp8e4nv support, capability >= 89, which no kernel uses; the `.target`
line aside, `front_end_shared` checks it), and the launchers choose the same
configurations on both (same 99 KiB, both with tensor cores). So sm_89 reuses
the PTX of sm_86 and only runs `ptxas` for sm_89.

Must run without `TRITON_INTERPRET` (interpreted kernels cannot be compiled);
the CLI re-executes itself without it when needed.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from glm_kernels.backend import TARGETS
from glm_kernels.fileio import atomic_write_text

SHARED_LIMIT = {cc: info.shared_memory for cc, info in TARGETS.items()}
# target -> the target whose PTX it reuses (ptxas only), when the launchers' configurations are the same on both
SHARED_FRONT_END = {89: 86}


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


def _options(spec) -> dict:
    return {"num_warps": spec.num_warps, "num_stages": spec.num_stages}


def compile_variant(spec, variant, cc: int):
    """triton.compile of one specialisation for sm_`cc`: the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(spec.kernel, signature=variant.signature, constexprs=variant.constexprs, attrs=variant.attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=_options(spec))


def retarget(spec, compiled, cc: int) -> bytes:
    """The cubin for sm_`cc` from the PTX of another target of the same code generation (ptxas only)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", cc, 32))
    ptx = re.sub(r"\.target sm_\d+\b", f".target sm_{cc}", compiled.asm["ptx"])
    return backend.make_cubin(ptx, {}, backend.parse_options(_options(spec)), cc)


def _row(spec, variant, cc, cubin, metadata_shared) -> dict:
    res = _resources(cubin)
    shared = max(int(metadata_shared), res["shared"])
    return {"kernel": spec.name, "config": spec.label, "variant": variant.label, "target": f"sm_{cc}",
            "registers": res["reg"], "stack": res["stack"], "local": res["local"], "shared": shared,
            "ok": res["local"] == 0 and res["stack"] == 0 and shared <= SHARED_LIMIT[cc]}


_SPECS: dict = {}


def specs_for(module_name: str, cc: int) -> list:
    """The module's compile specs on sm_`cc` (cached per process)."""
    import importlib

    if (module_name, cc) not in _SPECS:
        _SPECS[(module_name, cc)] = importlib.import_module(module_name).compile_specs(TARGETS[cc])
    return _SPECS[(module_name, cc)]


def _signature_of(specs) -> list:
    return [(s.name, s.label, s.num_warps, s.num_stages, [v.label for v in s.variants()]) for s in specs]


def _compile_job(job) -> list[dict]:
    module_name, index, vindex, ccs = job
    spec = specs_for(module_name, ccs[0])[index]
    variant = spec.variants()[vindex]
    compiled = compile_variant(spec, variant, ccs[0])
    rows = [_row(spec, variant, ccs[0], compiled.asm["cubin"], compiled.metadata.shared)]
    for cc in ccs[1:]:
        rows.append(_row(spec, variant, cc, retarget(spec, compiled, cc), compiled.metadata.shared))
    return rows


def jobs(kernel: str | None = None, targets=tuple(TARGETS)) -> list[tuple]:
    """(module, spec index, variant index, targets) per compile; targets that share a front end share a job."""
    from glm_kernels.kernels import load_all

    out = []
    for module in load_all():
        name = module.__name__
        if kernel and name.rsplit(".", 1)[-1] != kernel:
            continue
        groups = defaultdict(list)
        for cc in targets:
            base = SHARED_FRONT_END.get(cc)
            if base in targets and _signature_of(specs_for(name, cc)) == _signature_of(specs_for(name, base)):
                groups[base].append(cc)
            else:
                groups[cc].insert(0, cc)
        for ccs in groups.values():
            for i, spec in enumerate(specs_for(name, ccs[0])):
                out += [(name, i, j, tuple(ccs)) for j in range(len(spec.variants()))]
    return out


def collect(kernel: str | None = None, workers: int | None = None, targets=tuple(TARGETS)) -> list[dict]:
    """Compile every spec variant (of one kernel module, or all) for every target, in parallel processes."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    todo = jobs(kernel, targets)
    todo.sort(key=lambda j: ("attention" not in j[0], j[3][0] != 75))  # the slowest first
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = list(tqdm(pool.map(_compile_job, todo, chunksize=2), total=len(todo), desc="compile",
                            file=sys.stderr))
    rows = [r for rs in results for r in rs]
    order = {f"sm_{cc}": i for i, cc in enumerate(TARGETS)}
    rows.sort(key=lambda r: (r["kernel"], r["config"], r["variant"], order[r["target"]]))
    return rows


def front_end_shared(spec, variant, base: int = 86, cc: int = 89) -> bool:
    """Whether Triton's PTX for sm_`cc` equals the PTX for sm_`base` but for the `.target` line."""
    def body(c):
        return re.sub(r"\.target sm_\d+\b", "", compile_variant(spec, variant, c).asm["ptx"])

    return body(base) == body(cc)


def verify_front_end(base: int = 86, cc: int = 89) -> list[str]:
    """Compile the largest configuration of every kernel module (most warps; for attention the hd-128 dQ and dK/dV
    kernels) for sm_`base` and sm_`cc` with Triton; returns the ones whose PTX differs."""
    from glm_kernels.kernels import load_all

    bad = []
    for module in load_all():
        specs = specs_for(module.__name__, base)
        picks = [s for s in specs if "hd=128" in s.label and s.name in ("_attn_bwd_dq", "_attn_bwd_dkdv")][:2] or \
            [max(specs, key=lambda s: (s.num_warps, s.label))]
        for spec in picks:
            same = front_end_shared(spec, spec.variants()[0], base, cc)
            if not same:
                bad.append(f"{spec.name} {spec.label}")
            print(f"{spec.name} {spec.label}: sm_{base} and sm_{cc} PTX {'identical' if same else 'differ'}")
    return bad


def markdown(rows: list[dict]) -> str:
    lines = ["| kernel | config | specialisation | target | registers | stack (B) | spills (local B) | "
             "shared memory (B) | limit (B) | ok |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cc = int(r["target"][3:])
        lines.append(f"| {r['kernel']} | {r['config']} | {r['variant']} | {r['target']} | {r['registers']} | "
                     f"{r['stack']} | {r['local']} | {r['shared']} | {SHARED_LIMIT[cc]} | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


DTYPE_ORDER = {"fp16": 0, "bf16": 1, "fp32": 2}


def _grouped(rows: list[dict], by_kernel: bool) -> str:
    """One line per (kernel,) target and dtype: configurations, compiles, max registers, spills, max shared vs limit."""
    groups = defaultdict(list)
    for r in rows:
        groups[((r["kernel"],) if by_kernel else ()) + (int(r["target"][3:]), r["config"].split()[0])].append(r)
    head = ["kernel"] if by_kernel else []
    lines = ["| " + " | ".join(head + ["target", "dtype", "configurations", "compiles", "max registers", "spills (B)",
                                       "max shared (B)", "limit (B)"]) + " |", "|---" * (len(head) + 8) + "|"]
    for key, rs in sorted(groups.items(), key=lambda kv: kv[0][:-1] + (DTYPE_ORDER.get(kv[0][-1], 3),)):
        *kernel, cc, dtype = key
        top = max(rs, key=lambda r: r["shared"])
        shared = f"{top['shared']}" if by_kernel else f"{top['shared']} `{top['kernel']}`"
        lines.append("| " + " | ".join([f"`{k}`" for k in kernel] + [
            f"sm_{cc}", dtype, str(len({(r['kernel'], r['config']) for r in rs})), str(len(rs)),
            str(max(r["registers"] for r in rs)), str(sum(r["stack"] + r["local"] for r in rs)), shared,
            str(SHARED_LIMIT[cc])]) + " |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Per kernel, target and dtype: configurations, compiles, max registers, spills, max shared vs limit."""
    return _grouped(rows, True)


def target_summary(rows: list[dict]) -> str:
    """Per target and dtype (every kernel): the same, with the kernel that needs the most shared memory."""
    return _grouped(rows, False)


def main(args) -> int:
    targets = tuple(int(t) for t in (getattr(args, "target", None) or "").split(",") if t) or tuple(TARGETS)
    if getattr(args, "verify_front_end", False):
        return 1 if verify_front_end() else 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = [sys.executable, "-m", "glm_kernels.tools.compile_report"] + \
            (["--kernel", args.kernel] if args.kernel else []) + \
            (["--markdown", args.markdown] if args.markdown else []) + \
            (["--target", ",".join(map(str, targets))] if getattr(args, "target", None) else [])
        return subprocess.run(argv, env=env).returncode
    rows = collect(args.kernel, targets=targets)
    table = markdown(rows)
    print(target_summary(rows))
    if args.markdown:
        atomic_write_text(args.markdown, 
            "# Ahead-of-time compile report\n\nGenerated by `glm-kernels compile-report --markdown docs/compile_report.md`"
            " (see docs/kernels.md).\n\nBy target\n\n" + target_summary(rows) + "\n\nBy kernel\n\n" + summary(rows) +
            "\n\nEvery compile\n\n" + table + "\n")
    bad = [r for r in rows if not r["ok"]]
    for r in bad:
        print(f"FAIL {r['kernel']} {r['config']} [{r['variant']}] {r['target']}: stack {r['stack']} local "
              f"{r['local']} shared {r['shared']} > {SHARED_LIMIT[int(r['target'][3:])]}?", file=sys.stderr)
    if bad:
        print(f"{len(bad)} configuration(s) spill or exceed shared memory", file=sys.stderr)
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernel", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--target", default=None, help="comma-separated compute capabilities (default: all)")
    parser.add_argument("--verify-front-end", action="store_true",
                        help="check that Triton's PTX for sm_86 and sm_89 is the same (one kernel config each)")
    sys.exit(main(parser.parse_args()))
