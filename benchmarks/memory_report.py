"""`python -m benchmarks.memory`'s output: the fit, the 7B/13B predictions, the cards, the chart."""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from benchmarks.common import table, write_json
from benchmarks.memory_model import (
    CLIP_L_336, CPU, CUDA_CONTEXT, GIB, LLAMA, NF4_BYTES, Coefficients, LlmShape, Measurement, VisionShape, Workload,
    breakdown, cuda_precision, fit, max_batch, moment_bytes, peak_bytes, predicted_step, relative_errors, static_parts,
)

CARDS_GB = (12, 16, 24)
SEQ_LENS = (512, 1024, 2048)


def measurements(data: dict) -> list[Measurement]:
    out = []
    for s in data["shapes"]:
        sh = s["shape"]
        llm = LlmShape(f"{s['layers']}×{s['hidden']}", s["layers"], s["hidden"], sh["intermediate"], sh["vocab"],
                       sh["kv_heads"] * s["hidden"] // sh["heads"])
        for p in s["points"]:
            work = Workload(p["seq_len"], p["batch"], p["gradient_checkpointing"], s["lora_r"], p["answer_fraction"])
            out.append(Measurement(llm, work, s["trainable"], p["step_bytes"]))
    return out


def _mb(x: float) -> str:
    return f"{x / 2**20:.0f}"


def _gb(x: float) -> str:
    return f"{x / GIB:.2f}"


def _fit_report(data: dict, ms: list[Measurement], coef: Coefficients) -> dict:
    errors = relative_errors(ms, _fit_precision(data), coef)
    rows, i = [], 0
    for s in data["shapes"]:
        for p in s["points"]:
            m = ms[i]
            rows.append([f"{s['layers']}×{s['hidden']}", s["lora_r"], p["batch"], p["seq_len"],
                         "on" if p["gradient_checkpointing"] else "off", f"{p['answer_fraction']:.2f}",
                         _mb(m.step_bytes), _mb(m.step_bytes * (1 + errors[i])), f"{errors[i]:+.1%}"])
            i += 1
    print(table(["layers×hidden", "LoRA r", "batch", "seq", "checkpointing", "answers", "measured MB",
                 "model MB", "error"], rows))
    largest = max(data["shapes"], key=lambda s: (s["hidden"], s["layers"]))  # the widest: towards 7B
    train = [m for m in ms if (m.llm.layers, m.llm.hidden) != (largest["layers"], largest["hidden"])]
    held = [m for m in ms if (m.llm.layers, m.llm.hidden) == (largest["layers"], largest["hidden"])]
    held_errors = relative_errors(held, _fit_precision(data), fit(train, _fit_precision(data))) if train else errors
    summary = {"mean_abs_error": float(abs(errors).mean()), "max_abs_error": float(abs(errors).max()),
               "held_out_shape": f"{largest['layers']}×{largest['hidden']}",
               "held_out_mean_abs_error": float(abs(held_errors).mean()),
               "held_out_max_abs_error": float(abs(held_errors).max())}
    print(f"\nfitted: {coef.act_recompute:.1f} values/token/hidden while a checkpointed layer is recomputed, "
          f"{coef.act_layer:.1f} per layer without checkpointing, {coef.logit_bytes:.1f} bytes per answer logit, "
          f"{coef.grad_factor:.2f}× the gradients at the end of backward, workspace {_mb(coef.workspace)} MB")
    print(f"fit error over {len(ms)} steps: mean {summary['mean_abs_error']:.1%}, max {summary['max_abs_error']:.1%}; "
          f"fitted without the {summary['held_out_shape']} shape and predicting it: mean "
          f"{summary['held_out_mean_abs_error']:.1%}, max {summary['held_out_max_abs_error']:.1%}")
    return summary


def _fit_precision(data: dict):
    return CPU if data["config"]["device"] == "cpu" else replace(cuda_precision(data["bf16_ratio"]), constant=0.0)


def _static_report(data: dict) -> None:
    rows = []
    for s in data["shapes"]:
        t, sh = s["tensors"], s["shape"]
        llm = LlmShape("", s["layers"], s["hidden"], sh["intermediate"], sh["vocab"])
        vision = VisionShape("", s["vision_params"], sh["vision_width"], s["image_tokens"])
        analytic = sum(static_parts(llm, vision, Workload(1, lora_r=s["lora_r"]), _fit_precision(data)).values())
        counted = t["nf4_bytes"] + t["other_bytes"] + t["optimizer_bytes"]
        rows.append([f"{s['layers']}×{s['hidden']}", s["lora_r"], f"{t['nf4_bytes'] / t['nf4_params']:.4f}",
                     _mb(analytic), _mb(counted), f"{counted / analytic - 1:+.2%}", _mb(s["loaded_bytes"])])
    print(table(["layers×hidden", "LoRA r", "NF4 bytes/param", "loaded: model MB", "tensors MB", "error",
                 "RSS growth MB"], rows))
    print(f"(NF4 + double quant in the model: {NF4_BYTES:.4f} bytes/param; RSS also grows by code and runtime "
          "buffers, which the tensor count leaves out)")


def strategy_case(cfg: dict, side: dict, size: str) -> tuple[VisionShape, Workload]:
    """The tower and the workload of one image-token strategy (`side`, an `image_side` entry) at model
    `size`: `--seq-len`'s text (all but LLaVA-1.5's 576 image tokens) and its answer positions, plus the
    strategy's image tokens; the projector's saved tensors on every tile."""
    seq = cfg["seq_len"] - CLIP_L_336.tokens + side["image_tokens"]
    answers = cfg["answer_fraction"] * cfg["seq_len"]
    vision = replace(CLIP_L_336, queries=side["queries"] if side["strategy"] == "resampler" else None)
    saved = side["saved"][size]
    return vision, Workload(seq, cfg["batch"], True, cfg["lora_r"], answers / seq, 4 if cfg["vision_dtype"] == "fp32" else 2,
                            saved["per_sequence"], saved["per_step"])


def _chosen(data: dict) -> dict:
    return next(s for s in data["image_side"] if s["strategy"] == data["config"]["image_tokens"]["strategy"])


def _predictions(data: dict, coef: Coefficients, prec) -> dict:
    columns, parts = {}, {}
    for size in ("7b", "13b"):
        vision, work = strategy_case(data["config"], _chosen(data), size)
        for checkpointing in (True, False):
            w = replace(work, gradient_checkpointing=checkpointing)
            key = f"{size} {'ckpt' if checkpointing else 'no ckpt'}"
            parts[key] = breakdown(LLAMA[size], vision, w, prec, coef)
            columns[key] = sum(parts[key].values())
    names = list(parts[next(iter(parts))])
    rows = [[n] + [_gb(parts[k][n]) for k in parts] for n in names] + [["total"] + [_gb(v) for v in columns.values()]]
    print(table(["GB (2^30 bytes)"] + list(parts), rows))
    return {"parts": parts, "totals": columns}


def _comparisons(coef: Coefficients, prec, cfg: dict) -> list[str]:
    llm = LLAMA["7b"]
    w = Workload(2048, 1, True, cfg["lora_r"], cfg["answer_fraction"])
    base = llm.linear_params() * NF4_BYTES + llm.other_params() * prec.weight_bytes
    lora = llm.lora_params(cfg["lora_r"])
    lines = [(f"4-bit 7B base: {_gb(base)} GB here ({_gb(llm.linear_params() * NF4_BYTES)} NF4 + "
              f"{_gb(llm.other_params() * 2)} bf16 embeddings/lm_head, counted tensor by tensor) vs ~5.0 GB (4.66 × 2^30) in the "
              f"QLoRA paper: {_gb(5.0e9 - base)} GB less here, which counts no buffers beyond the weights"),
             (f"LoRA weights: the paper's ~26 MB is ~13M parameters in 16-bit (0.2% of 7B); the shipped r "
              f"{cfg['lora_r']} on every linear layer is {lora / 1e6:.0f}M ({lora / 6.74e9:.1%}): {_gb(lora * 4)} GB in "
              f"float32, {_gb(lora * (4 + 4 + prec.optimizer_bytes))} GB with gradients and 8-bit AdamW")]
    per_token = llm.layers * llm.hidden * prec.weight_bytes
    lines.append(f"activations with checkpointing: the stored layer inputs take {per_token / 2**10:.0f} KB per token "
                 f"({_gb(per_token * 2048)} GB at 2048 tokens), the recomputed layer "
                 f"{_gb(coef.act_recompute * 2048 * llm.hidden * prec.act_bytes)} GB more; the paper's ~18 MB per "
                 "sequence counts only LoRA input gradients, so the two are not comparable one to one")
    slope = _activation_growth(llm, w, prec, coef)
    qwen_slope = _activation_growth(replace(llm, vocab=151936), replace(w, answer_fraction=1.0), prec, coef)
    lines.append(f"Qwen-VL-7B QLoRA: 17.0 → 19.3 GB from 384 to 2048 tokens = {2.3 * 1e3 / 1664:.2f} GB/1000 tokens; "
                 f"activations + logits here grow {slope * 1000 / GIB:.2f} GB/1000 tokens for LLaMA-7B (32K vocab, "
                 f"answer-only logits), {qwen_slope * 1000 / GIB:.2f} with Qwen's 152K vocab and logits at every "
                 "position (its 1.9B-parameter ViT and own LoRA make the absolute figures incomparable)")
    text = peak_bytes(llm, replace(CLIP_L_336, params=0, width=0), Workload(512, 1, True, 8, 0.5), prec, coef)
    lines.append(f"LLaMA-Factory's 6 GB for 7B QLoRA: this model gives {_gb(text)} GB for text-only 7B, LoRA r 8, "
                 "512 tokens, batch 1 (context included); mmchat's stage 2 adds the fp32 CLIP tower "
                 f"({_gb(CLIP_L_336.params * 4)} GB) and r {cfg['lora_r']}")
    return lines


def _activation_growth(llm: LlmShape, work: Workload, prec, coef: Coefficients) -> float:
    """Bytes per token that activations + logits add from 384 to 2048 tokens (their larger moment)."""
    def step(seq: int) -> float:
        moments = moment_bytes(llm, replace(work, seq_len=seq), prec, coef, 0.0)
        return max(v for name, v in moments.items() if name != "gradients")

    return (step(2048) - step(384)) / 1664


def _cards(coef: Coefficients, prec, data: dict) -> list[list]:
    """Largest batches at each total length, an mlp2x_gelu image (576 tokens) among them."""
    cfg, mlp = data["config"], next(s for s in data["image_side"] if s["strategy"] == "mlp")
    rows = []
    for size in ("7b", "13b"):
        _, work = strategy_case(cfg, mlp, size)
        for checkpointing in (True, False):
            for seq in SEQ_LENS:
                w = replace(work, seq_len=seq, batch=1, gradient_checkpointing=checkpointing,
                            answer_fraction=cfg["answer_fraction"])
                fits = [max_batch(LLAMA[size], CLIP_L_336, w, prec, coef, gb * GIB) for gb in CARDS_GB]
                rows.append([LLAMA[size].name, "on" if checkpointing else "off", seq] + [b or "—" for b in fits])
    return rows


def _strategies(data: dict, coef: Coefficients, prec) -> list[dict]:
    """Each image-token strategy at --seq-len's text, batch and LoRA, checkpointing on: 7B and 13B peaks."""
    cfg, card = data["config"], CARDS_GB[-1] * GIB
    rows = []
    for side in data["image_side"]:
        row = {"strategy": side["strategy"], "label": side["label"], "image_tokens": side["image_tokens"],
               "tiles": side["tiles"]}
        for size in ("7b", "13b"):
            vision, work = strategy_case(cfg, side, size)
            row.update({"seq_len": work.seq_len, f"{size}_peak_bytes": peak_bytes(LLAMA[size], vision, work, prec, coef),
                        f"{size}_max_batch_{CARDS_GB[-1]}gb": max_batch(LLAMA[size], vision, work, prec, coef, card),
                        f"{size}_projector_saved_bytes": work.batch * work.image_bytes_per_sequence + work.image_bytes_per_step})
        rows.append(row)
    big = f"{CARDS_GB[-1]} GB"
    print(table(["strategy", "image tokens", "tiles", "sequence", "projector saved MB", "7B peak GB", f"fits {big}",
                 f"7B largest batch, {big}", "13B peak GB", f"13B fits {big}"],
                [[r["label"], r["image_tokens"], r["tiles"], r["seq_len"], _mb(r["7b_projector_saved_bytes"]),
                  _gb(r["7b_peak_bytes"]), "yes" if r["7b_peak_bytes"] <= card else "no",
                  r[f"7b_max_batch_{CARDS_GB[-1]}gb"] or "—", _gb(r["13b_peak_bytes"]),
                  "yes" if r["13b_peak_bytes"] <= card else "no"] for r in rows]))
    return rows


CAVEATS = """\
What CPU measurements can and can't say about GPU memory:
- measured: what a real stage-2 step adds (RSS peak over the loaded model, glibc returning freed
  blocks), on small shapes in float32; the loaded tensors are counted exactly (NF4 constants too);
- carried over: values per token per hidden unit (the same autograd graph saves the same tensors),
  bytes per logit; the bytes per value under bf16 autocast come from counting saved tensors on CPU;
- assumed: CUDA context + cuBLAS workspace {context:.2f} GB (0.5-1 GB by driver and card); no
  allocator fragmentation (PyTorch's caching allocator often reserves 5-15% more than it allocates);
  flash / memory-efficient attention (no L² scores); paged 8-bit AdamW states resident on the GPU;
- the CPU runtime's own workspace (fitted) is dropped for the GPU prediction;
- a step's moments are modelled as separate peaks and the larger counts: the largest fit errors
  are steps where two are about equal and the real peak holds part of both."""


def report(data: dict, out: Path) -> int:
    cfg = data["config"]
    ms = measurements(data)
    coef = fit(ms, _fit_precision(data))
    print(f"machine: {data['machine']}, {cfg['threads']} torch threads; fit measured on {cfg['device']}\n")
    print("what a stage-2 step adds over the loaded model (one image per sequence, 4-bit NF4 + LoRA + projector):")
    summary = _fit_report(data, ms, coef)
    print("\nwhat stays loaded (model, LoRA, projector, AdamW states): this model vs the tensors vs RSS growth")
    _static_report(data)
    prec = cuda_precision(data["bf16_ratio"])
    if cfg["device"] != "cpu":
        prec = replace(prec, constant=CUDA_CONTEXT + coef.workspace)
    print(f"\nbf16 autocast saves {data['bf16_ratio']:.2f}× the bytes of float32 "
          f"(→ {prec.act_bytes:.2f} bytes per activation value on GPU)")
    chosen = _chosen(data)
    seq = strategy_case(cfg, chosen, "7b")[1].seq_len
    print(f"\npredicted peak GPU memory, stage 2: LoRA r {cfg['lora_r']} on every linear layer + projector, paged 8-bit "
          f"AdamW, bf16 autocast, {cfg['vision_dtype']} CLIP ViT-L/14-336, {chosen['label']} ({chosen['image_tokens']} "
          f"image tokens), {seq} tokens × batch {cfg['batch']}, {cfg['answer_fraction'] * cfg['seq_len']:.0f} answer "
          "positions:")
    predictions = _predictions(data, coef, prec)
    print("\ncompared with published figures (REFERENCE.md):")
    comparisons = _comparisons(coef, prec, cfg)
    for line in comparisons:
        print(f"- {line}")
    print(f"\nimage-token strategies: --seq-len {cfg['seq_len']}'s {cfg['seq_len'] - CLIP_L_336.tokens} text tokens "
          f"+ the image's, batch {cfg['batch']}, LoRA r {cfg['lora_r']}, checkpointing on (tiles: tower passes per image; "
          "projector saved: what it keeps for backward):")
    strategies = _strategies(data, coef, prec)
    cards = _cards(coef, prec, data)
    print(f"\nlargest batch that fits (LoRA r {cfg['lora_r']}, {cfg['vision_dtype']} tower; — = not even batch 1):")
    print(table(["model", "checkpointing", "seq"] + [f"{gb} GB card" for gb in CARDS_GB], cards))
    print("\n" + CAVEATS.format(context=CUDA_CONTEXT / GIB))
    data.update(coefficients=asdict(coef), fit=summary, predictions=predictions, comparisons=comparisons,
                strategies=strategies, cards={"columns": [f"{gb} GB" for gb in CARDS_GB], "rows": cards})
    write_json(out / "memory.json", data)
    _plot(data, ms, coef, prec, out / "memory.png")
    key = f"{cfg['model_size']} ckpt"
    print(f"\nresults: {out / 'memory.json'}, chart: {out / 'memory.png'}")
    print(f"headline: {LLAMA[cfg['model_size']].name} stage 2 (QLoRA r {cfg['lora_r']}, {chosen['label']}, {seq} tokens "
          f"× batch {cfg['batch']}, gradient checkpointing): {_gb(predictions['totals'][key])} GB predicted peak GPU memory "
          f"(fit error mean {summary['mean_abs_error']:.1%}, max {summary['max_abs_error']:.1%} over {len(ms)} "
          f"measured steps)")
    return 0


def _plot(data: dict, ms: list[Measurement], coef: Coefficients, prec, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.8))
    ax1, ax2 = fig.subplots(1, 2)
    fit_prec = _fit_precision(data)
    for checkpointing, marker in ((True, "o"), (False, "s")):
        sel = [m for m in ms if m.work.gradient_checkpointing == checkpointing]
        ax1.scatter([m.step_bytes / 2**20 for m in sel], [predicted_step(m, fit_prec, coef) / 2**20 for m in sel],
                    marker=marker, label=f"checkpointing {'on' if checkpointing else 'off'}")
    top = max(m.step_bytes for m in ms) / 2**20 * 1.2
    low = min(m.step_bytes for m in ms) / 2**20 / 1.2
    ax1.plot([low, top], [low, top], "k:", lw=1)
    ax1.set(xscale="log", yscale="log", xlabel="measured MB (a step over the loaded model)", ylabel="model MB",
            title=f"Fit on {data['config']['device'].upper()}: {data['fit']['mean_abs_error']:.1%} mean error")
    ax1.legend()
    parts = data["predictions"]["parts"]
    bottom = [0.0] * len(parts)
    for name in next(iter(parts.values())):
        values = [parts[k][name] / GIB for k in parts]
        ax2.bar(list(parts), values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    for gb in CARDS_GB:
        ax2.axhline(gb, color="k", ls="--", lw=0.8)
        ax2.text(-0.45, gb + 0.2, f"{gb} GB", fontsize=8)
    cfg, chosen = data["config"], _chosen(data)
    seq = strategy_case(cfg, chosen, "7b")[1].seq_len
    ax2.set(ylabel="GB (2^30 bytes)", title=f"Predicted stage-2 peak, {chosen['label']}: {seq} tokens × batch {cfg['batch']}")
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(data["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
