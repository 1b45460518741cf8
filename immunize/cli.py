"""`immunize fit|validate|test|predict` through LightningCLI, plus export and stage caching.

Bad input ends with one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from immunize.errors import UserError, fail, find_user_error, summarize_parser_error
from immunize.stage_cache import cached, config_hash, mark_done

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
    """LightningCLI with --export_dir (save_pretrained after fit) and config-hash caching of finished fits."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--export_dir", type=Optional[str], default=None, help="export the fitted model here (HF format)")
        parser.add_argument("--skip_if_cached", type=bool, default=True, help="skip fit when export_dir holds this config's result")

    def _stage_config(self) -> dict:
        return self.config[self.subcommand].as_dict() if self.subcommand else self.config.as_dict()

    def instantiate_classes(self) -> None:
        self._cache_hit = False
        if self.subcommand == "fit":
            cfg = self.config["fit"]
            if cfg.get("export_dir"):
                check_writable(cfg.export_dir)
            self._digest = config_hash(self._stage_config())
            if cfg.get("skip_if_cached") and cached(cfg.get("export_dir"), self._digest):
                self._cache_hit = True
                print(f"immunize: {cfg.export_dir} already holds this config's result (hash {self._digest}); skipping fit")
                return
        super().instantiate_classes()

    def _run_subcommand(self, subcommand: str) -> None:
        if self._cache_hit:
            return
        super()._run_subcommand(subcommand)

    def after_fit(self) -> None:
        cfg = self.config["fit"]
        if cfg.get("export_dir") and not self.trainer.interrupted:
            self.model.prepare_export()  # a collective under FSDP: the full weights are gathered to rank 0
        if cfg.get("export_dir") and self.trainer.is_global_zero:
            if self.trainer.interrupted:
                print("immunize: fit was interrupted; not exporting", file=sys.stderr)
                return
            export_or_keep(self.model, cfg.export_dir, Path(self.trainer.default_root_dir))
            mark_done(cfg.export_dir, self._digest, self._stage_config())
            print(f"immunize: exported model to {cfg.export_dir}")


def check_writable(export_dir: str) -> None:
    """Before any training: the export directory (or the nearest existing folder above it) must be writable."""
    path = Path(export_dir).resolve()
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise UserError(f"export_dir {export_dir!r} cannot be written ({probe} is not a writable folder); choose another "
                        "--export_dir before training")


def export_or_keep(module, export_dir: str, root: Path) -> None:
    """Export; if that fails after training (unwritable path, full disk), save the trained model elsewhere and say where,
    in one line, so the run is not lost."""
    try:
        module.export(export_dir)
        return
    except OSError as err:
        first = f"{type(err).__name__}: {err.strerror or err}"
    for fallback in (root / "export_fallback", Path(tempfile.gettempdir()) / f"immunize-export-{os.getpid()}"):
        try:
            module.export(fallback)
        except OSError as err:
            last = f"{fallback} ({err.strerror or err})"
            continue
        raise UserError(f"could not write the export to {export_dir!r} ({first}); the trained model was saved to "
                        f"{fallback} instead: move it there, or export again from it")
    raise UserError(f"could not write the export to {export_dir!r} ({first}) nor to the fallback {last}; free disk space "
                    "and rerun (the fit's checkpoints, if enabled, are under the trainer's default_root_dir)")


def main(args: Optional[list[str]] = None) -> None:
    """`immunize fit|validate|test|predict ...` (LightningCLI); bad input ends with one line and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*Total length of .* across ranks is zero.*")
    try:
        ImmunizeCLI(
            args=args,
            seed_everything_default=0,
            trainer_defaults={"logger": DEFAULT_LOGGER},
            save_config_callback=LogConfig,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
        )
    except Exception as err:
        user_error = find_user_error(err)
        if user_error is not None:
            fail(str(user_error))
        if type(err).__name__ == "ArgumentError":  # jsonargparse: unknown key, bad type, missing value
            fail(summarize_parser_error(str(err)))
        raise


if __name__ == "__main__":
    main()
