"""Instruction data: build LLaVA-format records from captioning / VQA datasets (`sources`, with the
wordings in `instructions`), check them (`check`), read and write them (`io`), and load them for
training (`dataset`). The command line is `python -m finetune.data {build,check}` (`cli`)."""
