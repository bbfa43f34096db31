"""Serving benchmark: `python -m mmchat.serve` vs `transformers serve`, each in its own process, driven
by the official `openai` client.

    python -m benchmarks.serve --quick         # 2-layer LLM, users 1 and 4: about a minute on 2 CPU cores
    python -m benchmarks.serve                 # 8-layer × 256 LLaMA, users 1, 4, 8, 16: about 6 minutes
    python -m benchmarks.serve --vllm ../peers/vllm/bin/python   # and vLLM twice (benchmarks.serve_vllm): +10 min

One random-weight llava-hf folder (CLIP 336 px / patch 14 = 576 image tokens, llava-hf/llava-1.5's
processor and chat template) is served, one server at a time, by mmchat with batching on
(`--max-batch`) and off (`--max-batch 1`), and by `transformers serve` plain and with
`--continuous-batching`; with `--vllm VENV/bin/python`, by vLLM too, as it starts by default and with
`--block-size 32` (`benchmarks.serve_vllm` says how). Against each server:

  (a) one user, `--turns` turns about a picture: time to first token per turn (mmchat reuses the
      conversation's KV cache across requests; `transformers serve` re-reads the whole history);
  (b) 1, 4, 8 and 16 users at once, `--rounds` turns each: aggregate completion tokens/s (all tokens
      ÷ the phase's wall time), p50/p95 time to first token, the server's peak memory (VmHWM of its
      process tree, reset before each phase).

mmchat (batching on) runs first; its single-user answers are every other server's history, so all
see the same prompts, and their greedy answers must agree with it (`benchmarks.serve_agreement`:
texts equal, or a flip at a near-tie; the run fails otherwise). Each server answers one warm-up
request before anything is timed, and gets `--threads` torch threads (OMP_NUM_THREADS /
MKL_NUM_THREADS); the clients run in this process.
Results: serve.json, serve.png and serve_readme.md in `--out`; the last line is the headline.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.common import machine
from benchmarks.random_llava import LLAVA_15_CHAT_TEMPLATE, LlavaShape
from benchmarks.serve_vllm import VLLM_SERVERS, thread_note, vllm_command, vllm_env

SERVERS = {
    "mmchat": "mmchat",
    "mmchat-unbatched": "mmchat, batching off",
    **{key: label for key, (label, _) in VLLM_SERVERS.items()},
    "transformers": "transformers serve",
    "transformers-cb": "transformers serve --continuous-batching",
}
"""Run in this order: mmchat's single-user answers are the others' history."""

SERVE_SHAPE = LlavaShape(hidden=256, layers=8, heads=4, kv_heads=4, intermediate=768)
"""The issue's reference shape: an 8-layer, 256-wide LLaMA; 4 heads of 64 (a real head size) with as
many KV heads, MLP 768 (LLaMA's 8/3 × width rounded up to a multiple of 256); the chat benchmark's
8k vocabulary and 4-block CLIP at 336 px (576 image tokens)."""

QUICK_SHAPE = LlavaShape(hidden=256, layers=2, heads=4, kv_heads=4, intermediate=768, vision_layers=2)

@dataclass
class ServeBenchConfig:
    quick: bool = False
    """A 2-layer LLM, users 1 and 4, fewer turns and tokens: about a minute on 2 CPU cores."""
    out: Path = Path("benchmarks/results")
    """Where serve.json, serve.png and serve_readme.md go."""
    turns: int = 10
    """Turns of the single-user conversation."""
    rounds: int = 5
    """Turns of each user's conversation in the concurrent phases."""
    users: list[int] = field(default_factory=lambda: [1, 4, 8, 16])
    new_tokens: int = 24
    """max_tokens of every request (the random model seldom ends an answer sooner)."""
    threads: int = 1
    """torch threads of each server process; one leaves the second of 2 cores to the clients and the
    server's event loop, and keeps the numbers steady on a shared machine."""
    max_batch: int = 16
    """mmchat's --max-batch with batching on (running generations decoded together)."""
    device: str = "cpu"
    seed: int = 0
    vllm: Path | None = None
    """vLLM's venv python (`bash benchmarks/peers/vllm.sh` makes it): vLLM is served too, default and
    `--block-size 32`; without it, vLLM is left out."""
    shape: LlavaShape = field(default_factory=lambda: SERVE_SHAPE)
    servers: list[str] | None = None
    """Which servers run (keys of `SERVERS`; mmchat always does: the others are compared with it).
    None: all of them (vLLM's only with `vllm`). `benchmarks.gpu --dry-run` runs two, for time."""
    solo_rounds: int = 5
    """Paired rounds of one user's decode in process, a session alone vs the engine (`--quick`: 1)."""

    def __post_init__(self) -> None:
        if self.servers is not None:
            unknown = sorted(set(self.servers) - set(SERVERS))
            if unknown:
                raise ValueError(f"servers {unknown}: choose from {sorted(SERVERS)}")
        if self.quick:
            self.solo_rounds = 1
            self.shape = QUICK_SHAPE
            self.turns, self.rounds, self.users = min(self.turns, 4), min(self.rounds, 3), [1, 4]
            self.new_tokens = min(self.new_tokens, 8)
        if self.turns < 2:
            raise ValueError(f"--turns {self.turns}: the single-user phase compares later turns, use at least 2")
        if self.rounds < 1 or self.new_tokens < 1 or self.threads < 1:
            raise ValueError("--rounds, --new-tokens and --threads must be at least 1")
        if self.max_batch < 2:
            raise ValueError(f"--max-batch {self.max_batch}: batching on needs at least 2 "
                             "(the batching-off run uses 1)")
        if not self.users or min(self.users) < 1:
            raise ValueError(f"--users {self.users}: give user counts of at least 1")
        self.users = sorted(set(self.users))
        if self.vllm is not None and not Path(self.vllm).is_file():
            raise ValueError(f"--vllm {self.vllm}: not found; make vLLM's venv with `bash benchmarks/peers/vllm.sh` "
                             "and pass VENV/bin/python")


# ------------------------------------------------------------------ the served folder


def build_folder(out: Path, shape: LlavaShape, seed: int) -> list[str]:
    """A random llava-hf folder as the hub's llava-1.5 folders are: weights named as the hub names them
    (`vision_tower.vision_model.…`, which vLLM needs; transformers 5 saves `vision_tower.…` and reads
    both), tokenizer, and a `LlavaProcessor` (CLIP preprocessing, the chat template) that `transformers
    serve` needs."""
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    from benchmarks.random_llava import build_llava_hf
    from mmchat.convert.to_llava_hf import hub_layout

    lexicon = build_llava_hf(out, shape, seed)
    hub_layout(out)
    side = shape.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                         resample=3)
    LlavaProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(out),
                   patch_size=shape.patch, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=LLAVA_15_CHAT_TEMPLATE).save_pretrained(out)
    return lexicon


# ------------------------------------------------------------------ one server process


@dataclass
class Server:
    key: str
    command: list[str]
    process: subprocess.Popen
    url: str
    log: Path
    model_id: str = ""
    startup_s: float = 0.0


def mmchat_batching_flag() -> bool:
    """Whether this mmchat's server takes --max-batch (batching decode steps across conversations)."""
    from dataclasses import fields

    from mmchat.serve import ApiConfig

    return "max_batch" in {f.name for f in fields(ApiConfig)}


def server_command(key: str, cfg: ServeBenchConfig, folder: Path, port: int, batching_flag: bool) -> list[str]:
    if key in VLLM_SERVERS:
        return vllm_command(key, cfg.vllm, folder, port, cfg.seed)
    if key.startswith("mmchat"):
        batch = ["--max-batch", "1" if key == "mmchat-unbatched" else str(cfg.max_batch)] if batching_flag else []
        # every user's conversation keeps its KV cache (+ the warm-up and single-user ones), and
        # --max-sessions is at least --max-batch; no user is ever refused for a full queue
        sessions = max(max(cfg.users) + 2, cfg.max_batch)
        return [sys.executable, "-m", "mmchat.serve", "--model", str(folder), "--port", str(port),
                "--device", cfg.device, "--load-in", "32bit", "--max-sessions", str(sessions),
                "--max-queue", str(4 * max(cfg.users)), *batch]
    cli = Path(sys.executable).with_name("transformers")
    cli = str(cli) if cli.is_file() else shutil.which("transformers")
    if cli is None:
        raise SystemExit("`transformers serve` not found: pip install 'transformers[serving]' openai")
    return [cli, "serve", str(folder), "--device", cfg.device, "--dtype", "float32", "--host", "127.0.0.1",
            "--port", str(port), *(["--continuous-batching"] if key == "transformers-cb" else [])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(key: str, cfg: ServeBenchConfig, folder: Path, work: Path, batching_flag: bool) -> Server:
    """Start the server and wait until GET /v1/models answers (the model is loaded by then)."""
    port = free_port()
    env = vllm_env() if key in VLLM_SERVERS else {}
    return launch(key, server_command(key, cfg, folder, port, batching_flag), port, work, cfg.threads, **env)


def launch(key: str, command: list[str], port: int, work: Path, threads: int, **extra_env: str) -> Server:
    """Run `command` (a server listening on 127.0.0.1:`port`, its log in WORK/KEY.log) and wait until GET
    /v1/models answers (the model is loaded by then)."""
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith("MMCHAT_")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False", MMCHAT_CACHE=str(work / "cache"),
               NO_PROXY="127.0.0.1,localhost", **extra_env)
    log = work / f"{key}.log"
    with open(log, "w") as f:
        process = subprocess.Popen(command, env=env, stdout=f, stderr=subprocess.STDOUT,
                                   cwd=Path(__file__).resolve().parent.parent)
    server = Server(key, command, process, f"http://127.0.0.1:{port}/v1", log)
    started, opener = time.perf_counter(), urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.perf_counter() - started < 600:
        if process.poll() is not None:
            raise SystemExit(f"{key} exited with {process.returncode} before serving:\n{log.read_text()[-3000:]}")
        try:
            with opener.open(server.url + "/models", timeout=5) as response:
                server.model_id = json.loads(response.read())["data"][0]["id"]
            server.startup_s = time.perf_counter() - started
            return server
        except OSError:
            time.sleep(0.25)
    stop_server(server)
    raise SystemExit(f"{key} did not answer GET /v1/models within 600 s:\n{log.read_text()[-3000:]}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a server that forks workers counts them all)."""
    tree, i = [pid], 0
    while i < len(tree):
        for task in Path(f"/proc/{tree[i]}/task").glob("*"):
            try:
                tree += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        i += 1
    return tree


def reset_peak(pid: int) -> None:
    """Peak RSS starts again from the current RSS (Linux `clear_refs` 5), for every process of the tree."""
    for p in process_tree(pid):
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            pass  # not Linux, or gone: the peak then runs from the start


def peak_mb(pid: int) -> float:
    total = 0
    for p in process_tree(pid):
        try:
            match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{p}/status").read_text())
        except OSError:
            continue
        total += int(match.group(1)) if match else 0
    return total / 1024 if total else float("nan")


def notes(server: Server) -> list[str]:
    """What a server's log says about how it served (transformers serve falls back for VLMs)."""
    text = server.log.read_text()
    found = []
    if "does not support continuous batching" in text:
        found.append("continuous batching unavailable for this model: transformers serve fell back to "
                     "sequential generate")
    if server.key in VLLM_SERVERS:
        found += thread_note(text)
    return found


# ------------------------------------------------------------------ the run


def progress(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def phase_summary(records: list[dict], wall: float, peak: float, rounds: int) -> dict:
    ttfts = [r["ttft_s"] for r in records]
    tokens = sum(r["completion_tokens"] for r in records)
    last = [r["ttft_s"] for r in records if r["turn"] == rounds]
    return {"aggregate_tps": tokens / wall, "completion_tokens": tokens, "wall_s": wall, "requests": len(records),
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
            "last_turn_ttft_s": sum(last) / len(last), "peak_mb": peak,
            # the answers are left out: only single-user answers are compared, and these would be a third of the JSON
            "records": [{k: v for k, v in r.items() if k != "answer"} for r in records]}


def serve_and_measure(key: str, cfg: ServeBenchConfig, folder: Path, work: Path, batching_flag: bool, plan: dict,
                      history: list[str] | None) -> dict:
    """Start one server, run the warm-up, the single-user phase and every concurrent phase, stop it."""
    from benchmarks.serve_clients import client, concurrent, converse

    progress(f"serving with {SERVERS[key]}")
    server = start_server(key, cfg, folder, work, batching_flag)
    progress(f"  ready in {server.startup_s:.1f} s")
    pid = server.process.pid
    try:
        api = client(server.url)
        converse(api, server.model_id, plan["warmup"], 2)  # first-request costs stay out of the timings
        reset_peak(pid)
        single = converse(api, server.model_id, plan["single"], cfg.new_tokens, history)
        t0 = single[0]["start"]
        single = [{**r, "start": r["start"] - t0} for r in single]
        single_peak = peak_mb(pid)
        phases = {}
        for users in cfg.users:
            progress(f"  {users} user{'s' * (users > 1)} × {cfg.rounds} turns")
            reset_peak(pid)
            records, wall = concurrent(server.url, server.model_id, plan["users"][users], cfg.new_tokens)
            phases[str(users)] = phase_summary(records, wall, peak_mb(pid), cfg.rounds)
    except Exception as e:
        raise SystemExit(f"{key}: {type(e).__name__}: {e}\nserver log:\n{server.log.read_text()[-3000:]}") from e
    finally:
        stop_server(server)
        progress("  stopped")
    return {"label": SERVERS[key], "command": server.command, "model_id": server.model_id,
            "startup_s": server.startup_s, "notes": notes(server), "single_user": single,
            "single_user_peak_mb": single_peak, "concurrent": phases}


def conversation_plan(cfg: ServeBenchConfig, lexicon: list[str]) -> dict:
    """Every conversation of the run, each with its own picture and questions."""
    from benchmarks.serve_clients import Conversation, picture_urls, questions

    side, seed = cfg.shape.image_size, cfg.seed
    pics = picture_urls(2 + max(cfg.users), side)
    plan = {"warmup": Conversation(pics[-1], questions(lexicon, 1, f"{seed}-warmup")),
            "single": Conversation(pics[0], questions(lexicon, cfg.turns, f"{seed}-single")), "users": {}}
    for users in cfg.users:  # a phase's users start at another picture than the phase before
        order = [(users + u) % len(pics) for u in range(users)]
        plan["users"][users] = [Conversation(pics[i], questions(lexicon, cfg.rounds, f"{seed}-{users}-{u}"))
                                for u, i in enumerate(order)]
    return plan


def data_url_image(url: str):
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def run(cfg: ServeBenchConfig) -> dict:
    from benchmarks.serve_agreement import check_single_user
    from benchmarks.serve_solo import solo_vs_engine

    work = Path(tempfile.mkdtemp(prefix="mmchat-bench-serve-"))
    started, load_before = time.perf_counter(), os.getloadavg()[0]  # other work on the machine skews timings
    try:
        folder = work / f"random-llava-{cfg.shape.layers}x{cfg.shape.hidden}"
        progress(f"building random weights: {cfg.shape.describe()}")
        lexicon = build_folder(folder, cfg.shape, cfg.seed)
        plan = conversation_plan(cfg, lexicon)
        batching_flag = mmchat_batching_flag()
        keys = [k for k in SERVERS if (batching_flag or k != "mmchat-unbatched")
                and (cfg.vllm is not None or k not in VLLM_SERVERS)
                and (cfg.servers is None or k == "mmchat" or k in cfg.servers)]
        if not batching_flag:
            progress("note: python -m mmchat.serve has no --max-batch here; mmchat runs once, with its defaults")
        servers = {}
        for key in keys:
            history = [r["answer"] for r in servers["mmchat"]["single_user"]] if servers else None
            servers[key] = serve_and_measure(key, cfg, folder, work, batching_flag, plan, history)
        progress("checking greedy agreement")
        agreement = check_single_user(str(folder), plan["single"], {k: s["single_user"] for k, s in servers.items()},
                                      "mmchat", cfg.new_tokens)
        progress("one user in this process: a chat session alone vs through the engine")
        solo = solo_vs_engine(folder, work, plan["single"].questions, data_url_image(plan["single"].picture),
                              cfg.new_tokens, cfg.threads, rounds=cfg.solo_rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    config = {**asdict(cfg), "out": str(cfg.out), "vllm": cfg.vllm and str(cfg.vllm)}
    return {"config": config, "shape": cfg.shape.describe(), "machine": machine(),
            "mmchat_max_batch_flag": batching_flag, "seconds": time.perf_counter() - started,
            "load_average": {"before": load_before, "after": os.getloadavg()[0]},
            "questions_single_user": list(plan["single"].questions), "servers": servers, "agreement": agreement,
            "one_user_decode": solo}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.serve_report import report

    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2-layer LLM, users 1 and 4, 4 + 3 turns, 8 tokens")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--turns", type=int, default=10, help="single-user turns (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="turns of each concurrent user (default: %(default)s)")
    p.add_argument("--users", type=int, nargs="+", default=[1, 4, 8, 16], help="default: 1 4 8 16")
    p.add_argument("--new-tokens", type=int, default=24, help="max_tokens per request (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per server (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=16, help="mmchat's --max-batch, batching on (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="mmchat's and transformers' --device (default: %(default)s)")
    p.add_argument("--vllm", type=Path, metavar="VENV_PYTHON",
                   help="serve with vLLM too (default and --block-size 32): its venv's python, made by "
                        "`bash benchmarks/peers/vllm.sh` (../peers/vllm/bin/python)")
    a = p.parse_args(argv)
    try:
        cfg = ServeBenchConfig(quick=a.quick, out=a.out, turns=a.turns, rounds=a.rounds, users=a.users,
                               new_tokens=a.new_tokens, threads=a.threads, max_batch=a.max_batch, device=a.device,
                               vllm=a.vllm)
    except ValueError as e:
        p.error(str(e))
    return report(run(cfg), cfg.out)


if __name__ == "__main__":
    sys.exit(main())
