"""`python -m mmchat.cli`: chat about an image in the terminal.

    python -m mmchat.cli --model CKPT --image cat.png --prompt "What is this?" --prompt "What colour?"
    python -m mmchat.cli --model CKPT --image cat.png        # interactive; /help lists commands
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

from mmchat.config import LOAD_IN
from mmchat.generate import GenerationConfig, decoding_defaults
from mmchat.templates import TEMPLATE_NAMES

HELP = "commands: /image PATH (attach to the next question), /undo, /regen, /clear, /quit"


@dataclass
class CliArgs:
    model: str
    """An mmchat checkpoint folder, or a LLaVA folder / hub id (converted on the fly)."""
    image: str | None = None
    prompt: list[str] = field(default_factory=list)
    """One user turn each, in order; none reads turns from stdin."""
    load_in: str | None = None
    device: str | None = None
    template: str | None = None
    json: bool = False
    generation: dict = field(default_factory=dict)
    """--max-new-tokens, --temperature, --top-p, --repetition-penalty, --seed as given (None: not
    given); the rest come from the checkpoint's decoding defaults (`generate.decoding_defaults`)."""


def parse_args(argv: list[str] | None = None) -> CliArgs:
    p = argparse.ArgumentParser(prog="python -m mmchat.cli", description="Chat with an mmchat model about an image.")
    p.add_argument("--model", required=True, help="mmchat checkpoint folder, LLaVA folder or hub id")
    p.add_argument("--image", help="image file for the first question")
    p.add_argument("--prompt", action="append", default=[], help="a user turn (repeat for several turns); omit for interactive")
    p.add_argument("--max-new-tokens", type=int, help="answer length limit (default: the checkpoint's, else 512)")
    p.add_argument("--temperature", type=float,
                   help="0 decodes greedily (default: the checkpoint's — a converted llava-hf folder decodes as its "
                        "generation config says, greedy unless it samples — else LLaVA's 0.2)")
    p.add_argument("--top-p", type=float, help="nucleus sampling (default: the checkpoint's, else 0.7)")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed, for reproducible answers")
    p.add_argument("--load-in", choices=LOAD_IN, help="LLM weight precision (default: 4bit on a GPU, 32bit on a CPU)")
    p.add_argument("--template", choices=TEMPLATE_NAMES,
                   help="conversation template; chat = the tokenizer's own chat template (default: the checkpoint's)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--json", action="store_true", help='print only {"answers": [...]} on stdout')
    a = p.parse_args(argv)
    gen = {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_p": a.top_p,
           "repetition_penalty": a.repetition_penalty, "seed": a.seed}
    try:  # bad values fail here, before a model loads
        GenerationConfig(**{k: v for k, v in gen.items() if v is not None})
    except ValueError as e:
        p.error(str(e))
    return CliArgs(a.model, a.image, a.prompt, a.load_in, a.device, a.template, a.json, gen)


def run(args: CliArgs) -> int:
    from mmchat.chat import ChatSession
    from mmchat.convert import resolve_checkpoint
    from mmchat.image import load_image
    from mmchat.model import LoadOptions, load_model

    image = load_image(args.image) if args.image else None  # fail on a bad image before loading the model
    model = load_model(resolve_checkpoint(args.model), LoadOptions(args.load_in, args.device))
    session = ChatSession(model, template=args.template)
    gen = decoding_defaults(model.config, **args.generation)
    if args.prompt:
        answers = []
        for i, prompt in enumerate(args.prompt):
            if not args.json:
                print(f"USER: {prompt}\nASSISTANT: ", end="", flush=True)
            answer = "".join(_stream(session.ask(prompt, image if i == 0 else None, gen), echo=not args.json))
            answers.append(answer.strip())  # as the session keeps it in the history
            _notices(session)
        if args.json:
            print(json.dumps({"answers": answers}, ensure_ascii=False))
        return 0
    return _interactive(session, image, gen)


def _stream(deltas, echo: bool):
    for delta in deltas:
        if echo:
            print(delta, end="", flush=True)
        yield delta
    if echo:
        print(flush=True)


def _notices(session) -> None:
    while session.notices:
        print(f"[note] {session.notices.pop(0)}", file=sys.stderr)


def _interactive(session, image, gen: GenerationConfig) -> int:
    from mmchat.image import ImageError, load_image

    print(f"{HELP}; Ctrl-C stops an answer, Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("USER: ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        try:
            if line in ("/quit", "/exit"):
                return 0
            if line == "/help":
                print(HELP, file=sys.stderr)
            elif line.startswith("/image "):
                image = load_image(line[7:].strip())
                print("[image attached to the next question]", file=sys.stderr)
            elif line == "/undo":
                session.undo()
            elif line == "/clear":
                session.clear()
            elif line == "/regen":
                _answer(session.regenerate(gen))
            elif line:
                _answer(session.ask(line, image, gen))
                image = None
            _notices(session)
        except (ImageError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)


def _answer(deltas) -> None:
    print("ASSISTANT: ", end="", flush=True)
    try:
        for _ in _stream(deltas, echo=True):
            pass
    except KeyboardInterrupt:
        deltas.close()  # keeps the partial answer in the history
        print(" [stopped]", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
