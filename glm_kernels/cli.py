"""The `glm-kernels` command line."""
from __future__ import annotations

import argparse
import sys


def _cmd_selfcheck(args) -> int:
    import torch

    from .selfcheck import run_selfcheck

    dtype = getattr(torch, args.dtype)
    result = run_selfcheck(seed=args.seed, new_tokens=args.new_tokens, backend=args.backend, dtype=dtype)
    print(f"backend: {result['backend']}  dtype: {result['dtype']}")
    print(f"logits max |model - reference|: {result['logits_max_abs_diff']:.3e} "
          f"(scale max|ref| = {result['logits_scale']:.3g})")
    print(f"greedy tokens: {result['tokens']}")
    print(f"greedy tokens identical to the reference: {result['tokens_match_reference']}")
    return 0 if result["tokens_match_reference"] else 1


def _cmd_load_memory(args) -> int:
    from .tools.load_memory import main as load_memory_main

    return load_memory_main(args)


def _cmd_compile_report(args) -> int:
    from .tools.compile_report import main as compile_main

    return compile_main(args)


def _cmd_bytes_table(args) -> int:
    from .tools.bytes_table import main as bytes_main

    return bytes_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from .ptuning.demo import add_parser as add_demo_parser

    add_demo_parser(sub)

    check = sub.add_parser("selfcheck", help="tiny random model with a P-Tuning prefix, checked against the "
                                             "reference")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--new-tokens", type=int, default=16)
    check.add_argument("--backend", choices=["torch", "triton"], default=None,
                       help="kernel backend (default: by device, or $GLM_KERNELS_BACKEND)")
    check.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    check.set_defaults(func=_cmd_selfcheck)

    mem = sub.add_parser("load-memory", help="peak RSS of loading a synthetic sharded checkpoint")
    mem.add_argument("--gb", type=float, default=1.0, help="checkpoint size in GB (default 1)")
    mem.add_argument("--shards", type=int, default=4)
    mem.add_argument("--format", choices=["bin", "safetensors"], default="bin")
    mem.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    mem.set_defaults(func=_cmd_load_memory)

    comp = sub.add_parser("compile-report", help="compile every Triton kernel config for sm_75, sm_80, sm_86, sm_89 "
                                                 "and sm_90 (fp16, bf16, fp32), check spills and shared memory")
    comp.add_argument("--kernel", default=None, help="only this kernel module (rope, attention, ...)")
    comp.add_argument("--target", default=None, help="comma-separated compute capabilities (default: all five)")
    comp.add_argument("--markdown", default=None, help="also write the table to this file")
    comp.set_defaults(func=_cmd_compile_report)

    table = sub.add_parser("bytes-table", help="bytes each fused kernel moves at the 6B shapes vs the unfused ops")
    table.add_argument("--markdown", default=None, help="also write the table to this file")
    table.set_defaults(func=_cmd_bytes_table)

    from .tools.chat import add_parser as add_chat_parser

    add_chat_parser(sub)
    from .serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    from .tools.bench_table import add_parser as add_bench_table_parser

    add_bench_table_parser(sub)
    # Listed for --help only: `main` hands everything after "ptune" to THUDM's argument parser unchanged.
    sub.add_parser("ptune", add_help=False,
                   help="P-Tuning v2 train/evaluate/predict with THUDM's ptuning/main.py arguments "
                        "(glm-kernels ptune --help)")
    sub.add_parser("quant-report", add_help=False,
                   help="INT8/INT4 quantization error against the unquantized model: logits and greedy answers "
                        "(glm-kernels quant-report --help)")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "ptune":
        from .ptuning.main import main as ptune_main

        return ptune_main(argv[1:])
    if argv and argv[0] == "quant-report":  # its own parser (glm_kernels/quant/report.py)
        from .quant.report import main as report_main

        return report_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
