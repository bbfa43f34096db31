"""An analytic model of stage-2 QLoRA peak memory, and its least-squares fit to measured peaks.

Peak = what stays loaded + the largest of three moments of a training step + a constant:

- static: NF4 weights with double-quantised constants (0.5 + 0.127/8 bytes per parameter),
  the unquantised embeddings / lm_head / norms, the frozen vision tower, the trainable LoRA and
  projector weights (float32: peft upcasts adapters) and their AdamW states;
- end of forward: stored activations (with gradient checkpointing each layer's input, without
  every layer's activations) + the logits at answer positions (mmchat computes no others;
  `finetune/objective.py`);
- recompute (gradient checkpointing): each layer's input + one layer's forward rerun in backward;
- in those two, what the projector keeps for its backward, on every tile of the image (AnyRes runs
  1 + rows × cols): counted, not fitted; the frozen tower runs without gradients and keeps nothing;
- end of backward and optimizer step: the trainable weights' float32 gradients;
- in the last two, bitsandbytes' unpacked copy of the weight being multiplied (an MLP matrix in
  the compute dtype; it exists only during that matmul, and counts as activations below);
- a constant: the runtime's workspace (fitted on CPU) or the CUDA context (assumed on GPU).

Byte counts of activations are (values per token per hidden unit) × (bytes per value): the values
are fitted, the bytes depend on the dtype the device trains in (`Precision`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

NF4_BYTES = 0.5 + 0.127 / 8
"""Bytes per NF4 weight: 4-bit codes + an 8-bit absmax per 64 weights + a float32 per 256 of those."""
GIB = 2**30


@dataclass(frozen=True)
class LlmShape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_hidden: int | None = None
    """Width of k and v (grouped-query attention); None: as hidden (LLaMA-1/2 7B and 13B)."""

    @property
    def kv(self) -> int:
        return self.kv_hidden or self.hidden

    def linear_params(self) -> int:
        """Weights of the quantised linear layers (every one but lm_head)."""
        h, i = self.hidden, self.intermediate
        return self.layers * (2 * h * h + 2 * h * self.kv + 3 * h * i)

    def other_params(self) -> int:
        """Unquantised weights: embeddings, lm_head, RMSNorms."""
        return 2 * self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden

    def lora_params(self, r: int) -> int:
        """LoRA A and B on every linear layer but lm_head (q, k, v, o, gate, up, down)."""
        h, i = self.hidden, self.intermediate
        return self.layers * r * (2 * (h + h) + 2 * (h + self.kv) + 3 * (h + i))


LLAMA = {
    "7b": LlmShape("LLaMA-7B", 32, 4096, 11008, 32000),
    "13b": LlmShape("LLaMA-13B", 40, 5120, 13824, 32000),
}


@dataclass(frozen=True)
class VisionShape:
    name: str
    params: int
    width: int
    tokens: int
    """Image tokens per tile (the projector's output per tower pass)."""
    queries: int | None = None
    """A `resampler` projector's learned queries; None: mlp2x_gelu."""

    def projector_params(self, hidden: int) -> int:
        """mlp2x_gelu: Linear(width → hidden), GELU, Linear(hidden → hidden); none without a tower.
        resampler: the queries, Linear(width → hidden, no bias), three LayerNorms, multi-head attention
        (in_proj 3 hidden², out_proj hidden², with biases), Linear(hidden → hidden)."""
        if not self.width:
            return 0
        if self.queries is not None:
            return self.queries * hidden + self.width * hidden + 3 * 2 * hidden + 4 * hidden * (hidden + 1) + hidden * (hidden + 1)
        return self.width * hidden + hidden + hidden * hidden + hidden


CLIP_L_336 = VisionShape("CLIP ViT-L/14-336", 304_000_000, 1024, 576)
NO_VISION = VisionShape("none (text only)", 0, 0, 0)


@dataclass(frozen=True)
class Precision:
    """How a device holds each kind of tensor during training."""

    name: str
    weight_bytes: float
    """Unquantised LLM weights and the residual stream (float32 on CPU, bf16 on GPU)."""
    act_bytes: float
    """Bytes per stored activation value: 4 in float32; under bf16 autocast, 4 × the measured ratio."""
    optimizer_bytes: float
    """AdamW state per trainable weight: 8 (torch, float32) or 2 (bitsandbytes 8-bit)."""
    constant: float
    """Bytes outside the model (GPU: CUDA context and workspaces; CPU: fitted)."""


CPU = Precision("CPU float32", 4, 4, 8, 0.0)
CUDA_CONTEXT = 0.75 * GIB
"""CUDA context + cuBLAS workspace: 0.5-1 GB depending on driver and GPU; not measured here."""


def cuda_precision(bf16_ratio: float) -> Precision:
    """bf16 autocast, paged 8-bit AdamW (the shipped GPU config)."""
    return Precision("GPU bf16 autocast", 2, 4 * bf16_ratio, 2.0, CUDA_CONTEXT)


@dataclass(frozen=True)
class Workload:
    seq_len: int
    batch: int = 1
    gradient_checkpointing: bool = True
    lora_r: int = 128
    answer_fraction: float = 0.5
    """Share of positions whose next token is an answer token (only those get logits)."""
    vision_bytes: int = 4
    """The frozen tower: mmchat keeps it float32 (4); 2 if cast to bf16."""
    image_bytes_per_sequence: float = 0.0
    """What the projector keeps for its backward for one sequence's image (all its tiles): counted, not
    fitted (`benchmarks.memory.projector_saved_bytes`). The tower runs without gradients and keeps nothing."""
    image_bytes_per_step: float = 0.0
    """The same, once a step: the bf16 copies of projector weights its backward multiplies by."""

    @property
    def tokens(self) -> int:
        return self.seq_len * self.batch


@dataclass
class Coefficients:
    act_recompute: float = 20.0
    """Values per token per hidden unit alive while one checkpointed layer is recomputed."""
    act_layer: float = 40.0
    """Values per token per hidden unit kept by each layer without gradient checkpointing."""
    logit_bytes: float = 12.0
    """Bytes per (answer position × vocab entry): logits, their softmax and gradients."""
    grad_factor: float = 1.0
    """Bytes alive at the end of backward / in the optimizer step, per byte of gradients."""
    workspace: float = 0.0
    """Bytes of runtime workspace on the measuring device (fitted on CPU; GPU uses its context)."""


COEFFICIENTS = ("act_recompute", "act_layer", "logit_bytes", "grad_factor", "workspace")


def static_parts(llm: LlmShape, vision: VisionShape, work: Workload, prec: Precision) -> dict[str, float]:
    trainable = llm.lora_params(work.lora_r) + vision.projector_params(llm.hidden)
    return {
        "NF4 weights": llm.linear_params() * NF4_BYTES,
        "embeddings, lm_head, norms": llm.other_params() * prec.weight_bytes,
        "vision tower": vision.params * work.vision_bytes,
        "LoRA + projector": trainable * 4.0,
        "optimizer states": trainable * prec.optimizer_bytes,
    }


def moments(llm: LlmShape, work: Workload, prec: Precision, trainable: float) -> dict[str, tuple[np.ndarray, float]]:
    """The moments a step can peak at, each as (features, known bytes): bytes = features · COEFFICIENTS + known.

    - logits: the end of the forward pass; stored activations + the answer positions' logits;
    - recompute: with gradient checkpointing, one layer's forward rerun inside the backward pass;
    - gradients: the end of the backward pass and the optimizer step (float32 gradients).
    Backward matmuls unpack one NF4 weight at a time (known bytes of the last two).
    """
    th = work.tokens * llm.hidden * prec.act_bytes
    logit_elems = work.answer_fraction * work.tokens * llm.vocab
    checkpoints = llm.layers * work.tokens * llm.hidden * prec.weight_bytes  # each layer's input
    # the projector's saved tensors live until the backward pass reaches it, after every LLM layer
    image = work.batch * work.image_bytes_per_sequence + work.image_bytes_per_step
    dequantised = llm.hidden * llm.intermediate * prec.weight_bytes  # an MLP weight, unpacked for a matmul
    out = {"gradients": (np.array([0.0, 0.0, 0.0, trainable * 4.0, 1.0]), dequantised)}
    if work.gradient_checkpointing:
        out["logits"] = (np.array([0.0, 0.0, logit_elems, 0.0, 1.0]), checkpoints + image)
        out["recompute"] = (np.array([th, 0.0, 0.0, 0.0, 1.0]), checkpoints + dequantised + image)
    else:
        out["logits"] = (np.array([0.0, llm.layers * th, logit_elems, 0.0, 1.0]), image)
    return out


def _vector(coef: Coefficients) -> np.ndarray:
    return np.array([getattr(coef, name) for name in COEFFICIENTS])


def moment_bytes(llm: LlmShape, work: Workload, prec: Precision, coef: Coefficients,
                 trainable: float) -> dict[str, float]:
    """Bytes a step holds at each moment, over what is loaded (the workspace included)."""
    v = _vector(coef)
    return {name: float(f @ v + known) for name, (f, known) in moments(llm, work, prec, trainable).items()}


def peak_moment(llm: LlmShape, work: Workload, prec: Precision, coef: Coefficients, trainable: float) -> str:
    values = moment_bytes(llm, work, prec, coef, trainable)
    return max(values, key=values.get)


def breakdown(llm: LlmShape, vision: VisionShape, work: Workload, prec: Precision,
              coef: Coefficients) -> dict[str, float]:
    """Bytes per part at the peak: what is loaded + the step's largest moment + the constant."""
    static = static_parts(llm, vision, work, prec)
    trainable = static["LoRA + projector"] / 4.0
    moment = peak_moment(llm, work, prec, coef, trainable)
    features, known = moments(llm, work, prec, trainable)[moment]
    terms = features[:4] * _vector(coef)[:4]
    step = {"activations": known + terms[0] + terms[1], "logits": terms[2], "gradients": terms[3]}
    constant = {"CUDA context": prec.constant} if prec.constant else {"workspace": coef.workspace}
    return {**static, **step, **constant}


def peak_bytes(llm: LlmShape, vision: VisionShape, work: Workload, prec: Precision, coef: Coefficients) -> float:
    return sum(breakdown(llm, vision, work, prec, coef).values())


# ---------------------------------------------------------------- fitting to measured steps


@dataclass
class Measurement:
    """One measured training step: the memory its step added over what was loaded."""

    llm: LlmShape
    work: Workload
    trainable: int
    step_bytes: float
    """Peak during the step minus the memory just before it (weights, optimizer states loaded)."""


def predicted_step(m: Measurement, prec: Precision, coef: Coefficients) -> float:
    return max(moment_bytes(m.llm, m.work, prec, coef, m.trainable).values())


def fit(measurements: list[Measurement], prec: Precision = CPU, iterations: int = 20) -> Coefficients:
    """Least squares on relative error, each step explained by the moment the current fit says it
    peaks at, repeated until that assignment settles. Coefficients no step informs keep their
    defaults; all stay >= 0 (a negative one is dropped and the rest refitted)."""
    coef = Coefficients()
    for _ in range(iterations):
        rows, targets = [], []
        for m in measurements:
            features, known = moments(m.llm, m.work, prec, m.trainable)[peak_moment(m.llm, m.work, prec, coef,
                                                                                    m.trainable)]
            rows.append(features / m.step_bytes)
            targets.append((m.step_bytes - known) / m.step_bytes)
        a = np.array(rows)
        used = np.abs(a).sum(0) > 0
        solution = _vector(coef).copy()
        solution[used] = _nonnegative_lstsq(a[:, used], np.array(targets))
        new = Coefficients(*map(float, solution))
        if new == coef:
            break
        coef = new
    return coef


def _nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    active = list(range(a.shape[1]))
    while True:
        x = np.zeros(a.shape[1])
        x[active] = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
        if (x[active] >= 0).all() or len(active) == 1:
            return np.maximum(x, 0.0)
        active.remove(active[int(np.argmin(x[active]))])


def relative_errors(measurements: list[Measurement], prec: Precision, coef: Coefficients) -> np.ndarray:
    return np.array([predicted_step(m, prec, coef) / m.step_bytes - 1 for m in measurements])


def max_batch(llm: LlmShape, vision: VisionShape, work: Workload, prec: Precision, coef: Coefficients,
              capacity: float, batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)) -> int:
    """The largest batch in `batches` whose predicted peak fits `capacity` bytes (0: none)."""
    fitting = [b for b in batches if peak_bytes(llm, vision, replace(work, batch=b), prec, coef) <= capacity]
    return max(fitting, default=0)
