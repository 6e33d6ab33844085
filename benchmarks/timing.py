"""The one place the benchmarks time anything, so that no case times asynchronous CUDA launches.

`measure(benchmark, group, impl, fn, device=..., dtype=...)` times `fn()` as one implementation
("glm_kernels" or "reference") of the case `group`:

- CUDA: `triton.testing.do_bench`, which records CUDA events around every call, synchronises the device
  before reading them and flushes the L2 cache between calls. Its per-call times go into the
  pytest-benchmark fixture, so medians, `--benchmark-json` and the ratio tables read alike on both devices.
- CPU: pytest-benchmark as before: `benchmark(fn)` calibrates rounds itself; `rounds=` for slow steps.

It also records what the results files need in `benchmark.extra_info` (impl, device, device name, dtype,
timing method, 1-minute load average). `best_seconds(fn, device)` is the fastest of a few calls;
`read_floor_seconds(tensors, device)` the fastest read of a model's weights, the floor of a decode step
(`read_floor_around` records it around a timed case). `tests/test_benchmarks_meta.py` checks that every benchmark case goes
through here and nothing else in `benchmarks/` reads a clock, and runs the CUDA branch on a fake do_bench.
"""
from __future__ import annotations

import contextlib
import os
import platform
import time

import torch

DO_BENCH = "triton.testing.do_bench"
PYTEST_BENCHMARK = "pytest-benchmark"
DO_BENCH_WARMUP_MS, DO_BENCH_REP_MS = 25, 100
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def device_name(device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (`platform.processor()` elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def dtype_name(dtype) -> str:
    return dtype if isinstance(dtype, str) else _DTYPES.get(dtype, str(dtype).replace("torch.", ""))


def _do_bench(fn, **kwargs):
    from triton.testing import do_bench  # looked up per call: the tests patch it

    return do_bench(fn, warmup=DO_BENCH_WARMUP_MS, rep=DO_BENCH_REP_MS, **kwargs)


def measure(benchmark, group, impl, fn, *, device, dtype, rounds=None, warmup_rounds=1, setup=None, **extra):
    """Time `fn()` into the pytest-benchmark fixture as `impl` of case `group`; `extra` goes to extra_info.

    `rounds`/`warmup_rounds` apply on the CPU (None: pytest-benchmark calibrates); do_bench sizes its own.
    `setup()` (CPU with `rounds`) runs untimed before every round, warm-up rounds included (a `RoundFloor`).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, device=device.type, device_name=device_name(device),
                                dtype=dtype_name(dtype), timing=DO_BENCH if cuda else PYTEST_BENCHMARK,
                                load=round(os.getloadavg()[0], 2), **extra)
    if not cuda:
        if rounds is None:
            return benchmark(fn)
        kwargs = {} if setup is None else {"setup": setup}
        return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds, **kwargs)
    if benchmark.disabled:  # --benchmark-disable: run once, as pytest-benchmark does
        return fn()
    times_ms = _do_bench(fn, return_mode="all")
    # Hand the per-call times to the fixture as pedantic would have measured them (pytest-benchmark 4-5 API).
    benchmark._mode = DO_BENCH
    stats = benchmark._make_stats(1)
    for t in times_ms:
        stats.update(t / 1e3)
    return None


def stamp(device) -> float:
    """A point in time (seconds) after the work queued on `device` is done: for latencies inside a timed case
    (serving: when each token of each request came out)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def best_seconds(fn, device, repeats: int = 5) -> float:
    """The fastest call of `fn()` in seconds (after one warm-up call on the CPU; do_bench warms up itself)."""
    if torch.device(device).type == "cuda":
        return _do_bench(fn, return_mode="min") / 1e3
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _unique(tensors) -> list:
    """The tensors, each storage once (a tied matrix is read once), contiguous."""
    seen = {}
    for t in tensors:
        seen.setdefault(t.data_ptr(), t.detach().contiguous())
    return list(seen.values())


def read_floor_seconds(tensors, device, repeats: int = 5) -> float:
    """The fastest read of every byte of `tensors` (the weights one decode step reads), in seconds.

    CPU: the C++ extension's `stream_read` (AVX-512 loads of each tensor in turn, split over the threads, as the
    quantized products split their weights), on the tensors as the model holds them, so the floor sees the same
    memory (page sizes, placement) as the step it bounds. Without the extension, and on CUDA: a sum over each
    tensor's bytes. Measured on this VM, DRAM reads vary between ~27 and ~48 GB/s from one minute to the next,
    so the benchmarks measure the floor around each timed case (`read_floor_around`).
    """
    from glm_kernels import cpu_ext

    tensors = _unique(tensors)
    ext = cpu_ext.extension()
    if torch.device(device).type == "cpu" and ext is not None:
        return best_seconds(lambda: ext.stream_read(tensors), device, repeats)
    views = [t.view(-1).view(torch.uint8) for t in tensors]
    return best_seconds(lambda: [v.sum() for v in views], device, repeats)


@contextlib.contextmanager
def read_floor_around(benchmark, tensors, device):
    """Time the floor of `tensors` just before and just after the `with` body (a timed case) and record the faster
    in `benchmark.extra_info`: `floor_ms` and the read bandwidth it implies, `bandwidth_gbs`."""
    before = read_floor_seconds(tensors, device)
    yield
    floor = min(before, read_floor_seconds(tensors, device))
    nbytes = sum(t.numel() * t.element_size() for t in _unique(tensors))
    benchmark.extra_info.update(floor_ms=floor * 1e3, bandwidth_gbs=nbytes / floor / 1e9)


class RoundFloor:
    """The floor of a decode step measured before each of its timed rounds, with the step's products alone.

    Pass it as `measure(..., setup=floor)`, then `floor.record(benchmark)`. Before every round it reads the
    weights once (`read_floor_seconds`, one timed read after one untimed) and, given `products`, times them once
    the same way; `record` stores in `benchmark.extra_info` the medians over the timed rounds (`floor_ms`,
    `bandwidth_gbs`, `products_ms`) and the shares paired round by round: `floor_share` = median of floor_i /
    step_i, `products_share` = median of floor_i / products_i. Pairing matters on this VM, whose DRAM bandwidth
    moves between ~23 and ~48 GB/s within a minute: a floor read before or after the whole case may see another
    bandwidth than the rounds it is compared with. Where `setup` does not run (CUDA's do_bench, a disabled
    benchmark) the floor and the products are measured once after the case and the shares use the median step.
    """

    def __init__(self, tensors, device, products=None):
        self.tensors, self.device, self.products = _unique(tensors), device, products
        self.floors, self.product_times = [], []

    def __call__(self):
        self.floors.append(read_floor_seconds(self.tensors, self.device, repeats=1))
        if self.products is not None:
            self.product_times.append(best_seconds(self.products, self.device, repeats=1))

    def record(self, benchmark):
        from statistics import median

        stats = getattr(benchmark, "stats", None)
        steps = list(stats.stats.data) if stats is not None else []
        n = len(steps)
        paired = n > 0 and len(self.floors) >= n
        floors = self.floors[-n:] if paired else [read_floor_seconds(self.tensors, self.device)]
        floor = median(floors)
        nbytes = sum(t.numel() * t.element_size() for t in self.tensors)
        info = dict(floor_ms=floor * 1e3, bandwidth_gbs=nbytes / floor / 1e9)
        if steps:
            info["floor_share"] = median(f / s for f, s in zip(floors, steps)) if paired else floor / median(steps)
        if self.products is not None:
            products = self.product_times[-n:] if paired else [best_seconds(self.products, self.device)]
            info["products_ms"] = median(products) * 1e3
            info["products_share"] = (median(f / p for f, p in zip(floors, products)) if paired
                                      else floor / median(products))
        benchmark.extra_info.update(info)
