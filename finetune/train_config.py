"""`TrainConfig`: every option of `python -m finetune.qlora`, from a YAML file and/or flags.

Each field is a YAML key and a flag (`batch_size` ↔ `--batch-size`); its docstring is the flag's
help. Flags override the YAML file, which overrides the defaults below. Unknown keys and flags
are errors that name the closest known ones.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import inspect
import textwrap
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import yaml

from mmchat.config import LOAD_IN as MODEL_LOAD_IN
from mmchat.config import PROJECTOR_TYPES, SELECT_FEATURES

STAGES = ("align", "instruct", "full")
LOAD_IN = ("auto", *MODEL_LOAD_IN)
OPTIMIZERS = ("auto", "adamw", "adamw_8bit", "paged_adamw_8bit")
SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
ALL_LINEAR = "all-linear"

# Keys a resumed run may change; every other key must match the checkpoint's run.
RESUME_SAFE = frozenset({
    "output_dir", "resume", "overwrite", "save_every", "keep_checkpoints", "log_every", "num_workers",
    "progress", "tensorboard", "stop_after", "image_root",
})


class ConfigError(ValueError):
    """A bad option; the message names the key or flag that fixes it."""


@dataclass
class TrainConfig:
    """Options of `python -m finetune.qlora` (stage 1 alignment, stage 2 QLoRA / full tuning)."""

    # ---- what to train
    stage: str = "instruct"
    """align: projector only (vision and LLM frozen); instruct: projector + LoRA on the LLM
    (QLoRA when the LLM is 4-bit); full: projector + every LLM weight (small models)."""
    model: str | None = None
    """An mmchat checkpoint to start from (e.g. a converted LLaVA or a stage-1 output)."""
    llm: str | None = None
    """Or start from parts: a Hugging Face causal LM id or folder (the tokenizer comes with it)."""
    vision: str = "ViT-L-14-336"
    """With --llm: an open_clip model name with patch tokens (OpenAI CLIP, DFN, MetaCLIP, SigLIP, SigLIP2,
    EVA; its preprocessing comes with it), or an mmchat checkpoint whose vision tower to use."""
    vision_pretrained: str | None = "openai"
    """With --llm and an open_clip name: its pretrained tag (e.g. openai, webli)."""
    vision_select_layer: list[str] = field(default_factory=lambda: ["-2"])
    """With --llm and an open_clip name: the hidden state(s) that feed the projector, counted as
    transformers' hidden_states (-1 = the last block's output; LLaVA-1.5: -2); several are concatenated."""
    vision_select_feature: str = "patch"
    """With --llm and an open_clip name: patch (the patch tokens), cls_patch (class token + patches) or
    cls; towers without a class token (SigLIP) take only patch."""
    projector: str | None = None
    """Projector weights to start from: projector.safetensors, LLaVA's mm_projector.bin, or an
    mmchat checkpoint folder; none starts a new projector (stage 1 from parts)."""
    projector_type: str = "mlp2x_gelu"
    """Projector of a new model built from parts (LLaVA-1.5: mlp2x_gelu): linear, mlp2x_gelu (one token
    per patch) or resampler (--resampler-queries learned queries cross-attend to the patches)."""
    resampler_queries: int = 64
    """With --projector-type resampler: learned queries, so image tokens per image (Qwen-VL: 256)."""
    template: str | None = None
    """Conversation template; none picks `plain` for align (LLaVA stage 1) and `llava_v1` otherwise."""
    load_in: str = "auto"
    """LLM weights: 4bit (NF4, double quant), 8bit, 16bit, 32bit; auto = 4bit for align and
    instruct, 32bit for full."""
    lora_r: int = 128
    """LoRA rank (LLaVA-1.5: 128)."""
    lora_alpha: int = 256
    """LoRA scale numerator: updates are scaled by alpha / r (LLaVA-1.5: 256)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input (LLaVA-1.5: 0.05)."""
    lora_targets: list[str] = field(default_factory=lambda: [ALL_LINEAR])
    """LoRA target module names (e.g. q_proj v_proj); all-linear = every linear layer of the LLM
    except lm_head, as LLaVA."""

    # ---- data
    data: str = ""
    """LLaVA-format training data: a JSON list or JSONL of {id, image, conversations}."""
    image_root: str | None = None
    """Folder that record `image` paths are relative to (needed when records have images)."""
    max_length: int = 2048
    """Tokens per example (image slots included); longer records are truncated and counted."""
    group_by_length: bool = True
    """Batch records of similar length together (less padding; the order stays random)."""
    num_workers: int = 2
    """DataLoader worker processes that read and preprocess images."""

    # ---- optimisation
    epochs: int = 1
    """Passes over the data (LLaVA-1.5: 1)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides --epochs for the schedule's length)."""
    batch_size: int = 4
    """Examples per device per forward pass; the global batch is batch_size × grad_accum × GPUs."""
    grad_accum: int = 1
    """Forward passes accumulated into each optimizer step."""
    lr: float = 2e-4
    """Learning rate of the LLM's trainable weights (LoRA or full), or of the projector in align."""
    projector_lr: float | None = None
    """Learning rate of the projector in instruct/full (LLaVA-1.5 LoRA: 2e-5); none = --lr."""
    weight_decay: float = 0.0
    """AdamW weight decay on every trainable weight (LLaVA-1.5: 0)."""
    lr_scheduler: str = "cosine"
    """After warmup: cosine or linear decay to 0, or constant."""
    warmup_ratio: float = 0.03
    """Fraction of the optimizer steps spent warming the learning rate up linearly from 0."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this; 0 disables clipping."""
    optimizer: str = "auto"
    """auto = paged_adamw_8bit on GPU, adamw (torch) on CPU."""
    gradient_checkpointing: bool = True
    """Recompute the LLM's activations in the backward pass: much less memory, ~30% slower."""
    precision: str = "auto"
    """Autocast dtype: auto = bf16 on GPU, fp32 on CPU."""
    cpu: bool = False
    """Train on the CPU even when a GPU is visible."""
    seed: int = 0
    """Seeds the data order, new weights (LoRA, a new projector) and dropout."""

    # ---- output
    output_dir: str = ""
    """Where the trained mmchat checkpoint, training checkpoints and logs go."""
    save_every: int = 500
    """Write a resumable checkpoint every N optimizer steps (0: only the final model)."""
    keep_checkpoints: int = 2
    """How many of the newest resumable checkpoints to keep."""
    resume: bool = False
    """Continue from the newest checkpoint in --output-dir."""
    stop_after: int | None = None
    """End this run after N optimizer steps with a checkpoint, keeping the schedule of the whole
    run (e.g. to fit a job's time limit); --resume continues it."""
    overwrite: bool = False
    """Start afresh in a non-empty --output-dir, deleting its checkpoints."""
    log_every: int = 1
    """Print a log line every N optimizer steps (the JSONL log gets every step)."""
    progress: bool | None = None
    """Progress bar; none = only on a terminal."""
    tensorboard: bool = True
    """Also log to TensorBoard (in OUTPUT_DIR/tensorboard) when it is installed."""

    def __post_init__(self) -> None:
        _check_choice("stage", self.stage, STAGES)
        _check_choice("load_in", self.load_in, LOAD_IN)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("projector_type", self.projector_type, PROJECTOR_TYPES)
        _check_choice("vision_select_feature", self.vision_select_feature, SELECT_FEATURES)
        self._check_layers()
        if self.model and self.llm:
            raise ConfigError("Can't provide both --model and --llm. Choose one: --model starts from an mmchat "
                              "checkpoint, --llm from parts (with --vision and optionally --projector).")
        if self.model and (self.vision_select_layer != ["-2"] or self.vision_select_feature != "patch"):
            raise ConfigError("Can't provide both --model and --vision-select-layer / --vision-select-feature: a "
                              "checkpoint keeps its own tower settings. Choose one (the flags apply with --llm).")
        if self.model and (self.projector_type != "mlp2x_gelu" or self.resampler_queries != 64):
            raise ConfigError("Can't provide both --model and --projector-type / --resampler-queries: a checkpoint keeps "
                              "its own projector. Choose one (the flags apply with --llm).")
        if self.resampler_queries != 64 and self.projector_type != "resampler":
            raise ConfigError(f"--resampler-queries {self.resampler_queries} needs --projector-type resampler "
                              f"(now {self.projector_type})")
        if not self.model and not self.llm:
            raise ConfigError("Nothing to train: give --model (an mmchat checkpoint) or --llm (a Hugging Face "
                              "model id or folder, with --vision and optionally --projector).")
        if not self.data:
            raise ConfigError("--data is required: a LLaVA-format JSON or JSONL file")
        if not self.output_dir:
            raise ConfigError("--output-dir is required: the folder the trained checkpoint is written to")
        if self.model and Path(self.model).resolve() == Path(self.output_dir).resolve():
            raise ConfigError(f"--output-dir {self.output_dir} is the --model checkpoint; write the trained model "
                              "to another folder")
        if self.resume and self.overwrite:
            raise ConfigError("Can't provide both --resume and --overwrite. Choose one.")
        if self.template is not None:
            from mmchat.templates import check_template_name

            check_template_name(self.template)
        if self.stage == "full" and self.load_in in ("4bit", "8bit"):
            raise ConfigError(f"--stage full trains every LLM weight, which --load-in {self.load_in} cannot hold; "
                              "use --load-in 32bit (or 16bit), or --stage instruct for LoRA on a quantised LLM")
        self._check_numbers()
        if not self.lora_targets or (ALL_LINEAR in self.lora_targets and len(self.lora_targets) > 1):
            raise ConfigError(f"--lora-targets: give module names (e.g. q_proj v_proj) or {ALL_LINEAR} alone, "
                              f"got {self.lora_targets}")

    def _check_layers(self) -> None:
        try:  # a list of ints, kept as text like every list option (YAML and flags give either)
            layers = [int(v) for v in self.vision_select_layer]
        except (TypeError, ValueError):
            raise ConfigError(f"--vision-select-layer: give layer numbers (e.g. -2, or -2 -1), got "
                              f"{' '.join(map(str, self.vision_select_layer))}") from None
        if not layers or 0 in layers:
            raise ConfigError(f"--vision-select-layer {' '.join(map(str, layers))}: give block outputs (-1 = the last "
                              "block, 1 = the first), not 0 (the embeddings)")
        self.vision_select_layer = [str(v) for v in layers]

    @property
    def vision_layers(self) -> int | list[int]:
        """--vision-select-layer as VisionConfig takes it: one int, or a list when several."""
        layers = [int(v) for v in self.vision_select_layer]
        return layers[0] if len(layers) == 1 else layers

    def _check_numbers(self) -> None:
        for name in ("max_length", "epochs", "batch_size", "grad_accum", "lora_r", "lora_alpha", "keep_checkpoints",
                     "log_every", "resampler_queries"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("num_workers", "save_every", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("max_steps", "stop_after"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "projector_lr"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise ConfigError(f"{flag(name)} must be in (0, 1), got {value}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")

    @property
    def llm_load_in(self) -> str:
        if self.load_in != "auto":
            return self.load_in
        return "32bit" if self.stage == "full" else "4bit"

    @property
    def template_name(self) -> str:
        return self.template or ("plain" if self.stage == "align" else "llava_v1")

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> None:
        header = "# The resolved options of this run (python -m finetune.qlora --config THIS_FILE)\n"
        Path(path).write_text(header + yaml.safe_dump(self.to_dict(), sort_keys=False))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{flag(name)} {value!r}: choose one of {', '.join(choices)}")


# ---------------------------------------------------------------- YAML and flags


def field_docs() -> dict[str, str]:
    """Each field's docstring (the string literal under it), whitespace-collapsed."""
    body = ast.parse(textwrap.dedent(inspect.getsource(TrainConfig))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _field_types() -> dict[str, tuple[type, bool]]:
    """name -> (base type, optional?) from the annotations (`int | None` -> (int, True))."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for f in fields(TrainConfig):
        hint = hints[f.name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else ()
        base = next(a for a in args if a is not type(None)) if args else hint
        out[f.name] = (typing.get_origin(base) or base, type(None) in args)
    return out


def _close(name: str, known: list[str]) -> str:
    matches = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(matches)}?" if matches else ""


def coerce(name: str, value, where: str, kinds: dict[str, tuple[type, bool]]):
    """A YAML value as the field's type (`kinds`: from `_field_types`); errors name the key and file."""
    base, optional = kinds[name]
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: {name} can't be empty")
    try:
        if base is bool:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if base is list:
            return [str(v) for v in value] if isinstance(value, list) else [str(value)]
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)  # PyYAML reads `1e-3` (no dot) as a string
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {name}: expected {base.__name__}, got {value!r}") from None


def load_yaml(path: str | Path) -> dict:
    """The options in a YAML file, checked against TrainConfig's fields and coerced to their types."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold `key: value` lines")
    kinds = _field_types()
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in kinds:
            raise ConfigError(f"{path}: unknown key {key!r}{_close(name, list(kinds))}")
        out[name] = coerce(name, value, str(path), kinds)
    return out


def _optional(convert):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else convert(text)

    parse.__name__ = convert.__name__
    return parse


def build_parser(defaults: dict) -> argparse.ArgumentParser:
    """An argparse parser with one flag per TrainConfig field, `defaults` shown in --help."""
    parser = argparse.ArgumentParser(
        prog="python -m finetune.qlora", allow_abbrev=False,
        description="Stage 1 projector alignment and stage 2 (Q)LoRA instruction tuning of an mmchat model. "
                    "Every option is a YAML key of --config and a flag; flags win. Optional values take `none`.")
    parser.add_argument("--config", help="a YAML file of options (finetune/configs/*.yaml)")
    choices = {"stage": STAGES, "load_in": LOAD_IN, "optimizer": OPTIMIZERS, "lr_scheduler": SCHEDULERS,
               "precision": PRECISIONS, "projector_type": PROJECTOR_TYPES, "vision_select_feature": SELECT_FEATURES}
    docs = field_docs()
    for name, (base, optional) in _field_types().items():
        kwargs: dict = {"dest": name, "default": defaults[name], "help": docs.get(name, "") + " (default: %(default)s)"}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif base is list:
            kwargs.update(nargs="+", metavar="LAYER" if name == "vision_select_layer" else "NAME")
        else:
            kwargs["type"] = _optional(base) if optional else base
            kwargs["choices"] = choices.get(name)
        parser.add_argument(flag(name), **kwargs)
    return parser


def defaults() -> dict:
    out = {}
    for f in fields(TrainConfig):
        out[f.name] = f.default_factory() if f.default is MISSING else f.default
    return out


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags (and the YAML file named by --config) -> a validated TrainConfig."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    values = {**defaults(), **(load_yaml(known.config) if known.config else {})}
    parser = build_parser(values)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        options = ["--config"] + [flag(f.name) for f in fields(TrainConfig)]
        bad = next((u for u in unknown if u.startswith("-")), unknown[0])
        raise ConfigError(f"unknown flag {bad!r}{_close(bad.split('=')[0], options)} (see --help)")
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
