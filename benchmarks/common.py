"""What every benchmark shares: peak-memory probes, the machine's description, tables and results."""
from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

import torch


def reset_peak_memory(device: str) -> None:
    """Start a fresh peak: CUDA's allocator counter, or the process's peak RSS (Linux `clear_refs` 5)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the peak then includes loading


def peak_memory_mb(device: str) -> float:
    """Peak since the last reset: CUDA allocated bytes, or the process's peak RSS (VmHWM)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def rss_mb() -> float:
    """The process's resident memory now (VmRSS), for the baseline a CPU peak is read against."""
    match = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def machine() -> str:
    """One line naming the machine the numbers came from."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} (CPU, float32 compute)"


def table(header: list[str], rows: list[list]) -> str:
    """A fixed-width text table."""
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def run_worker(module: str, job: dict, path: Path, label: str, **extra_env: str):
    """Run `python -m MODULE --worker PATH` in a fresh process, so its peak memory is its own.

    The worker reads the job from `path` and writes its result next to it (`*.out.json`).
    """
    import subprocess
    import sys

    path.write_text(json.dumps(job))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS=str(job["threads"]), **extra_env)
    done = subprocess.run([sys.executable, "-m", module, "--worker", str(path)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{label} failed:\n{done.stderr[-3000:]}")
    return json.loads(path.with_suffix(".out.json").read_text())


class FirstTokenTimer:
    """A `generate` streamer that notes when the first new token arrives (its first put is the prompt)."""

    def __init__(self) -> None:
        self.calls, self.first, self.end_time = 0, None, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        self.end_time = time.perf_counter()
