"""Benchmark plumbing shared by ``benchmarks/`` and ``research/``: run metadata, timing with cold
caches, memory-copy and row-gather bandwidth, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import torch

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(root: str | None = None) -> str:
    """Short hash of the checkout at ``root`` (default: the working directory), ``-dirty`` when
    tracked files differ from it; ``unknown`` outside a git checkout."""
    root = root or os.getcwd()
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_metadata(device: torch.device, root: str | None = None) -> dict:
    """Where and on what a result was measured (``root``: the checkout whose commit is recorded)."""
    import sparq_ext

    meta = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(root),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sparq_backend": "native" if sparq_ext.has_native_kernel(device.type) else "pure-torch",
        "extension_error": sparq_ext.extension_error,
    }
    if device.type == "cpu":
        meta["threads"] = torch.get_num_threads()
        meta["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return meta


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def last_level_cache_bytes(default: int = 64 << 20) -> int:
    """Size of the largest CPU cache in sysfs (the last level), or ``default``."""
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip().upper()
            except OSError:
                continue
            unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * unit)
    except (OSError, ValueError):
        pass
    return max(sizes, default=default)


class CacheFlush:
    """Evicts the CPU caches: a read of twice the last-level cache (reads, not writes: a write
    sweep also costs the other thread page-table work on VMs that track dirty pages).

    Called untimed before each timed call, so every method reads its inputs from memory, as a
    decode step does: between two visits to one layer, the other layers' caches pass through.
    """

    def __init__(self, nbytes: int | None = None):
        nbytes = nbytes or 2 * last_level_cache_bytes()
        self.nbytes = nbytes
        self.buffer = torch.ones(nbytes // 4, dtype=torch.float32)

    def __call__(self) -> None:
        self.buffer.sum()


def time_call(fn, device: torch.device, warmup: int, repeats: int, before=None) -> float:
    """Median seconds of ``fn(i)`` (``i`` = call number, for rotating inputs).

    CUDA: events around each call, after warm-up. CPU: wall clock around each call.
    ``before()``, when given, runs untimed before every call (e.g. a :class:`CacheFlush`).
    """
    before = before or (lambda: None)
    for i in range(warmup):
        before()
        fn(i)
    sync(device)
    times = []
    if device.type == "cuda":
        for i in range(repeats):
            before()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for i in range(repeats):
            before()
            t0 = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_interleaved(fns: dict, device: torch.device, warmup: int, repeats: int, before=None) -> dict:
    """Median seconds of each ``fns[name](i)``, their calls interleaved so that a drift of a
    shared machine's load falls on every method alike, the order rotated each repeat (A, B, C;
    B, C, A; ...) so that no method always runs first after another; otherwise as
    :func:`time_call`."""
    before = before or (lambda: None)
    for i in range(warmup):
        for fn in fns.values():
            before()
            fn(i)
    sync(device)
    times = {name: [] for name in fns}
    names = list(fns)
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            fn = fns[name]
            before()
            sync(device)
            t0 = time.perf_counter()
            fn(i)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Measured device memory bandwidth in bytes/s: a large copy reads and writes nbytes."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = time_call(lambda i: dst.copy_(src), device, warmup=2, repeats=repeats)
    del src, dst
    return 2 * nbytes / seconds


def row_gather_bandwidth(device: torch.device, row_bytes: int = 512, nbytes: int = 1 << 30,
                         fraction: float = 1 / 16, repeats: int = 10, before=None) -> float:
    """Bytes/s that ``torch.index_select`` reads gathering a random ``fraction`` of the
    ``row_bytes`` rows of an ``nbytes`` table, in ascending order: the access pattern of
    SparQ's step 2 (k of S rows of K and V), done by PyTorch. Against copy_bandwidth it shows
    what gathers cost on the machine (each row is a separate run of a few cache lines)."""
    cols = max(1, row_bytes // 4)
    table = torch.empty(nbytes // (4 * cols), cols, dtype=torch.float32, device=device).uniform_()
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(table.shape[0], generator=gen)[: int(table.shape[0] * fraction)]
    idx = idx.sort().values.to(device)
    out = torch.empty(len(idx), cols, dtype=torch.float32, device=device)
    seconds = time_call(lambda i: torch.index_select(table, 0, idx, out=out), device, warmup=2,
                        repeats=repeats, before=before)
    del table, out
    return len(idx) * cols * 4 / seconds


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)  # never leave a half-written result behind
