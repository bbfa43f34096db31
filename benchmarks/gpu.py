"""The GPU check: every claim mmchat makes about a GPU, in order of value, in one command that fits its budget.

    python -m benchmarks.gpu                       # on a CUDA machine, 480 s (benchmarks/GPU.md: the recipe)
    python -m benchmarks.gpu --dry-run             # the same code on a CPU at tiny shapes: about a minute on 2 cores

Steps, each in its own process (its own peak memory; a crash or hang costs only that step):
  1. tests:  `pytest -m gpu tests/test_gpu.py` (4-bit NF4 bf16 chat, KV reuse, the batching engine,
             stage 1 and 2 with paged 8-bit AdamW and resume, merge, export); pass/fail counts
  2. chat:   4-bit chat at LLaVA-1.5-7B's shape, random weights built on the GPU: decode tokens/s,
             turn-1 and turn-10 time to first token, peak memory, mmchat vs transformers `generate`
             on the same weights and prompts; 8 users through the engine
  3. stage2: QLoRA at 7B / 2048 tokens, batch 1, 4, 8: peak memory vs `benchmarks.memory`'s model, tokens/s
  4. serve:  `benchmarks.serve` at TinyLlama-1.1B's shape vs `transformers serve`
Before each step the time left is set against the step's estimate; a step that would not fit is
"skipped for time", and a running step is stopped at the budget. Results: gpu.json and gpu.md in
--out (each step's own JSON beside them); the exit status is 1 if a step failed.
`--dry-run` runs the same steps on the CPU at tiny shapes (float32 compute; bitsandbytes' CPU
4-bit kernels), the tests with MMCHAT_GPU_TESTS_ON_CPU=1.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.common import machine, write_json

ESTIMATE_S = {"tests": 150, "chat": 170, "stage2": 130, "serve": 200}
"""Seconds each step is expected to take on an H100, process start and imports included (not yet
measured: the first GPU run replaces these with its own times)."""
DRY_RUN_ESTIMATE_S = {"tests": 45, "chat": 12, "stage2": 15, "serve": 30}
"""The same on 2 CPU cores at --dry-run's shapes (measured: 15-40, 8-10, 10-12 and 25 s; the first
numbers on an idle machine, the second on a shared one)."""
MARGIN_S = 5.0
"""Time kept back for writing the results after the last step."""


@dataclass
class GpuCheckConfig:
    out: Path = Path("benchmarks/results/gpu")
    """Where gpu.json, gpu.md and each step's JSON go."""
    dry_run: bool = False
    """Run on the CPU at tiny shapes (a test runs this)."""
    budget_s: float = 480.0
    """Wall-clock seconds for all steps; the default leaves a 10-minute device call room to start and copy."""
    steps: list[str] = field(default_factory=lambda: list(ESTIMATE_S))
    """The steps to run, in this order."""

    def __post_init__(self) -> None:
        unknown = [s for s in self.steps if s not in ESTIMATE_S]
        if unknown:
            raise ValueError(f"--steps {' '.join(unknown)}: choose from {' '.join(ESTIMATE_S)}")
        if self.budget_s <= 0:
            raise ValueError(f"--budget-s {self.budget_s}: must be positive")

    @property
    def estimates(self) -> dict[str, float]:
        return DRY_RUN_ESTIMATE_S if self.dry_run else ESTIMATE_S


# ------------------------------------------------------------------ the steps (each in its own process)


def run_step(name: str, dry_run: bool, out: Path) -> dict:
    """One step in this process; returns its results (written to out/NAME.json by the caller)."""
    import torch

    from benchmarks.gpu_model import DRY_RUN_SHAPE, LLAVA_7B

    device = "cpu" if dry_run else "cuda"
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU is visible: run on a GPU machine, or pass --dry-run")
    with tempfile.TemporaryDirectory(prefix=f"mmchat-gpu-{name}-") as folder:
        work = Path(folder)
        if name == "tests":
            return run_tests(dry_run, out)
        if name == "chat":
            from benchmarks.gpu_chat import chat_check

            return chat_check(DRY_RUN_SHAPE if dry_run else LLAVA_7B, device, work, turns=3 if dry_run else 10,
                              new_tokens=4 if dry_run else 24, users=8)
        if name == "stage2":
            from benchmarks.gpu_train import stage2_check

            return stage2_check(DRY_RUN_SHAPE if dry_run else LLAVA_7B, device, work, [1, 2] if dry_run else [1, 4, 8],
                                seq_len=64 if dry_run else 2048, lora_r=8 if dry_run else 128)
        return run_serve(dry_run, device, out)


def run_tests(dry_run: bool, out: Path) -> dict:
    """`pytest -m gpu tests/test_gpu.py`: counts from its JUnit XML (on a CPU with MMCHAT_GPU_TESTS_ON_CPU=1)."""
    import xml.etree.ElementTree as ET

    report = out / "tests.xml"
    env = dict(os.environ, **({"MMCHAT_GPU_TESTS_ON_CPU": "1"} if dry_run else {}))
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={report}"], env=env, capture_output=True, text=True)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    if report.is_file():
        for suite in ET.parse(report).getroot().iter("testsuite"):
            counts = {k: counts[k] + int(suite.get(k, 0)) for k in counts}
        failed = [case.get("name") for case in ET.parse(report).getroot().iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"exit_status": done.returncode, "passed": passed, "failed": counts["failures"] + counts["errors"],
            "skipped": counts["skipped"], "failed_tests": failed, "output_tail": done.stdout[-3000:] + done.stderr[-2000:]}


def run_serve(dry_run: bool, device: str, out: Path) -> dict:
    """`benchmarks.serve` at TinyLlama-1.1B's shape (its quick shape on --dry-run), users 1 and 8."""
    from benchmarks.random_llava import LlavaShape
    from benchmarks.serve import QUICK_SHAPE, ServeBenchConfig, run
    from benchmarks.serve_report import report

    shape = QUICK_SHAPE if dry_run else LlavaShape(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632,
                                                   vocab=32000, vision_width=1024, vision_layers=24)
    cfg = ServeBenchConfig(out=out / "serve", turns=2 if dry_run else 4, rounds=1 if dry_run else 2,
                           users=[2] if dry_run else [1, 8], new_tokens=4 if dry_run else 24, max_batch=8,
                           device=device, shape=shape,
                           # the dry run checks the plumbing: mmchat and one transformers serve, one solo round
                           servers=["mmchat", "transformers"] if dry_run else None, solo_rounds=1 if dry_run else 5)
    cfg.out.mkdir(parents=True, exist_ok=True)
    data = run(cfg)
    status = report(data, cfg.out)
    return {"exit_status": status, "shape": data["shape"], "results": str(cfg.out / "serve.json")}


# ------------------------------------------------------------------ orchestration


def headline(name: str, result: dict) -> str:
    """A step's numbers in one Markdown cell."""
    if name == "tests":
        return f"{result['passed']} passed, {result['failed']} failed, {result['skipped']} skipped"
    if name == "chat":
        s = result["summary"]
        last = next(k for k in s if k.startswith("mmchat_ttft_turn") and not k.endswith("turn1_s"))
        return (f"decode {s['mmchat_decode_tps']:.1f} tok/s (transformers {s['transformers_decode_tps']:.1f}); TTFT turn 1 "
                f"{s['mmchat_ttft_turn1_s']:.3f} s, last {s[last]:.3f} s (transformers {s[last.replace('mmchat', 'transformers')]:.3f} s); "
                f"peak {s['mmchat_peak_mb']:.0f} MB; {s['engine_users']} users {s['engine_aggregate_tps']:.1f} tok/s; "
                f"greedy disagreements {s['greedy_agreement_failures']}")
    if name == "stage2":
        return "; ".join(f"batch {r['batch']}: {r['error']}" if "error" in r else
                         f"batch {r['batch']}: {r['peak_bytes'] / 2**30:.2f} GiB measured / {r['predicted_bytes'] / 2**30:.2f} "
                         f"predicted = {r['measured_over_predicted']:.2f}, {r['tokens_per_s']:.0f} tok/s"
                         for r in result["batches"])
    return f"exit status {result['exit_status']}; {result['results']}"


def run(cfg: GpuCheckConfig) -> dict:
    started = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    steps = []
    for name in cfg.steps:
        left = cfg.budget_s - (time.perf_counter() - started) - MARGIN_S
        entry = {"step": name, "estimate_s": cfg.estimates[name]}
        if cfg.estimates[name] > left:
            steps.append({**entry, "status": "skipped for time", "seconds": 0.0,
                          "detail": f"{left:.0f} s left, {cfg.estimates[name]} s estimated"})
            continue
        print(f"[gpu check] {name} ({left:.0f} s left)", file=sys.stderr, flush=True)
        result_file = cfg.out / f"{name}.json"
        result_file.unlink(missing_ok=True)
        command = [sys.executable, "-m", "benchmarks.gpu", "--step", name, "--out", str(cfg.out)]
        tick = time.perf_counter()
        try:
            done = subprocess.run(command + (["--dry-run"] if cfg.dry_run else []), capture_output=True, text=True,
                                  timeout=left, env=dict(os.environ, PYTHONUNBUFFERED="1", TRANSFORMERS_VERBOSITY="error"))
            status = "ok" if done.returncode == 0 and result_file.is_file() else "failed"
            log = done.stderr[-2500:]
        except subprocess.TimeoutExpired as e:
            status, log = "stopped at the budget", (e.stderr or b"")[-2500:].decode(errors="replace")
        entry.update(status=status, seconds=time.perf_counter() - tick)
        if status == "ok":
            result = json.loads(result_file.read_text())
            entry.update(result=result, detail=headline(name, result))
            if result.get("exit_status", 0) != 0:
                entry["status"] = "failed"
        else:
            entry.update(detail=log.strip().splitlines()[-1] if log.strip() else "", log_tail=log)
        steps.append(entry)
    data = {"config": {**asdict(cfg), "out": str(cfg.out)}, "machine": machine(),
            "seconds": time.perf_counter() - started, "steps": steps}
    write_json(cfg.out / "gpu.json", data)
    (cfg.out / "gpu.md").write_text(markdown(data))
    return data


def markdown(data: dict) -> str:
    rows = [f"| {s['step']} | {s['status']} | {s['seconds']:.0f} | {s.get('detail', '').replace('|', '/')} |"
            for s in data["steps"]]
    mode = "dry run (CPU, tiny shapes)" if data["config"]["dry_run"] else "GPU"
    return "\n".join([f"GPU check, {mode}: {data['machine']}; {data['seconds']:.0f} s of a "
                      f"{data['config']['budget_s']:.0f} s budget", "", "| step | status | s | numbers |",
                      "| --- | --- | --- | --- |", *rows, ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=GpuCheckConfig.out, help="default: %(default)s")
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny shapes")
    p.add_argument("--budget-s", type=float, default=GpuCheckConfig.budget_s, help="default: %(default)s")
    p.add_argument("--steps", nargs="+", default=list(ESTIMATE_S), help="default: %(default)s")
    p.add_argument("--step", help=argparse.SUPPRESS)  # one step, in the process the check started
    a = p.parse_args(argv)
    if a.step:
        write_json(a.out / f"{a.step}.json", run_step(a.step, a.dry_run, a.out))
        return 0
    try:
        cfg = GpuCheckConfig(out=a.out, dry_run=a.dry_run, budget_s=a.budget_s, steps=a.steps)
    except ValueError as e:
        p.error(str(e))
    data = run(cfg)
    print((cfg.out / "gpu.md").read_text())
    return 1 if any(s["status"] in ("failed", "stopped at the budget") for s in data["steps"]) else 0


if __name__ == "__main__":
    sys.exit(main())
