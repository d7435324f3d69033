"""The token layout, in one place: the pretraining document (`documents`), the instruction
templates of supervised fine-tuning (`templates`, paper Table 5) and the inference prompts
of every task (`prompts`), all in the unified vocabulary's ids (`cm3leon.tokenizers.vocab`).
The sequence streams that pack documents for training are `cm3leon.objectives.sequences`."""
