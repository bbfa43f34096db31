"""Do the servers' greedy answers agree? The texts, and where they differ, a teacher-forced model in process.

The API returns text, not tokens or logits, so a differing answer is checked against transformers'
`LlavaForConditionalGeneration` run here on the very prompt the servers got (the folder's processor
and chat template on the same messages, as `transformers serve` renders them). The answer is
followed token by token: at each step the reference's top token must continue the answer's text;
where it does not, the token that does (the server's pick) must trail the top one by no more than the
32-bit near-tie tolerance of `benchmarks.agreement` (a flip float rounding can explain). An answer
that ended before `max_tokens` must end where the reference picks an end-of-sequence token.
Both answers of a differing pair are followed, so a near-tie flip on either side is found.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks.agreement import TOLERANCE
from benchmarks.serve_clients import Conversation, openai_messages


@dataclass
class Reference:
    model: object
    processor: object
    eos_ids: set[int]


def load_reference(folder: str) -> Reference:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    eos = model.generation_config.eos_token_id
    eos_ids = set([eos] if isinstance(eos, int) else eos or []) | {processor.tokenizer.eos_token_id}
    return Reference(model, processor, eos_ids)


def processor_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages as `transformers serve` hands them to the processor: content parts, images by URL."""
    out = []
    for m in messages:
        parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
        out.append({"role": m["role"], "content": [
            {"type": "image", "url": p["image_url"]["url"]} if p["type"] == "image_url" else p for p in parts]})
    return out


@torch.inference_mode()
def follow(ref: Reference, messages: list[dict], answer: str, finish_reason: str | None, max_steps: int,
           tol: float) -> dict:
    """Teacher-force `answer` after the prompt of `messages`; returns the near-ties it took and, if the
    reference is sure of something else somewhere, `failure` (where and by how much)."""
    tokenizer = ref.processor.tokenizer
    inputs = ref.processor.apply_chat_template(processor_messages(messages), add_generation_prompt=True,
                                               tokenize=True, return_dict=True, return_tensors="pt")
    out = ref.model(**inputs, use_cache=True, logits_to_keep=1)
    cache, logits = out.cache, out.logits[0, -1].float()
    target, ids, near_ties = answer.lstrip(), [], []

    def text(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True).lstrip()

    def name(token: int) -> str:
        if token in ref.eos_ids:
            return "the end of the answer"
        return f"{token} {tokenizer.convert_ids_to_tokens(token)!r}"

    def moves_on(tokens: list[int], so_far: str) -> bool:
        """The tokens' text is a longer prefix of the answer (a token that decodes to nothing does not count)."""
        now = text(tokens)
        return len(now) > len(so_far) and target.startswith(now)

    for step in range(max_steps + 1):
        so_far = text(ids)
        done = so_far == target
        if done and finish_reason == "length":
            break  # cut at max_tokens: nothing more was generated
        order = logits.argsort(descending=True).tolist()
        top = order[0]
        if done:  # the answer ended by itself: the reference must end it too
            fits = top in ref.eos_ids
            pick = top if fits else max(ref.eos_ids, key=lambda t: float(logits[t]))
        else:
            # the top token fits if it moves the text on, or adds none (a special token, skipped in
            # the server's text too)
            fits = top not in ref.eos_ids and target.startswith(text(ids + [top]))
            pick = top if fits else next((t for t in order[1:] if t not in ref.eos_ids and moves_on(ids + [t], so_far)),
                                         None)
        if pick is None:
            return {"ok": False, "tokens": step, "near_ties": near_ties,
                    "failure": f"token {step + 1}: no token continues the answer's text {target[len(so_far):][:30]!r}"}
        if not fits:
            margin = float(logits[top] - logits[pick])
            entry = {"token": step + 1, "margin": margin, "reference": top, "server": pick}
            if margin > tol:
                return {"ok": False, "tokens": step, "near_ties": near_ties,
                        "failure": f"token {step + 1}: the reference prefers {name(top)} over the server's "
                                   f"{name(pick)} by {margin:.3g} logits (a near-tie is ≤ {tol:g})", **entry}
            near_ties.append(entry)
        if done:
            break
        ids.append(pick)
        out = ref.model(input_ids=torch.tensor([[pick]]), cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[0, -1].float()
    else:
        return {"ok": False, "tokens": len(ids), "near_ties": near_ties,
                "failure": f"{len(ids)} tokens do not spell the answer (the reference's text: {text(ids)[:40]!r})"}
    return {"ok": True, "tokens": len(ids), "near_ties": near_ties, "failure": None}


def same_text(mine: str, theirs: str) -> tuple[bool, bool]:
    """(the answers are the same text, and only once leading white space is dropped). vLLM's answers
    and mmchat's differ by the leading space of the first token: vLLM streams a SentencePiece `▁word`
    first token as ` word`, mmchat and `transformers serve` as `word` (tokenizers drop the space that
    starts a text); the same token either way."""
    if mine == theirs:
        return True, False
    spaced = mine.lstrip() == theirs.lstrip()
    return spaced, spaced


def check_single_user(folder: str, conv: Conversation, runs: dict[str, list[dict]], reference: str,
                      max_tokens: int) -> dict:
    """Every server's single-user turns against `runs[reference]` (whose answers were everyone's
    history). Per server: turns with the same text (`same_text`: a leading space apart, counted in
    `leading_space_only`), near-tie divergences, failures (a real disagreement, or a prompt of another
    length: then the servers did not see the same prompt)."""
    tol, ref, followed = TOLERANCE["32bit"], None, {}
    history = [r["answer"] for r in runs[reference]]

    def checked(key: str, turn: int) -> dict:
        nonlocal ref
        if (key, turn) not in followed:
            ref = ref or load_reference(folder)
            r = runs[key][turn - 1]
            followed[key, turn] = follow(ref, openai_messages(conv, history, turn), r["answer"], r["finish_reason"],
                                         max_tokens, tol)
        return followed[key, turn]

    out = {}
    for key, records in runs.items():
        if key == reference:
            continue
        same, spaced, divergences, failures, turns = 0, 0, 0, [], []
        for turn, (mine, theirs) in enumerate(zip(records, runs[reference]), start=1):
            equal, space_only = same_text(mine["answer"], theirs["answer"])
            entry = {"turn": turn, "same": equal, "leading_space_only": space_only}
            spaced += space_only
            if mine["prompt_tokens"] != theirs["prompt_tokens"]:
                failures.append(f"turn {turn}: prompt of {mine['prompt_tokens']} tokens, {reference}'s "
                                f"{theirs['prompt_tokens']}")
            if entry["same"]:
                same += 1
            else:
                entry.update({key: checked(key, turn), reference: checked(reference, turn)})
                bad = [f"{k}: {entry[k]['failure']}" for k in (key, reference) if not entry[k]["ok"]]
                failures += [f"turn {turn}: {b}" for b in bad]
                divergences += not bad
            turns.append(entry)
        out[key] = {"turns_compared": len(records), "same_text": same, "leading_space_only": spaced,
                    "near_tie_divergences": divergences, "failures": failures, "tolerance": tol, "turns": turns}
    return out
