"""The model plumbing every method shares: loading a causal LM and its tokenizer (hub id, local folder, GGUF, toy
preset), LoRA through peft, FSDP2 sharding, hidden-state hooks, optimizer and schedule.

May import: torch, transformers, peft, immunize.errors, immunize.datamodules (the toy tokenizer) and each other;
nothing else of immunize.lightning_modules (functional/, evaluation/ and the methods build on it).
"""
