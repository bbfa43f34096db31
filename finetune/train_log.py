"""Per-step metrics: a JSONL log, log lines, TensorBoard when installed, and peak memory."""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

LOG_FILE = "train_log.jsonl"
TENSORBOARD_DIR = "tensorboard"


def say(message: str) -> None:
    """A log line on stdout that does not break a progress bar."""
    from tqdm import tqdm

    tqdm.write(f"[qlora] {message}", file=sys.stdout)
    sys.stdout.flush()


def bar_disabled(progress: bool | None) -> bool | None:
    """tqdm's `disable` for --progress / --no-progress; None shows bars on a terminal only."""
    return None if progress is None else not progress


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def format_step(record: dict, total_steps: int) -> str:
    lrs = " / ".join(f"{record[k]:.2e}" for k in ("lr", "lr_projector") if k in record)
    return (f"step {record['step']}/{total_steps} | loss {record['loss']:.4f} | lr {lrs} | "
            f"{record['tokens_per_s']:,.0f} tok/s | padding {record['padding']:.1%} | "
            f"peak mem {record['peak_mem_gb']:.2f} GB")


class TrainLog:
    """Appends one JSON line per optimizer step (rank 0 only); on resume, keeps the lines up to
    the checkpoint's step so the log reads as one run."""

    def __init__(self, out_dir: Path, resumed_step: int | None, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.path = out_dir / LOG_FILE
        self.history: list[dict] = []
        self.writer = None
        if not enabled:
            return
        if resumed_step is not None and self.path.is_file():
            lines = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.history = [r for r in lines if r["step"] <= resumed_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                say("TensorBoard is not installed (pip install tensorboard); logging to JSONL only")
            else:
                self.writer = SummaryWriter(str(out_dir / TENSORBOARD_DIR), purge_step=resumed_step)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.history.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
