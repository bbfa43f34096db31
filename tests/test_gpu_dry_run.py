"""`python -m benchmarks.gpu --dry-run`: the GPU check's own code, end to end on the CPU at tiny shapes.

The chat and stage-2 steps run; the serve step does not fit the budget given and must be listed as
skipped for time (the tests step, `pytest -m gpu` on the CPU, takes ~40 s more and is left out here)."""
import json
import subprocess
import sys

import pytest


def gpu_check(out, *flags) -> tuple[subprocess.CompletedProcess, dict, str]:
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--dry-run", "--out", str(out), *flags],
                          capture_output=True, text=True)
    return done, json.loads((out / "gpu.json").read_text()), (out / "gpu.md").read_text()


@pytest.mark.timeout(240)
def test_dry_run_measures_chat_and_stage2_and_skips_what_does_not_fit(tmp_path):
    done, data, md = gpu_check(tmp_path, "--steps", "chat", "stage2", "serve", "--budget-s", "45")
    assert done.returncode == 0, done.stderr[-3000:]
    status = {s["step"]: s["status"] for s in data["steps"]}
    assert status == {"chat": "ok", "stage2": "ok", "serve": "skipped for time"}, data["steps"]
    chat, stage2 = (s["result"] for s in data["steps"][:2])
    summary = chat["summary"]
    assert summary["mmchat_decode_tps"] > 0 and summary["transformers_decode_tps"] > 0
    assert summary["mmchat_ttft_turn3_s"] < summary["mmchat_ttft_turn1_s"]  # the cache: turn 3 prefills no image
    assert summary["greedy_agreement_failures"] == 0 and chat["engine"]["largest_batch"] > 1
    assert [r["batch"] for r in stage2["batches"]] == [1, 2]
    assert all(r["peak_bytes"] > 0 and r["predicted_bytes"] > 0 and r["tokens_per_s"] > 0 for r in stage2["batches"])
    assert "| serve | skipped for time |" in md and "| chat | ok |" in md


def test_no_time_left_skips_every_step(tmp_path):
    done, data, md = gpu_check(tmp_path, "--budget-s", "1")
    assert done.returncode == 0
    assert [s["status"] for s in data["steps"]] == ["skipped for time"] * 4
    assert md.count("skipped for time") == 4
