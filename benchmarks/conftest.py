"""Benchmark setup: glm_kernels against the reference, measured in the same run, kept as data.

Every case times each implementation through `timing.measure` (do_bench on CUDA, pytest-benchmark on the
CPU), which records the impl, device, device name and dtype. After the run a table of medians and
reference / glm_kernels ratios (> 1 means glm_kernels is faster) is printed, with peak memory (reference /
glm_kernels, > 1 means glm_kernels needs less) and first-step losses where a case records them.

`--bench-results DIR` (`make bench`: benchmarks/results) also merges the run into DIR/<device>.json and .csv
and plots it to DIR/<device>.png (`glm_kernels.tools.bench_table`, which renders the README's tables from
those files); `--bench-note TEXT` is stored with the run (e.g. what else loaded the machine).
"""
import datetime
import os

import torch

from glm_kernels.tools import bench_table

torch.set_num_threads(max(1, torch.get_num_threads()))
_START = {}


def pytest_addoption(parser):
    group = parser.getgroup("glm_kernels benchmark results")
    group.addoption("--bench-results", default=None, metavar="DIR",
                    help="merge this run's cases into DIR/<device>.json/.csv and plot DIR/<device>.png")
    group.addoption("--bench-note", default="", help="free text stored with the run in the results file")


def pytest_sessionstart(session):
    _START.update(time=datetime.datetime.now(datetime.timezone.utc), load=os.getloadavg())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    run = bench_table.run_info(_START["time"], _START["load"], config.getoption("bench_note"),
                               "pytest " + " ".join(config.invocation_params.args))
    run_id = run["started"]
    cases = bench_table.cases_from_benchmarks(session.benchmarks, run_id, run)
    if not cases:
        return
    tr = terminalreporter
    tr.write_sep("-", "glm_kernels vs reference (median, same run)")
    for suite in dict.fromkeys(c["suite"] for c in cases):
        tr.write_line(bench_table.render_table({"machine": bench_table.machine_of(cases), "runs": {run_id: run},
                                                "cases": cases}, suite))
        tr.write_line("")
    directory = config.getoption("bench_results")
    if directory:
        written = bench_table.save(cases, run_id, run, directory)
        tr.write_line(f"results: {', '.join(map(str, written))}" if written else
                      "results: nothing written (no case has both implementations timed)")
