"""What the benchmarks ran on, and the machine-level measurements they share.

    machine_info()            CPU (and GPU) model, cores, memory, torch/transformers versions, threads, load
    matmul_peak(n, repeats)   measured fp32 peak: best of `repeats` square torch.mm of size n, in GFLOP/s
    rss_bytes(), peak_rss_bytes(), reset_peak_rss()   resident memory of this process
    tune_malloc()             keep freed memory in glibc's heap (fewer page faults per training step)

Why `tune_malloc`: glibc serves allocations above its mmap threshold (128 KiB, adapting up to
32 MiB) with fresh mmap()s and returns them to the kernel on free, so every training step
page-faults its large activations and logits back in (tens of thousands of faults a step at the
baby-GPT shape). Raising the threshold and the trim threshold keeps them in the heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_MALLOC_TUNED = False


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def _mem_total_bytes() -> int | None:
    try:
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def machine_info() -> dict[str, Any]:
    """JSON-serialisable description of the machine and software the numbers come from."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    simd = [f for f in ("avx512f", "avx512_bf16", "amx_tile", "avx2", "fma", "neon") if f in flags]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    try:
        import transformers

        hf_version: str | None = transformers.__version__
    except ImportError:
        hf_version = None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}" if info else None,
        "cpu_simd": simd,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_bytes": _mem_total_bytes(),
        "torch_version": torch.__version__,
        "transformers_version": hf_version,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "cuda": torch.cuda.is_available(),
        "gpu_model": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "malloc_tuned": _MALLOC_TUNED,
        "load_average_1m": round(load[0], 2) if load else None,
    }


def matmul_peak(n: int = 2048, repeats: int = 7, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Measured matmul peak: the best of `repeats` timed (n x n) @ (n x n) products, after a warm-up,
    through each fp32 GEMM library PyTorch ships: torch.mm (MKL on x86 builds) and oneDNN's linear
    primitive. "gflops" is the best of the two: what this machine can do, whichever library gets it.

    The best (not the median) is the machine's capability; noise only ever makes a run slower.
    """
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    c = torch.empty(n, n, dtype=dtype)
    kernels: dict[str, Any] = {"torch_mm": lambda: torch.mm(a, b, out=c)}
    try:
        lp = torch.ops.mkldnn._linear_pointwise
        if torch.backends.mkldnn.is_available():
            kernels["onednn"] = lambda: lp(a, b.t(), None, "none", [], "")  # a @ b
    except (AttributeError, RuntimeError):
        pass
    flops = 2.0 * n ** 3
    out: dict[str, Any] = {"n": n, "repeats": repeats, "dtype": str(dtype).replace("torch.", "")}
    ref = torch.mm(a, b)
    for name, fn in list(kernels.items()):
        got = fn()
        # a library that silently computes in reduced precision does not count as an fp32 peak
        if name != "torch_mm" and not torch.allclose(got, ref, rtol=1e-4, atol=1e-3 * ref.abs().max().item()):
            del kernels[name]
            continue
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_gflops"] = flops / best / 1e9
    out["best_kernel"] = max(kernels, key=lambda k: out[f"{k}_gflops"])
    out["gflops"] = out[f"{out['best_kernel']}_gflops"]
    return out


def rss_bytes() -> int:
    """Current resident set size (0 when /proc is unavailable)."""
    try:
        m = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(m.group(1)) * 1024 if m else 0
    except OSError:
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size since start or since the last successful `reset_peak_rss()`."""
    try:
        m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Reset the peak-RSS high-water mark to the current RSS (Linux >= 4.0). False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def tune_malloc(threshold_bytes: int = 1 << 30) -> bool:
    """Raise glibc's mmap and trim thresholds so freed large tensors stay in the heap (see module doc).

    Process-wide and irreversible, so benchmarks apply it once for every framework they compare.
    Returns False (and does nothing) where the C library is not glibc.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    trim = min(2 * threshold_bytes, 2**31 - 1)  # an int in C
    ok = mallopt(_M_MMAP_THRESHOLD, threshold_bytes) == 1 and mallopt(_M_TRIM_THRESHOLD, trim) == 1
    _MALLOC_TUNED = bool(ok)
    return _MALLOC_TUNED


def minor_faults() -> int:
    """Minor page faults of this process so far (each one a first touch of freshly mapped memory)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_probe(module: str, spec: dict, what: str) -> dict:
    """Run `module._memory_child(spec_json)` in a fresh Python process (so its peak RSS is its own)
    and return the JSON dict it prints last."""
    import json
    import subprocess
    import sys

    code = f"import sys; from {module} import _memory_child; _memory_child(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} memory probe failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
