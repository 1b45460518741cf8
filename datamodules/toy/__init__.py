"""The toy world: a deterministic synthetic world generated from a seed, the project's measuring instrument.

lexicon (categories, tasks, the closed vocabulary), world (pools and disjoint splits: pretrain, align, attack,
finetune, eval; over-refusal look-alikes), tokenizer (the word-level tokenizer with a chat template), oracle (the
judge that needs the prompt's own knowledge), multiple_choice (the toy eval as an lm-eval multiple-choice task).

May import: tokenizers, transformers, immunize.errors and each other (layer L1, inside immunize.datamodules).
"""
