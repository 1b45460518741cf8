"""What `immunize test` measures on a model besides the judges: batched greedy generation, capability through
lm-evaluation-harness and our own log-likelihood multiple choice, and mechanism diagnostics (gradient cosine).

May import: torch, transformers, immunize.errors, immunize.datamodules, immunize.lightning_modules.functional and
.modeling; not the methods or their bases.
"""
