"""Settings of the web app (`python app.py`): flags, each also an environment variable for Spaces.

    python app.py --model CKPT --load-in 4bit --port 7860 --max-sessions 4
    MMCHAT_MODEL=llava-hf/llava-1.5-7b-hf python app.py      # what a Space sets in its settings

A flag beats its variable; the variable beats the default. On Hugging Face Spaces (`SYSTEM=spaces`
or `SPACE_ID` set) the default host is 0.0.0.0, which the Space's proxy needs. The OpenAI routes
(`/v1/...`) come along there too: set MMCHAT_API_KEY as a Space *secret*, or MMCHAT_API=false.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping

from mmchat.config import LOAD_IN
from mmchat.serving.assets import assets_dir

DEFAULT_MAX_BATCH = 8
"""Answers decoded together by default: 8 conversations of 2,000 tokens hold ~8 GB of KV cache on
a LLaVA-1.5-7B, which a 24 GB card running it in 4 bits can spare."""
DEMO_MODEL = assets_dir() / "demo-model"
"""The small model the project trains and ships; served when no --model is given."""
ENV_PREFIX = "MMCHAT_"


@dataclass
class ServeConfig:
    model: str = str(DEMO_MODEL)
    """An mmchat checkpoint folder, a llava-hf folder or a hub id (converted on the fly)."""
    load_in: str | None = None
    """LLM weights: 4bit, 8bit, 16bit or 32bit; None picks 4bit on a GPU and 32bit on a CPU
    (bitsandbytes' 4-bit matmuls are slower than plain float32 on CPUs)."""
    device: str | None = None
    """cuda, cuda:N or cpu; None picks cuda when available."""
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    """A temporary public gradio.live link (needs network)."""
    max_sessions: int = DEFAULT_MAX_BATCH
    """Conversations that keep a KV cache between turns (answers in progress always keep theirs);
    the least recently used drop theirs and are re-prefilled when their user comes back. A
    LLaVA-7B cache costs ~0.5 MB per token."""
    max_conversations: int = 256
    """Conversations remembered at all (text and images at most twice the model's input size)."""
    max_batch: int = DEFAULT_MAX_BATCH
    """Answers decoded together (the page's and the API's), one LLM forward per step for all;
    1 answers one at a time. Also the page queue's concurrency."""
    api: bool = True
    """Also serve the OpenAI-compatible routes (`/v1/models`, `/v1/chat/completions`) on the same port."""
    api_key: str | None = None
    """Require 'Authorization: Bearer KEY' on the `/v1` routes (the page itself stays open)."""

    def __post_init__(self) -> None:
        if self.load_in is not None and self.load_in not in LOAD_IN:
            raise ValueError(f"--load-in {self.load_in!r}: choose one of {', '.join(LOAD_IN)}")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port {self.port}: must be between 1 and 65535")
        for name in ("max_sessions", "max_conversations", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.max_conversations < self.max_sessions:
            raise ValueError(
                f"--max-conversations {self.max_conversations} is below --max-sessions {self.max_sessions}; "
                "raise --max-conversations"
            )
        if self.api_key == "":
            raise ValueError("--api-key is empty; give a key or leave the flag out")

    @property
    def is_demo_model(self) -> bool:
        return Path(self.model).resolve() == DEMO_MODEL


def on_spaces(environ: Mapping[str, str]) -> bool:
    return environ.get("SYSTEM") == "spaces" or bool(environ.get("SPACE_ID"))


def on_zero_gpu(environ: Mapping[str, str]) -> bool:
    """A ZeroGPU Space (as the `spaces` package tells: SPACES_ZERO_GPU=true)."""
    return environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def env_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{name}={value!r}: use true or false")


def _defaults(environ: Mapping[str, str]) -> dict:
    """Defaults for each flag: the dataclass's, overridden by MMCHAT_* variables."""
    values = {f.name: f.default for f in fields(ServeConfig)}
    if on_spaces(environ):
        values["host"] = "0.0.0.0"
    for f in fields(ServeConfig):
        name = ENV_PREFIX + f.name.upper()
        raw = environ.get(name)
        if raw is None or raw == "":
            continue
        if f.name in ("share", "api"):
            values[f.name] = env_bool(name, raw)
        elif f.name in ("port", "max_sessions", "max_conversations", "max_batch"):
            try:
                values[f.name] = int(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r}: must be a whole number") from None
        else:
            values[f.name] = raw
    return values


def parse_args(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> ServeConfig:
    environ = os.environ if environ is None else environ
    p = argparse.ArgumentParser(
        prog="python app.py", description="Chat about images in the browser (Gradio).",
        epilog="Every flag can also be set as an environment variable: --max-sessions is MMCHAT_MAX_SESSIONS.",
    )
    try:
        d = _defaults(environ)
    except ValueError as e:
        p.error(str(e))
    p.add_argument("--model", default=d["model"],
                   help="mmchat checkpoint folder, LLaVA folder or hub id (default: the demo model in assets/demo-model)")
    p.add_argument("--load-in", choices=LOAD_IN, default=d["load_in"],
                   help="LLM weight precision (default: 4bit on a GPU, 32bit on a CPU)")
    p.add_argument("--device", default=d["device"], help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--host", default=d["host"], help="address to bind (default: %(default)s; 0.0.0.0 on Spaces)")
    p.add_argument("--port", type=int, default=d["port"], help="default: %(default)s")
    p.add_argument("--share", action=argparse.BooleanOptionalAction, default=d["share"],
                   help="also open a temporary public gradio.live link (default: off)")
    p.add_argument("--max-sessions", type=int, default=d["max_sessions"],
                   help="conversations that keep a KV cache; least recently used are evicted (default: %(default)s)")
    p.add_argument("--max-conversations", type=int, default=d["max_conversations"],
                   help="conversations remembered at all (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=d["max_batch"],
                   help="answers decoded together, the page's and the API's (default: %(default)s; 1: one at a time)")
    p.add_argument("--api", action=argparse.BooleanOptionalAction, default=d["api"],
                   help="also serve the OpenAI-compatible API under /v1 on the same port (default: on)")
    p.add_argument("--api-key", default=d["api_key"],
                   help="require 'Authorization: Bearer KEY' on /v1 (default: none; set it on Spaces)")
    a = p.parse_args(argv)
    try:
        return ServeConfig(a.model, a.load_in, a.device, a.host, a.port, a.share, a.max_sessions,
                           a.max_conversations, a.max_batch, api=a.api, api_key=a.api_key)
    except ValueError as e:
        p.error(str(e))
