"""Shared fixtures: a tokenizer trained here and tiny random models (CPU, no network)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tiny_models import build_checkpoint, build_tokenizer  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    """In CI (`CI` set, as `.ci/run` does) a skipped test fails the run: every test here can run
    on a CPU with no network, so a skip means something is missing (e.g. chromium)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if os.environ.get("CI") and skipped and exitstatus == 0:
        reporter.write_line(f"error: {skipped} test(s) skipped in CI; every test must run (see the reasons above)", red=True)
        session.exitstatus = 1


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` (tests/test_gpu.py) need CUDA: without it they are deselected, so they neither
    run nor count as skipped; `-m gpu` then says why. MMCHAT_GPU_TESTS_ON_CPU=1 runs them on the CPU."""
    import torch

    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu or torch.cuda.is_available() or os.environ.get("MMCHAT_GPU_TESTS_ON_CPU"):
        return
    items[:] = [item for item in items if not item.get_closest_marker("gpu")]
    config.hook.pytest_deselected(items=gpu)
    if "gpu" in (config.option.markexpr or ""):
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        reporter.write_line(f"no CUDA GPU is visible: {len(gpu)} gpu test(s) deselected "
                            "(MMCHAT_GPU_TESTS_ON_CPU=1 runs them on the CPU)", yellow=True)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer_dir):
    """A random tiny mmchat checkpoint folder (vision in the folder, 16 image tokens)."""
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llava_hf_model(tmp_path_factory, tiny_tokenizer_dir):
    """(folder, model): a random tiny llava-hf checkpoint as `save_pretrained` writes it, with its
    processor and `<image>` token, and the in-memory `LlavaForConditionalGeneration` it came from."""
    from tiny_models import build_llava_hf

    out = tmp_path_factory.mktemp("llava-hf") / "tiny-llava-hf"
    return out, build_llava_hf(out, tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llava_hf_dir(tiny_llava_hf_model):
    """A random tiny llava-hf checkpoint folder (CLIP 32 px / patch 8 -> 16 image tokens, tiny LLaMA)."""
    return tiny_llava_hf_model[0]


@pytest.fixture(scope="session")
def app_server(tiny_checkpoint, tmp_path_factory):
    """`python app.py` serving the tiny checkpoint in 4 bits (the path users get on a GPU).

    --max-sessions 3 is below the load test's 8 clients, so eviction and re-prefill happen.
    """
    from app_server import AppServer

    server = AppServer(["--model", str(tiny_checkpoint), "--load-in", "4bit", "--max-sessions", "3"],
                       tmp_path_factory.mktemp("app"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def demo_app_server(tmp_path_factory):
    """`python app.py` with no flags: the committed demo model, as a fresh offline machine runs it."""
    from app_server import AppServer

    server = AppServer([], tmp_path_factory.mktemp("demo-app"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_train_checkpoint(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny checkpoint that LoRA can teach (wide lm_head; see `build_trainable_checkpoint`)."""
    from tiny_models import build_trainable_checkpoint

    return build_trainable_checkpoint(tmp_path_factory.mktemp("train-ckpt") / "tiny", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory):
    """32 records: a solid-colour image + "What colour is it?" -> the colour's name."""
    from tiny_models import build_colour_data

    return build_colour_data(tmp_path_factory.mktemp("colours"), records=32)


@pytest.fixture(scope="session")
def qlora_run(tmp_path_factory, tiny_train_checkpoint, colour_data):
    """Stage 2 (4-bit QLoRA) trained for 40 steps with tests/configs/tiny-instruct.yaml."""
    from finetune.train import train
    from tiny_models import one_torch_thread, tiny_train_config

    out = tmp_path_factory.mktemp("qlora") / "run"
    with one_torch_thread():
        return train(tiny_train_config("instruct", model=str(tiny_train_checkpoint), data=str(colour_data),
                                       image_root=str(colour_data.parent), output_dir=str(out), max_steps=40))
