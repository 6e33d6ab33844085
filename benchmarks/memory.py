"""Peak memory of one step, as the growth above what is held before it (the benchmarks' memory tables).

`peak_mib(module, builder, *args)`: `module.builder(*args)` builds the inputs and returns the step function;
after one warm-up call, the step's peak growth is measured:

- GPU: in this process, `torch.cuda.max_memory_allocated` above `memory_allocated` before the step.
- CPU: in a fresh Python process, the resident set's high-water mark (`VmHWM`, reset through
  /proc/self/clear_refs) above the resident set before the step. The fresh process runs with glibc's mmap
  threshold at 64 KiB (`MALLOC_MMAP_THRESHOLD_`), so every tensor buffer is its own mapping, returned to the
  kernel when freed and counted again when allocated; with the default allocator a step that reuses blocks
  freed earlier shows no growth (seen here: the same step measured 381 MiB in one run, 689 MiB in another).
  The timings stay in the benchmark's own process with the default allocator.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def peak_growth_mib(fn, device: str = "cpu") -> float:
    """MiB `fn()` needs above what is held before it, measured in this process."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def peak_mib(module: str, builder: str, *args) -> float:
    """Peak growth of the step `module.builder(*args)` returns (see the module docstring)."""
    if torch.cuda.is_available():
        step = getattr(__import__(module), builder)(*args)
        step()
        return peak_growth_mib(step, "cuda")
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import memory, {module} as m; "
            f"step = m.{builder}(*{args!r}); step(); print(memory.peak_growth_mib(step))")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])
