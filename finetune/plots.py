"""The loss curve of a run as a PNG (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

from mmchat.checkpoint import atomic_file


def plot_loss(history: list[dict], path: Path, title: str = "") -> Path | None:
    """Loss per optimizer step (with a moving average) and the learning rate; None without steps."""
    if not history:
        return None
    from matplotlib.figure import Figure  # no pyplot: no backend to choose, no global figure list

    steps = [r["step"] for r in history]
    losses = [r["loss"] for r in history]
    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.subplots()
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="loss")
    ax.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"mean of {window}" if window > 1 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("answer-token loss")
    ax.grid(alpha=0.3)
    lr_axis = ax.twinx()
    lr_axis.plot(steps, [r["lr"] for r in history], color="tab:orange", linewidth=1, label="lr")
    lr_axis.set_ylabel("learning rate", color="tab:orange")
    lines = ax.get_legend_handles_labels()[0] + lr_axis.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp)
    return path
