"""`immunize fit|validate|test|predict` through LightningCLI, plus export and stage caching.

Bad input ends with one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Optional

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from immunize.errors import fail, find_user_error, summarize_parser_error
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
        if cfg.get("export_dir") and self.trainer.is_global_zero:
            if self.trainer.interrupted:
                print("immunize: fit was interrupted; not exporting", file=sys.stderr)
                return
            self.model.export(cfg.export_dir)
            mark_done(cfg.export_dir, self._digest, self._stage_config())
            print(f"immunize: exported model to {cfg.export_dir}")


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
