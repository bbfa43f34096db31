"""`python -m finetune.demo`: build the embedded demo model from nothing, on a CPU.

    python -m finetune.demo --out assets/demo-model            # the shipped model (under an hour, 2 cores)
    python -m finetune.demo --out /tmp/demo --quick            # a smaller world in a few minutes (the tests)
    python -m finetune.demo --out /tmp/demo-rs --quick --projector resampler   # a resampler instead of the MLP
    python -m finetune.demo --out /tmp/demo-ar --quick --anyres   # the MLP on AnyRes tiles of 2x-sized images

1. data: synthetic shape images with captions and conversations, as LLaVA-format files
2. tokenizer: BPE over the world's text (`finetune.demo.tokenizer`)
3. CLIP: a tiny open_clip CLIP trained contrastively (`finetune.demo.pretrain_clip`)
4. LLM: a tiny LLaMA trained on the conversations' text (`finetune.demo.pretrain_lm`)
5. stage 0: both parts and a new projector as an mmchat checkpoint
6. stage 1: `python -m finetune.qlora --stage align` (projector only, LLM in 4-bit)
7. stage 2: `python -m finetune.qlora --stage instruct` (QLoRA: 4-bit NF4 LLM + LoRA, projector)
8. pack: the base LLM copied in, so the folder stands alone; then held-out evaluation in 4-bit
   and the model card (README.md, learning curves) written beside the weights.

Stages 1-2 run the very command users run on a 7B model, with `finetune/demo/configs/demo-*.yaml`.
Each step prints its time. Work files go to `--work` (default: beside --out) and are kept.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from finetune.demo.pretrain_clip import ClipConfig
from finetune.demo.lookups import CELL_TOKENS, Lookups
from finetune.demo.pretrain_lm import LmConfig, Turns
from finetune.demo.world import WorldConfig
from finetune.demo.sets import SyntheticSet
from finetune.demo.strategies import anyres_config, image_side, new_projector, new_stage0_projector
from finetune.demo.texts import TextConfig

CONFIGS = Path(__file__).resolve().parent / "configs"
SEEDS = {"clip": 1, "lm": 2, "align": 3, "instruct": 4, "tokenizer": 5, "heldout": 1000}
"""World seeds of each part: every set is a different draw, the held-out one never trained on."""


@dataclass
class DemoConfig:
    out: Path
    work: Path
    quick: bool = False
    world: WorldConfig = field(default_factory=WorldConfig)
    text: TextConfig = field(default_factory=TextConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    lm: LmConfig = field(default_factory=LmConfig)
    vocab_size: int = 512
    select_layer: int = -2
    """The CLIP block whose output feeds the projector: the penultimate, as LLaVA (with CLS
    pooling the last block's patch outputs feed nothing in CLIP's loss)."""
    select_feature: str = "patch"
    """The nine patch tokens, one per cell: the LLM learnt to read the scene as a 3×3 grid of
    cell words in that order (`finetune.demo.lookups`)."""
    projector: str = "mlp2x_gelu"
    """What stages 1-2 train: `mlp2x_gelu` (each patch to its cell word) or `resampler` (learned
    queries cross-attend to the nine patches; the LLM's pretraining is the same)."""
    resampler_queries: int = 9
    """With `resampler`: the queries, so the image tokens the LLM reads."""
    anyres: bool = False
    """AnyRes (LLaVA-NeXT's tiling) with the MLP: images drawn at twice the CLIP's side, each read as
    the whole image in one tile plus a 2×2 grid of tiles (`finetune.demo.strategies`)."""
    align_records: int = 6000
    instruct_records: int = 16000
    heldout_records: int = 600
    align_flags: list[str] = field(default_factory=list)
    """Extra `finetune.qlora` flags after demo-align.yaml (the quick build shortens the run)."""
    instruct_flags: list[str] = field(default_factory=list)
    curve_every: int = 0
    """Evaluate stage 2's checkpoints every N steps on held-out questions for the learning curve (0: off)."""
    curve_records: int = 80
    reuse_pretraining: bool = False
    """Keep `work`'s pretrained CLIP and LLM (stage 0) when they were trained with these settings:
    re-running stages 1-2 then takes minutes, not the pretraining's 50."""
    threads: int = 1
    """Torch threads per process. When another process holds a core, two threads wait on each
    other, so the CLIP and the LLM first train side by side on one core each; the LLM, the long
    pole, doubles its threads when the CLIP is done, and so do stages 1-2, which run alone."""

    def __post_init__(self) -> None:
        if self.anyres and self.projector != "mlp2x_gelu":
            raise ValueError(f"Can't provide both --anyres and --projector {self.projector}: AnyRes packs the tiles' "
                             "patch grids, which only mlp2x_gelu keeps. Choose one.")

    def set(self, kind: str, records: int, seed: int) -> SyntheticSet:
        side = image_side(self)  # sets of another size get their own folders: builds share `work`
        folder = f"data-{kind}" if side == self.clip.image_size else f"data-{kind}-{side}px"
        return SyntheticSet(self.work / folder, seed, records, side,
                            "captions" if kind == "align" else "conversations", self.world, self.text)


def full_config(out: Path, work: Path) -> DemoConfig:
    """The shipped model: the LLM's pretraining is the long pole (reading the grid by attribute,
    "the colour of the circle", is learnt slowly); the CLIP trains beside it on the other core."""
    clip = ClipConfig(pool="tok", steps=800)
    # After the mix, lookup batches take turns with it: colour twice, as finding a shape by its kind
    # is the slowest of the three to form. Then yes/no joins the turns: the others wear down "no" to
    # a shape that is not there, and checking two attributes of one shape forms only once finding
    # it has, so not in the same phase.
    colour, position, shape, yes_no = (Lookups((kind,)) for kind in ("colour", "position", "shape", "yes/no"))
    lm = LmConfig(conversations=40000, steps=4400, batch_size=64, lr=1e-3,
                  turns=(Turns((colour, colour, position, shape), 1200),
                         Turns((colour, colour, position, shape, yes_no), 800)))
    # Stages 1-2 on as many records as paid off in held-out accuracy (stage 2's curve was still
    # rising with fewer). All seven of stage 2's checkpoints are kept: each is a point of the card's
    # held-out curve.
    return DemoConfig(out, work, clip=clip, lm=lm, align_records=40000, instruct_records=36000,
                      instruct_flags=["--save-every", "300", "--keep-checkpoints", "8"], curve_every=300)


def quick_config(out: Path, work: Path) -> DemoConfig:
    """One shape per image, colour questions only, small models, short runs."""
    world = WorldConfig(max_shapes=1)
    text = TextConfig(types=("colour",), max_turns=1)
    clip = ClipConfig(width=64, layers=2, heads=2, embed_dim=64, text_width=64, text_layers=1, images=2048,
                      steps=100, batch_size=128, warmup=20, world=world)
    lm = LmConfig(hidden=64, layers=2, heads=2, intermediate=192, conversations=2000, steps=300, batch_size=32,
                  warmup=30, world=world, text=text)
    return DemoConfig(out, work, True, world, text, clip, lm, vocab_size=384, align_records=600, instruct_records=1200,
                      heldout_records=120, align_flags=["--max-steps", "40"], instruct_flags=["--max-steps", "120"])


# ---------------------------------------------------------------- the steps


class Steps:
    """Prints each step's start and time; keeps the times for the model card."""

    def __init__(self, total: int):
        self.total, self.times, self.started = total, {}, time.perf_counter()

    @contextmanager
    def step(self, name: str):
        n = len(self.times) + 1
        say(f"step {n}/{self.total}: {name}")
        tick = time.perf_counter()
        yield
        self.times[name] = time.perf_counter() - tick
        say(f"step {n}/{self.total}: {name} done in {self.times[name]:.0f} s ({time.perf_counter() - self.started:.0f} s in all)")


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def qlora(stage: str, model: Path, data: Path, out: Path, flags: list[str], threads: int) -> list[str]:
    """Run `python -m finetune.qlora` as a user would; returns the command."""
    command = [sys.executable, "-m", "finetune.qlora", "--config", str(CONFIGS / f"demo-{stage}.yaml"),
               "--model", str(model), "--data", str(data), "--image-root", str(data.parent),
               "--output-dir", str(out), "--overwrite", "--no-progress", *flags]
    say(" ".join(command[1:]))
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return command


def build(cfg: DemoConfig) -> dict:
    """All the steps; returns what the model card reports."""
    import torch

    from finetune.demo.card import accuracy_by_shapes, write_card
    from finetune.eval import EvalConfig, evaluate

    torch.set_num_threads(cfg.threads)
    steps = Steps(6)
    work = cfg.work
    work.mkdir(parents=True, exist_ok=True)
    with steps.step("data"):
        sets = write_sets(cfg)
    with steps.step("tokenizer"):
        tokenizer = make_tokenizer(cfg)
    pretraining = "CLIP and LLM pretraining (in parallel, one core each)"
    with steps.step(pretraining):
        earlier = reusable_pretraining(cfg) if cfg.reuse_pretraining else None
        if earlier is None:
            clip, lm, lm_history, parallel = pretrain_both(cfg, tokenizer)
            stage0_checkpoint(cfg, clip, lm, tokenizer)
            clip_history = clip.history
        else:
            say(f"reusing the pretrained CLIP and LLM in {work / 'stage0'} (same pretraining settings)")
            new_stage0_projector(cfg)
            clip_history, lm_history, parallel = earlier["clip"], earlier["lm"], earlier["parallel"]
        stage0 = work / "stage0"
    if earlier is None:
        _write_pretraining(cfg, clip_history, lm_history, parallel, steps.times[pretraining])
    else:  # the card reports the build as it ran, pretraining included
        steps.times[pretraining] = earlier["seconds"]
        steps.started -= earlier["seconds"]
    alone = 2 * cfg.threads  # stages 1-2 run by themselves: both cores
    with steps.step("stage 1: align"):
        align_cmd = qlora("align", stage0, sets["align"], work / "stage1", cfg.align_flags, alone)
    with steps.step("stage 2: instruct (QLoRA)"):
        instruct_cmd = qlora("instruct", work / "stage1", sets["instruct"], work / "stage2", cfg.instruct_flags,
                             alone)
    with steps.step("pack, evaluate in 4-bit, model card"):
        pack(work / "stage2", stage0 / "llm", cfg.out)
        predictions = work / "heldout-predictions.jsonl"
        result = evaluate(EvalConfig(str(cfg.out), sets["heldout"], sets["heldout"].parent, load_in="4bit",
                                     device="cpu", predictions=predictions, progress=False))
        curve = instruct_curve(cfg, sets["heldout"])
        info = {"quick": cfg.quick, "times": steps.times, "parallel_times": parallel,
                "wall_seconds": time.perf_counter() - steps.started, "pretraining_reused": earlier is not None,
                "eval": result, "clip": clip_history, "lm": lm_history,
                "instruct_curve": curve, "by_shapes": accuracy_by_shapes(predictions, cfg.world),
                "commands": {"align": align_cmd, "instruct": instruct_cmd},
                "training": {stage: _train_summary(work / folder) for stage, folder in (("align", "stage1"),
                                                                                         ("instruct", "stage2"))},
                "config": _plain(asdict(cfg))}
        write_card(cfg, info)
    say(f"done in {time.perf_counter() - steps.started:.0f} s: {cfg.out} (python app.py --model {cfg.out})")
    return info


def write_sets(cfg: DemoConfig) -> dict[str, Path]:
    """The three sets' files, drawn on both cores at once (the biggest set alone on one)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from finetune.demo.sets import write_set

    sizes = {"align": cfg.align_records, "instruct": cfg.instruct_records, "heldout": cfg.heldout_records}
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {kind: pool.submit(write_set, cfg.set(kind, records, SEEDS[kind]))
                for kind, records in sorted(sizes.items(), key=lambda item: -item[1])}
        return {kind: jobs[kind].result() for kind in sizes}


PRETRAINING_RECORD = "pretraining.json"


def _pretraining_settings(cfg: DemoConfig) -> dict:
    """What the pretrained stage 0 depends on: equal settings give an equal stage 0 (up to float
    rounding: the LLM's thread count changes when the CLIP is done, at a step that depends on timing)."""
    return _plain({"world": asdict(cfg.world), "text": asdict(cfg.text), "clip": asdict(cfg.clip),
                   "lm": asdict(cfg.lm), "vocab_size": cfg.vocab_size, "select_layer": cfg.select_layer,
                   "select_feature": cfg.select_feature})


def _write_pretraining(cfg: DemoConfig, clip_history, lm_history, parallel: dict, seconds: float) -> None:
    record = {"settings": _pretraining_settings(cfg), "clip": clip_history, "lm": lm_history,
              "parallel": parallel, "seconds": seconds}
    (cfg.work / PRETRAINING_RECORD).write_text(json.dumps(record) + "\n")


def reusable_pretraining(cfg: DemoConfig) -> dict | None:
    """The record of an earlier build's pretraining in `cfg.work` when its settings equal these, else None."""
    path = cfg.work / PRETRAINING_RECORD
    if not path.is_file() or not (cfg.work / "stage0").is_dir():
        say(f"no reusable pretraining in {cfg.work}: pretraining from scratch")
        return None
    record = json.loads(path.read_text())
    if record["settings"] != _pretraining_settings(cfg):
        say(f"the pretraining in {cfg.work} used other settings: pretraining from scratch")
        return None
    return record


def make_tokenizer(cfg: DemoConfig):
    """BPE over conversations as the renderer cuts them (split at the image slot, `\\n` then the
    question), the scenes' descriptions and the captions, so merges follow what the model reads."""
    import random

    from finetune.demo.world import sample_scene, scene_rng
    from finetune.demo.texts import caption, conversation, description
    from finetune.demo.tokenizer import train_tokenizer
    from mmchat.conversation import ASSISTANT, USER, Message
    from mmchat.templates import IMAGE_TOKEN, get_template, prompt_text, segments

    template = get_template(cfg.lm.template)

    def corpus():
        for i in range(4000):
            scene = sample_scene(scene_rng(SEEDS["tokenizer"], i), cfg.world)
            rng = random.Random(i)
            messages = []
            for n, turn in enumerate(conversation(scene, rng, cfg.text)):
                messages += [Message(USER, turn.question, int(n == 0)), Message(ASSISTANT, turn.answer)]
            yield from prompt_text(segments(template, messages, False)).split(IMAGE_TOKEN)
            yield description(scene)
            yield caption(scene, rng)

    return train_tokenizer(corpus(), cfg.work / "tokenizer", cfg.vocab_size,
                           extra_specials=CELL_TOKENS if cfg.lm.cell_places else ())


def pretrain_both(cfg: DemoConfig, tokenizer):
    """CLIP here and the LLM in a second process at once: the two share nothing, and each of
    these tiny models runs as fast on one core as on two.

    Returns the CLIP result, the LLM, its history and each part's seconds.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from transformers import AutoModelForCausalLM

    from finetune.demo.pretrain_clip import pretrain_clip

    clip_done = cfg.work / "clip-done"
    clip_done.unlink(missing_ok=True)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        lm_job = pool.submit(_pretrain_lm, replace(cfg.lm, seed=SEEDS["lm"]), cfg.work / "tokenizer",
                             cfg.work / "lm", cfg.threads, clip_done)
        clip = pretrain_clip(replace(cfg.clip, seed=SEEDS["clip"]), tokenizer, cfg.work / "clip", log=say)
        clip_done.touch()  # the LLM, the long pole, takes this process's core for the rest of its run
        lm_history, lm_seconds = lm_job.result()
    parallel = {"CLIP pretraining": clip.seconds, "LLM pretraining": lm_seconds}
    return clip, AutoModelForCausalLM.from_pretrained(cfg.work / "lm"), lm_history, parallel


def _pretrain_lm(cfg: LmConfig, tokenizer_dir: Path, out: Path, threads: int, clip_done: Path) -> tuple[list[dict], float]:
    """The LLM's pretraining in the second process (its log lines are prefixed like the rest);
    it doubles its threads once `clip_done` exists."""
    import torch
    from transformers import AutoTokenizer

    from finetune.demo.pretrain_lm import pretrain_lm

    torch.set_num_threads(threads)
    result = pretrain_lm(cfg, AutoTokenizer.from_pretrained(tokenizer_dir), out, log=say,
                         threads=lambda: 2 * threads if clip_done.exists() else threads)
    return result.history, result.seconds


def stage0_checkpoint(cfg: DemoConfig, clip, lm, tokenizer) -> Path:
    """The pretrained CLIP tower and LLaMA with a new projector, as an mmchat checkpoint."""
    from mmchat.checkpoint import save_checkpoint
    from mmchat.config import ModelConfig, VisionConfig

    vision = VisionConfig(open_clip_model="mmchat-demo-clip", pretrained=None, select_layer=cfg.select_layer,
                          select_feature=cfg.select_feature, image_size=cfg.clip.image_size, anyres=anyres_config(cfg))
    projector_config, projector = new_projector(cfg)
    config = ModelConfig(vision=vision, projector=projector_config, llm="llm", tokenizer="llm", template=cfg.lm.template)
    return save_checkpoint(cfg.work / "stage0", config, projector, tokenizer, llm=lm,
                           vision=clip.model.visual, vision_model_cfg=clip.model_cfg)


def pack(trained: Path, base_llm: Path, out: Path) -> Path:
    """The stage-2 checkpoint with its base LLM copied in (it names the LLM by absolute path)."""
    from mmchat.checkpoint import LLM_DIR, PROJECTOR_FILE, atomic_dir, read_config, write_config
    from mmchat.vision import VISION_DIR

    config = read_config(trained)
    with atomic_dir(out) as tmp:
        for name in (PROJECTOR_FILE, VISION_DIR, config.tokenizer, config.adapter):
            source = trained / name
            (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp / name)
        shutil.copytree(base_llm, tmp / LLM_DIR)
        _adapter_beside_its_llm(tmp / config.adapter)
        config.llm = LLM_DIR
        write_config(config, tmp)
    return out


def _adapter_beside_its_llm(adapter: Path) -> None:
    """The adapter names its base by the build's work path; in the packed folder the base is `llm/`
    beside it. PEFT's empty model-card template goes: the folder's README is the card."""
    from mmchat.checkpoint import LLM_DIR

    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = LLM_DIR
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    (adapter / "README.md").unlink(missing_ok=True)


def instruct_curve(cfg: DemoConfig, heldout: Path) -> list[dict]:
    """Held-out accuracy of stage 2's saved checkpoints (the learning curve in the card)."""
    from finetune.eval import EvalConfig, evaluate

    if not cfg.curve_every:
        return []
    points = []
    for folder in sorted((cfg.work / "stage2" / "checkpoints").glob("step-*")):
        result = evaluate(EvalConfig(str(folder / "model"), heldout, heldout.parent, load_in="4bit", device="cpu",
                                     limit=cfg.curve_records, progress=False))
        step = int(folder.name.split("-")[1])
        points.append({"step": step, "accuracy": result["accuracy"],
                       "per_question_type": {k: v["accuracy"] for k, v in result["per_question_type"].items()}})
        say(f"stage 2 step {step}: held-out accuracy {result['accuracy']:.1%}")
    return points


def _train_summary(out: Path) -> dict:
    """A training stage's speed, as `finetune.qlora` summed it up (kept: the next build in `work` overwrites it)."""
    summary = json.loads((out / "train_summary.json").read_text())
    return {k: summary[k] for k in ("steps", "seconds", "mean_tokens_per_s", "first_loss", "last_loss")}


def _plain(value):
    """A config as JSON-friendly values (paths as strings)."""
    return json.loads(json.dumps(value, default=str))


def parse_args(argv: list[str] | None = None) -> DemoConfig:
    p = argparse.ArgumentParser(prog="python -m finetune.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the checkpoint folder to write (e.g. assets/demo-model)")
    p.add_argument("--work", type=Path, default=None, help="folder for data and intermediate models (default: beside --out)")
    p.add_argument("--quick", action="store_true", help="one shape per image, colour questions, a few minutes")
    p.add_argument("--reuse-pretraining", action="store_true",
                   help="keep the pretrained CLIP and LLM that an earlier build with the same pretraining settings left in --work")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default: %(default)s)")
    p.add_argument("--projector", choices=("mlp2x_gelu", "resampler"), default="mlp2x_gelu",
                   help="the projector stages 1-2 train: one token per patch, or learned queries (default: %(default)s)")
    p.add_argument("--resampler-queries", type=int, default=None,
                   help="with --projector resampler: its queries, the image tokens (default: 9, one per cell)")
    p.add_argument("--anyres", action="store_true",
                   help="the MLP projector on AnyRes tiles: images at twice the CLIP's side, read as one whole-image "
                        "tile plus a 2x2 grid (LLaVA-NeXT's tiling)")
    a = p.parse_args(argv)
    if a.threads < 1:
        p.error(f"--threads {a.threads}: must be at least 1")
    if a.resampler_queries is not None and (a.projector != "resampler" or a.resampler_queries < 1):
        p.error(f"--resampler-queries {a.resampler_queries}: needs --projector resampler and at least 1 query")
    work = a.work or a.out.with_name(f"{a.out.name}-work")
    cfg = (quick_config if a.quick else full_config)(a.out, work)
    try:
        return replace(cfg, threads=a.threads, reuse_pretraining=a.reuse_pretraining, projector=a.projector,
                       anyres=a.anyres, resampler_queries=a.resampler_queries or cfg.resampler_queries)
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        build(cfg)
    except subprocess.CalledProcessError as e:
        print(f"error: a training stage failed (exit {e.returncode}): {' '.join(map(str, e.cmd))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
