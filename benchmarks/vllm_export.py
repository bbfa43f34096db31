"""Scale-out proof: vLLM serving mmchat's `--to llava-hf` exports answers as mmchat does, token by token.

    bash benchmarks/peers/vllm.sh                  # once: vLLM's CPU build in ../peers/vllm (~4.5 min, 6.3 GB)
    python -m benchmarks.vllm_export               # ~8 minutes on 2 CPU cores
    python -m benchmarks.vllm_export --python VENV/bin/python --out DIR

Two random-weight models (`SHAPE`), each exported with `python -m mmchat.convert --to llava-hf`:
`mmchat`, a checkpoint built by mmchat (open_clip tower, exported as `CLIPVisionModel`), and
`llava-hf`, a llava-hf folder converted to mmchat and back. Each answers a 3-turn conversation about a real
photo (matplotlib's grace_hopper.jpg, 512x600, sent as the file's own JPEG bytes: larger than the 112-px
tower, so every engine resizes it itself) in float32, greedily:

- mmchat's engine in process (a `ChatSession`): its tokens and the logits each was picked from; its
  answers are everyone's history, so every engine sees the same conversation;
- mmchat's API (`python -m mmchat.serve`) through the official `openai` client: its answers' text;
- `vllm serve EXPORT --dtype float32` through the same client, with `logprobs` (the top `top_logprobs`
  of each step, tokens as ids); the mmchat-built model twice, with vLLM's default image backend
  (torchvision) and with PIL's (`PIL_BACKEND`), the one mmchat's own preprocessing matches.

vLLM's tokens are compared with the engine's up to the first difference; there the near-tie rule of
`benchmarks.agreement` decides (`compare_turn`). Results: vllm_export.json and vllm_export.md in --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.agreement import TOLERANCE as AGREEMENT_TOLERANCE
from benchmarks.agreement import is_near_tie
from benchmarks.common import machine, write_json
from benchmarks.random_llava import LlavaShape

REPO = Path(__file__).resolve().parent.parent
SHAPE = LlavaShape(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, vocab=4096, vision_width=128,
                   vision_layers=2, image_size=112, patch=14)
"""Small enough for vLLM to start in about a minute on 2 cores; head_dim 64 (vLLM's CPU attention
supports it); 112 px / patch 14 = 64 image tokens."""
TOLERANCE = AGREEMENT_TOLERANCE["32bit"]
"""The near-tie tolerance, in logits: agreement.py's for 32-bit engines (1e-4, 60x the 1.7e-6 noise between
mmchat and transformers). vLLM's CPU kernels are other code again, but measured here on the same pixels
(the llava-hf rows) its log-probabilities differ from mmchat's by at most 1.4e-6 at identical prefixes:
the same noise, so the same tolerance. A flip with a margin above it is a difference in what the
engines compute (pixels, prompt, weights), not rounding."""
PIL_BACKEND = ["--mm-processor-kwargs", json.dumps({"backend": "pil"})]
"""vLLM builds the folder's processor with `AutoProcessor.from_pretrained`, whose default image backend is
torchvision: its bicubic differs from PIL's (mmchat's own preprocessing for a checkpoint it trained on an
open_clip tower) by up to 0.015. This asks for the PIL backend instead."""
RUNS = {"mmchat": ("mmchat", []), "mmchat, vLLM with PIL": ("mmchat", PIL_BACKEND), "llava-hf": ("llava-hf", [])}
"""Table row -> (model, extra `vllm serve` flags)."""


@dataclass
class VllmExportConfig:
    python: Path = REPO.parent / "peers" / "vllm" / "bin" / "python"
    """The vLLM virtualenv's python (benchmarks/peers/vllm.sh makes it); its `vllm` command sits beside it."""
    out: Path = Path("benchmarks/results")
    """Where vllm_export.json and vllm_export.md go."""
    turns: int = 3
    new_tokens: int = 24
    """Tokens generated per turn (fewer when the model ends its answer)."""
    top_logprobs: int = 20
    """vLLM's top log-probabilities per step (its default limit, --max-logprobs, is 20)."""
    threads: int = 2
    kv_cache_gib: int = 1
    """VLLM_CPU_KVCACHE_SPACE: vLLM's CPU KV cache; 1 GiB holds this model's 2,048-token context many times."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.turns < 1 or self.new_tokens < 1:
            raise ValueError(f"--turns {self.turns} and --new-tokens {self.new_tokens} must be at least 1")


# ------------------------------------------------------------------ the comparison


def compare_turn(mine: list[int], mine_logits: torch.Tensor, theirs: list[int], theirs_top: list[dict[int, float]],
                 tol: float = TOLERANCE) -> dict:
    """mmchat's greedy tokens against vLLM's in one turn.

    `mine`: mmchat's picks (an end-of-sequence pick included), `mine_logits` [len(mine), V] the logits each
    came from; `theirs`: vLLM's picks, `theirs_top[i]`: vLLM's log-probabilities at step i, {token: logprob},
    its own pick among them. Up to the first difference the prefixes are the same, so the two engines'
    log-probabilities of the same tokens are compared (`max_logprob_diff`: the cross-engine noise). At the
    first difference, `a` (mmchat's pick) and `b` (vLLM's) get margins as in `benchmarks.agreement`:
    mmchat's logit a - b, vLLM's logprob b - a (a log-probability difference is the logit difference). The
    turn passes if both are within `tol`; an `a` outside vLLM's top list fails (vLLM prefers b over it by
    at least b - its last listed token, the lower bound reported).
    """
    n = min(len(mine), len(theirs))
    k = next((i for i in range(n) if mine[i] != theirs[i]), None)
    compared = n if k is None else k + 1
    logprobs = mine_logits[:compared].float().log_softmax(-1)
    diffs = [abs(float(logprobs[i, t]) - lp) for i in range(compared if k is None else k) for t, lp in theirs_top[i].items()]
    out = {"compared": compared, "equal": compared if k is None else k, "diverged_at": k,
           "max_logprob_diff": max(diffs, default=0.0), "ok": True}
    if k is None:
        return out
    a, b, top = mine[k], theirs[k], theirs_top[k]
    m_mine = float(mine_logits[k, a] - mine_logits[k, b])
    m_theirs = top[b] - (top[a] if a in top else min(top.values()))
    out.update(tokens=[a, b], margins=[m_mine, m_theirs], a_in_top=a in top,
               ok=a in top and is_near_tie(m_mine, m_theirs, tol))
    return out


def vllm_steps(choice, eos_ids: list[int]) -> tuple[list[int], list[dict[int, float]]]:
    """vLLM's picked ids and top log-probabilities per step (tokens come as `token_id:N`); an answer ended by
    the model (finish `stop`) ends with an end-of-sequence id (`eos_ids[0]` if vLLM left it out), as mmchat's
    picks do."""
    def token(text: str) -> int:
        return int(text.removeprefix("token_id:"))

    ids, tops = [], []
    for step in choice.logprobs.content:
        ids.append(token(step.token))
        tops.append({token(t.token): t.logprob for t in step.top_logprobs} | {ids[-1]: step.logprob})
    if choice.finish_reason == "stop" and (not ids or ids[-1] not in eos_ids):
        ids.append(eos_ids[0])
        tops.append({eos_ids[0]: 0.0})  # not reported: only the pick itself is known
    return ids, tops


# ------------------------------------------------------------------ models, engines, servers


def build(work: Path) -> tuple[dict[str, tuple[Path, Path]], list[str]]:
    """{name: (mmchat checkpoint, its `--to llava-hf` export)} and the tokenizer's words (for questions).

    Both models speak llava-1.5-7b-hf's chat template (mmchat's `chat` template), which mmchat renders into
    the ids the folder's processor gives. (mmchat's own `llava_v1` prompt differs from any chat template's:
    it tokenizes the text around each `<image>` separately, as LLaVA's code does, and adds `<s>` when the
    tokenizer does not: 2 more ids here. vLLM, like transformers, tokenizes the rendered string whole.)
    """
    from dataclasses import replace

    from transformers import CLIPImageProcessor, LlavaProcessor

    from benchmarks.random_llava import LLAVA_15_CHAT_TEMPLATE, build_llava_hf, build_mmchat, train_tokenizer
    from mmchat.checkpoint import read_config, write_config
    from mmchat.convert.cli import main as convert
    from mmchat.templates import CHAT

    def run(*args: Path | str) -> None:
        if convert([str(a) for a in args]) != 0:
            raise SystemExit(f"python -m mmchat.convert {' '.join(map(str, args))} failed")

    tokenizer, lexicon = train_tokenizer(work / "tokenizer", SHAPE.vocab)
    tokenizer.chat_template = LLAVA_15_CHAT_TEMPLATE
    tokenizer.save_pretrained(work / "tokenizer")
    native = build_mmchat(work / "mmchat", SHAPE, work / "tokenizer")
    write_config(replace(read_config(native), template=CHAT), native)

    build_llava_hf(work / "llava-hf", SHAPE)  # and its processor, as the hub's folders have one
    side = {"height": SHAPE.image_size, "width": SHAPE.image_size}
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": SHAPE.image_size}, crop_size=side),
                   tokenizer=tokenizer, chat_template=LLAVA_15_CHAT_TEMPLATE, patch_size=SHAPE.patch,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(work / "llava-hf")
    run(work / "llava-hf", work / "llava-hf-mmchat")
    models = {"mmchat": native, "llava-hf": work / "llava-hf-mmchat"}
    for name, checkpoint in models.items():
        run("--to", "llava-hf", checkpoint, work / f"{name}-export")
    return {name: (checkpoint, work / f"{name}-export") for name, checkpoint in models.items()}, lexicon


def photo(work: Path) -> tuple[Path, str]:
    """grace_hopper.jpg copied to WORK, and its bytes as a data URL (no re-encoding: every engine decodes the same file)."""
    import base64

    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        data = f.read()
    (work / "grace_hopper.jpg").write_bytes(data)
    return work / "grace_hopper.jpg", "data:image/jpeg;base64," + base64.b64encode(data).decode()


def engine_turns(checkpoint: Path, questions: tuple[str, ...], image: Path, cfg: VllmExportConfig,
                 work: Path) -> tuple[list[dict], list[torch.Tensor]]:
    """mmchat's engine in process (benchmarks.chat's instrumented session): per turn its picks and logits."""
    from benchmarks.chat import mmchat_turns
    from mmchat.model import LoadOptions, load_model

    torch.set_num_threads(cfg.threads)
    job = {"new_tokens": cfg.new_tokens, "questions": list(questions), "image": str(image),
           "logits": str(work / f"{checkpoint.name}-logits.pt")}
    turns = mmchat_turns(load_model(checkpoint, LoadOptions("32bit", "cpu")), job)
    return turns, torch.load(job["logits"])


def mmchat_api(checkpoint: Path, conv, history: list[str], cfg: VllmExportConfig, work: Path) -> list[dict]:
    from benchmarks.serve import free_port, launch, stop_server
    from benchmarks.serve_clients import client, converse

    port = free_port()
    server = launch(f"mmchat-{checkpoint.name}", [sys.executable, "-m", "mmchat.serve", "--model", str(checkpoint),
                                                 "--load-in", "32bit", "--device", "cpu", "--port", str(port)],
                    port, work, cfg.threads)
    try:
        return converse(client(server.url), server.model_id, conv, cfg.new_tokens, history)
    finally:
        stop_server(server)


def vllm_turns(export: Path, conv, history: list[str], eos_ids: list[int], cfg: VllmExportConfig, work: Path,
               flags: list[str]) -> list[dict]:
    """`vllm serve EXPORT --dtype float32 FLAGS` on 127.0.0.1, the conversation with `history` as the answers."""
    from benchmarks.serve import free_port, launch, stop_server
    from benchmarks.serve_clients import client, openai_messages

    vllm = cfg.python.with_name("vllm")
    if not vllm.is_file():
        raise SystemExit(f"--python {cfg.python}: no `vllm` command beside it; run `bash benchmarks/peers/vllm.sh`")
    port = free_port()
    server = launch(f"vllm-{export.name}{len(flags)}", [str(vllm), "serve", str(export), "--dtype", "float32", "--host", "127.0.0.1",
                                            "--port", str(port), "--max-model-len", "2048", "--seed", str(cfg.seed), *flags],
                    port, work, cfg.threads, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE=str(cfg.kv_cache_gib))
    try:
        api, records = client(server.url), []
        for turn in range(1, len(conv.questions) + 1):
            response = api.chat.completions.create(
                model=server.model_id, messages=openai_messages(conv, history, turn), temperature=0.0,
                max_tokens=cfg.new_tokens, logprobs=True, top_logprobs=cfg.top_logprobs,
                extra_body={"return_tokens_as_token_ids": True})
            choice = response.choices[0]
            ids, tops = vllm_steps(choice, eos_ids)
            records.append({"turn": turn, "answer": choice.message.content, "finish_reason": choice.finish_reason,
                            "prompt_tokens": response.usage.prompt_tokens, "chosen": ids, "top": tops})
        return records
    finally:
        stop_server(server)


# ------------------------------------------------------------------ run and report


def run(cfg: VllmExportConfig) -> dict:
    from benchmarks.serve_clients import Conversation, questions

    with tempfile.TemporaryDirectory(prefix="vllm-export-") as tmp:
        work = Path(tmp)
        models, lexicon = build(work)
        image, url = photo(work)
        conv = Conversation(url, questions(lexicon, cfg.turns, "vllm-export"))
        mmchat, results = {}, {}
        for row, (name, flags) in RUNS.items():
            checkpoint, export = models[name]
            if name not in mmchat:
                print(f"[vllm_export] {name}: mmchat's engine, mmchat's API", flush=True)
                engine, logits = engine_turns(checkpoint, conv.questions, image, cfg, work)
                history = [t["answer"] for t in engine]
                mmchat[name] = engine, logits, mmchat_api(checkpoint, conv, history, cfg, work)
            engine, logits, api = mmchat[name]
            print(f"[vllm_export] {row}: vLLM", flush=True)
            eos = json.loads((export / "generation_config.json").read_text())["eos_token_id"]
            served = vllm_turns(export, conv, [t["answer"] for t in engine], eos if isinstance(eos, list) else [eos],
                                cfg, work, flags)
            turns = []
            for mine, step_logits, ours, theirs in zip(engine, logits, api, served):
                turns.append({**compare_turn(mine["chosen"], step_logits, theirs["chosen"], theirs["top"]),
                              "prompt_tokens": {"mmchat": mine["prompt_tokens"], "mmchat_api": ours["prompt_tokens"],
                                                "vllm": theirs["prompt_tokens"]},
                              "answers": {"mmchat": mine["answer"], "mmchat_api": ours["answer"], "vllm": theirs["answer"]},
                              "mmchat_tokens": len(mine["chosen"]), "vllm_tokens": len(theirs["chosen"])})
            results[row] = {"vllm_flags": flags, "turns": turns}
    return {"config": {**asdict(cfg), "python": str(cfg.python), "out": str(cfg.out)}, "shape": SHAPE.describe(),
            "tolerance": TOLERANCE, "machine": machine(), "questions": list(conv.questions), "models": results}


def report(data: dict, out: Path) -> int:
    """Write vllm_export.json and .md; 0 when every turn passes and the prompts have the same length."""
    rows, failed = [], 0
    for name, entry in data["models"].items():
        for i, t in enumerate(entry["turns"], start=1):
            counts = t["prompt_tokens"]
            same_prompt = len(set(counts.values())) == 1
            ok = t["ok"] and same_prompt
            failed += not ok
            first = "—" if t["diverged_at"] is None else f"token {t['diverged_at'] + 1}: {t['tokens'][0]} vs {t['tokens'][1]}"
            margin = "—" if t["diverged_at"] is None else " / ".join(f"{m:.2g}" for m in t["margins"])
            api_same = t["answers"]["mmchat_api"] == t["answers"]["mmchat"]
            rows.append(f"| {name} | {i} | {counts['vllm']} / {counts['mmchat']} | {t['equal']} of {t['compared']} | "
                        f"{first} | {margin} | {t['max_logprob_diff']:.1e} | {'yes' if api_same else 'no'} | "
                        f"{'pass' if ok else 'FAIL'} |")
    table = "\n".join([
        "| model | turn | prompt tokens (vLLM / mmchat) | tokens equal | first difference (mmchat vs vLLM) | "
        "margin (mmchat / vLLM) | max logprob diff | mmchat API = engine | verdict |",
        "|---|---|---|---|---|---|---|---|---|", *rows])
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "vllm_export.json", data)
    (out / "vllm_export.md").write_text(
        f"{table}\n\nNear-tie tolerance {data['tolerance']:g} logits; {data['shape']}; {data['machine']}.\n")
    print(table)
    return 1 if failed else 0


def parse_args(argv: list[str] | None) -> VllmExportConfig:
    defaults = VllmExportConfig()
    p = argparse.ArgumentParser(prog="python -m benchmarks.vllm_export", description=__doc__.split("\n")[0])
    p.add_argument("--python", type=Path, default=defaults.python, help="the vLLM virtualenv's python")
    p.add_argument("--out", type=Path, default=defaults.out)
    p.add_argument("--turns", type=int, default=defaults.turns)
    p.add_argument("--new-tokens", type=int, default=defaults.new_tokens)
    p.add_argument("--threads", type=int, default=defaults.threads)
    args = p.parse_args(argv)
    return VllmExportConfig(python=args.python, out=args.out, turns=args.turns, new_tokens=args.new_tokens,
                            threads=args.threads)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    if not cfg.python.is_file():
        raise SystemExit(f"--python {cfg.python}: not found; make vLLM's virtualenv with `bash benchmarks/peers/vllm.sh`")
    return report(run(cfg), cfg.out)


if __name__ == "__main__":
    sys.exit(main())
