"""Benchmark setup: times are reported as ratios against the reference measured in the same run.

Each benchmark sets `benchmark.group` to the case and `benchmark.extra_info["impl"]`
to "glm_kernels" or "reference"; after the run a table of medians and
reference / glm_kernels ratios (> 1 means glm_kernels is faster) is printed;
cases that record `extra_info["peak_mib"]` also get a table of peak memory
(reference / glm_kernels, > 1 means glm_kernels needs less), and those that
record `extra_info["loss"]` a table of both losses.
"""
import torch

torch.set_num_threads(max(1, torch.get_num_threads()))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        impl = bench.extra_info.get("impl")
        if impl and bench.stats:
            groups.setdefault(bench.group, {})[impl] = bench.stats.median
    rows = [(g, v.get("glm_kernels"), v.get("reference")) for g, v in sorted(groups.items())]
    if not rows:
        return
    tr = terminalreporter
    tr.write_sep("-", "glm_kernels vs reference (median, same run)")
    tr.write_line(f"{'case':<48} {'glm_kernels ms':>15} {'reference ms':>13} {'speedup':>8}")
    for group, ours, ref in rows:
        ratio = f"{ref / ours:.2f}x" if ours and ref else "-"
        fmt = lambda t: f"{t * 1e3:.3f}" if t else "-"  # noqa: E731
        tr.write_line(f"{group:<48} {fmt(ours):>15} {fmt(ref):>13} {ratio:>8}")
    floors = {}
    for bench in session.benchmarks:
        if "floor_ms" in bench.extra_info:
            floors[bench.group.rsplit(" ", 1)[-1]] = (bench.extra_info["floor_ms"], bench.extra_info["bandwidth_gbs"])
    peaks = {}
    for bench in session.benchmarks:
        impl = bench.extra_info.get("impl")
        if impl and "peak_mib" in bench.extra_info:
            peaks.setdefault(bench.group, {})[impl] = bench.extra_info["peak_mib"]
    if peaks:
        tr.write_sep("-", "peak memory above the inputs (MiB), glm_kernels vs reference")
        tr.write_line(f"{'case':<48} {'glm_kernels MiB':>15} {'reference MiB':>13} {'ratio':>8}")
        for group, v in sorted(peaks.items()):
            ours, ref = v.get("glm_kernels"), v.get("reference")
            ratio = f"{ref / ours:.1f}x" if ours and ref else "-"
            fmt = lambda m: f"{m:.0f}" if m is not None else "-"  # noqa: E731
            tr.write_line(f"{group:<48} {fmt(ours):>15} {fmt(ref):>13} {ratio:>8}")
    losses = {}
    for bench in session.benchmarks:
        impl = bench.extra_info.get("impl")
        if impl and "loss" in bench.extra_info:
            losses.setdefault(bench.group, {})[impl] = bench.extra_info["loss"]
    if losses:
        tr.write_sep("-", "loss of the first step (same weights and batch), glm_kernels vs reference")
        for group, v in sorted(losses.items()):
            tr.write_line(f"{group:<48} {v.get('glm_kernels', float('nan')):>15.6f} "
                          f"{v.get('reference', float('nan')):>13.6f}")
    for dtype, (floor, bandwidth) in sorted(floors.items()):
        tr.write_line(f"decode weight-bandwidth floor {dtype}: {floor:.1f} ms/token "
                      f"(weights read per token / measured read bandwidth {bandwidth:.1f} GB/s)")
