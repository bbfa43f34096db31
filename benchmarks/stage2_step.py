"""One stage-2 QLoRA step on synthetic data, as `finetune.qlora` takes it: `finetune.build` (4-bit NF4 +
LoRA + the projector), `AnswerLoss`, gradient clipping, AdamW. The memory benchmark measures what such
steps add; the image-token benchmark times them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Stage2:
    """A checkpoint loaded for stage 2, with its loss and optimizer."""

    model: object
    loss: object
    optimizer: object
    params: list
    device: str

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")


def load_stage2(checkpoint: str, lora_r: int, device: str) -> Stage2:
    """`checkpoint` ready to train: LoRA r `lora_r` (alpha 2r) on every linear layer, gradient checkpointing
    on; on a GPU bf16 autocast and paged 8-bit AdamW (the shipped config), on a CPU float32 and AdamW."""
    from finetune.build import build_model

    cfg = stage2_config(checkpoint, lora_r, device)
    return with_optimizer(build_model(cfg, device).model, cfg, device)


def stage2_config(checkpoint: str, lora_r: int, device: str):
    """The `TrainConfig` of `load_stage2`."""
    from finetune.train_config import TrainConfig

    on_gpu = device.startswith("cuda")
    return TrainConfig(model=checkpoint, data="unused.json", output_dir="unused", lora_r=lora_r, lora_alpha=2 * lora_r,
                       optimizer="paged_adamw_8bit" if on_gpu else "adamw", cpu=not on_gpu,
                       precision="bf16" if on_gpu else "fp32")


def with_optimizer(model, cfg, device: str) -> Stage2:
    """A trainable `MultimodalModel` (as `finetune.build` leaves it) in train mode, with its loss and `cfg`'s optimizer."""
    import torch

    from finetune.build import set_train_mode, trainable_parameters
    from finetune.objective import AnswerLoss
    from finetune.optim import make_optimizer, param_groups

    set_train_mode(model)
    params = list(trainable_parameters(model).values())
    return Stage2(model, AnswerLoss(model), make_optimizer(param_groups(model, cfg), cfg, torch.device(device)), params,
                  device)


def train_step(st: Stage2, batch: int, seq: int, answers: float, tiles: int = 1,
               picture: tuple[int, int] | None = None) -> None:
    """One optimizer step on `batch` random sequences of `seq` tokens: an image right after BOS (as LLaVA's
    records), then text whose last `answers` share are answer tokens.

    An AnyRes model reads the image as a `picture` of (height, width) pixels would be read: its base
    tile and grid through tower and projector, packed (`MultimodalModel.forward`). Any other model reads
    `tiles` tower-sized squares into `image_tokens` slots each; more than one stands for AnyRes's tiles
    on a model that does not train AnyRes (the packing and the row newlines aside: their positions are text).
    """
    import torch

    from mmchat import anyres
    from mmchat.conversation import IGNORE_INDEX

    model = st.model
    extra = {}
    if model.anyres is not None:
        if picture is None:
            raise ValueError("an AnyRes model reads a picture's tiles: pass picture=(height, width)")
        rows, cols = anyres.grid_shape(picture, model.anyres)
        tiles, slots = 1 + rows * cols, anyres.num_image_tokens(picture, model.anyres)
        extra = {"image_sizes": torch.tensor([picture] * batch), "image_tiles": torch.tensor([tiles] * batch)}
    else:
        slots = tiles * model.image_tokens
    vocab = model.llm.get_output_embeddings().weight.shape[0]
    size = model.config.vision.image_size
    n = max(1, int(answers * seq))
    if seq - n <= 1 + slots:
        raise ValueError(f"a sequence of {seq} tokens has no room for BOS, {slots} image slots and {n} answer tokens")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (batch, seq), generator=g)
    image_mask = torch.zeros(batch, seq, dtype=torch.bool)
    image_mask[:, 1:1 + slots] = True
    labels = torch.full((batch, seq), IGNORE_INDEX)
    labels[:, seq - n:] = ids[:, seq - n:]
    pixels = torch.randn(batch * tiles, 3, size, size, generator=g)
    tensors = [t.to(st.device) for t in (ids, image_mask, torch.ones_like(ids), labels, pixels)]
    with torch.autocast(st.device.split(":")[0], torch.bfloat16, enabled=st.on_gpu):
        loss = st.loss(*tensors, **{k: v.to(st.device) for k, v in extra.items()})
    loss.backward()
    torch.nn.utils.clip_grad_norm_(st.params, 1.0)
    st.optimizer.step()
    st.optimizer.zero_grad(set_to_none=True)
