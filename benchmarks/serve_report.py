"""`benchmarks.serve`'s results: tables, the targets, serve.json, serve.png, serve_readme.md, the headline."""
from __future__ import annotations

from pathlib import Path

from benchmarks.common import table, write_json

TRANSFORMERS = ("transformers", "transformers-cb")
VLLM = ("vllm", "vllm-bs32")
MODE = {"transformers": "plain", "transformers-cb": "--continuous-batching"}
TARGETS = {"vs_transformers": 3.0, "vs_unbatched": 4.0, "ttft_vs_transformers": 5.0, "one_user_decode": 1.0}
"""The issue's targets: aggregate tokens/s at the headline user count ≥ 3× `transformers serve`'s
better mode and ≥ 4× mmchat with batching off; one user's last-turn time to first token ≥ 5× lower;
one user's decode through the engine ≥ 1.0× a chat session's alone."""


def decode_tps(turns: list[dict]) -> float:
    """One user's decode rate: tokens after the first ÷ the time after the first token, over all turns."""
    tokens = sum(t["completion_tokens"] - 1 for t in turns)
    seconds = sum(t["total_s"] - t["ttft_s"] for t in turns)
    return tokens / seconds if seconds > 0 else float("nan")


def vs_vllm(data: dict, decode: dict[str, float]) -> dict:
    """mmchat against each vLLM run, as the issue's targets put it: throughput and decode as mmchat ÷ vLLM
    (higher is better), times and memory as mmchat ÷ vLLM (lower is better)."""
    servers, users = data["servers"], data["config"]["users"]
    top, mine = str(users[-1]), servers["mmchat"]
    out = {}
    for key in (k for k in VLLM if k in servers):
        theirs = servers[key]
        out[key] = {"aggregate": {u: mine["concurrent"][u]["aggregate_tps"] / theirs["concurrent"][u]["aggregate_tps"]
                                  for u in mine["concurrent"] if u != "1"},
                    "one_user_decode": decode["mmchat"] / decode[key],
                    "last_turn_ttft": mine["single_user"][-1]["ttft_s"] / theirs["single_user"][-1]["ttft_s"],
                    "ttft_p50": mine["concurrent"][top]["ttft_p50_s"] / theirs["concurrent"][top]["ttft_p50_s"],
                    "ttft_p95": mine["concurrent"][top]["ttft_p95_s"] / theirs["concurrent"][top]["ttft_p95_s"],
                    "peak_memory": mine["concurrent"][top]["peak_mb"] / theirs["concurrent"][top]["peak_mb"]}
    return out


def summarise(data: dict) -> dict:
    servers, users = data["servers"], data["config"]["users"]
    hu = str(8 if 8 in users else users[-1])  # the headline is at 8 users, else the largest count
    agg = {k: s["concurrent"][hu]["aggregate_tps"] for k, s in servers.items()}
    last_ttft = {k: s["single_user"][-1]["ttft_s"] for k, s in servers.items()}
    modes = [k for k in TRANSFORMERS if k in servers]
    better = max(modes, key=agg.get)
    quickest = min(modes, key=last_ttft.get)
    values = {"vs_transformers": agg["mmchat"] / agg[better],
              "vs_unbatched": agg["mmchat"] / agg["mmchat-unbatched"] if "mmchat-unbatched" in servers else None,
              "ttft_vs_transformers": last_ttft[quickest] / last_ttft["mmchat"],
              "one_user_decode": data["one_user_decode"]["ratio"] if "one_user_decode" in data else None}
    decode = {k: decode_tps(s["single_user"]) for k, s in servers.items()}
    return {"headline_users": int(hu), "aggregate_tps": agg, "last_turn_ttft_s": last_ttft,
            "one_user_decode_tps": decode,
            "vs_vllm": vs_vllm(data, decode),
            "better_transformers_mode": better, "quickest_transformers_mode_last_turn": quickest, "ratios": values,
            "targets_met": {k: v is not None and v >= TARGETS[k] for k, v in values.items()}}


def target_lines(data: dict) -> list[str]:
    s, hu, turns = data["summary"], data["summary"]["headline_users"], data["config"]["turns"]
    r, met = s["ratios"], s["targets_met"]

    def verdict(key: str) -> str:
        return "PASS" if met[key] else "short"

    lines = [f"{hu}-user aggregate tokens/s, mmchat ÷ transformers serve ({MODE[s['better_transformers_mode']]}, the "
             f"better mode): {r['vs_transformers']:.2f}× (target ≥ {TARGETS['vs_transformers']:g}×) "
             f"{verdict('vs_transformers')}"]
    if r["vs_unbatched"] is None:
        lines.append(f"{hu}-user aggregate tokens/s, mmchat ÷ mmchat with batching off: n/a (this python -m "
                     "mmchat.serve has no --max-batch)")
    else:
        lines.append(f"{hu}-user aggregate tokens/s, mmchat ÷ mmchat with batching off: {r['vs_unbatched']:.2f}× "
                     f"(target ≥ {TARGETS['vs_unbatched']:g}×) {verdict('vs_unbatched')}")
    lines.append(f"one user's turn-{turns} time to first token, transformers serve "
                 f"({MODE[s['quickest_transformers_mode_last_turn']]}) ÷ mmchat: {r['ttft_vs_transformers']:.1f}× "
                 f"(target ≥ {TARGETS['ttft_vs_transformers']:g}×) {verdict('ttft_vs_transformers')}")
    if r.get("one_user_decode") is not None:
        solo = data["one_user_decode"]
        lines.append(f"one user's decode in this process, through the engine ÷ a chat session alone: "
                     f"{solo['engine']['decode_tokens_per_s']:.1f} ÷ {solo['alone']['decode_tokens_per_s']:.1f} tok/s, "
                     f"median of {solo['rounds']} paired rounds {r['one_user_decode']:.2f}× "
                     f"(target ≥ {TARGETS['one_user_decode']:g}×) {verdict('one_user_decode')}")
    top = data["config"]["users"][-1]
    for key, v in s["vs_vllm"].items():
        agg = ", ".join(f"{u} users {x:.2f}×" for u, x in v["aggregate"].items())
        lines.append(f"mmchat vs {data['servers'][key]['label']} (mmchat ÷ vLLM): aggregate tok/s {agg or 'n/a'}; "
                     f"one user's decode {v['one_user_decode']:.2f}×; turn-{turns} TTFT {v['last_turn_ttft']:.2f}×; "
                     f"TTFT p50 {v['ttft_p50']:.2f}× and p95 {v['ttft_p95']:.2f}× at {top} users; peak memory at "
                     f"{top} users {v['peak_memory']:.2f}×")
    return lines


def server_table(data: dict) -> list[str]:
    """The issue's table: a column per server, a row per measure (markdown)."""
    cfg, servers, s = data["config"], data["servers"], data["summary"]
    users, hu = cfg["users"], s["headline_users"]
    top, turns = str(users[-1]), cfg["turns"]

    def row(name: str, cell) -> str:
        return f"| {name} | " + " | ".join(cell(k, srv) for k, srv in servers.items()) + " |"

    def ttft(u: str):
        return lambda k, srv: f"{srv['concurrent'][u]['ttft_p50_s']:.2f} s / {srv['concurrent'][u]['ttft_p95_s']:.2f} s"

    labels = [f"`{srv['label']}`" if key.startswith(("transformers", "vllm")) else srv["label"]
              for key, srv in servers.items()]
    return ["| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(servers),
            row("one user's decode, tok/s", lambda k, srv: f"{s['one_user_decode_tps'][k]:.1f}"),
            row(f"aggregate tok/s at {' / '.join(map(str, users))} user{'s' * (len(users) > 1 or users[0] > 1)}",
                lambda k, srv: " / ".join(f"{srv['concurrent'][str(u)]['aggregate_tps']:.1f}" for u in users)),
            row(f"TTFT turn {turns}, one user", lambda k, srv: f"{srv['single_user'][-1]['ttft_s']:.3f} s"),
            *([row(f"TTFT p50 / p95 at {hu} users", ttft(str(hu)))] if str(hu) != top else []),
            row(f"TTFT p50 / p95 at {top} users", ttft(top)),
            row(f"peak memory at {top} users, MB", lambda k, srv: f"{srv['concurrent'][top]['peak_mb']:.0f}"),
            row("start, s", lambda k, srv: f"{srv['startup_s']:.1f}")]


def spaced(agreement: dict) -> str:
    n = agreement.get("leading_space_only", 0)
    return f" ({n} only once a leading space is dropped)" if n else ""


def headline(data: dict) -> str:
    s = data["summary"]
    better = s["better_transformers_mode"]
    return (f"headline: {s['headline_users']} users: mmchat {s['aggregate_tps']['mmchat']:.1f} tok/s ÷ transformers "
            f"serve (better mode: {MODE[better]}) {s['aggregate_tps'][better]:.1f} tok/s = "
            f"{s['ratios']['vs_transformers']:.2f}×")


def report(data: dict, out: Path) -> int:
    servers, cfg = data["servers"], data["config"]
    data["summary"] = summarise(data)
    load = data["load_average"]
    print(f"machine: {data['machine']}\nmodel: {data['shape']}\n{cfg['threads']} torch thread(s) per server, "
          f"{cfg['new_tokens']} tokens a turn, {data['seconds']:.0f} s in all; 1-minute load average "
          f"{load['before']:.1f} before, {load['after']:.1f} after (the benchmark's own servers add about 1)\n")
    first = next(iter(servers.values()))["single_user"]
    rows = [[i + 1, first[i]["prompt_tokens"], *[s["single_user"][i]["ttft_s"] for s in servers.values()]]
            for i in range(len(first))]
    print("one user: time to first token (s) per turn")
    print(table(["turn", "prompt tok", *[s["label"] for s in servers.values()]], rows))
    rows = [[s["label"], users, p["aggregate_tps"], p["ttft_p50_s"], p["ttft_p95_s"], p["last_turn_ttft_s"],
             p["peak_mb"], p["wall_s"]] for s in servers.values() for users, p in s["concurrent"].items()]
    print(f"\nconcurrent users × {cfg['rounds']} turns")
    print(table(["server", "users", "tok/s (all)", "TTFT p50 s", "TTFT p95 s", f"turn-{cfg['rounds']} TTFT s",
                 "peak MB", "wall s"], rows))
    print("\n" + "\n".join(server_table(data)) + "\n")
    for s in servers.values():
        for note in s["notes"]:
            print(f"note: {s['label']}: {note}")
    failures = []
    for key, ag in data["agreement"].items():
        failures += [f"{servers[key]['label']}: {f}" for f in ag["failures"]]
        print(f"greedy agreement, {servers[key]['label']} vs mmchat: {ag['same_text']}/{ag['turns_compared']} "
              f"single-user answers identical{spaced(ag)}, {ag['near_tie_divergences']} differ at a near-tie "
              f"(≤ {ag['tolerance']:g} logits), {len(ag['failures'])} real disagreement(s)")
    for line in target_lines(data):
        print(line)
    write_json(out / "serve.json", data)
    plot(data, out / "serve.png")
    (out / "serve_readme.md").write_text(readme(data))
    print(f"results: {out / 'serve.json'}, chart: {out / 'serve.png'}, README section: {out / 'serve_readme.md'}")
    if failures:
        print("FAIL: the servers' greedy answers disagree beyond a near-tie: " + "; ".join(failures))
        return 1
    print(headline(data))
    return 0


def plot(data: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for key, s in data["servers"].items():
        style = "-o" if key.startswith("mmchat") else ":^" if key in VLLM else "--s"
        turns = s["single_user"]
        ax1.plot([t["turn"] for t in turns], [t["ttft_s"] for t in turns], style, label=s["label"])
        users = [int(u) for u in s["concurrent"]]
        ax2.plot(users, [p["aggregate_tps"] for p in s["concurrent"].values()], style, label=s["label"])
    ax1.set(xlabel="turn", ylabel="time to first token (s)", title="One user: time to first token per turn",
            yscale="log")
    ax2.set(xlabel="concurrent users", ylabel="completion tokens/s, all users",
            title=f"Aggregate throughput ({data['config']['rounds']} turns each)", xscale="log")
    users = data["config"]["users"]
    ax2.set_xticks(users, [str(u) for u in users])
    ax2.minorticks_off()
    ax2.set_ylim(bottom=0)
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.suptitle(f"{data['shape']}\n{data['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def readme(data: dict) -> str:
    """The README section: a table of the run and how to run it."""
    cfg, servers = data["config"], data["servers"]
    agree = "; ".join(f"{servers[k]['label']}: {a['same_text']}/{a['turns_compared']} identical{spaced(a)}, "
                      f"{a['near_tie_divergences']} near-tie flips" for k, a in data["agreement"].items())
    flags = (" --quick" if cfg["quick"] else "") + (f" --threads {cfg['threads']}" if cfg["threads"] != 1 else "") \
        + (f" --vllm {cfg['vllm']}" if cfg.get("vllm") else "")
    with_vllm = (" and by vLLM (`vllm serve FOLDER --dtype float32`, as it starts by default and with "
                 "`--block-size 32`)") if any(k in VLLM for k in servers) else ""
    notes = [f"- {srv['label']}: {note}" for srv in servers.values() for note in srv["notes"]]
    return "\n".join([
        "## Serving benchmark: `python -m benchmarks.serve`", "",
        "One random-weight llava-hf folder (llava-1.5's processor and chat template) served one server at a time, "
        f"each in its own process, by `python -m mmchat.serve` (batching on with `--max-batch {cfg['max_batch']}`, "
        f"and off with `--max-batch 1`), by `transformers serve` (plain and `--continuous-batching`){with_vllm}, "
        "driven by "
        f"the official `openai` client with streamed greedy requests of {cfg['new_tokens']} tokens; each user's turn "
        f"re-sends the whole conversation (a picture, then questions and answers). Model: {data['shape']}. "
        f"Measured on {data['machine']}, {cfg['threads']} torch thread(s) per server (`python -m "
        f"benchmarks.serve{flags}`, {data['seconds'] / 60:.0f} min; 1-minute load average "
        f"{data['load_average']['before']:.1f} before the run). Concurrent users ask {cfg['rounds']} turns each, all "
        "starting together; tok/s is all completion tokens ÷ the phase's wall time. One user's decode is the "
        f"{cfg['turns']} single-user turns' tokens after the first ÷ their time after the first token; start is the "
        "time until `GET /v1/models` answers; peak memory sums the peak RSS (VmHWM) of the server's process tree "
        "(vLLM's API server, engine core and worker processes).", "",
        *server_table(data), "",
        *[f"- {line}" for line in target_lines(data)], *notes,
        f"- greedy single-user answers vs mmchat's (every server got mmchat's answers as history): {agree}", "",
        f"{headline(data).replace('headline: ', 'Headline: ')}.", "",
        "```bash",
        "python -m benchmarks.serve --quick    # a 2-layer LLM, users 1 and 4: about a minute on 2 CPU cores",
        "python -m benchmarks.serve            # the 8-layer × 256 LLaMA above, users 1, 4, 8, 16",
        "python -m benchmarks.serve --vllm ../peers/vllm/bin/python   # and vLLM (bash benchmarks/peers/vllm.sh)",
        "```", ""])
