"""`immunize bench`: run defenses through the attack grid and report the four immunization conditions.

One purpose per module:
  schema    the bench config (dataclasses parsed by jsonargparse)
  registry  named defenses (alignment stage and fine-tuning stage)
  stages    loading and merging stage configs (YAML files plus inline overrides)
  validate  checks that run before any training (one-line errors)
  cells     a cell = one stage with one config, in a directory keyed by its config hash
  planner   the bench config -> the ordered list of cells
  runner    runs cells as `python -m immunize fit|test` subprocesses, resumably
  progress  progress lines and the ETA
  recorder  the Lightning callback each fit cell runs with (steps, progress lines)
  results   finished eval cells -> results.json
  rows      what every table reads: Table, number formatting with intervals, row lookup, the attack window
  report    results -> tables (pure functions) -> report.md
  no_win    the no-win check: every defense under every attack protocol (the ingredient table)
  plots     results -> PNG figures
  wandb_log tables and figures to Weights & Biases (offline by default)
  command   `immunize bench --config FILE --out DIR`
  calibration, search, launchers, recorder: a swept family's selection, the attacker's Optuna search, Slurm/Ray

May import: anything of immunize (the bench is the top layer, L5); nothing below imports the bench.
"""
