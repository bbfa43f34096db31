"""The demo model's card: README.md with how it was built and how it scores, and its learning curves.

The bar the shipped model must pass (on a held-out world seed, loaded in 4-bit): at least 90%
on single-turn questions of every type and 80% on follow-up turns; the card says whether it does.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from finetune.demo.strategies import describe
from finetune.demo.texts import FOLLOW_UP

CURVES = "learning_curves.png"
BUILD_INFO = "build.json"
SINGLE_TURN_BAR, FOLLOW_UP_BAR = 0.90, 0.80
CHANCE = {"colour": "1/6", "shape": "1/3", "count": "~1/4", "position": "1/9", "yes/no": "1/2",
          "description": "~0", FOLLOW_UP: "mixed"}


def passes_bar(per_type: dict[str, dict]) -> bool:
    return all(row["accuracy"] >= (FOLLOW_UP_BAR if name == FOLLOW_UP else SINGLE_TURN_BAR)
               for name, row in per_type.items())


def accuracy_by_shapes(predictions: Path, world) -> dict[str, dict[str, list[float]]]:
    """Held-out accuracy per question type and number of shapes in the image: {type: {n: [accuracy, questions]}}.

    The held-out records are `shapes-SEED-INDEX`, so each one's scene is drawn again from its seed.
    """
    from collections import defaultdict

    from finetune.demo.world import sample_scene, scene_rng

    scores: dict = defaultdict(lambda: defaultdict(list))
    for line in Path(predictions).read_text().splitlines():
        row = json.loads(line)
        seed, index = row["record"].split("-")[1:]
        shapes = len(sample_scene(scene_rng(int(seed), int(index)), world).shapes)
        scores[row["type"]][str(shapes)].append(row["score"])
    return {kind: {n: [sum(v) / len(v), len(v)] for n, v in sorted(by_n.items())} for kind, by_n in scores.items()}


def plot_curves(info: dict, path: Path) -> Path:
    """Four panels: CLIP loss and caption matching, LLM loss, stage-1 and stage-2 loss with held-out accuracy."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7), dpi=90)  # no pyplot: no backend to choose, no global figure list
    axes = fig.subplots(2, 2)
    clip, lm = info["clip"], info["lm"]
    ax = axes[0][0]
    ax.plot([r["step"] for r in clip], [r["loss"] for r in clip], color="tab:blue", alpha=0.6, label="contrastive loss")
    ax.set_title("1. CLIP pretraining")
    ax.set_xlabel("step")
    twin = ax.twinx()
    evals = [r for r in clip if "match_accuracy" in r]
    twin.plot([r["step"] for r in evals], [r["match_accuracy"] for r in evals], "o-", color="tab:green",
              label="held-out caption match (256-way)")
    twin.set_ylim(0, 1)
    _legend(ax, twin)
    ax = axes[0][1]
    ax.plot([r["step"] for r in lm], [r["loss"] for r in lm], color="tab:blue", alpha=0.6, label="train loss")
    evals = [r for r in lm if "held_out_loss" in r]
    ax.plot([r["step"] for r in evals], [r["held_out_loss"] for r in evals], "o-", color="tab:red", label="held-out loss")
    ax.set_title("2. LLaMA pretraining (text, the scene as cell words)")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    twin = ax.twinx()
    twin.plot([r["step"] for r in evals], [r["answer_accuracy"] for r in evals], "o-", color="tab:green",
              label="held-out answers right")
    twin.set_ylim(0, 1)
    _legend(ax, twin)
    for ax, stage in ((axes[1][0], "align"), (axes[1][1], "instruct")):
        history = info["stage_logs"].get(stage, [])
        ax.plot([r["step"] for r in history], [r["loss"] for r in history], color="tab:blue", alpha=0.6,
                label="answer-token loss")
        ax.set_title({"align": "3. stage 1: align (projector)", "instruct": "4. stage 2: instruct (QLoRA)"}[stage])
        ax.set_xlabel("optimizer step")
        ax.set_yscale("log")
        if stage == "instruct" and info["instruct_curve"]:
            twin = ax.twinx()
            curve = info["instruct_curve"]
            twin.plot([p["step"] for p in curve], [p["accuracy"] for p in curve], "o-", color="tab:green",
                      label="held-out accuracy")
            twin.set_ylim(0, 1)
            _legend(ax, twin)
        else:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def _legend(ax, twin) -> None:
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="center right")


def read_log(folder: Path) -> list[dict]:
    path = folder / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _round(phase) -> str:
    """A phase's round of turns ("2 of colour questions about 2-3 shapes, 1 of ..."): a kind listed twice takes two."""
    return ", ".join(f"{n} of {k.describe()}" for k, n in Counter(phase.lookups).items())


def write_card(cfg, info: dict) -> Path:
    """README.md, learning_curves.png and build.json into `cfg.out`."""
    out = Path(cfg.out)
    info["stage_logs"] = {"align": read_log(cfg.work / "stage1"), "instruct": read_log(cfg.work / "stage2")}
    plot_curves(info, out / CURVES)
    (out / BUILD_INFO).write_text(json.dumps({k: v for k, v in info.items() if k != "stage_logs"}, indent=1) + "\n")
    (out / "README.md").write_text(card_text(cfg, info))
    return out / "README.md"


def card_text(cfg, info: dict) -> str:
    result = info["eval"]
    per_type = result["per_question_type"]
    verdict = "passes" if passes_bar(per_type) else "does NOT pass"
    bar = (f"The bar (≥ 90% on single-turn questions of every type, ≥ 80% on follow-ups): the model **{verdict}** it."
           if not cfg.quick else "The quick build asks only colour questions about one-shape images; the bar "
           "(≥ 90% on every question type, ≥ 80% on follow-ups) is for the full build.")
    skills = ("the colour of a shape" if cfg.text.types == ("colour",) else
              "the colour of a shape, the shape of a colour, how many shapes (of a kind or colour), where a shape is "
              "(\"top left\", \"center\", ...), whether there is a given shape (yes/no), a one-sentence description")
    follow_ups = (", and follow-ups that need the earlier turns (\"And the square?\", \"What colour is it?\")"
                  if cfg.text.max_turns > 1 else "")
    below = [f"{name} ({row['accuracy']:.0%})" for name, row in per_type.items()
             if row["accuracy"] < (FOLLOW_UP_BAR if name == FOLLOW_UP else SINGLE_TURN_BAR)]
    weak = f"Below the bar: {', '.join(below)}.\n\n" if below and not cfg.quick else ""
    by_shapes = info.get("by_shapes") or {}
    counts = sorted({n for row in by_shapes.values() for n in row}, key=int)
    shapes_table = ("By shapes in the image (accuracy, questions):\n\n| question type | "
                    + " | ".join(f"{n} shape{'s' if n != '1' else ''}" for n in counts) + " |\n| --- |"
                    + " --- |" * len(counts) + "\n"
                    + "\n".join(f"| {name} | " + " | ".join(f"{row[n][0]:.0%} ({row[n][1]})" if n in row else "–"
                                                        for n in counts) + " |" for name, row in by_shapes.items())
                    + "\n" if len(counts) > 1 else "")
    world = cfg.world
    shapes = f"{world.min_shapes}–{world.max_shapes} solid shapes" if world.max_shapes > 1 else "one solid shape"
    rows = "\n".join(f"| {name} | {row['questions']} | {row['accuracy']:.1%} | {CHANCE.get(name, '?')} |"
                     for name, row in per_type.items())
    times = "\n".join(f"| {name} | {seconds / 60:.1f} min |" for name, seconds in info["times"].items())
    times += "".join(f"\n| &nbsp;&nbsp;of which {name} | {seconds / 60:.1f} min |" for name, seconds in info["parallel_times"].items())
    pope = result["pope"]
    pope_line = (f"Yes/no questions as POPE counts them ({pope['questions']}): accuracy {pope['accuracy']:.1%}, "
                 f"precision {pope['precision']:.1%}, recall {pope['recall']:.1%}, F1 {pope['f1']:.1%}, "
                 f"yes-ratio {pope['yes_ratio']:.1%}." if pope else "")
    projector, flags = describe(cfg)
    build_cmd = "python -m finetune.demo --out assets/demo-model" + (" --quick" if cfg.quick else "") + flags
    heldout = cfg.set("heldout", cfg.heldout_records, 1000)
    clip, lm = cfg.clip, cfg.lm
    reused = (" Stages 1-2 were re-run with `--reuse-pretraining` on the CLIP and LLM that the same command "
              "had pretrained (same settings); the pretraining's times are that run's." if info.get("pretraining_reused") else "")
    places_tokens = ", and `<cell0>`..`<cell8>`, the grid's places" if lm.cell_places else ""
    places_sum = (", plus its place token's: rotary positions tell how far back a cell is, not which cell"
                  if lm.cell_places else "")
    lookups = "".join(
        f" Then {phase.steps} more steps (learning rate warmed up and decayed again) in which batches take turns, "
        f"a round being {_round(phase)} and 1 of the mix." for phase in lm.turns)
    if lm.turns:
        lookups += (" Each lookup record is a single question about a scene of several shapes: one to find by its "
                    "kind or colour, or whether one of a given colour and kind is there. In the mix alone these "
                    "lookups do not form (mmchat's README, \"The demo model\", has what was measured).")
    style = "LLaVA-NeXT-style (AnyRes)" if cfg.anyres else "LLaVA-1.5-style"
    return f"""# mmchat demo model

A tiny {style} model that mmchat builds from nothing on a CPU: it answers questions about
pictures of coloured shapes. It is what `python app.py` serves by default, offline; it shows the
whole pipeline working, not a general-purpose assistant.

Built with `{build_cmd}` in {info['wall_seconds'] / 60:.1f} minutes
({'the quick build' if cfg.quick else 'the full build'}).{reused}

## What it knows

Images of {shapes} (circle, square, triangle) in six colours (red, green, blue, yellow, purple,
orange) on white, one shape per cell of a 3×3 grid, sized {world.min_size:.0%}–{world.max_size:.0%} of the image side.
It answers: {skills}{follow_ups}. Short answers are single words, digits or a cell name.

## Scores

Held-out world (seed 1000, never trained on), {result['records']} images, {result['questions']} questions, the model
loaded in **4-bit NF4**, greedy answers, VQAv2 answer normalisation, earlier turns showing the
reference answers. Overall accuracy **{result['accuracy']:.1%}**. {bar}

| question type | questions | accuracy | chance |
| --- | --- | --- | --- |
{rows}

{shapes_table}
{pope_line}

Reproduce:

```bash
python -m finetune.demo.sets --out data/shapes-heldout --seed 1000 --records {heldout.records} \\
    --image-size {heldout.image_size} --max-shapes {world.max_shapes}{'' if cfg.text.types == ('colour', 'shape', 'count', 'position', 'yes/no', 'description') else ' --types ' + ' '.join(cfg.text.types)} --max-turns {cfg.text.max_turns}
python -m finetune.eval --model assets/demo-model --data data/shapes-heldout/data.json \\
    --image-root data/shapes-heldout --load-in 4bit
```

## How it was built

| step | time |
| --- | --- |
{times}

1. **CLIP**: an open_clip ViT ({clip.layers} blocks, width {clip.width}, {clip.image_size} px, patch {clip.patch_size}) and text
   transformer, trained contrastively with open_clip's `ClipLoss` on {clip.images:,} synthetic scenes × varied
   captions ({clip.steps} steps of {clip.batch_size}). The config is an open_clip `local-dir` config.
2. **Tokenizer**: byte-pair encoding over the world's text (`tokenizers`), LLaMA's special tokens{places_tokens}.
3. **LLM**: a LLaMA ({lm.layers} layers, hidden {lm.hidden}) trained from scratch on {lm.conversations:,} rendered
   records ({1 - lm.caption_rate:.0%} conversations in `llava_v1` format, {lm.caption_rate:.0%} stage-1 captions in `plain`),
   {lm.steps} steps of {lm.batch_size} at learning rate {lm.lr:g}.{lookups} Where the image goes it reads the scene as nine "cell words", one input
   vector per cell of the 3×3 grid (the sum of the colour and shape words' embeddings{places_sum}), the layout
   the vision tower's nine patch tokens have: so it learns to answer from a grid it reads, and
   stages 1-2 teach the projector to turn each patch into its cell word.
4. **Stage 1** (`finetune.qlora --stage align`, `finetune/demo/configs/demo-align.yaml`): the projector only,
   on {cfg.align_records:,} captioned images, the LLM frozen in 4-bit.
5. **Stage 2** (`finetune.qlora --stage instruct`, `finetune/demo/configs/demo-instruct.yaml`): QLoRA — the LLM
   in 4-bit NF4 with LoRA on every linear layer — and the projector, on {cfg.instruct_records:,} conversations.

Features: CLIP block {cfg.select_layer} output, `{cfg.select_feature}` tokens; projector {projector}. The folder holds
the base LLM (`llm/`), the LoRA adapter (`adapter/`), the projector, the vision tower (`vision/`)
and the tokenizer; `build.json` has every setting, step time and learning-curve point.

![learning curves]({CURVES})

## Limits

{weak}It knows only this world: six colours, three shapes, nine cells, white backgrounds. Other
pictures (photos, other colours or shapes, overlapping or very large shapes) get confident
answers in this world's vocabulary, which may be wrong; free-form questions outside the
question types above get answers of the nearest type. Its context is 512 tokens.
"""
