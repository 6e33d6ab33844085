"""CPU cost of one weight-only product per path, over distinct weights larger than the caches.

    python -m glm_kernels.quant.measure [--gb 1.1] [--shape 16384x4096] [--rows 1] [--paths int8-bf16,...]

A decode step streams every weight from DRAM once, so each path is timed over
enough distinct weights (`--gb` of them in that path's own storage) that none
is still in the L3 cache when it is read again (docs/quantization.md; the
L3 of the machine these numbers come from is 32-260 MiB depending on how it
is counted). Reported per product: milliseconds and the weight bytes read per
second (that path's bytes: 4 per weight for fp32, 2 bf16, 1 int8, 0.5 int4).

This is a measurement tool, like `benchmarks/`: run it on a quiet machine. The
median and the best of `--repeats` sweeps are printed (on a shared machine the
best is the one other jobs disturbed least).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from .. import cpu_ext
from . import cpu_pack
from .layout import pack_int4

PATHS = {
    "fp32-linear": "fp32 x, fp32 weights: F.linear (the unquantized model)",
    "bf16-linear": "bf16 x, bf16 weights: F.linear (the unquantized model)",
    "int8-fp32-ext": "fp32 x, int8: the C++ extension's linear on THUDM's bytes (ops.quant_linear with glm_kernels._C)",
    "int4-fp32-ext": "fp32 x, int4: the C++ extension's linear on THUDM's bytes",
    "int8-bf16-ext": "bf16 x, int8: the C++ extension's linear (vdpbf16ps on an AVX512-BF16 CPU, else x in fp32)",
    "int4-bf16-ext": "bf16 x, int4: the C++ extension's linear (as above)",
    "int8-bf16-kernel": "bf16 x, int8: torch._weight_int8pack_mm on THUDM's bytes, unit scales, fp32 rescale "
                        "(ops.quant_linear)",
    "int4-bf16-kernel": "bf16 x, int4 repacked: aten._weight_int4pack_mm_for_cpu group 256, unit scales, fp32 "
                        "rescale (ops.quant_linear)",
    "int4-bf16-kernel-g128": "the same with group 128",
    "int8-bf16-dequant": "bf16 x, int8: dequantize blocks to bf16 + bf16 matmul",
    "int4-bf16-dequant": "bf16 x, int4 repacked: dequantize blocks to bf16 + bf16 matmul",
    "int8-fp32-dequant": "fp32 x, int8: dequantize blocks to fp32 + fp32 matmul (ops.quant_linear)",
    "int4-fp32-dequant": "fp32 x, int4 repacked: dequantize blocks + fp32 matmul (ops.quant_linear)",
    "int4-fp32-dequant-thudm": "fp32 x, int4 in THUDM's bytes: dequantize blocks + fp32 matmul",
    "int8-fp32-kernel": "fp32 x, int8: torch._weight_int8pack_mm in fp32 (PyTorch's scalar loop)",
    "int4-fp32-kernel": "fp32 x, int4: aten._weight_int4pack_mm_for_cpu in fp32 (scalar loop)",
}
BYTES_PER_WEIGHT = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}


def _storage(path: str) -> str:
    if path.startswith(("int8", "int4")):
        return path[:4]
    return path.split("-")[0]


def _make(path: str, out_features: int, in_features: int, count: int, gen: torch.Generator):
    """`count` distinct weights in the path's storage and a function running the product on one of them."""
    from ..ops.quant_linear import _product, dequantized_product

    storage = _storage(path)
    items = []
    for _ in range(count):
        if storage in ("fp32", "bf16"):
            w = torch.randn(out_features, in_features, generator=gen) * 0.02
            items.append(w.to(torch.float32 if storage == "fp32" else torch.bfloat16))
            continue
        # random q and scales (quantizing random floats would only be slower to set up: same bytes)
        bits = 8 if storage == "int8" else 4
        limit = 2 ** (bits - 1) - 1
        q = torch.randint(-limit, limit + 1, (out_features, in_features), generator=gen, dtype=torch.int8)
        q = q if bits == 8 else pack_int4(q)
        scale = (torch.rand(out_features, generator=gen) * 1e-3).to(torch.float16)
        if bits == 4 and not path.endswith(("thudm", "ext")):
            group = 128 if path.endswith("g128") else cpu_pack.group_size(in_features)
            sz = torch.zeros(in_features // group, out_features, 2, dtype=torch.bfloat16)
            sz[:, :, 0] = 1  # unit scales, as ops.quant_linear runs it (the fp16 scales are applied after)
            packed = cpu_pack.PackedInt4(cpu_pack.pack(q), sz, group)
            items.append((packed, scale))
        else:
            items.append((q, scale))
    bits = 4 if storage == "int4" else 8
    x_dtype = torch.bfloat16 if "bf16" in path else torch.float32

    def run(item, x):
        if path in ("fp32-linear", "bf16-linear"):
            return F.linear(x, item)
        weight, scale = item
        if path in ("int8-bf16-kernel", "int4-bf16-kernel", "int4-bf16-kernel-g128"):
            return _product(x, weight, scale, bits, None)  # the op's own kernel path (x has < 32 rows)
        if path.endswith("-ext"):
            return cpu_ext.extension().linear(x, weight, scale, bits, None)
        if path == "int8-fp32-kernel":
            return torch._weight_int8pack_mm(x, weight, scale.float())
        if path == "int4-fp32-kernel":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight.data, weight.group,
                                                              weight.scales_and_zeros.float())
        return dequantized_product(x, weight, scale, bits, None, x_dtype)

    return items, run, x_dtype


def measure(path: str, out_features: int, in_features: int, gb: float, rows: int, repeats: int = 3) -> dict:
    """Median over `repeats` sweeps of the per-product time of `path` over distinct weights totalling `gb` GB."""
    nbytes = out_features * in_features * BYTES_PER_WEIGHT[_storage(path)]
    count = max(2, int(gb * 1e9 / nbytes + 0.999))
    gen = torch.Generator().manual_seed(0)
    items, run, x_dtype = _make(path, out_features, in_features, count, gen)
    x = torch.randn(rows, in_features, generator=gen).to(x_dtype)
    for item in items[:2]:
        run(item, x)
    sweeps = []
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            run(item, x)
        sweeps.append((time.perf_counter() - start) / len(items))
    seconds, best = statistics.median(sweeps), min(sweeps)
    return {"path": path, "ms": seconds * 1e3, "best_ms": best * 1e3, "gb_s": nbytes / seconds / 1e9,
            "best_gb_s": nbytes / best / 1e9, "weights": count, "total_gb": count * nbytes / 1e9}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m glm_kernels.quant.measure", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.1, help="distinct weights per path, in GB of that path's storage")
    p.add_argument("--shape", default="16384x4096", help="out x in of each weight (ChatGLM-6B's dense_h_to_4h)")
    p.add_argument("--rows", type=int, default=1, help="rows of x (1: one decoded token)")
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated, from: " + ", ".join(PATHS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-extension", action="store_true",
                   help="hide glm_kernels._C (the dequantizing paths then use PyTorch's ops)")
    args = p.parse_args(argv)
    if args.no_extension:
        cpu_ext.extension = lambda: None
    out_features, in_features = (int(v) for v in args.shape.lower().split("x"))
    paths = [s for s in args.paths.split(",") if s]
    unknown = [s for s in paths if s not in PATHS]
    if unknown:
        p.error(f"unknown paths {unknown}; known: {', '.join(PATHS)}")
    if cpu_ext.extension() is None:
        skipped = [s for s in paths if s.endswith("-ext")]
        paths = [s for s in paths if not s.endswith("-ext")]
        if skipped:
            print(f"glm_kernels._C is not built: {', '.join(skipped)} skipped")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, weight {out_features}x{in_features}, x rows {args.rows}, "
          f"load average {load:.2f}")
    print("| path | what | ms per product (median / best) | weight GB/s (median / best) | distinct weights (GB) |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for path in paths:
            r = measure(path, out_features, in_features, args.gb, args.rows, args.repeats)
            print(f"| `{path}` | {PATHS[path]} | {r['ms']:.2f} / {r['best_ms']:.2f} | {r['gb_s']:.1f} / "
                  f"{r['best_gb_s']:.1f} | {r['weights']} ({r['total_gb']:.2f}) |", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average at the end {load:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
