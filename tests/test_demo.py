"""The demo model's build end to end: `python -m finetune.demo --quick` trains CLIP, tokenizer,
LLaMA, stage 1 and stage 2 from nothing, and the result answers held-out questions far above
chance through the 4-bit path (the slow test of the suite: a few minutes on 2 CPU cores)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from mmchat.checkpoint import PROJECTOR_FILE, read_config
from mmchat.model import IMAGE_NEWLINE

REPO = Path(__file__).resolve().parents[1]
# A hang must still fail, well inside CI's time; how fast the build is, is printed per step, not tested.
BUILD_TIMEOUT_S = 900
COLOUR_CHANCE = 1 / 6


def run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_build(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """The MLP quick build from nothing: (its folder, its work folder, the command's output). Its
    pretraining is reused by the AnyRes build."""
    root = tmp_path_factory.mktemp("demo")
    out, work = root / "demo-model", root / "work"
    built = run(["finetune.demo", "--quick", "--out", str(out), "--work", str(work)], timeout=BUILD_TIMEOUT_S)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return out, work, built


@pytest.mark.timeout(3 * BUILD_TIMEOUT_S)  # a build, an eval and a rebuild
def test_quick_build_trains_from_nothing_and_beats_chance_in_4bit(quick_build, tmp_path):
    out, work, built = quick_build
    for step in ("data", "tokenizer", "CLIP and LLM pretraining", "stage 1: align", "stage 2: instruct"):
        assert f"{step}" in built.stdout and " done in " in built.stdout, f"no time printed for step {step!r}"

    config = read_config(out)
    assert config.llm == "llm" and config.adapter == "adapter" and config.vision.pretrained is None
    assert (out / "llm" / "config.json").is_file() and (out / "vision" / "visual.safetensors").is_file()
    assert sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) < 20 * 2**20
    card = (out / "README.md").read_text()
    assert "python -m finetune.eval" in card and (out / "learning_curves.png").stat().st_size > 10_000

    heldout = work / "data-heldout"
    scored = run(["finetune.eval", "--model", str(out), "--data", str(heldout / "data.json"), "--image-root", str(heldout),
                  "--load-in", "4bit", "--device", "cpu", "--json", "--no-progress"], timeout=BUILD_TIMEOUT_S)
    assert scored.returncode == 0, scored.stderr[-3000:]
    result = json.loads(scored.stdout)
    assert result["load_in"] == "4bit" and set(result["per_question_type"]) == {"colour"}
    assert result["questions"] >= 100
    assert result["accuracy"] >= 0.70 > 3 * COLOUR_CHANCE, result
    assert result == {**json.loads((out / "build.json").read_text())["eval"], "seconds": result["seconds"]}, \
        "the card's scores are what the eval command gives"

    # Re-running with --reuse-pretraining keeps stage 0 and retrains only stages 1-2: same model, same scores.
    again = run(["finetune.demo", "--quick", "--out", str(tmp_path / "again"), "--work", str(work),
                 "--reuse-pretraining"], timeout=BUILD_TIMEOUT_S)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "reusing the pretrained CLIP and LLM" in again.stdout and "clip step" not in again.stdout
    rebuilt = json.loads((tmp_path / "again" / "build.json").read_text())
    assert rebuilt["pretraining_reused"] and rebuilt["eval"]["per_question_type"] == result["per_question_type"]


@pytest.mark.timeout(2 * BUILD_TIMEOUT_S)  # a build and a comparison
def test_quick_build_with_a_resampler_reaches_the_same_bar(tmp_path):
    """`--projector resampler`: nine learned queries instead of the MLP, the same build and the same bar."""
    out = tmp_path / "demo-resampler"
    built = run(["finetune.demo", "--quick", "--projector", "resampler", "--out", str(out), "--work", str(tmp_path / "work")],
                timeout=BUILD_TIMEOUT_S)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    config = read_config(out)
    assert (config.projector.type, config.projector.queries) == ("resampler", 9)
    build = json.loads((out / "build.json").read_text())
    assert build["eval"]["load_in"] == "4bit" and build["eval"]["questions"] >= 100
    assert build["eval"]["accuracy"] >= 0.70 > 3 * COLOUR_CHANCE, build["eval"]
    assert build["training"]["instruct"]["mean_tokens_per_s"] > 0
    assert "--projector resampler --resampler-queries 9" in (out / "README.md").read_text()
    compared = run(["finetune.demo.compare", str(out), "--turns", "2", "--repeats", "1"], timeout=300)
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert "| resampler (9 queries) | 9 | " in compared.stdout and f"{build['eval']['accuracy']:.1%}" in compared.stdout


@pytest.mark.timeout(2 * BUILD_TIMEOUT_S)  # a build and a comparison
def test_quick_build_with_anyres_reaches_the_same_bar(quick_build, tmp_path):
    """`--anyres`: the MLP build's pretrained CLIP and LLM, images drawn at twice the CLIP's side and
    read as LLaVA-NeXT reads them (the whole image in one tile, then a 2×2 grid with a newline per row):
    the same stages 1-2 and the same bar; compare counts each build's own image tokens."""
    mlp, mlp_work, _ = quick_build
    work = tmp_path / "work"  # a copy: the pretraining is all a reusing build needs, and it rewrites stage 0
    shutil.copytree(mlp_work / "stage0", work / "stage0")
    shutil.copy(mlp_work / "pretraining.json", work / "pretraining.json")
    out = tmp_path / "demo-anyres"
    built = run(["finetune.demo", "--quick", "--anyres", "--reuse-pretraining", "--out", str(out), "--work", str(work)],
                timeout=BUILD_TIMEOUT_S)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert "reusing the pretrained CLIP and LLM" in built.stdout and "clip step" not in built.stdout
    config = read_config(out)
    side = config.vision.image_size
    assert config.projector.type == "mlp2x_gelu"
    assert config.vision.anyres.pinpoints == [[side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    assert IMAGE_NEWLINE in load_file(str(out / PROJECTOR_FILE))
    with Image.open(next((work / f"data-heldout-{2 * side}px" / "images").iterdir())) as image:
        assert image.size == (2 * side, 2 * side)
    build = json.loads((out / "build.json").read_text())
    assert build["pretraining_reused"] and build["eval"]["load_in"] == "4bit" and build["eval"]["questions"] >= 100
    assert build["eval"]["accuracy"] >= 0.70 > 3 * COLOUR_CHANCE, build["eval"]
    assert build["training"]["instruct"]["mean_tokens_per_s"] > 0
    assert "--quick --anyres" in (out / "README.md").read_text()
    compared = run(["finetune.demo.compare", str(mlp), str(out), "--turns", "2", "--repeats", "1"], timeout=300)
    assert compared.returncode == 0, compared.stderr[-3000:]
    # 9 base tokens, then the 2×2 tiles' 6×6 map with a newline after each row: 9 + 6 × 7
    assert "| mlp2x_gelu | 9 | " in compared.stdout and "| AnyRes (mlp2x_gelu, base + 2×2 tiles) | 51 | " in compared.stdout
    assert f"{build['eval']['accuracy']:.1%}" in compared.stdout
