"""`python -m mmchat.cli` as users run it (subprocess)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, stdin=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mmchat.cli", *args], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


PROMPTS = ["What colour?", "And the shape?"]


def test_json_prints_only_the_answers(tiny_checkpoint, tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (230, 20, 20)).save(image)
    out = run_cli("--model", str(tiny_checkpoint), "--image", str(image), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                  "--temperature", "0", "--max-new-tokens", "6", "--load-in", "32bit", "--device", "cpu", "--json")
    assert out.returncode == 0, out.stderr
    answers = json.loads(out.stdout)["answers"]  # stdout holds the JSON and nothing else
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_prompts_are_turns_of_one_conversation(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """In-process, so the reference sessions below decode with the very same numerics."""
    import mmchat.chat
    from mmchat.chat import ChatSession
    from mmchat.cli import main
    from mmchat.generate import GenerationConfig
    from mmchat.model import LoadOptions, load_model

    image = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (230, 20, 20)).save(image)
    sessions = []

    class Recorded(ChatSession):
        def __post_init__(self):
            super().__post_init__()
            sessions.append(self)

    monkeypatch.setattr(mmchat.chat, "ChatSession", Recorded)
    rc = main(["--model", str(tiny_checkpoint), "--image", str(image), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
               "--temperature", "0", "--max-new-tokens", "6", "--load-in", "32bit", "--device", "cpu", "--json"])
    assert rc == 0
    answers = json.loads(capsys.readouterr().out)["answers"]
    assert len(sessions) == 1, "both prompts go to one session"
    (s,) = sessions
    assert [(m.role, m.text, m.images) for m in s.messages] == [
        ("user", PROMPTS[0], 1), ("assistant", answers[0], 0), ("user", PROMPTS[1], 0), ("assistant", answers[1], 0)]
    assert {p.dtype for p in s.model.llm.parameters()} == {torch.float32}, "--load-in 32bit: no quantised weights"

    # The second answer is the one a session gives with the first turn (and its image) before it…
    model = load_model(tiny_checkpoint, LoadOptions(load_in="32bit", device="cpu"))
    gen = GenerationConfig(max_new_tokens=6, temperature=0.0)
    together = ChatSession(model)
    expected = ["".join(together.ask(PROMPTS[0], image, gen)), "".join(together.ask(PROMPTS[1], None, gen))]
    assert answers == [a.strip() for a in expected]
    assert s.last_stats.answer_ids == together.last_stats.answer_ids
    assert s.last_stats.prompt_tokens == together.last_stats.prompt_tokens
    # …not the one a fresh session gives to the second prompt alone.
    alone = ChatSession(model)
    "".join(alone.ask(PROMPTS[1], None, gen))
    assert alone.last_stats.prompt_tokens < s.last_stats.prompt_tokens - model.image_tokens
    assert alone.last_stats.answer_ids != s.last_stats.answer_ids


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
