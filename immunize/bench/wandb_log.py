"""The report's tables and figures to Weights & Biases (offline by default: `wandb sync DIR/wandb/...` later)."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def log_report(spec, out_dir: Path, config: dict, tables, images: dict[str, list[str]]) -> str:
    """One W&B run holding every table (wandb.Table) and figure (wandb.Image); returns its directory.

    Failures are reported as one warning line and do not fail the bench (the files on disk are complete).
    """
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb

        run = wandb.init(project=spec.project, name=spec.name, mode=spec.mode, dir=str(out_dir), config=config,
                         job_type="bench", settings=wandb.Settings(console="off"))
        payload = {f"tables/{t.key}": wandb.Table(columns=t.columns, data=[[str(c) for c in row] for row in t.rows])
                   for t in tables}
        for names in images.values():
            for name in names:
                payload[f"plots/{Path(name).stem}"] = wandb.Image(str(Path(out_dir) / name))
        run.log(payload)
        run_dir = getattr(run, "dir", "")
        run.finish()
        return str(Path(run_dir).parent) if run_dir else ""
    except Exception as err:  # noqa: BLE001 - W&B is a side channel; the report files are the record
        print(f"immunize bench: warning: W&B logging failed ({type(err).__name__}: {err}); report files are unaffected",
              file=sys.stderr)
        return ""
