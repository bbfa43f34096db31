"""mmchat: LLaVA-1.5-exact multimodal chat and QLoRA fine-tuning on one consumer GPU."""
