"""`immunize fit|validate|test|predict` through LightningCLI, plus export and stage caching.

Bad input ends with one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from immunize.errors import UserError, errors_only_on_stderr, fail, find_user_error, summarize_parser_error
from immunize.outputs import check_output_dir
from immunize.stage_cache import cached, config_hash, mark_done

CLI_DESCRIPTION = ("immunize fit|validate|test|predict: one stage of the pipeline through LightningCLI: a model "
                   "(--model: a method of immunize.lightning_modules), its data (--data: immunize.datamodules) and "
                   "the trainer (--trainer, with callbacks such as immunize.callbacks.Panacea). `immunize --help` "
                   "lists every command.")
DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.WandbLogger",
    "init_args": {"project": "immunize", "offline": True, "save_dir": "runs"},
}


class LogConfig(SaveConfigCallback):
    """Also send the full resolved config to the loggers (W&B shows it as the run config)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = self.config.as_dict()
        config.pop("config", None)
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})


class ImmunizeCLI(LightningCLI):
    """LightningCLI with --export_dir (save_pretrained after fit) and content-keyed caching of finished fits."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--export_dir", type=Optional[str], default=None,
                            help="export the fitted model here (HF format): a new or empty folder, or one holding an "
                                 "earlier immunize export, which is replaced once the new export is complete")
        parser.add_argument("--skip_if_cached", type=bool, default=True,
                            help="skip fit when export_dir holds the result of this config and these input files")

    def _stage_config(self) -> dict:
        return self.config[self.subcommand].as_dict() if self.subcommand else self.config.as_dict()

    def instantiate_classes(self) -> None:
        self._cache_hit = False
        if self.subcommand in ("fit", "validate", "test", "predict"):
            check_trainer_counts(self.config[self.subcommand].get("trainer"))
        if self.subcommand == "fit":
            cfg = self.config["fit"]
            if cfg.get("export_dir"):
                check_output_dir(cfg.export_dir, "--export_dir")
            # the cache key reads every input's content (memoised); without skip_if_cached (bench cells, which key
            # themselves) it is not needed, and stage.json then holds no key that a later rerun could match
            self._digest = config_hash(self._stage_config()) if cfg.get("skip_if_cached") and cfg.get("export_dir") \
                else None
            if self._digest is not None and cached(cfg.get("export_dir"), self._digest):
                self._cache_hit = True
                print(f"immunize: {cfg.export_dir} already holds this config's result for these inputs "
                      f"(hash {self._digest}); skipping fit")
                return
        super().instantiate_classes()

    def _run_subcommand(self, subcommand: str) -> None:
        if self._cache_hit:
            return
        super()._run_subcommand(subcommand)

    def after_fit(self) -> None:
        cfg = self.config["fit"]
        if not self.trainer.interrupted and self.trainer.global_step == 0 and \
                getattr(self.model, "needs_optimizer_steps", True):
            raise UserError("fit ended without a single optimizer step (an empty training set, limit_train_batches 0 "
                            "or max_steps 0), so nothing was trained and nothing is exported; check the data and "
                            "the trainer's limits")
        if cfg.get("export_dir") and not self.trainer.interrupted:
            self.model.prepare_export()  # a collective under FSDP: the full weights are gathered to rank 0
        if cfg.get("export_dir") and self.trainer.is_global_zero:
            if self.trainer.interrupted:
                print("immunize: fit was interrupted; not exporting", file=sys.stderr)
                return
            export_or_keep(self.model, cfg.export_dir, Path(self.trainer.default_root_dir))
            mark_done(cfg.export_dir, self._digest, self._stage_config())
            print(f"immunize: exported model to {cfg.export_dir}")


def check_trainer_counts(trainer) -> None:
    """Step and epoch limits that would train nothing (or mean nothing) fail before any work: max_steps > 0 or -1
    (no limit), max_epochs >= 1 or -1 / null."""
    if trainer is None:
        return
    steps, epochs = trainer.get("max_steps"), trainer.get("max_epochs")
    if steps is not None and steps != -1 and steps < 1:
        raise UserError(f"trainer.max_steps must be > 0, or -1 for no step limit, got {steps}; set --trainer.max_steps")
    if epochs is not None and epochs != -1 and epochs < 1:
        raise UserError(f"trainer.max_epochs must be >= 1, or -1 for no epoch limit, got {epochs}; set "
                        "--trainer.max_epochs")


FALLBACK_PREFIX = "export_fallback"


def export_or_keep(module, export_dir: str, root: Path) -> None:
    """Export; if that fails after training (unwritable path, full disk, anything else), save the trained model to
    a new folder of its own and say where, in one line, so the run is not lost. The fallback folder's name starts
    with FALLBACK_PREFIX; the bench moves such folders out of a cell before it reruns the cell."""
    try:
        module.export(export_dir)
        return
    except Exception as err:  # noqa: BLE001 - whatever went wrong, the trained weights must survive
        first = f"{type(err).__name__}: {getattr(err, 'strerror', None) or err}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    last = ""
    for base in (root, Path(tempfile.gettempdir())):
        fallback = base / f"{FALLBACK_PREFIX}-{stamp}-{os.getpid()}"
        try:
            module.export(fallback)
        except Exception as err:  # noqa: BLE001
            last = f"{fallback} ({getattr(err, 'strerror', None) or err})"
            continue
        raise UserError(f"could not write the export to {export_dir!r} ({first}); the trained model was saved to "
                        f"{fallback} instead: move it there, or export again from it")
    raise UserError(f"could not write the export to {export_dir!r} ({first}) nor to the fallback {last}; free disk space "
                    "and rerun (the fit's checkpoints, if enabled, are under the trainer's default_root_dir)")


def main(args: Optional[list[str]] = None) -> None:
    """`immunize fit|validate|test|predict ...` (LightningCLI); bad input ends with one line and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*Total length of .* across ranks is zero.*")
    argv = sys.argv[1:] if args is None else list(args)
    saved_argv = sys.argv
    sys.argv = [saved_argv[0] if saved_argv else "immunize", *argv]  # LightningCLI reads them here (no warning)
    message = None
    try:
        with errors_only_on_stderr():
            try:
                ImmunizeCLI(
                    args=None,
                    seed_everything_default=0,
                    trainer_defaults={"logger": DEFAULT_LOGGER},
                    save_config_callback=LogConfig,
                    save_config_kwargs={"overwrite": True},
                    parser_kwargs={"exit_on_error": False, "description": CLI_DESCRIPTION, "prog": "immunize"},
                )
            except Exception as err:
                user_error = find_user_error(err)
                if user_error is not None:
                    message = str(user_error)
                elif type(err).__name__ == "ArgumentError":  # jsonargparse: unknown key, bad type, missing value
                    message = summarize_parser_error(str(err))
                else:
                    raise
    finally:
        sys.argv = saved_argv
    if message is not None:
        fail(message)


if __name__ == "__main__":
    main()
