"""Shared test fixtures: alignment-stage fits on toy triplets, fine-tuning-stage fits on a toy harmful mix, and
callbacks that DDP subprocesses load by class path (tests.helpers.ranks)."""
