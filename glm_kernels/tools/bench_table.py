"""Benchmark results as data: the files `make bench` writes, their plot, and the README's tables.

    glm-kernels bench-table --results benchmarks/results/cpu-amd-epyc-2cores.json [--suite ops]
    glm-kernels bench-table --update README.md [--results FILE] [--suite ops]  # re-render the marked tables
    glm-kernels bench-table --check README.md     # exit 1 when a marked table differs from its results file
    glm-kernels bench-table --results FILE --plot speedup.png

`pytest benchmarks --benchmark-only --bench-results DIR` (what `make bench` runs; `benchmarks/conftest.py`)
merges the run into `DIR/<device>.json`, one file per machine named by its device (a case measured again
replaces its row, the others stay), and writes the same rows as `DIR/<device>.csv` and a plot
`DIR/<device>.png`, each atomically. The JSON:

    {"schema": 1,
     "machine": {"device": "cpu", "device_name": "AMD EPYC", "cpu_count": 2},
     "runs": {"<run id>": {"started", "finished", "load_start", "load_end" (1/5/15-minute load averages),
                           "uptime", "torch", "triton", "python", "platform", "torch_threads", "command",
                           "note"}},
     "cases": [{"case", "suite" (benchmark file without test_), "dtype", "device", "device_name", "torch",
                "triton", "timing" (pytest-benchmark or triton.testing.do_bench), "glm_kernels_ms",
                "reference_ms" (medians), "speedup" (reference / glm_kernels, same run), "<impl>_min_ms",
                "<impl>_rounds", where measured "<impl>_peak_mib", "memory_ratio" (reference /
                glm_kernels), "<impl>_model_mib" (memory of the loaded weights), "<impl>_loss", "floor_ms",
                "bandwidth_gbs", "products_ms" (quantized decoding: the step's products alone), "floor_share" /
                "products_share" (floor / step and floor / products, paired round by round); serving:
                "streams", "<impl>_tokens_per_s", "<impl>_tpot_p50_ms" / "_p99_ms" (time per output token), "<impl>_latency_p50_ms" / "_p99_ms"; "<impl>_load" (1-minute load
                average when it was timed); "run" (its run id)}]}

The README holds each table between `<!-- bench:SUITE FILE -->` and `<!-- /bench:SUITE -->`: the cases of
that suite rendered from FILE (relative to the README). `tests/test_benchmarks_meta.py` checks that every
marked table equals what this renders from the committed results.
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from ..fileio import atomic_write

SCHEMA = 1
BUSY = 1.25  # a CPU case timed at a load average above this many times the cores is marked noisy
IMPLS = ("glm_kernels", "reference")
# extra_info measured per implementation; other keys are per case
PER_IMPL = ("peak_mib", "model_mib", "loss", "load", "tokens_per_s", "tpot_p50_ms", "tpot_p99_ms", "latency_p50_ms",
            "latency_p99_ms")
COLUMNS = ("case", "suite", "dtype", "device", "device_name", "torch", "triton", "timing",
           "glm_kernels_ms", "reference_ms", "speedup", "glm_kernels_min_ms", "reference_min_ms",
           "glm_kernels_rounds", "reference_rounds", "glm_kernels_peak_mib", "reference_peak_mib", "memory_ratio",
           "glm_kernels_model_mib", "reference_model_mib", "glm_kernels_loss", "reference_loss", "floor_ms",
           "bandwidth_gbs", "products_ms", "floor_share", "products_share", "glm_kernels_load", "reference_load",
           "run")
MARKER = re.compile(r"(?P<open><!-- bench:(?P<suite>\w+) (?P<path>\S+) -->\n)(?P<body>.*?)"
                    r"(?P<close><!-- /bench:(?P=suite) -->)", re.S)


# ----------------------------------------------------------------------------- results from a run


def run_info(started: datetime.datetime, load_start, note: str = "", command: str = "") -> dict:
    """What the run's rows share: when, how loaded the machine was, the software."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        uptime = None
    return {"started": started.isoformat(timespec="seconds"),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_start": [round(x, 2) for x in load_start], "load_end": [round(x, 2) for x in os.getloadavg()],
            "uptime": uptime, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(), "command": command, "note": note}


def cases_from_benchmarks(benchmarks, run_id: str, run: dict) -> list[dict]:
    """One row per case (pytest-benchmark group) from the fixture records, as `measure` filled them."""
    cases = {}
    for bench in benchmarks:
        info = dict(bench.extra_info)
        impl = info.pop("impl", None)
        if impl not in IMPLS or not bench.stats:
            continue
        case = cases.setdefault(bench.group, {
            "case": bench.group, "suite": Path(bench.fullname.split("::")[0]).stem.removeprefix("test_"),
            "torch": run["torch"], "triton": run["triton"], "run": run_id})
        stats = bench.stats
        case.update({f"{impl}_ms": _round(stats.median * 1e3), f"{impl}_min_ms": _round(stats.min * 1e3),
                     f"{impl}_rounds": stats.rounds})
        for key, value in info.items():
            case[f"{impl}_{key}" if key in PER_IMPL else key] = value
    for case in cases.values():
        case["speedup"] = _ratio(case, "ms")
        if _ratio(case, "peak_mib") is not None:
            case["memory_ratio"] = _ratio(case, "peak_mib")
    return [_ordered(case) for case in cases.values()]


def _round(x):
    """Times and ratios to 6 significant digits (they vary by far more; the files stay readable)."""
    return float(f"{x:.6g}")


def _ratio(case, key):
    ours, ref = case.get(f"glm_kernels_{key}"), case.get(f"reference_{key}")
    return _round(ref / ours) if ours and ref is not None else None


def _ordered(case: dict) -> dict:
    return {**{k: case[k] for k in COLUMNS if k in case}, **{k: case[k] for k in sorted(case) if k not in COLUMNS}}


def machine_of(cases: list[dict]) -> dict:
    device = "cuda" if any(c["device"] == "cuda" for c in cases) else "cpu"
    machine = {"device": device, "device_name": next(c["device_name"] for c in cases if c["device"] == device)}
    if device == "cpu":
        machine["cpu_count"] = os.cpu_count()
    return machine


def results_stem(machine: dict) -> str:
    """The file name of a machine's results: its device, e.g. `cpu-amd-epyc-2cores`, `cuda-nvidia-a100-...`."""
    slug = re.sub(r"[^a-z0-9]+", "-", f"{machine['device']} {machine['device_name']}".lower()).strip("-")
    return slug + (f"-{machine['cpu_count']}cores" if "cpu_count" in machine else "")


def merge(old: dict | None, new: dict) -> dict:
    """`new` over `old` (the same machine's file): a case measured again replaces its row in place."""
    cases = {c["case"]: c for c in (old or {}).get("cases", [])}
    cases.update((c["case"], c) for c in new["cases"])
    runs = {**(old or {}).get("runs", {}), **new["runs"]}
    used = {c["run"] for c in cases.values()}
    return {"schema": SCHEMA, "machine": new["machine"], "runs": {k: v for k, v in runs.items() if k in used},
            "cases": list(cases.values())}


def _write_csv(cases: list[dict], path: Path) -> None:
    fields = list(dict.fromkeys(k for case in cases for k in _ordered(case)))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(cases)


def save(cases: list[dict], run_id: str, run: dict, directory) -> list[Path]:
    """Merge a run's complete cases (both implementations timed) into the machine's JSON; write CSV and PNG."""
    cases = [c for c in cases if c.get("speedup") is not None]
    if not cases:
        return []
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    machine = machine_of(cases)
    stem = directory / results_stem(machine)
    json_path, csv_path, png_path = (stem.with_suffix(s) for s in (".json", ".csv", ".png"))
    old = load(json_path) if json_path.exists() else None
    data = merge(old, {"machine": machine, "runs": {run_id: run}, "cases": cases})
    atomic_write(json_path, lambda p: p.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8"))
    atomic_write(csv_path, lambda p: _write_csv(data["cases"], p))
    atomic_write(png_path, lambda p: plot(data, p))
    return [json_path, csv_path, png_path]


def load(path) -> dict:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: results schema {data.get('schema')!r}, this tool reads {SCHEMA}")
    return data


# ----------------------------------------------------------------------------- tables and plot


def _ms(x):
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 1000 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _num(x, fmt):
    return "-" if x is None else format(x, fmt)


def render_table(data: dict, suite: str, source: str | None = None) -> str:
    """The markdown table of one suite's cases, with a line naming the machine, run(s) and load."""
    cases = [c for c in data["cases"] if c["suite"] == suite]
    if not cases:
        raise ValueError(f"no {suite!r} cases in the results{f' {source}' if source else ''}")
    has = lambda *keys: any(c.get(k) is not None for c in cases for k in keys)  # noqa: E731
    busy = _busy(data["machine"])
    cols = [("case", lambda c: c["case"] + " †" * busy(c)), ("dtype", lambda c: c["dtype"]),
            ("glm_kernels ms", lambda c: _ms(c.get("glm_kernels_ms"))),
            ("reference ms", lambda c: _ms(c.get("reference_ms"))),
            ("speedup", lambda c: _num(c.get("speedup"), ".2f") + "x" * (c.get("speedup") is not None))]
    if has("glm_kernels_peak_mib", "reference_peak_mib"):
        cols += [("glm_kernels peak MiB", lambda c: _num(c.get("glm_kernels_peak_mib"), ".0f")),
                 ("reference peak MiB", lambda c: _num(c.get("reference_peak_mib"), ".0f")),
                 ("memory ratio", lambda c: _num(c.get("memory_ratio"), ".2f") + "x" * (c.get("memory_ratio")
                                                                                       is not None))]
    if has("glm_kernels_model_mib", "reference_model_mib"):
        cols += [("glm_kernels weights MiB", lambda c: _num(c.get("glm_kernels_model_mib"), ".0f")),
                 ("reference weights MiB", lambda c: _num(c.get("reference_model_mib"), ".0f"))]
    if has("glm_kernels_loss", "reference_loss"):
        cols += [("glm_kernels loss", lambda c: _num(c.get("glm_kernels_loss"), ".4f")),
                 ("reference loss", lambda c: _num(c.get("reference_loss"), ".4f"))]
    if has("glm_kernels_tokens_per_s", "reference_tokens_per_s"):  # serving: throughput and latency per request
        for impl in IMPLS:
            cols += [(f"{impl} tokens/s", lambda c, i=impl: _num(c.get(f"{i}_tokens_per_s"), ".1f")),
                     (f"{impl} ms/token p50 / p99", lambda c, i=impl: _pair(c, i, "tpot")),
                     (f"{impl} latency ms p50 / p99", lambda c, i=impl: _pair(c, i, "latency"))]
    if has("floor_ms"):
        cols += [("weight-read floor ms", lambda c: _ms(c.get("floor_ms"))),
                 ("glm_kernels at % of floor", lambda c: _num(_floor_share(c), ".0%")),
                 ("read bandwidth GB/s", lambda c: _num(c.get("bandwidth_gbs"), ".1f"))]
    if has("products_ms"):  # quantized decoding: the step's products alone, against the same floor
        cols += [("products alone ms", lambda c: _ms(c.get("products_ms"))),
                 ("products at % of floor", lambda c: _num(_products_share(c), ".0%"))]
    lines = ["| " + " | ".join(name for name, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(c) for _, cell in cols) + " |" for c in cases]
    lines.append("")
    if any(busy(c) for c in cases):
        lines.append(f"† timed while the 1-minute load average was above {BUSY * data['machine']['cpu_count']:g} "
                     f"(other jobs shared the {data['machine']['cpu_count']} cores): noisy.")
    for run_id in dict.fromkeys(c["run"] for c in cases):
        lines.append(_caption(data, run_id, {c["timing"] for c in cases if c["run"] == run_id}))
    if source:
        lines.append(f"Generated by `glm-kernels bench-table` from `{source}`.")
    return "\n".join(lines)


def _pair(case, impl, metric):
    p50, p99 = case.get(f"{impl}_{metric}_p50_ms"), case.get(f"{impl}_{metric}_p99_ms")
    return "-" if p50 is None else f"{_ms(p50)} / {_ms(p99)}"


def _floor_share(case):
    """floor / glm_kernels time: 100% means reading the weights is all the step costs. Paired round by round when
    the case measured it so (`floor_share`), else the two medians."""
    return case.get("floor_share") or _share(case.get("floor_ms"), case.get("glm_kernels_ms"))


def _products_share(case):
    """floor / the step's products alone, paired round by round when measured so (`products_share`)."""
    return case.get("products_share") or _share(case.get("floor_ms"), case.get("products_ms"))


def _share(floor, ms):
    return floor / ms if floor and ms else None


def _busy(machine):
    """Whether a case was timed on an oversubscribed CPU (load above BUSY x the cores; the run itself is ~1x)."""
    limit = BUSY * machine["cpu_count"] if "cpu_count" in machine else float("inf")
    return lambda c: max(c.get("glm_kernels_load", 0), c.get("reference_load", 0)) > limit


def _caption(data, run_id, timings) -> str:
    machine, run = data["machine"], data["runs"][run_id]
    where = machine["device_name"] + (f", {machine['cpu_count']} cores" if "cpu_count" in machine else "")
    load = (f"; load average {run['load_start'][0]:.2f} at the start, {run['load_end'][0]:.2f} at the end"
            if run.get("load_start") and run.get("load_end") else "")
    note = f" Note: {run['note'].rstrip('.')}." if run.get("note") else ""
    return (f"Medians, both columns from the same run ({', '.join(sorted(timings))}): {machine['device']} "
            f"{where}, torch {run['torch']}, triton {run['triton']}, {run['started'][:16].replace('T', ' ')} "
            f"UTC{load}.{note}")


def plot(data: dict, path) -> None:
    """Speedup per case, and peak memory of both implementations where recorded, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in data["cases"] if c.get("speedup") is not None]
    mem = [c for c in cases if c.get("memory_ratio") is not None]
    fig, axes = plt.subplots(1 + bool(mem), 1, figsize=(9, 1.2 + 0.22 * (len(cases) + 2 * len(mem))),
                             height_ratios=[len(cases) + 1] + [2 * len(mem) + 1] * bool(mem), squeeze=False)
    ax = axes[0][0]
    y = range(len(cases))
    ax.barh(y, [c["speedup"] for c in cases], color=["tab:green" if c["speedup"] >= 1 else "tab:red" for c in cases])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(list(y), [f"{c['suite']}: {c['case']}" for c in cases], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup: reference median / glm_kernels median (same run; > 1: glm_kernels faster)")
    if mem:
        ax = axes[1][0]
        y = range(len(mem))
        ax.barh([i - 0.2 for i in y], [c["glm_kernels_peak_mib"] for c in mem], height=0.4, label="glm_kernels")
        ax.barh([i + 0.2 for i in y], [c["reference_peak_mib"] for c in mem], height=0.4, label="reference")
        ax.set_yticks(list(y), [f"{c['suite']}: {c['case']}" for c in mem], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("peak memory above the inputs, MiB")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    machine = data["machine"]
    fig.suptitle(f"glm_kernels vs reference: {machine['device']} {machine['device_name']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- README sections


def update_text(text: str, base: Path, results: str | None = None, suite: str | None = None) -> str:
    """`text` with every marked table (or only `suite`'s) re-rendered from the file its marker names.

    `results` (a path relative to `base`) replaces the file named in the markers it updates."""
    def render(m):
        if suite and m["suite"] != suite:
            return m[0]
        source = results or m["path"]
        table = render_table(load(base / source), m["suite"], source)
        return f"<!-- bench:{m['suite']} {source} -->\n{table}\n{m['close']}"

    return MARKER.sub(render, text)


def _relative(path: str, base: Path) -> str:
    return os.path.relpath(Path(path).resolve(), base.resolve())


def add_parser(sub) -> None:
    table = sub.add_parser("bench-table", help="benchmark results (benchmarks/results/*.json) as markdown "
                                               "tables; update or check the README's tables")
    table.add_argument("--results", default=None, help="results JSON (default with --update/--check: the file "
                                                       "each README marker names)")
    table.add_argument("--suite", default=None, help="only this benchmark file's cases (ops, decode, ...)")
    table.add_argument("--markdown", default=None, help="also write the table(s) to this file")
    table.add_argument("--plot", default=None, help="write the speedup/memory plot of --results to this PNG")
    mode = table.add_mutually_exclusive_group()
    mode.add_argument("--update", metavar="README", default=None, help="re-render the marked tables in place")
    mode.add_argument("--check", metavar="README", default=None, help="exit 1 if a marked table is stale")
    table.set_defaults(func=main)


def main(args) -> int:
    readme = args.update or args.check
    if readme:
        base = Path(readme).parent
        text = Path(readme).read_text(encoding="utf-8")
        if not MARKER.search(text):
            print(f"{readme}: no <!-- bench:SUITE FILE --> markers", file=sys.stderr)
            return 1
        results = _relative(args.results, base) if args.results else None
        new = update_text(text, base, results, args.suite)
        if args.check:
            stale = [m["suite"] for m, n in zip(MARKER.finditer(text), MARKER.finditer(new)) if m[0] != n[0]]
            print(f"{readme}: stale tables: {', '.join(stale)}" if stale else f"{readme}: tables up to date")
            return 1 if stale else 0
        if new != text:
            atomic_write(Path(readme), lambda p: p.write_text(new, encoding="utf-8"))
        print(f"{readme}: {'updated' if new != text else 'already up to date'}")
        return 0
    if not args.results:
        print("bench-table: --results FILE is required without --update/--check", file=sys.stderr)
        return 2
    data = load(args.results)
    if args.plot:
        atomic_write(Path(args.plot), lambda p: plot(data, p))
    suites = [args.suite] if args.suite else list(dict.fromkeys(c["suite"] for c in data["cases"]))
    text = "\n\n".join((f"### {s}\n\n" if len(suites) > 1 else "") + render_table(data, s, args.results)
                       for s in suites)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n", encoding="utf-8")
    return 0
