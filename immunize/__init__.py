"""immunize: Lightning modules that make LLMs resist harmful fine-tuning, and measure how well they resist.

The package holds the CLI (main, cli: `immunize fit|validate|test|predict|bench|judges|import-gguf`), the bench
(bench/), the judges (judges/), metrics and statistics, and the plumbing under them (errors, io, outputs,
fingerprint, stage_cache, strategies, gguf_import). Its sub-packages lightning_modules, datamodules and callbacks live
in the repository's top-level folders of those names (pyproject's package-dir).

May import: each module only what lies below it in the layers of tests/test_layers.py (errors and io at the bottom,
the CLI and the bench at the top).
"""
