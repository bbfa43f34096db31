"""`python -m finetune.qlora`: stage 1 projector alignment and stage 2 (Q)LoRA instruction tuning.

    python -m finetune.qlora --config finetune/configs/llava-1.5-7b-instruct.yaml --data mix.json \\
        --image-root /data/images --output-dir runs/instruct
    accelerate launch -m finetune.qlora --config ...      # several GPUs (DDP, a 4-bit copy per GPU)
    python -m finetune.qlora --help                       # every option, with its default

Every option is a key of the YAML file given by --config and a flag; flags win.
"""
from __future__ import annotations

import sys

from finetune.train import OutOfMemory, train
from finetune.train_config import parse_args


def main(argv: list[str] | None = None) -> int:
    try:
        train(parse_args(argv))
    except (ValueError, OSError, OutOfMemory) as e:  # ConfigError, DataError: the user's input
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
