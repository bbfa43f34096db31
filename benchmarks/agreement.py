"""Do two greedy engines pick the same tokens? Token by token, allowing a flip only at a genuine near-tie.

Two engines that compute the same function in a different order (a cached prefill of the new
turn vs a re-prefill of the whole conversation, different matmul shapes, 4-bit blocks
dequantized in another order) give logits that differ by float rounding. Greedy decoding can
then pick different tokens where the top two logits are nearly tied, and from there the two
answers are different texts. So a turn is compared up to its first differing token; there, the
two candidates `a` (engine A's pick) and `b` (engine B's) are looked up in both engines' logits:

    margin_A = logits_A[a] - logits_A[b]      margin_B = logits_B[b] - logits_B[a]

A flip that rounding caused needs both margins within the rounding noise: it passes when
max(margin_A, margin_B) <= tolerance, and fails otherwise (the engines disagree about a token
they are each sure of: a real difference in what they compute).
"""
from __future__ import annotations

import torch

TOLERANCE = {"4bit": 0.03, "8bit": 0.03, "16bit": 0.03, "32bit": 1e-4}
"""The largest margin float rounding can explain at a flip, in logits, per precision.

At a flip, margin_A + margin_B <= 2 × max |logits_A - logits_B| at that position, so rounding
explains margins up to twice the cross-engine logit noise. Measured at identical prefixes
(`max_logit_diff` in the results; AMD EPYC, 2 cores; the model's logits have a standard
deviation of 0.48): 4-bit at most 9.3e-3 (6 layers) and 8.1e-3 (30 layers), because
bitsandbytes' CPU 4-bit kernel multiplies in bfloat16 and its rounding depends on how many rows
a call has (a cached prefill of one turn vs the whole conversation); 32-bit at most 1.7e-6.
The tolerances are 2 × that noise with headroom for other CPUs' kernels: 0.03 (3.2× the noise,
6% of the logits' spread) and 1e-4 (60× the noise). 8-bit and 16-bit are not measured and get
4-bit's (bfloat16-sized rounding).
"""


def margins(logits_a: torch.Tensor, logits_b: torch.Tensor, a: int, b: int) -> tuple[float, float]:
    """How sure each engine is of its own pick over the other's: (A's a - A's b, B's b - B's a)."""
    return float(logits_a[a] - logits_a[b]), float(logits_b[b] - logits_b[a])


def is_near_tie(margin_a: float, margin_b: float, tol: float) -> bool:
    """A flip rounding can explain: neither engine prefers its pick by more than `tol`."""
    return max(margin_a, margin_b) <= tol


def compare_turn(chosen_a: list[int], chosen_b: list[int], logits_a: torch.Tensor, logits_b: torch.Tensor,
                 tol: float) -> dict:
    """One turn of two greedy engines that saw the same prompt.

    `chosen_*`: the tokens each picked (an end-of-sequence pick included); `logits_*` [len(chosen), V]:
    the logits each picked them from. Positions up to the first difference have identical prefixes,
    so their logits are compared too (`max_logit_diff`), and counted as near-ties where either
    engine's top two are within `tol` (`near_tie_positions`).
    """
    n = min(len(chosen_a), len(chosen_b))
    k = next((i for i in range(n) if chosen_a[i] != chosen_b[i]), None)
    compared = n if k is None else k + 1
    la, lb = logits_a[:compared].float(), logits_b[:compared].float()
    top_a, top_b = la.topk(2, dim=-1).values, lb.topk(2, dim=-1).values
    gaps = torch.minimum(top_a[:, 0] - top_a[:, 1], top_b[:, 0] - top_b[:, 1])
    out = {"compared": compared, "diverged_at": k, "max_logit_diff": float((la - lb).abs().max()) if compared else 0.0,
           "logit_std": float(la.std(dim=-1).mean()) if compared else 0.0,
           "min_top2_gap": float(gaps.min()) if compared else None,
           "near_tie_positions": int((gaps <= tol).sum()), "ok": True}
    if k is not None:
        a, b = chosen_a[k], chosen_b[k]
        m_a, m_b = margins(la[k], lb[k], a, b)
        out.update(tokens=[a, b], margins=[m_a, m_b], ok=is_near_tie(m_a, m_b, tol))
    return out


def compare_engines(turns_a: list[dict], turns_b: list[dict], logits_a: list[torch.Tensor],
                    logits_b: list[torch.Tensor], precision: str) -> dict:
    """Every turn of engine A vs engine B (turn dicts with `chosen`), and the totals."""
    tol = TOLERANCE[precision]
    turns = [compare_turn(ta["chosen"], tb["chosen"], la, lb, tol)
             for ta, tb, la, lb in zip(turns_a, turns_b, logits_a, logits_b)]
    compared = sum(t["compared"] for t in turns)
    return {"tolerance": tol, "turns": turns, "tokens_compared": compared,
            "divergences": sum(t["diverged_at"] is not None for t in turns),
            "failures": [i for i, t in enumerate(turns, start=1) if not t["ok"]],
            "near_ties_per_1000": 1000 * sum(t["near_tie_positions"] for t in turns) / max(1, compared),
            "max_logit_diff": max(t["max_logit_diff"] for t in turns)}
