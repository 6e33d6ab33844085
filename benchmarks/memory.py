"""Peak memory of one call, as the growth above what is held before it (used by the benchmarks' memory tables).

CPU: the resident set's high-water mark (`VmHWM` of /proc/self/status, reset through /proc/self/clear_refs);
GPU: `torch.cuda.max_memory_allocated`.
"""
import re

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def peak_growth_mib(fn, device: str = "cpu") -> float:
    """MiB `fn()` needs above what is held before it."""
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
