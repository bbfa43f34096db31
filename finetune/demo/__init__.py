"""Everything that only builds the embedded demo model (`python -m finetune.demo`): the world of
drawn shapes (`world`), its captions and questions (`texts`), data sets of it (`sets`), a
tokenizer (`tokenizer`), pretraining of the tiny CLIP and LLaMA (`pretrain`, `pretrain_clip`,
`pretrain_lm`, `lookups`), the build itself (`build`, with `configs/`) and its model card (`card`).
Stages 1 and 2 go through the general kit (`finetune.qlora`), as a user's model does."""
