"""mmchat as an installed package: importable and runnable from any folder, console commands, and
the demo model found without a checkout (pyproject.toml; the README installs with `pip install -e`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMMANDS = {  # console command -> the module whose main() it runs (the `python -m` entry point's)
    "mmchat-app": "app",
    "mmchat-chat": "mmchat.cli",
    "mmchat-serve": "mmchat.serve",
    "mmchat-convert": "mmchat.convert.cli",
    "mmchat-data": "finetune.data.cli",
    "mmchat-finetune": "finetune.qlora",
    "mmchat-merge": "finetune.merge",
    "mmchat-eval": "finetune.eval",
    "mmchat-build-demo": "finetune.demo.build",
}


def _outside_env() -> dict:
    """The environment minus anything that would put the checkout on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    return env


def test_modules_run_from_a_folder_outside_the_checkout(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "finetune.data", "check", "--help"], cwd=tmp_path,
                          env=_outside_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + "\n(is the project installed? pip install -e '.[test]')"
    assert "--image-root" in proc.stdout
    code = "import mmchat, finetune; print(mmchat.__file__); print(finetune.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_outside_env(), capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    assert [Path(p).parent.parent for p in out] == [ROOT, ROOT]  # the editable install points at this checkout


def test_console_commands_are_installed(tmp_path):
    from importlib.metadata import entry_points

    scripts = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("mmchat-")}
    assert sorted(scripts) == sorted(COMMANDS)
    for name, module in COMMANDS.items():
        assert (BIN / name).is_file(), f"{BIN / name} missing: install the project (pip install -e '.[test]')"
        assert scripts[name].module == module and scripts[name].attr == "main"
        assert callable(scripts[name].load())
    for name in ("mmchat-data", "mmchat-convert"):  # two of them run for real, from outside the checkout
        proc = subprocess.run([str(BIN / name), "--help"], cwd=tmp_path, env=_outside_env(), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m"), proc.stderr


def test_app_finds_the_demo_model_from_another_folder(tmp_path):
    code = ("import json; from mmchat.serving.config import parse_args; from mmchat.checkpoint import is_checkpoint; "
            "c = parse_args([], {}); print(json.dumps([c.model, c.is_demo_model, is_checkpoint(c.model)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_outside_env(), capture_output=True,
                         text=True, timeout=60, check=True).stdout
    model, is_demo, loadable = json.loads(out)
    assert Path(model) == ROOT / "assets" / "demo-model" and is_demo and loadable


def test_a_regular_install_carries_the_demo_model_and_examples(tmp_path):
    """`pip install .` (no checkout beside the code): the assets land in <prefix>/share/mmchat and
    the app's defaults point there."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(wheels)], cwd=tmp_path, env=_outside_env(), check=True, timeout=300,
                   capture_output=True)
    prefix = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True, timeout=120)
    # pip's --python installs into that environment and leaves this one's editable install alone.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(prefix / "bin" / "python"), "install", "-q",
                    "--no-deps", *map(str, wheels.glob("*.whl"))], env=_outside_env(), check=True, timeout=300,
                   capture_output=True)
    python = prefix / "bin" / "python"
    # The new environment's own packages first, then this one's third-party packages (torch, gradio, ...);
    # PYTHONPATH folders are not scanned for .pth files, so the editable checkout stays out of it.
    env = {**_outside_env(), "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    code = ("import json, mmchat; from mmchat.serving.config import DEMO_MODEL; from mmchat.serving.examples import "
            "EXAMPLES, EXAMPLES_DIR, example_path; from mmchat.checkpoint import is_checkpoint; "
            "print(json.dumps([mmchat.__file__, str(DEMO_MODEL), is_checkpoint(DEMO_MODEL), "
            "all(example_path(e).is_file() for e in EXAMPLES)]))")
    out = subprocess.run([str(python), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    package, demo, loadable, examples = json.loads(out.stdout)
    assert Path(package).is_relative_to(prefix), package
    assert Path(demo) == prefix / "share" / "mmchat" / "assets" / "demo-model" and loadable and examples
