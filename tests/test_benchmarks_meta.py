"""The benchmarks' machinery, without timing anything: every case goes through `benchmarks/timing.py`, whose
CUDA branch times with `triton.testing.do_bench`; results files round-trip; the README's tables are what
`glm-kernels bench-table` renders from the committed results."""
import ast
import csv
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

from glm_kernels.cli import build_parser
from glm_kernels.tools import bench_table

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
_spec = importlib.util.spec_from_file_location("bench_timing", BENCH / "timing.py")
timing = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(timing)

CLOCKS = {"time", "timeit"}  # modules only timing.py may import
TIMING_NAMES = {"perf_counter", "perf_counter_ns", "monotonic", "process_time", "pedantic", "weave", "do_bench",
                "Event", "elapsed_time", "benchmark_weave"}


def _tree(path):
    return ast.parse(path.read_text(), str(path))


@pytest.mark.parametrize("path", sorted(p.name for p in BENCH.glob("*.py") if p.name != "timing.py"))
def test_nothing_but_timing_py_reads_a_clock(path):
    """No clock, no pytest-benchmark timing call and no CUDA event outside the helper (so nothing async)."""
    bad = []
    for node in ast.walk(_tree(BENCH / path)):
        if isinstance(node, ast.Import):
            bad += [a.name for a in node.names if a.name.split(".")[0] in CLOCKS]
        elif isinstance(node, ast.ImportFrom):
            bad += [f"from {node.module}" for _ in [0] if (node.module or "").split(".")[0] in CLOCKS]
            bad += [a.name for a in node.names if a.name in TIMING_NAMES]
        elif isinstance(node, ast.Attribute) and node.attr in TIMING_NAMES:
            bad.append(node.attr)
        elif isinstance(node, ast.Name) and node.id in TIMING_NAMES:
            bad.append(node.id)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "benchmark":
            bad.append("benchmark(...)")
    assert not bad, f"benchmarks/{path} times outside benchmarks/timing.py: {bad}"


def _functions(tree):
    return {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _calls(fn):
    return {n.func.id for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


@pytest.mark.parametrize("path", sorted(p.name for p in BENCH.glob("test_*.py")))
def test_every_benchmark_case_is_timed_by_measure(path):
    tree = _tree(BENCH / path)
    assert any(isinstance(n, ast.ImportFrom) and n.module == "timing" and any(a.name == "measure" for a in n.names)
               for n in tree.body), f"benchmarks/{path} does not import timing.measure"
    functions = _functions(tree)
    reaches = {"measure"}
    for _ in functions:  # module-level helpers that call measure, to a fixed point
        reaches |= {name for name, fn in functions.items() if _calls(fn) & reaches}
    cases = [name for name in functions if name.startswith("test_")]
    assert cases
    for name in cases:
        assert "benchmark" in [a.arg for a in functions[name].args.args], f"{path}::{name} takes no benchmark"
        assert _calls(functions[name]) & reaches, f"{path}::{name} is not timed through timing.measure"


def _fixture(records, name="test_case[glm_kernels]", file="benchmarks/test_ops.py"):
    """A real pytest-benchmark fixture whose own timer must never run."""
    def never():
        raise AssertionError("the fixture's timer ran")

    node = SimpleNamespace(name=name, nodeid=f"{file}::{name}")
    return BenchmarkFixture(node, disable_gc=False, timer=SimpleNamespace(target=never), min_rounds=5,
                            min_time=5e-6, max_time=1.0, precision=None, confidence=None, warmup=False,
                            warmup_iterations=0, calibration_precision=10, add_stats=records.append, logger=None,
                            warner=None, disabled=False, cprofile=False, cprofile_loops=None, cprofile_dump=None)


@pytest.fixture
def fake_cuda(monkeypatch):
    """do_bench and the device name patched: records each call, runs `fn` as do_bench would, returns times."""
    calls = []

    def do_bench(fn, warmup, rep, return_mode):
        calls.append(dict(fn=fn, warmup=warmup, rep=rep, return_mode=return_mode))
        fn()
        return {"all": [3.0, 1.0, 2.0], "min": 1.0}[return_mode]

    import triton.testing

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU 80GB")
    return calls


def test_cuda_branch_times_with_do_bench(fake_cuda):
    records, ran = [], []
    fixture = _fixture(records)
    timing.measure(fixture, "case", "glm_kernels", lambda: ran.append(1), device="cuda", dtype=torch.bfloat16,
                   rounds=5, peak_mib=12.0)
    assert len(fake_cuda) == 1 and fake_cuda[0]["return_mode"] == "all" and len(ran) == 1  # only do_bench ran fn
    assert fake_cuda[0]["warmup"] > 0 and fake_cuda[0]["rep"] > 0
    assert records == [fixture.stats]
    assert fixture.stats.stats.median == pytest.approx(2e-3) and fixture.stats.stats.rounds == 3
    assert fixture.group == "case"
    assert fixture.extra_info.pop("load") >= 0
    assert fixture.extra_info == dict(impl="glm_kernels", device="cuda", device_name="Fake GPU 80GB", dtype="bf16",
                                      timing="triton.testing.do_bench", peak_mib=12.0)
    assert timing.best_seconds(lambda: None, "cuda") == pytest.approx(1e-3)
    assert fake_cuda[-1]["return_mode"] == "min"


class _CpuFixture:
    def __init__(self):
        self.calls, self.extra_info, self.disabled = [], {}, False

    def __call__(self, fn):
        self.calls.append(("benchmark", fn))

    def pedantic(self, fn, **kwargs):
        self.calls.append(("pedantic", kwargs))


def test_cpu_branch_uses_pytest_benchmark(fake_cuda):
    auto, slow = _CpuFixture(), _CpuFixture()
    timing.measure(auto, "case", "reference", print, device="cpu", dtype=torch.float32)
    timing.measure(slow, "case", "reference", print, device="cpu", dtype="bf16", rounds=3, warmup_rounds=0)
    assert auto.calls == [("benchmark", print)]
    assert slow.calls == [("pedantic", dict(rounds=3, iterations=1, warmup_rounds=0))]
    each = _CpuFixture()
    timing.measure(each, "case", "glm_kernels", print, device="cpu", dtype="int4", rounds=5, setup=print)
    assert each.calls == [("pedantic", dict(rounds=5, iterations=1, warmup_rounds=1, setup=print))]
    assert auto.extra_info["timing"] == "pytest-benchmark" and auto.extra_info["device"] == "cpu"
    assert auto.extra_info["device_name"] and slow.extra_info["dtype"] == "bf16"
    assert not fake_cuda


def _run(fake_cuda, cases):
    """Fixture records of one fake-CUDA run: {(suite, case): (glm_kernels extra_info, reference extra_info)}."""
    records = []
    for (suite, case), infos in cases.items():
        for impl, info in zip(bench_table.IMPLS, infos):
            fixture = _fixture(records, f"test_{case}[{impl}]", f"benchmarks/test_{suite}.py")
            timing.measure(fixture, case, impl, lambda: None, device="cuda", dtype=torch.float16, **info)
    run = dict(bench_table.run_info(__import__("datetime").datetime.now(), (0.5, 0.4, 0.3), "test"))
    return records, run


def test_results_files_round_trip_and_merge(fake_cuda, tmp_path):
    records, run = _run(fake_cuda, {("ops", "rope"): ({}, {}),
                                    ("ptune_step", "step"): ({"peak_mib": 100.0, "loss": 2.5},
                                                             {"peak_mib": 300.0, "loss": 2.5})})
    for record, ms in zip(records, [1.0, 2.0, 4.0, 5.0]):  # give the impls different medians
        record.stats.data[:] = [ms / 1e3]
    cases = bench_table.cases_from_benchmarks(records, "run1", run)
    assert [c["suite"] for c in cases] == ["ops", "ptune_step"]
    rope, step = cases
    assert rope["speedup"] == 2.0 and step["speedup"] == 1.25 and step["memory_ratio"] == 3.0
    assert step["glm_kernels_loss"] == step["reference_loss"] == 2.5
    assert rope["device_name"] == "Fake GPU 80GB" and rope["timing"] == "triton.testing.do_bench"
    assert rope["torch"] == torch.__version__ and rope["triton"] and rope["dtype"] == "fp16"
    written = bench_table.save(cases, "run1", run, tmp_path)
    assert [p.name for p in written] == ["cuda-fake-gpu-80gb.json", "cuda-fake-gpu-80gb.csv", "cuda-fake-gpu-80gb.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)  # no temporary left
    with open(written[1], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["rope", "step"] and float(rows[1]["memory_ratio"]) == 3.0
    assert written[2].read_bytes()[:4] == b"\x89PNG"

    # a later run of one case replaces its row and keeps the other's; its run entry goes with its last row
    again = [dict(rope, speedup=3.0, run="run2")]
    bench_table.save(again + [dict(rope, case="half", speedup=None, run="run2")], "run2", run, tmp_path)
    data = bench_table.load(written[0])
    assert [(c["case"], c["speedup"], c["run"]) for c in data["cases"]] == [("rope", 3.0, "run2"),
                                                                            ("step", 1.25, "run1")]
    assert sorted(data["runs"]) == ["run1", "run2"]
    table = bench_table.render_table(data, "ptune_step", "x.json")
    assert "| step | fp16 | 4.00 | 5.00 | 1.25x | 100 | 300 | 3.00x | 2.5000 | 2.5000 |" in table
    assert "Fake GPU 80GB" in table and "triton.testing.do_bench" in table and "load average 0.50" in table


def test_cases_timed_on_an_oversubscribed_cpu_are_marked():
    run = {"started": "2026-01-01T00:00:00+00:00", "torch": "t", "triton": "tr", "load_start": [0.5],
           "load_end": [2.0]}
    case = dict(case="c", suite="s", dtype="fp32", timing="pytest-benchmark", run="r", glm_kernels_ms=1.0,
                reference_ms=2.0, speedup=2.0)
    data = {"machine": {"device": "cpu", "device_name": "X", "cpu_count": 2}, "runs": {"r": run},
            "cases": [dict(case, glm_kernels_load=2.0, reference_load=2.4),
                      dict(case, case="d", glm_kernels_load=2.0, reference_load=2.6)]}
    table = bench_table.render_table(data, "s")
    assert "| c | fp32 |" in table and "| d † | fp32 |" in table
    assert "† timed while the 1-minute load average was above 2.5" in table


def test_serving_cases_show_throughput_and_latency_per_implementation():
    run = {"started": "2026-01-01T00:00:00+00:00", "torch": "t", "triton": "tr", "load_start": [0.5],
           "load_end": [0.5]}
    case = dict(case="16 streams", suite="serve", dtype="bf16", timing="pytest-benchmark", run="r",
                glm_kernels_ms=8000.0, reference_ms=60000.0, speedup=7.5, streams=16,
                glm_kernels_tokens_per_s=64.0, reference_tokens_per_s=8.5, glm_kernels_tpot_p50_ms=205.0,
                glm_kernels_tpot_p99_ms=250.5, reference_tpot_p50_ms=120.0, reference_tpot_p99_ms=128.0,
                glm_kernels_latency_p50_ms=7700.0, glm_kernels_latency_p99_ms=7800.0,
                reference_latency_p50_ms=35000.0, reference_latency_p99_ms=60000.0)
    data = {"machine": {"device": "cpu", "device_name": "X", "cpu_count": 2}, "runs": {"r": run}, "cases": [case]}
    header, _, row = bench_table.render_table(data, "serve").splitlines()[:3]
    assert "glm_kernels tokens/s" in header and "reference ms/token p50 / p99" in header
    assert row == ("| 16 streams | bf16 | 8000 | 60000 | 7.50x | 64.0 | 205.0 / 250.5 | 7700 / 7800 | 8.5 | "
                   "120.0 / 128.0 | 35000 / 60000 |")


def test_quantized_decode_cases_show_the_floor_and_the_products_alone():
    run = {"started": "2026-01-01T00:00:00+00:00", "torch": "t", "triton": "tr", "load_start": [0.5],
           "load_end": [0.5]}
    case = dict(case="decode", suite="quant", dtype="int4", timing="pytest-benchmark", run="r",
                glm_kernels_ms=20.0, reference_ms=100.0, speedup=5.0, floor_ms=10.0, bandwidth_gbs=32.0,
                products_ms=12.5)
    data = {"machine": {"device": "cpu", "device_name": "X", "cpu_count": 2}, "runs": {"r": run},
            "cases": [case, dict(case, case="prefill", floor_ms=None, bandwidth_gbs=None, products_ms=None)]}
    header, _, decode, prefill = bench_table.render_table(data, "quant").splitlines()[:4]
    assert header.endswith("| weight-read floor ms | glm_kernels at % of floor | read bandwidth GB/s | "
                           "products alone ms | products at % of floor |")
    # 10 / 20 of the step, 10 / 12.5 for the products alone
    assert decode.endswith("| 10.0 | 50% | 32.0 | 12.5 | 80% |") and prefill.endswith("| - | - | - | - | - |")
    # shares paired round by round, where the case measured them so, are the ones shown
    data["cases"] = [dict(case, floor_share=0.61, products_share=0.77)]
    assert bench_table.render_table(data, "quant").splitlines()[2].endswith("| 10.0 | 61% | 32.0 | 12.5 | 77% |")


def test_round_floor_pairs_each_round_with_the_floor_read_before_it():
    """RoundFloor.record: medians over the timed rounds, and each share paired with its own round's floor (the
    warm-up round's reads are left out). Read before a slow round, a slow floor leaves that round's share alone."""
    floor = timing.RoundFloor([torch.zeros(1000, dtype=torch.uint8)], "cpu", products=lambda: None)
    floor.floors = [9.0, 0.010, 0.020, 0.010]  # warm-up, then three rounds (seconds)
    floor.product_times = [9.0, 0.0125, 0.025, 0.0125]
    fixture = SimpleNamespace(stats=SimpleNamespace(stats=SimpleNamespace(data=[0.020, 0.040, 0.010])),
                              extra_info={})
    floor.record(fixture)
    info = fixture.extra_info
    assert info["floor_ms"] == pytest.approx(10.0) and info["products_ms"] == pytest.approx(12.5)
    assert info["bandwidth_gbs"] == pytest.approx(1000 / 0.010 / 1e9)
    assert info["floor_share"] == pytest.approx(0.5)  # rounds: 0.5, 0.5, 1.0
    assert info["products_share"] == pytest.approx(0.8)  # rounds: 0.8, 0.8, 0.8
    floor.floors = [9.0, 0.010, 0.040, 0.010]
    floor.record(fixture)
    # 0.5, 1.0, 1.0: each round against its own bandwidth (the medians alone would say 10 / 20 = 50%)
    assert info["floor_share"] == pytest.approx(1.0)


def test_bench_table_cli_updates_and_checks_a_readme(fake_cuda, tmp_path, capsys):
    records, run = _run(fake_cuda, {("ops", "rope"): ({}, {})})
    bench_table.save(bench_table.cases_from_benchmarks(records, "run1", run), "run1", run, tmp_path / "results")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- bench:ops results/cuda-fake-gpu-80gb.json -->\nold\n<!-- /bench:ops -->\ntail\n")

    def cli(*argv):
        args = build_parser().parse_args(["bench-table", *argv])
        return args.func(args)

    assert cli("--check", str(readme)) == 1
    assert cli("--update", str(readme)) == 0
    text = readme.read_text()
    assert "| rope | fp16 |" in text and "old" not in text and text.endswith("<!-- /bench:ops -->\ntail\n")
    assert cli("--check", str(readme)) == 0
    capsys.readouterr()
    assert cli("--results", str(tmp_path / "results" / "cuda-fake-gpu-80gb.json"), "--suite", "ops") == 0
    assert "| rope | fp16 |" in capsys.readouterr().out


def test_readme_tables_are_rendered_from_the_committed_results():
    text = (ROOT / "README.md").read_text()
    markers = list(bench_table.MARKER.finditer(text))
    assert {m["suite"] for m in markers} >= {"ops", "model_forward", "decode", "ptune_step", "quant", "serve"}
    for m in markers:
        assert (ROOT / m["path"]).parent == BENCH / "results", m["path"]
    assert bench_table.update_text(text, ROOT) == text, "run: glm-kernels bench-table --update README.md"


@pytest.mark.parametrize("path", sorted(p.name for p in (BENCH / "results").glob("*.json")))
def test_committed_results_are_complete(path):
    data = bench_table.load(BENCH / "results" / path)
    assert path == bench_table.results_stem(data["machine"]) + ".json"
    for case in data["cases"]:
        for key in ("device", "device_name", "dtype", "torch", "triton", "timing", "suite"):
            assert case.get(key), (case["case"], key)
        assert case["run"] in data["runs"] and data["runs"][case["run"]]["load_start"]
        assert case["speedup"] == pytest.approx(case["reference_ms"] / case["glm_kernels_ms"], rel=1e-5)
    assert json.loads((BENCH / "results" / path).read_text()) == data
    assert (BENCH / "results" / path).with_suffix(".csv").exists()
    assert (BENCH / "results" / path).with_suffix(".png").exists()
