"""The math of the methods, written once as plain functions on tensors and parameter lists (no Lightning): masked and
logit-lens cross-entropies, flat gradient buffers and global norms under DDP and FSDP2, the Hessian-free estimate,
MMD, perturbation primitives, and the per-rank weights that make rank means add up to global-batch means.

May import: torch, immunize.errors, immunize.lightning_modules.modeling (sharding and hidden-state hooks) and each
other; not evaluation/ or the methods.
"""
