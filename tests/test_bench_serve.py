"""`python -m benchmarks.serve --quick` end to end (every server in its own process, the openai client),
and its greedy-agreement check on a tiny model in process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(400)
def test_serve_benchmark_quick(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMCHAT_")}
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=380)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith("headline: 4 users: mmchat ") and " ÷ transformers serve (better mode: " in lines[-1]

    data = json.loads((tmp_path / "serve.json").read_text())
    cfg, servers = data["config"], data["servers"]
    assert cfg["users"] == [1, 4] and cfg["turns"] == 4
    expected = {"mmchat", "transformers", "transformers-cb"}
    expected |= {"mmchat-unbatched"} if data["mmchat_max_batch_flag"] else set()
    assert set(servers) == expected
    for key, s in servers.items():
        assert set(s["concurrent"]) == {"1", "4"}, key
        for users, phase in s["concurrent"].items():
            assert phase["requests"] == int(users) * cfg["rounds"] == len(phase["records"]), (key, users)
            assert {r["user"] for r in phase["records"]} == set(range(int(users))), (key, users)
            assert phase["aggregate_tps"] > 0 and phase["completion_tokens"] >= phase["requests"], (key, users)
            assert 0 < phase["ttft_p50_s"] <= phase["ttft_p95_s"] < phase["wall_s"], (key, users)
            assert 100 < phase["peak_mb"] < 16384, (key, users)
        turns = s["single_user"]
        assert [t["turn"] for t in turns] == [1, 2, 3, 4], key
        assert turns[0]["prompt_tokens"] > 576, key  # the picture's 576 image tokens are in the prompt
        assert [t["prompt_tokens"] for t in turns] == sorted({t["prompt_tokens"] for t in turns}), key
    # mmchat's later turns come from the conversation's cache; transformers serve reports none
    assert all(t["cached_tokens"] >= 576 for t in servers["mmchat"]["single_user"][1:])

    # every other server's greedy single-user answers agree with mmchat's, each turn compared
    assert set(data["agreement"]) == expected - {"mmchat"}
    for key, ag in data["agreement"].items():
        assert ag["turns_compared"] == 4 and ag["failures"] == [], (key, ag)
        assert ag["same_text"] + ag["near_tie_divergences"] == 4, (key, ag)
    summary = data["summary"]
    assert summary["headline_users"] == 4 and summary["better_transformers_mode"] in ("transformers", "transformers-cb")
    assert summary["ratios"]["vs_transformers"] == pytest.approx(
        summary["aggregate_tps"]["mmchat"] / summary["aggregate_tps"][summary["better_transformers_mode"]])

    solo = data["one_user_decode"]  # one conversation in-process: alone, then through the engine
    assert 0 < solo["alone"]["tokens"] == solo["engine"]["tokens"] <= 4 * (cfg["new_tokens"] - 1)
    assert solo["rounds"] == 1 and solo["ratio"] == pytest.approx(
        solo["engine"]["decode_tokens_per_s"] / solo["alone"]["decode_tokens_per_s"])
    assert "through the engine ÷ a chat session alone" in done.stdout

    assert (tmp_path / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    section = (tmp_path / "serve_readme.md").read_text()
    assert section.startswith("## Serving benchmark") and "python -m benchmarks.serve --quick" in section
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 6  # header, rule, a row per measure (p50/p95 once: the headline users are the most)
    assert all(s["label"] in rows[0] for s in servers.values())
    assert all(row.count("|") == len(servers) + 2 for row in rows)  # a column per server


def test_agreement_follows_greedy_answers_and_finds_real_disagreements(tmp_path):
    """The teacher-forced check passes the reference's own greedy answer, fails one it is sure it would
    not give (or one that ends too soon), and counts flips within the tolerance as near-ties."""
    import torch

    from benchmarks.random_llava import LlavaShape
    from benchmarks.serve import build_folder
    from benchmarks.serve_agreement import follow, load_reference, processor_messages
    from benchmarks.serve_clients import Conversation, openai_messages, picture_urls, questions

    shape = LlavaShape(hidden=64, layers=1, heads=2, kv_heads=2, intermediate=128, vocab=2048, vision_width=64,
                       vision_layers=1, image_size=56, patch=14)
    lexicon = build_folder(tmp_path / "tiny", shape, seed=0)
    ref = load_reference(str(tmp_path / "tiny"))
    conv = Conversation(picture_urls(1, 56)[0], questions(lexicon, 2, "test"))
    messages = openai_messages(conv, ["lailihaira vepai"], 2)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    inputs = ref.processor.apply_chat_template(processor_messages(messages), add_generation_prompt=True,
                                               tokenize=True, return_dict=True, return_tensors="pt")
    assert int((inputs["input_ids"] == ref.model.config.image_token_index).sum()) == 16
    with torch.inference_mode():
        ids = ref.model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    answer = ref.processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    greedy = follow(ref, messages, answer, "length", 6, 1e-4)
    assert greedy["ok"] and greedy["near_ties"] == [] and greedy["tokens"] == 6, greedy
    other = " ".join(w for w in lexicon[:50] if not answer.lstrip().startswith(w))[:20]
    wrong = follow(ref, messages, other, "length", 6, 1e-4)
    assert not wrong["ok"] and wrong["margin"] > 1e-4 and "the reference prefers" in wrong["failure"], wrong
    lenient = follow(ref, messages, other, "length", 20, 1e9)  # any flip is "rounding" at this tolerance
    assert lenient["ok"] and len(lenient["near_ties"]) >= 1, lenient
    ended = follow(ref, messages, answer, "stop", 6, 1e-4)  # the reference goes on where the answer stopped
    assert not ended["ok"] and "the end of the answer" in ended["failure"], ended


def test_report_picks_the_better_transformers_mode_and_fails_on_a_real_disagreement(tmp_path, capsys):
    from benchmarks.serve_report import report

    def server(label, tps, last_ttft):
        turns = [{"turn": t, "ttft_s": last_ttft if t == 2 else 0.3, "prompt_tokens": 600 + 50 * t,
                  "completion_tokens": 24, "total_s": (last_ttft if t == 2 else 0.3) + 23 / tps} for t in (1, 2)]
        phases = {str(u): {"aggregate_tps": tps * (u > 1 or 0.5), "ttft_p50_s": 0.1, "ttft_p95_s": 0.2,
                           "last_turn_ttft_s": 0.1, "peak_mb": 900.0, "wall_s": 5.0} for u in (1, 8)}
        return {"label": label, "notes": [], "single_user": turns, "concurrent": phases, "startup_s": 7.0}

    def agreement(failures):
        return {"turns_compared": 2, "same_text": 2 - len(failures), "near_tie_divergences": 0, "failures": failures,
                "tolerance": 1e-4}

    data = {"config": {"users": [1, 8], "turns": 2, "rounds": 5, "threads": 1, "new_tokens": 24, "max_batch": 16,
                       "quick": False},
            "machine": "test", "shape": "tiny", "seconds": 60.0, "load_average": {"before": 0.1, "after": 1.0},
            "servers": {"mmchat": server("mmchat", 120.0, 0.05),
                        "mmchat-unbatched": server("mmchat, batching off", 40.0, 0.06),
                        "transformers": server("transformers serve", 30.0, 0.5),
                        "transformers-cb": server("transformers serve --continuous-batching", 40.0, 0.4)},
            "agreement": {"mmchat-unbatched": agreement([]), "transformers": agreement([]),
                          "transformers-cb": agreement([])},
            "one_user_decode": {"alone": {"decode_tokens_per_s": 50.0}, "engine": {"decode_tokens_per_s": 51.0},
                                "ratio": 1.02, "rounds": 3}}
    assert report(data, tmp_path) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == ("headline: 8 users: mmchat 120.0 tok/s ÷ transformers serve "
                                            "(better mode: --continuous-batching) 40.0 tok/s = 3.00×")
    assert "mmchat with batching off: 3.00× (target ≥ 4×) short" in out
    assert "transformers serve (--continuous-batching) ÷ mmchat: 8.0× (target ≥ 5×) PASS" in out
    assert ("through the engine ÷ a chat session alone: 51.0 ÷ 50.0 tok/s, median of 3 paired rounds 1.02× "
            "(target ≥ 1×) PASS") in out
    assert data["summary"]["targets_met"] == {"vs_transformers": True, "vs_unbatched": False,
                                              "ttft_vs_transformers": True, "one_user_decode": True}

    data["agreement"]["transformers"] = agreement(["turn 2: transformers: token 3: the reference prefers ..."])
    assert report(data, tmp_path) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("FAIL: ")
    assert (tmp_path / "serve.png").read_bytes()[:4] == b"\x89PNG"


def test_report_with_vllm_columns_and_leading_space_agreement(tmp_path, capsys):
    """With vLLM's runs in the results (fake ones: no vLLM needed), the table gains their columns, the
    comparison lines their ratios, and answers that differ only by a leading space count as the same."""
    from benchmarks.serve_agreement import check_single_user, same_text
    from benchmarks.serve_clients import Conversation
    from benchmarks.serve_report import report

    assert same_text(" lai vepa", " lai vepa") == (True, False)
    assert same_text("lai vepa", " lai vepa") == (True, True)
    assert same_text("lai vepa", " lai vepo") == (False, False)

    def turns(answers, ttft, decode_tps):
        return [{"turn": t, "ttft_s": ttft * t, "total_s": ttft * t + 23 / decode_tps, "completion_tokens": 24,
                 "prompt_tokens": 600 + 50 * t, "answer": a, "finish_reason": "length"}
                for t, a in enumerate(answers, start=1)]

    def server(label, answers, ttft, decode, tps, peak, start, notes=()):
        phases = {str(u): {"aggregate_tps": tps[i], "ttft_p50_s": 0.1 * (i + 1), "ttft_p95_s": 0.5 * (i + 1),
                           "last_turn_ttft_s": 0.1, "peak_mb": peak, "wall_s": 10.0} for i, u in enumerate((1, 8, 16))}
        return {"label": label, "notes": list(notes), "single_user": turns(answers, ttft, decode),
                "concurrent": phases, "startup_s": start}

    mine = [" lai vepa", " hou ki"]
    servers = {"mmchat": server("mmchat", mine, 0.05, 92.0, (46.0, 120.0, 130.0), 1800.0, 8.0),
               "vllm": server("vLLM", [a.lstrip() for a in mine], 0.1, 92.0, (50.0, 100.0, 160.0), 5400.0, 90.0,
                              ["model process bound to core(s) 1 (1 OpenMP thread, VLLM_CPU_OMP_THREADS_BIND=auto)"]),
               "vllm-bs32": server("vLLM --block-size 32", [a.lstrip() for a in mine], 0.025, 115.0,
                                   (55.0, 150.0, 200.0), 5300.0, 70.0),
               "transformers": server("transformers serve", mine, 0.5, 40.0, (40.0, 40.0, 40.0), 900.0, 10.0)}
    conv = Conversation("data:,", ("q1?", "q2?"))
    # texts equal but for a leading space: no reference model is loaded (the folder does not exist)
    agreement = check_single_user(str(tmp_path / "no-folder"), conv,
                                  {k: s["single_user"] for k, s in servers.items()}, "mmchat", 24)
    assert agreement["vllm"]["same_text"] == 2 and agreement["vllm"]["leading_space_only"] == 2
    assert agreement["transformers"]["same_text"] == 2 and agreement["transformers"]["leading_space_only"] == 0
    assert all(a["failures"] == [] for a in agreement.values())

    data = {"config": {"users": [1, 8, 16], "turns": 2, "rounds": 5, "threads": 1, "new_tokens": 24, "max_batch": 16,
                       "quick": False, "vllm": "../peers/vllm/bin/python"},
            "machine": "test", "shape": "tiny", "seconds": 600.0, "load_average": {"before": 0.1, "after": 1.0},
            "servers": servers, "agreement": agreement}
    assert report(data, tmp_path) == 0
    out = capsys.readouterr().out
    assert "greedy agreement, vLLM vs mmchat: 2/2 single-user answers identical (2 only once a leading space is " \
           "dropped)" in out
    vs = data["summary"]["vs_vllm"]
    assert set(vs) == {"vllm", "vllm-bs32"}
    assert vs["vllm"]["aggregate"] == pytest.approx({"8": 1.2, "16": 130 / 160})
    assert vs["vllm-bs32"]["one_user_decode"] == pytest.approx(92 / 115)
    assert vs["vllm"]["last_turn_ttft"] == pytest.approx(0.5) and vs["vllm"]["peak_memory"] == pytest.approx(1 / 3)
    assert ("mmchat vs vLLM --block-size 32 (mmchat ÷ vLLM): aggregate tok/s 8 users 0.80×, 16 users 0.65×; one "
            "user's decode 0.80×; turn-2 TTFT 2.00×; TTFT p50 1.00× and p95 1.00× at 16 users; peak memory at 16 "
            "users 0.34×") in out

    section = (tmp_path / "serve_readme.md").read_text()
    assert "--vllm ../peers/vllm/bin/python" in section and "and by vLLM (`vllm serve FOLDER" in section
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows[0] == "| | mmchat | `vLLM` | `vLLM --block-size 32` | `transformers serve` |"
    assert rows[2] == "| one user's decode, tok/s | 92.0 | 92.0 | 115.0 | 40.0 |"
    assert rows[3] == ("| aggregate tok/s at 1 / 8 / 16 users | 46.0 / 120.0 / 130.0 | 50.0 / 100.0 / 160.0 | "
                       "55.0 / 150.0 / 200.0 | 40.0 / 40.0 / 40.0 |")
    assert rows[4] == "| TTFT turn 2, one user | 0.100 s | 0.200 s | 0.050 s | 1.000 s |"
    assert rows[5].startswith("| TTFT p50 / p95 at 8 users | 0.20 s / 1.00 s |")
    assert rows[6].startswith("| TTFT p50 / p95 at 16 users | 0.30 s / 1.50 s |")
    assert rows[7] == "| peak memory at 16 users, MB | 1800 | 5400 | 5300 | 900 |"
    assert rows[8] == "| start, s | 8.0 | 90.0 | 70.0 | 10.0 |"
    assert "- vLLM: model process bound to core(s) 1" in section
    assert (tmp_path / "serve.png").read_bytes()[:4] == b"\x89PNG"
