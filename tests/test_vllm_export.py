"""benchmarks.vllm_export's comparison of mmchat's greedy tokens with vLLM's, on made-up tokens and logits
(the benchmark itself needs vLLM's own virtualenv: see benchmarks/peers/vllm.sh)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from benchmarks.vllm_export import TOLERANCE, compare_turn, vllm_steps

V = 6


def logits_for(picks: list[int], runner_up: dict[int, tuple[int, float]] | None = None) -> torch.Tensor:
    """[len(picks), V] logits whose top token at step i is picks[i], 2 logits ahead of the rest, or, at the
    steps in `runner_up`, ahead of that token by the given margin."""
    logits = torch.zeros(len(picks), V)
    for i, pick in enumerate(picks):
        logits[i, pick] = 2.0
        if runner_up and i in runner_up:
            token, margin = runner_up[i]
            logits[i, token] = 2.0 - margin
    return logits


def tops(logits: torch.Tensor, picks: list[int], k: int = 3) -> list[dict[int, float]]:
    """vLLM's view of `logits`: the top-k log-probabilities per step (its pick among them)."""
    logprobs = logits.log_softmax(-1)
    return [{int(t): float(logprobs[i, t]) for t in {*logprobs[i].topk(k).indices.tolist(), pick}}
            for i, pick in enumerate(picks)]


def test_equal_answers_pass_and_measure_the_noise():
    picks = [1, 2, 3, 0]
    theirs = logits_for(picks) + 1e-5 * torch.randn(len(picks), V)
    out = compare_turn(picks, logits_for(picks), picks, tops(theirs, picks))
    assert out["ok"] and out["diverged_at"] is None and out["equal"] == out["compared"] == 4
    assert 0 < out["max_logprob_diff"] < 1e-4


def test_a_near_tie_flip_passes():
    """Both engines' top two within the tolerance at the flip: rounding can explain it."""
    mine, theirs = [1, 2, 3], [1, 2, 4]
    margin = TOLERANCE / 4
    mine_logits = logits_for(mine, {2: (4, margin)})
    their_logits = logits_for(theirs, {2: (3, margin)})
    out = compare_turn(mine, mine_logits, theirs, tops(their_logits, theirs))
    assert out["ok"] and out["diverged_at"] == 2 and out["equal"] == 2 and out["tokens"] == [3, 4]
    assert all(abs(m - margin) < 1e-6 for m in out["margins"])


def test_a_confident_disagreement_fails():
    """vLLM picks another token where mmchat is sure of its own (and vice versa): a real difference."""
    mine, theirs = [1, 2, 3], [1, 5, 5]
    out = compare_turn(mine, logits_for(mine, {1: (5, 0.5)}), theirs, tops(logits_for(theirs, {1: (2, 0.5)}), theirs))
    assert not out["ok"] and out["diverged_at"] == 1 and out["margins"][0] > TOLERANCE
    # one side sure is enough to fail: mmchat's near-tie against vLLM's confident pick
    out = compare_turn(mine, logits_for(mine, {1: (5, TOLERANCE / 4)}), theirs, tops(logits_for(theirs, {1: (2, 0.5)}), theirs))
    assert not out["ok"]


def test_mmchats_pick_outside_vllms_top_list_fails():
    mine, theirs = [1, 2], [1, 4]
    their_logits = logits_for(theirs)
    their_logits[1, 2] = -5.0  # far below vLLM's listed top-2
    out = compare_turn(mine, logits_for(mine, {1: (4, TOLERANCE / 4)}), theirs, tops(their_logits, theirs, k=2))
    assert not out["ok"] and not out["a_in_top"] and out["margins"][1] > 1


def test_vllm_steps_read_token_ids_and_end_with_eos():
    def step(token: int, alternatives: dict[int, float]):
        return SimpleNamespace(token=f"token_id:{token}", logprob=alternatives[token],
                               top_logprobs=[SimpleNamespace(token=f"token_id:{t}", logprob=lp) for t, lp in alternatives.items()])

    content = [step(7, {7: -0.1, 8: -2.5}), step(9, {9: -0.2, 7: -1.9})]
    choice = SimpleNamespace(finish_reason="stop", logprobs=SimpleNamespace(content=content))
    ids, top = vllm_steps(choice, eos_ids=[2, 9])
    assert ids == [7, 9]  # ended by a stop id of its own
    content.append(step(4, {4: -0.3}))
    ids, top = vllm_steps(choice, eos_ids=[2, 9])
    assert ids == [7, 9, 4, 2] and top[0] == {7: -0.1, 8: -2.5} and top[3] == {2: 0.0}
    choice.finish_reason = "length"
    assert vllm_steps(choice, eos_ids=[2])[0] == [7, 9, 4]
