"""`python -m mmchat.cli` as users run it (subprocess)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, stdin=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mmchat.cli", *args], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


def test_json_answers_each_prompt_in_one_conversation(tiny_checkpoint, tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (230, 20, 20)).save(image)
    out = run_cli("--model", str(tiny_checkpoint), "--image", str(image), "--prompt", "What colour?",
                  "--prompt", "And the shape?", "--temperature", "0", "--max-new-tokens", "6", "--json")
    assert out.returncode == 0, out.stderr
    answers = json.loads(out.stdout)["answers"]  # stdout holds the JSON and nothing else
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_interactive_reads_turns_from_stdin(tiny_checkpoint):
    out = run_cli("--model", str(tiny_checkpoint), "--max-new-tokens", "4", "--load-in", "4bit",
                  stdin="hello there\n/undo\nwhat now\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("ASSISTANT: ") == 2


def test_errors_are_one_line_with_exit_code_2(tiny_checkpoint, tmp_path):
    bad = tmp_path / "photo.png"
    bad.write_text("plain text")
    out = run_cli("--model", str(tiny_checkpoint), "--image", str(bad), "--prompt", "hi")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"error: {bad} is not a readable image (UnidentifiedImageError); upload a PNG, JPEG, WebP or GIF file"
    ]
    out = run_cli("--model", str(tiny_checkpoint), "--prompt", "hi", "--top-p", "0")
    assert out.returncode == 2 and "top_p" in out.stderr
