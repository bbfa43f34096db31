"""An OpenAI-compatible API server: `python -m mmchat.serve --model PATH_OR_HUB_ID`.

    python -m mmchat.serve --model llava-hf/llava-1.5-7b-hf --port 8000 --api-key SECRET
    MMCHAT_API_KEY=SECRET python -m mmchat.serve --model CKPT

Each flag is also a variable (`--max-sessions` is MMCHAT_MAX_SESSIONS); a flag beats its
variable. Binds 127.0.0.1 unless told otherwise; remote image URLs are off unless
`--allow-remote-images`. The routes are in `mmchat.serving.api`.
"""
from __future__ import annotations

import argparse
import os
import sys
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping

from mmchat.config import LOAD_IN
from mmchat.serving.config import DEFAULT_MAX_BATCH, DEMO_MODEL, ENV_PREFIX, ServeConfig, env_bool


@dataclass
class ApiConfig:
    model: str = str(DEMO_MODEL)
    """mmchat checkpoint folder, LLaVA folder or hub id (converted once into the cache)"""
    load_in: str | None = None
    """LLM weight precision (default: 4bit on a GPU, 32bit on a CPU)"""
    device: str | None = None
    """cuda, cuda:N or cpu (default: cuda when available)"""
    host: str = "127.0.0.1"
    """address to bind; 0.0.0.0 opens the server to the network"""
    port: int = 8000
    api_key: str | None = None
    """require 'Authorization: Bearer KEY' on every request (default: none)"""
    max_batch: int = DEFAULT_MAX_BATCH
    """answers decoded together, one LLM forward per step for all (continuous batching); 1 decodes
    one at a time. Each costs its conversation's KV cache in memory"""
    max_sessions: int = DEFAULT_MAX_BATCH
    """conversations whose KV cache is kept for the next request that continues them (at least --max-batch)"""
    max_queue: int = 16
    """requests waiting while the batch is full; more get HTTP 429 (0: refuse when full)"""
    max_images: int = 8
    """images per request"""
    max_body_mb: float = 20.0
    """request body limit in MB; larger bodies get HTTP 413"""
    allow_remote_images: bool = False
    """fetch http(s) image URLs (off: only data: URLs)"""
    remote_image_mb: float = 10.0
    """size limit of one fetched image"""
    remote_timeout: float = 10.0
    """seconds to fetch one remote image"""

    def __post_init__(self) -> None:
        if self.load_in is not None and self.load_in not in LOAD_IN:
            raise ValueError(f"--load-in {self.load_in!r}: choose one of {', '.join(LOAD_IN)}")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port {self.port}: must be between 1 and 65535")
        if self.max_queue < 0:
            raise ValueError(f"--max-queue {self.max_queue}: must be 0 or more")
        for name in ("max_batch", "max_sessions", "max_images", "max_body_mb", "remote_image_mb", "remote_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be above 0")
        if self.api_key == "":
            raise ValueError("--api-key is empty; give a key or leave the flag out")


def parse_args(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> ApiConfig:
    environ = os.environ if environ is None else environ
    p = argparse.ArgumentParser(prog="python -m mmchat.serve", description=__doc__.splitlines()[0],
                                epilog="Every flag is also a variable: --api-key is MMCHAT_API_KEY.")
    hints = typing.get_type_hints(ApiConfig)
    for f in fields(ApiConfig):
        kind = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = _from_env(f.name, kind, environ, f.default, p)
        help_text = _doc(f.name) + (" (default: %(default)s)" if default is not None else "")
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            base = {int: int, float: float}.get(kind, str)
            choices = LOAD_IN if f.name == "load_in" else None
            p.add_argument(flag, type=base, default=default, choices=choices, help=help_text)
    a = p.parse_args(argv)
    try:
        return ApiConfig(**vars(a))
    except ValueError as e:
        p.error(str(e))


def _doc(name: str) -> str:
    import ast
    import inspect

    body = ast.parse(inspect.getsource(ApiConfig)).body[0].body
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and node.target.id == name and isinstance(after, ast.Expr):
            return after.value.value
    return ""


def _from_env(name: str, kind, environ: Mapping[str, str], default, p: argparse.ArgumentParser):
    var = ENV_PREFIX + name.upper()
    raw = environ.get(var)
    if raw is None or raw == "":
        return default
    try:
        if kind is bool:
            return env_bool(var, raw)
        return {int: int, float: float}.get(kind, str)(raw)
    except ValueError as e:
        p.error(str(e) if kind is bool else f"{var}={raw!r}: must be a number")


def model_id(model: str) -> str:
    """The id `GET /v1/models` lists: a folder's name, or the hub id as given."""
    path = Path(model)
    return path.resolve().name if path.exists() else model


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from mmchat.engine import Engine
    from mmchat.serving.api import RemoteImages, create_app
    from mmchat.serving.loaded_model import load_served_model

    config = parse_args(argv)
    served = load_served_model(ServeConfig(model=config.model, load_in=config.load_in, device=config.device))
    if not served.ready:
        print(served.summary, file=sys.stderr)
        return 1
    print(served.summary, flush=True)
    if config.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        print(f"warning: serving on {config.host} with no --api-key: anyone who can reach it can use it", flush=True)
    remote = RemoteImages(config.allow_remote_images, int(config.remote_image_mb * 2**20), config.remote_timeout)
    app = create_app(served.model, model_id(config.model), api_key=config.api_key, max_sessions=config.max_sessions,
                     max_queue=config.max_queue, max_images=config.max_images,
                     max_body_bytes=int(config.max_body_mb * 2**20), remote=remote,
                     engine=Engine(served.model, config.max_batch))
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
